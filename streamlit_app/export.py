"""Every chart with its downloads: PNG and SVG rendered server-side (vl-convert, no browser),
and the chart's data as CSV.

Pages draw charts with :func:`show_chart` instead of ``st.altair_chart``; the
files are produced only when a download button is clicked (Streamlit calls
the callables then).
"""

from __future__ import annotations

import re

import altair as alt
import pandas as pd
import streamlit as st


def _spec(chart: alt.TopLevelMixin) -> dict:
    return chart.to_dict()


def chart_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    """The chart as a PNG, rendered by vl-convert (Vega in Rust/Deno; no browser)."""
    return spec_png(_spec(chart), scale=scale)


def chart_svg(chart: alt.TopLevelMixin) -> str:
    return spec_svg(_spec(chart))


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


def download_row(chart: alt.TopLevelMixin, name: str, data: pd.DataFrame | None = None, key: str | None = None):
    """PNG / SVG / CSV download buttons for one chart."""
    slug = _slug(name)
    key = key or slug
    # a row of buttons as wide as their labels (equal columns squeeze them to "⬇…" in a narrow column)
    row = st.container(horizontal=True, gap="small")
    row.download_button("⬇ PNG", lambda: chart_png(chart), file_name=f"{slug}.png", mime="image/png",
                        key=f"dl_png_{key}", on_click="ignore", help="the chart as a picture (PNG)")
    row.download_button("⬇ SVG", lambda: chart_svg(chart), file_name=f"{slug}.svg", mime="image/svg+xml",
                        key=f"dl_svg_{key}", on_click="ignore", help="the chart as a vector drawing (SVG)")
    frame = data if data is not None else None
    row.download_button("⬇ CSV", lambda: (frame if frame is not None else chart_data(chart)).to_csv(index=False),
                        file_name=f"{slug}.csv", mime="text/csv", key=f"dl_csv_{key}", on_click="ignore",
                        help="the chart's data (CSV)")


def show_chart(chart: alt.TopLevelMixin, name: str, data: pd.DataFrame | None = None, *,
               downloads: bool = True, **kwargs):
    """``st.altair_chart(chart, **kwargs)`` followed by its download buttons; returns the chart's
    selection event (with ``on_select``) as ``st.altair_chart`` does."""
    event = st.altair_chart(chart, **kwargs)
    if downloads:
        download_row(chart, name, data, key=kwargs.get("key"))
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
    row.download_button("⬇ CSV", lambda: table_csv(df), file_name=f"{slug}.csv", mime="text/csv",
                        key=f"dl_tcsv_{key}", on_click="ignore")
    row.download_button("⬇ Parquet", lambda: table_parquet(df), file_name=f"{slug}.parquet",
                        mime="application/vnd.apache.parquet", key=f"dl_tparquet_{key}", on_click="ignore")
