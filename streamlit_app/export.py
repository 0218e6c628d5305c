"""Every chart with its downloads: PNG and SVG rendered server-side (vl-convert, no browser),
and the chart's data as CSV.

Pages draw charts with :func:`show_chart` instead of ``st.altair_chart``; the
files are produced only when a download button is clicked (Streamlit calls
the callables then).
"""

from __future__ import annotations

import json
import re

import altair as alt
import pandas as pd
import streamlit as st


def _spec(chart: alt.TopLevelMixin) -> dict:
    return chart.to_dict()


def chart_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    """The chart as a PNG, rendered by vl-convert (Vega in Rust/Deno; no browser)."""
    import vl_convert as vlc

    return vlc.vegalite_to_png(_spec(chart), scale=scale)


def chart_svg(chart: alt.TopLevelMixin) -> str:
    import vl_convert as vlc

    return vlc.vegalite_to_svg(_spec(chart))


def chart_data(chart: alt.TopLevelMixin) -> pd.DataFrame:
    """The rows a chart draws: its top-level data, else the first inline dataset."""
    spec = _spec(chart)
    data = spec.get("datasets") or {}
    name = (spec.get("data") or {}).get("name")
    if name in data:
        return pd.DataFrame(data[name])
    for rows in data.values():
        return pd.DataFrame(rows)
    return pd.DataFrame()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "chart"


def download_row(chart: alt.TopLevelMixin, name: str, data: pd.DataFrame | None = None, key: str | None = None):
    """PNG / SVG / CSV download buttons for one chart."""
    slug = _slug(name)
    key = key or slug
    cols = st.columns([1, 1, 1, 6])
    cols[0].download_button("⬇ PNG", lambda: chart_png(chart), file_name=f"{slug}.png", mime="image/png",
                            key=f"dl_png_{key}", on_click="ignore")
    cols[1].download_button("⬇ SVG", lambda: chart_svg(chart), file_name=f"{slug}.svg", mime="image/svg+xml",
                            key=f"dl_svg_{key}", on_click="ignore")
    frame = data if data is not None else None
    cols[2].download_button("⬇ CSV", lambda: (frame if frame is not None else chart_data(chart)).to_csv(index=False),
                            file_name=f"{slug}.csv", mime="text/csv", key=f"dl_csv_{key}", on_click="ignore")


def show_chart(chart: alt.TopLevelMixin, name: str, data: pd.DataFrame | None = None, *,
               downloads: bool = True, **kwargs):
    """``st.altair_chart(chart, **kwargs)`` followed by its download buttons; returns the chart's
    selection event (with ``on_select``) as ``st.altair_chart`` does."""
    event = st.altair_chart(chart, **kwargs)
    if downloads:
        download_row(chart, name, data, key=kwargs.get("key"))
    return event


def spec_json(chart: alt.TopLevelMixin) -> str:
    return json.dumps(_spec(chart))
