"""DataFrame -> alt.Chart builders for the app's views. No Streamlit calls here.

Colour scales are the same everywhere: attention weights and raw statistics
on the sequential ``viridis`` scheme, z-scores on the diverging ``redblue``
scheme centred at 0 (red above the mean, blue below). Layers run down the y
axis with layer 0 at the top; heads run along x.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

SEQUENTIAL = "viridis"
DIVERGING = "redblue"
SELECT_COLOR = "#ff2b2b"
# Sizes below are of the plotting area; axes and legends add to them (Streamlit would
# otherwise squeeze everything into the given width, misplacing patches over images).
PAD = alt.AutoSizeParams(type="pad")


def value_scale(values: pd.Series, diverging: bool) -> alt.Scale:
    """The colour scale of a heatmap: viridis over the values' range, or redblue symmetric around 0."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if diverging:
        a = max(float(v.abs().max()) if len(v) else 1.0, 1.0)  # at least ±1 sd, so noise stays pale
        return alt.Scale(scheme=DIVERGING, reverse=True, domain=[-a, a], domainMid=0)
    hi = float(v.max()) if len(v) else 1.0
    lo = float(v.min()) if len(v) else 0.0
    return alt.Scale(scheme=SEQUENTIAL, domain=[lo, hi if hi > lo else lo + 1e-9])


# -- head summary ---------------------------------------------------------------------
def head_cells(m: pd.DataFrame) -> pd.DataFrame:
    """The heatmap's data: one row per (layer, head) plus a ``mean`` column per layer.

    ``m`` has layer, head, value (and optionally raw, n). Returns layer, col
    (head number as text, or ``"mean"``), head (-1 for the mean), value, raw, n, kind.
    """
    d = m.copy()
    d["layer"] = d["layer"].astype(int)
    d["head"] = d["head"].astype(int)
    for c in ("raw", "n"):
        if c not in d:
            d[c] = np.nan
    d["col"] = d["head"].astype(str)
    d["kind"] = "head"
    mean = d.groupby("layer", as_index=False).agg(value=("value", "mean"), raw=("raw", "mean"), n=("n", "max"))
    mean["head"] = -1
    mean["col"] = "mean"
    mean["kind"] = "layer mean"
    cols = ["layer", "head", "col", "value", "raw", "n", "kind"]
    out = pd.concat([d[cols], mean[cols]], ignore_index=True)
    return out.astype({"value": float, "raw": float})


def head_heatmap(m: pd.DataFrame, *, value_title: str, diverging: bool,
                 selected: tuple[int, int | str] | None = None, cell: int = 34,
                 description: str = "head-summary") -> alt.Chart:
    """Layers × heads heatmap of a statistic, with a layer-mean column; click a cell to select it.

    Parameters
    ----------
    m : layer, head, value[, raw, n].
    value_title : legend title (the statistic and its normalisation).
    diverging : z-scores (diverging scale around 0) instead of raw values.
    selected : ``(layer, head)`` to outline; head may be ``"mean"``.
    description : the spec's description, which names the chart (tests find charts by it).
    """
    d = head_cells(m)
    if selected is not None:
        sl, sh = selected
        d["selected"] = (d.layer == int(sl)) & (d.col == str(sh))
    else:
        d["selected"] = False
    heads = sorted(d.loc[d.kind == "head", "head"].unique().tolist())
    layers = sorted(d.layer.unique().tolist())
    x_order = [str(h) for h in heads] + ["mean"]
    click = alt.selection_point(name="cell", fields=["layer", "col"], on="click", clear=False)
    fmt = ".3f"
    base = alt.Chart(d).encode(
        x=alt.X("col:N", sort=x_order, title="head  (last column: mean over heads)",
                axis=alt.Axis(labelAngle=0, orient="top")),
        y=alt.Y("layer:O", sort="ascending", title="layer"),
    )
    rect = base.mark_rect(stroke="white", strokeWidth=0.5).encode(
        color=alt.Color("value:Q", scale=value_scale(d.value, diverging), title=value_title,
                        legend=alt.Legend(orient="right", gradientLength=max(60, cell * len(layers)))),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("col:N", title="head"),
                 alt.Tooltip("value:Q", format=fmt, title=value_title), alt.Tooltip("raw:Q", format=fmt),
                 alt.Tooltip("n:Q", title="examples")],
        opacity=alt.condition(click, alt.value(1.0), alt.value(0.85)),
    ).add_params(click)
    outline = base.transform_filter("datum.selected").mark_rect(
        fill=None, stroke=SELECT_COLOR, strokeWidth=3)
    return alt.layer(rect, outline).properties(
        width=cell * len(x_order) + 10, height=cell * len(layers), description=description, autosize=PAD)


# -- the image side ---------------------------------------------------------------------
def image_map(uri: str, width: int, height: int, display: tuple[int, int], patches: pd.DataFrame, *,
              weight_title: str, vmax: float | None = None, select: bool = False,
              description: str = "image-map") -> alt.Chart:
    """An image (``uri``, already carrying its heatmap) with its patch grid on top.

    Parameters
    ----------
    width, height : original image size in pixels (the boxes' coordinates).
    display : (w, h) in screen pixels.
    patches : token_idx, patch_row, patch_col, x0, y0, x1, y1, weight, selected.
    select : add a click (``patch``, shift-click adds) and a box (``box``) selection.
    vmax : top of the colour scale (default: the largest weight), as in the image's heatmap.
    description : the spec's description, which names the chart.
    """
    dw, dh = display
    xs = alt.Scale(domain=[0, width], nice=False, zero=False)
    ys = alt.Scale(domain=[0, height], nice=False, zero=False, reverse=True)
    img = alt.Chart(pd.DataFrame({"url": [uri], "x": [0.0], "y": [0.0]})).mark_image(
        width=dw, height=dh, align="left", baseline="top").encode(
        x=alt.X("x:Q", scale=xs, axis=None), y=alt.Y("y:Q", scale=ys, axis=None), url="url:N")
    p = patches.copy()
    p["patch"] = [f"r{int(r)}c{int(c)}" for r, c in zip(p.patch_row, p.patch_col)]
    if "selected" not in p:
        p["selected"] = False
    vmax = float(vmax if vmax is not None else (p.weight.max() if len(p) else 1.0)) or 1.0
    rect = alt.Chart(p).mark_rect(fillOpacity=0.0, strokeWidth=2.5).encode(
        x=alt.X("x0:Q", scale=xs, axis=None), x2="x1:Q",
        y=alt.Y("y0:Q", scale=ys, axis=None), y2="y1:Q",
        color=alt.Color("weight:Q", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, vmax]), title=weight_title),
        stroke=alt.condition("datum.selected", alt.value(SELECT_COLOR), alt.value(None)),
        tooltip=[alt.Tooltip("patch:N", title="patch (row, col)"), alt.Tooltip("token_idx:Q"),
                 alt.Tooltip("weight:Q", format=".4f")],
    )
    if select:
        rect = rect.add_params(
            alt.selection_point(name="patch", fields=["token_idx"], on="click", clear=False),
            alt.selection_interval(name="box", encodings=["x", "y"], clear=False),
        )
    return alt.layer(img, rect).properties(width=dw, height=dh, description=description, autosize=PAD).configure_view(
        stroke=None)


# -- the text side ------------------------------------------------------------------------
def token_strip(tokens: pd.DataFrame, *, weight_title: str, vmax: float | None = None,
                width: int = 460, selected: list[int] | None = None,
                description: str = "token-strip") -> alt.Chart:
    """Text tokens laid out as wrapped words, each coloured by its ``weight``.

    ``tokens`` has token_idx, token, role, text_pos, weight. ``selected``
    token_idx are outlined (the query tokens of another view). ``width`` is the
    line length in pixels; ``description`` names the chart.
    """
    t = tokens.sort_values(["text_pos", "token_idx"]).reset_index(drop=True).copy()
    t["word"] = [w if isinstance(w, str) else r for w, r in zip(t.token, t.role)]
    x, line, xs, x2s, lines = 0.0, 0, [], [], []
    for w in t.word:
        bw = 9 + 7.2 * len(w)
        if x + bw > width and x > 0:
            x, line = 0.0, line + 1
        xs.append(x)
        x2s.append(x + bw)
        lines.append(line)
        x += bw + 4
    t["x"], t["x2"], t["line"] = xs, x2s, lines
    t["xm"] = (t.x + t.x2) / 2
    vmax = float(vmax if vmax is not None else (t.weight.max() if len(t) else 1.0)) or 1.0
    t["ink"] = np.where(t.weight / vmax > 0.55, "black", "white")
    t["selected"] = t.token_idx.isin(selected or [])
    xs_ = alt.Scale(domain=[0, width], nice=False, zero=True)
    base = alt.Chart(t).encode(y=alt.Y("line:O", axis=None))
    rect = base.mark_rect(cornerRadius=3, height=22, strokeWidth=2).encode(
        x=alt.X("x:Q", scale=xs_, axis=None), x2="x2:Q",
        color=alt.Color("weight:Q", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, vmax]), title=weight_title,
                        legend=alt.Legend(orient="bottom", direction="horizontal", gradientLength=160)),
        stroke=alt.condition("datum.selected", alt.value(SELECT_COLOR), alt.value(None)),
        tooltip=[alt.Tooltip("word:N", title="token"), alt.Tooltip("role:N"), alt.Tooltip("text_pos:Q"),
                 alt.Tooltip("token_idx:Q"), alt.Tooltip("weight:Q", format=".4f")],
    )
    text = base.mark_text(fontSize=13).encode(x=alt.X("xm:Q", scale=xs_, axis=None), text="word:N",
                                              color=alt.Color("ink:N", scale=None))
    return alt.layer(rect, text).properties(width=width, height=30 * (max(lines, default=0) + 1),
                                            description=description, autosize=PAD).configure_view(stroke=None)


def token_matrix(m: pd.DataFrame, *, weight_title: str = "weight", cell: int = 24,
                 description: str = "token-matrix") -> alt.Chart:
    """Query × key heatmap of tokens; ``m`` from :func:`streamlit_app.views.matrix`; ``description`` names it."""
    q_order = m.drop_duplicates("query").sort_values("query_order")["query"].tolist()
    k_order = m.drop_duplicates("key").sort_values("key_order")["key"].tolist()
    vmax = float(m.weight.max()) if len(m) else 1.0
    return alt.Chart(m).mark_rect(stroke="white", strokeWidth=0.3).encode(
        x=alt.X("key:N", sort=k_order, title="key →", axis=alt.Axis(labelAngle=-50, orient="top", labelOverlap=False)),
        y=alt.Y("query:N", sort=q_order, title="query", axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, vmax or 1.0]), title=weight_title),
        tooltip=[alt.Tooltip("query:N"), alt.Tooltip("key:N"), alt.Tooltip("weight:Q", format=".4f")],
    ).properties(width=max(160, cell * len(k_order)), height=max(120, cell * len(q_order)),
                 description=description, autosize=PAD)
