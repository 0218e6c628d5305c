"""Every chart with its downloads: PNG and SVG rendered server-side (vl-convert, no browser),
and the chart's data as CSV.

Pages draw charts with :func:`show_chart` instead of ``st.altair_chart``; the
files are produced only when a download button is clicked (Streamlit calls
the callables then). A page hands each chart its ``context`` (run, example,
stream, layer, head, token, statistic: what the chart shows), which the PNG and
SVG carry as their title, so a picture says what it is once it leaves the app;
the chart on screen keeps its own (the page around it says the same).
"""

from __future__ import annotations

import re

import altair as alt
import pandas as pd
import streamlit as st


TITLE_WIDTH = 90  # characters per line of an exported title; longer contexts wrap at their " · "
TITLE_LINES = 6  # at most; a longer context (a long SQL query) ends with "…"


def title_lines(context: str, width: int = TITLE_WIDTH, max_lines: int = TITLE_LINES) -> list[str]:
    """``context`` as title lines: its ``" · "``-separated parts, packed into lines of about ``width``
    characters (a part longer than a line is cut at word boundaries), at most ``max_lines``."""
    import textwrap

    lines: list[str] = []
    for part in (p.strip() for p in str(context).split(" · ")):
        if not part:
            continue
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.extend(textwrap.wrap(part, width) or [part])
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:width - 1].rstrip() + "…"
    return lines


def with_title(spec: dict, context: str | None) -> dict:
    """The spec with ``context`` as its top-level title (a title it had becomes the subtitle)."""
    lines = title_lines(context) if context else []
    if not lines:
        return spec
    s = dict(spec)
    title = {"text": lines, "anchor": "start", "fontSize": 13, "offset": 10}
    old = s.get("title")
    if old:
        title["subtitle"] = old.get("text") if isinstance(old, dict) else old
    s["title"] = title
    return s


def _spec(chart: alt.TopLevelMixin, context: str | None = None) -> dict:
    return with_title(chart.to_dict(), context)


def chart_png(chart: alt.TopLevelMixin, scale: float = 2.0, context: str | None = None) -> bytes:
    """The chart as a PNG, rendered by vl-convert (Vega in Rust/Deno; no browser), titled ``context``."""
    return spec_png(_spec(chart, context), scale=scale)


def chart_svg(chart: alt.TopLevelMixin, context: str | None = None) -> str:
    """The chart as an SVG, titled ``context``."""
    return spec_svg(_spec(chart, context))


def chart_data(chart: alt.TopLevelMixin) -> pd.DataFrame:
    """The rows a chart draws (see :func:`spec_data`)."""
    return spec_data(_spec(chart))


# The same for a Vega-Lite spec as a dict (with its data inline under ``datasets``).
def spec_png(spec: dict, scale: float = 2.0) -> bytes:
    import vl_convert as vlc

    return vlc.vegalite_to_png(spec, scale=scale)


def spec_svg(spec: dict) -> str:
    import vl_convert as vlc

    return vlc.vegalite_to_svg(spec)


def spec_data(spec: dict) -> pd.DataFrame:
    """The rows a spec draws: its top-level data, else its largest inline dataset (a layer over an
    image has a one-row dataset for the picture and the real data beside it)."""
    data = spec.get("datasets") or {}
    name = (spec.get("data") or {}).get("name")
    if name in data:
        return pd.DataFrame(data[name])
    if data:
        return pd.DataFrame(max(data.values(), key=len))
    return pd.DataFrame()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "chart"


def download_row(chart: alt.TopLevelMixin, name: str, data: pd.DataFrame | None = None, key: str | None = None,
                 context: str | None = None):
    """PNG / SVG / CSV download buttons for one chart; the PNG and SVG are titled ``context``."""
    slug = _slug(name)
    key = key or slug
    titled = f", titled “{context}”" if context else ""
    # a row of buttons as wide as their labels (equal columns squeeze them in a narrow column); the labels
    # are words only: an arrow emoji shows as an empty box where no emoji font is installed
    row = st.container(horizontal=True, gap="small")
    row.download_button("Download PNG", lambda: chart_png(chart, context=context), file_name=f"{slug}.png",
                        mime="image/png", key=f"dl_png_{key}", on_click="ignore",
                        help=f"the chart as a picture (PNG){titled}")
    row.download_button("Download SVG", lambda: chart_svg(chart, context=context), file_name=f"{slug}.svg",
                        mime="image/svg+xml", key=f"dl_svg_{key}", on_click="ignore",
                        help=f"the chart as a vector drawing (SVG){titled}")
    frame = data if data is not None else None
    row.download_button("Download CSV",
                        lambda: (frame if frame is not None else chart_data(chart)).to_csv(index=False),
                        file_name=f"{slug}.csv", mime="text/csv", key=f"dl_csv_{key}", on_click="ignore",
                        help="the chart's data (CSV)")


def show_chart(chart: alt.TopLevelMixin, name: str, data: pd.DataFrame | None = None, *,
               context: str | None = None, downloads: bool = True, **kwargs):
    """``st.altair_chart(chart, **kwargs)`` followed by its download buttons; returns the chart's
    selection event (with ``on_select``) as ``st.altair_chart`` does. ``context`` (what the chart
    shows: run, example, stream, layer, head, token, statistic, parts joined by ``" · "``) is the title
    of the exported PNG and SVG."""
    event = st.altair_chart(chart, **kwargs)
    if downloads:
        download_row(chart, name, data, key=kwargs.get("key"), context=context)
    return event


# -- tables (the SQL page's results) ----------------------------------------------------------
def table_csv(df: pd.DataFrame) -> bytes:
    """A DataFrame as CSV (UTF-8, no index), as ``vlatlas sql --format csv`` prints it."""
    return df.to_csv(index=False).encode("utf-8")


def table_parquet(df: pd.DataFrame) -> bytes:
    """A DataFrame as a zstd Parquet file (column types kept)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def download_table(df: pd.DataFrame, name: str, key: str | None = None) -> None:
    """CSV and Parquet download buttons for a table."""
    slug = _slug(name)
    key = key or slug
    row = st.container(horizontal=True, gap="small")
    row.download_button("Download CSV", lambda: table_csv(df), file_name=f"{slug}.csv", mime="text/csv",
                        key=f"dl_tcsv_{key}", on_click="ignore")
    row.download_button("Download Parquet", lambda: table_parquet(df), file_name=f"{slug}.parquet",
                        mime="application/vnd.apache.parquet", key=f"dl_tparquet_{key}", on_click="ignore")
