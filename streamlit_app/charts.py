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
# The attention views' legend labels: 3 significant digits, trailing zeros dropped, in scientific notation
# below 1e-6, so a stretched legend of tiny weights reads "0 … 4e-8" rather than "0.00000000 0.00000004".
LEGEND_FORMAT = ".3~g"


def value_scale(values: pd.Series, diverging: bool) -> alt.Scale:
    """The colour scale of a heatmap: viridis over the values' range, or redblue symmetric around 0."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if diverging:
        a = max(float(v.abs().max()) if len(v) else 1.0, 1.0)  # at least ±1 sd, so noise stays pale
        return alt.Scale(scheme=DIVERGING, reverse=True, domain=[-a, a], domainMid=0)
    hi = float(v.max()) if len(v) else 1.0
    lo = float(v.min()) if len(v) else 0.0
    if hi <= lo:  # one value everywhere: a range from 0 to it (0 to 1 for 0), not lo … lo + 1e-9
        lo, hi = min(lo, 0.0), max(hi, 0.0) if hi != 0 else 1.0
    return alt.Scale(scheme=SEQUENTIAL, domain=[lo, hi])


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
                 description: str = "head-summary", scale: alt.Scale | None = None) -> alt.Chart:
    """Layers × heads heatmap of a statistic, with a layer-mean column; click a cell to select it.

    Parameters
    ----------
    m : layer, head, value[, raw, n].
    value_title : legend title (the statistic and its normalisation).
    diverging : z-scores (diverging scale around 0) instead of raw values.
    selected : ``(layer, head)`` to outline; head may be ``"mean"``.
    description : the spec's description, which names the chart (tests find charts by it).
    scale : the colour scale, instead of :func:`value_scale`'s (e.g. :func:`effect_scale`).
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
        color=alt.Color("value:Q", scale=scale or value_scale(d.value, diverging), title=value_title,
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
              description: str = "image-map", outlines: pd.DataFrame | None = None) -> alt.Chart:
    """An image (``uri``, already carrying its heatmap) with its patch grid on top.

    Parameters
    ----------
    width, height : original image size in pixels (the boxes' coordinates).
    display : (w, h) in screen pixels.
    patches : token_idx, patch_row, patch_col, x0, y0, x1, y1, weight, selected.
    select : add a click (``patch``, shift-click adds) and a box (``box``) selection.
    vmax : top of the colour scale (default: the largest weight), as in the image's heatmap.
    description : the spec's description, which names the chart.
    outlines : the tiles of a tiled image (``views.tile_boxes``: tile, outline, x0, y0, x1, y1,
        selected), each drawn as a dashed outline with its name (solid for the tiles shown).
    """
    dw, dh = display
    xs = alt.Scale(domain=[0, width], nice=False, zero=False)
    ys = alt.Scale(domain=[0, height], nice=False, zero=False, reverse=True)
    img = alt.Chart(pd.DataFrame({"url": [uri], "x": [0.0], "y": [0.0]})).mark_image(
        width=dw, height=dh, align="left", baseline="top").encode(
        x=alt.X("x:Q", scale=xs, axis=None), y=alt.Y("y:Q", scale=ys, axis=None), url="url:N")
    p = patches.copy()
    tile = p.tile if "tile" in p else pd.Series(0, index=p.index)
    p["patch"] = [(f"t{int(t)}" if pd.notna(t) and int(t) > 0 else "") + f"r{int(r)}c{int(c)}"
                  for t, r, c in zip(tile, p.patch_row, p.patch_col)]
    if "selected" not in p:
        p["selected"] = False
    vmax = float(vmax if vmax is not None else (p.weight.max() if len(p) else 1.0)) or 1.0
    rect = alt.Chart(p).mark_rect(fillOpacity=0.0, strokeWidth=2.5).encode(
        x=alt.X("x0:Q", scale=xs, axis=None), x2="x1:Q",
        y=alt.Y("y0:Q", scale=ys, axis=None), y2="y1:Q",
        # the legend goes under the image: on its right it would widen the chart past its column
        color=alt.Color("weight:Q", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, vmax]), title=weight_title,
                        legend=alt.Legend(orient="bottom", direction="horizontal", gradientLength=min(dw, 240),
                                          format=LEGEND_FORMAT)),
        stroke=alt.condition("datum.selected", alt.value(SELECT_COLOR), alt.value(None)),
        tooltip=[alt.Tooltip("patch:N", title="patch (row, col)"), alt.Tooltip("token_idx:Q"),
                 alt.Tooltip("weight:Q", format=".4f")],
    )
    if select:
        rect = rect.add_params(
            alt.selection_point(name="patch", fields=["token_idx"], on="click", clear=False),
            alt.selection_interval(name="box", encodings=["x", "y"], clear=False),
        )
    layers = [img]
    if outlines is not None and len(outlines):
        # under the patches, so that a click still picks a patch
        o = alt.Chart(outlines).encode(x=alt.X("x0:Q", scale=xs, axis=None), y=alt.Y("y0:Q", scale=ys, axis=None))
        layers += [
            o.mark_rect(fill=None, stroke="white", strokeWidth=2).encode(
                x2="x1:Q", y2="y1:Q", strokeDash=alt.condition("datum.selected", alt.value([1, 0]), alt.value([6, 4])),
                tooltip=[alt.Tooltip("outline:N", title="tile")]),
            # a tile's name at its top left; the base image's (usually the whole image) at its bottom left
            o.transform_filter("datum.tile > 0").mark_text(
                align="left", baseline="top", dx=4, dy=3, fontSize=11, fontWeight="bold", fill="white").encode(
                text="outline:N"),
            o.transform_filter("datum.tile <= 0").mark_text(
                align="left", baseline="bottom", dx=4, dy=-3, fontSize=11, fontWeight="bold", fill="white").encode(
                y=alt.Y("y1:Q", scale=ys, axis=None), text="outline:N"),
        ]
    return alt.layer(*layers, rect).properties(width=dw, height=dh, description=description,
                                               autosize=PAD).configure_view(stroke=None)


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
                        legend=alt.Legend(orient="bottom", direction="horizontal", gradientLength=160,
                                          format=LEGEND_FORMAT)),
        stroke=alt.condition("datum.selected", alt.value(SELECT_COLOR), alt.value(None)),
        tooltip=[alt.Tooltip("word:N", title="token"), alt.Tooltip("role:N"), alt.Tooltip("text_pos:Q"),
                 alt.Tooltip("token_idx:Q"), alt.Tooltip("weight:Q", format=".4f")],
    )
    text = base.mark_text(fontSize=13).encode(x=alt.X("xm:Q", scale=xs_, axis=None), text="word:N",
                                              color=alt.Color("ink:N", scale=None))
    return alt.layer(rect, text).properties(width=width, height=30 * (max(lines, default=0) + 1),
                                            description=description, autosize=PAD).configure_view(stroke=None)


def token_matrix(m: pd.DataFrame, *, weight_title: str = "weight", cell: int = 24, vmax: float | None = None,
                 description: str = "token-matrix") -> alt.Chart:
    """Query × key heatmap of tokens; ``m`` from :func:`streamlit_app.views.matrix`; ``description`` names it."""
    q_order = m.drop_duplicates("query").sort_values("query_order")["query"].tolist()
    k_order = m.drop_duplicates("key").sort_values("key_order")["key"].tolist()
    vmax = float(vmax if vmax is not None else (m.weight.max() if len(m) else 1.0))
    return alt.Chart(m).mark_rect(stroke="white", strokeWidth=0.3).encode(
        x=alt.X("key:N", sort=k_order, title="key →", axis=alt.Axis(labelAngle=-50, orient="top", labelOverlap=False)),
        y=alt.Y("query:N", sort=q_order, title="query", axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, vmax or 1.0]), title=weight_title,
                        legend=alt.Legend(format=LEGEND_FORMAT)),
        tooltip=[alt.Tooltip("query:N"), alt.Tooltip("key:N"), alt.Tooltip("weight:Q", format=".4f")],
    ).properties(width=max(160, cell * len(k_order)), height=max(120, cell * len(q_order)),
                 description=description, autosize=PAD)


# -- compare two groups ----------------------------------------------------------------------
# Group A is blue and group B orange in every chart of the Compare page: the dots of each group, and
# the map of B − A on the diverging blue–orange scheme (blue: higher in A, orange: higher in B).
GROUP_COLORS = {"A": "#4c78a8", "B": "#f58518"}
COMPARE_DIVERGING = "blueorange"


def _pad_domain(values, frac: float = 0.04) -> list[float]:
    """A value axis's domain: the values' range widened by ``frac`` of it on each side, so that a point
    at the edge (a statistic of exactly 0 or 1) is drawn whole instead of cut by the frame."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    span = hi - lo
    pad = frac * span if span > 0 else max(abs(hi) * frac, 0.02)
    return [lo - pad, hi + pad]


def compare_heatmap(result: pd.DataFrame, *, value: str = "diff", value_title: str = "B − A",
                    selected: tuple[int, int] | None = None, alpha: float = 0.05, cell: int = 34,
                    labels: tuple[str, str] = ("A", "B"), description: str = "compare-diff") -> alt.Chart:
    """Layers × heads map of a comparison (``lake.compare``): B − A on a diverging scale centred on 0,
    blue where A is higher and orange where B is higher (the groups' colours, :data:`GROUP_COLORS`).

    Parameters
    ----------
    result : layer, head, n_a, n_b, mean_a, mean_b, diff, effect, p, p_adj (one row per head).
    value : the column coloured: ``diff`` (difference of means) or ``effect`` (effect size).
    selected : ``(layer, head)`` to outline.
    alpha : heads with adjusted p below it are marked ``∗``.
    labels : the legend's names of the groups, e.g. ``("A: correct is true", "B: correct is false")``.
    description : the spec's description, which names the chart.
    """
    d = result.copy()
    d["layer"] = d["layer"].astype(int)
    d["head"] = d["head"].astype(int)
    d["col"] = d["head"].astype(str)
    d["value"] = d[value].astype(float)
    d["significant"] = (d.p_adj < alpha).fillna(False).astype(bool)
    d["mark"] = np.where(d.significant, "∗", "")
    d["selected"] = ((d.layer == int(selected[0])) & (d["head"] == int(selected[1]))) if selected else False
    heads = sorted(d["head"].unique().tolist())
    layers = sorted(d.layer.unique().tolist())
    v = d.value.abs().dropna()
    a = float(v.max()) if len(v) and v.max() > 0 else 1.0
    d["ink"] = np.where(d.value.abs() > 0.6 * a, "white", "black")  # the ∗ stays readable on dark cells
    click = alt.selection_point(name="cell", fields=["layer", "head"], on="click", clear=False)
    fmt = ".4f"
    base = alt.Chart(d).encode(
        x=alt.X("col:N", sort=[str(h) for h in heads], title="head",
                axis=alt.Axis(labelAngle=0, orient="top")),
        y=alt.Y("layer:O", sort="ascending", title="layer"),
    )
    rect = base.mark_rect(stroke="white", strokeWidth=0.5).encode(
        color=alt.Color("value:Q", title=[value_title, f"orange: higher in {labels[1]}",
                                          f"blue: higher in {labels[0]}"],
                        scale=alt.Scale(scheme=COMPARE_DIVERGING, domain=[-a, a], domainMid=0),
                        legend=alt.Legend(orient="right", gradientLength=max(60, cell * len(layers)),
                                          titleLimit=420)),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("head:O"),
                 alt.Tooltip("mean_a:Q", format=fmt, title="mean A"), alt.Tooltip("mean_b:Q", format=fmt,
                                                                                   title="mean B"),
                 alt.Tooltip("diff:Q", format=fmt, title="B − A"), alt.Tooltip("effect:Q", format=".3f",
                                                                               title="effect size"),
                 alt.Tooltip("p:Q", format=".3g"), alt.Tooltip("p_adj:Q", format=".3g", title="adjusted p"),
                 alt.Tooltip("n_a:Q", title="n A"), alt.Tooltip("n_b:Q", title="n B")],
        opacity=alt.condition(click, alt.value(1.0), alt.value(0.85)),
    ).add_params(click)
    stars = base.mark_text(fontSize=16, fontWeight="bold").encode(text="mark:N", color=alt.Color("ink:N", scale=None))
    outline = base.transform_filter("datum.selected").mark_rect(fill=None, stroke=SELECT_COLOR, strokeWidth=3)
    # the stars' colours are literal (scale=None): independent colour scales, else Vega-Lite fails to
    # compile the layer ("Cannot read properties of null") and the map is blank in the browser too
    return alt.layer(rect, stars, outline).resolve_scale(color="independent").properties(
        width=cell * len(heads) + 10, height=cell * len(layers), description=description, autosize=PAD)


def group_values(values: pd.DataFrame, *, value_title: str, labels: dict[str, str] | None = None,
                 width: int = 420, description: str = "compare-values") -> alt.Chart:
    """One head's per-example values, a row of dots per group, with each group's mean as a tick.

    ``values``: example_id, group (``A``/``B``), value. ``labels``: the legend's name of each group
    (``{"A": "A: correct is true", …}``; default the group itself). A is blue and B orange
    (:data:`GROUP_COLORS`), with a legend; the value axis is padded so that values at its ends (0 or 1)
    are drawn whole.
    """
    d = values.copy()
    groups = sorted(d.group.unique().tolist())
    names = {g: (labels or {}).get(g, g) for g in groups}
    d["legend"] = d.group.map(names)
    means = d.groupby("group", as_index=False).value.mean()
    y = alt.Y("group:N", title=None, sort=groups)
    x_scale = alt.Scale(domain=_pad_domain(d.value), nice=False, zero=False, clamp=False)
    colors = [GROUP_COLORS.get(g, "#7f7f7f") for g in groups]
    dots = alt.Chart(d).mark_circle(size=40, opacity=0.6).encode(
        x=alt.X("value:Q", title=value_title, scale=x_scale), y=y, yOffset="jitter:Q",
        color=alt.Color("legend:N", title=None, scale=alt.Scale(domain=[names[g] for g in groups], range=colors),
                        legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=600)),
        tooltip=[alt.Tooltip("example_id:Q"), alt.Tooltip("legend:N", title="group"),
                 alt.Tooltip("value:Q", format=".4f")],
    ).transform_calculate(jitter="random() * 16 - 8")
    ticks = alt.Chart(means).mark_tick(thickness=3, size=30, color="black").encode(
        x=alt.X("value:Q", scale=x_scale), y=y,
        tooltip=[alt.Tooltip("group:N"), alt.Tooltip("value:Q", format=".4f", title="mean")])
    return alt.layer(dots, ticks).properties(width=width, height=110, description=description, autosize=PAD)


# -- the SQL page's quick chart -----------------------------------------------------------------
QUICK_MARKS = ("auto", "bar", "line", "point", "area", "heatmap")
QUICK_MAX_ROWS = 5000  # Altair refuses to inline more rows than this


def _field(name: str) -> str:
    """A column name as a Vega-Lite field: dots and brackets would otherwise mean nesting, and quotes
    open a quoted path (DuckDB names an unaliased ``avg(value)`` column ``avg("value")``)."""
    return "".join("\\" + c if c in ".[]\\'\"" else c for c in str(name))


def column_kind(s: pd.Series) -> str:
    """``quantitative``, ``temporal`` or ``nominal``: how a result column is charted."""
    if pd.api.types.is_bool_dtype(s):
        return "nominal"
    if pd.api.types.is_numeric_dtype(s):
        return "quantitative"
    if pd.api.types.is_datetime64_any_dtype(s):
        return "temporal"
    return "nominal"


def chartable_columns(df: pd.DataFrame) -> list[str]:
    """Columns with scalar values (numbers, text, booleans, times): lists, structs and blobs are left out."""
    out = []
    for c in df.columns:
        s = df[c]
        if s.dtype == object and s.map(lambda v: isinstance(v, (list, dict, tuple, bytes, bytearray, np.ndarray))).any():
            continue
        out.append(str(c))
    return out


def _discrete(s: pd.Series) -> bool:
    kind = column_kind(s)
    return kind == "nominal" or (pd.api.types.is_integer_dtype(s) and s.nunique() <= 60)


def quick_defaults(df: pd.DataFrame) -> tuple[str | None, str | None, str | None]:
    """Sensible (x, y, colour) for a result: a layer × head heatmap when it has both, else the first
    text-like column against the first measured (float) one."""
    cols = chartable_columns(df)
    if not cols:
        return None, None, None
    floats = [c for c in cols if pd.api.types.is_float_dtype(df[c])]
    numeric = [c for c in cols if column_kind(df[c]) == "quantitative"]
    for x, y in (("head", "layer"), ("patch_col", "patch_row"), ("key_idx", "query_idx"), ("key", "query")):
        if x in cols and y in cols:  # a grid: heads of layers, patches of an image, keys of queries
            return x, y, next((c for c in floats if c not in (x, y)), None)
    x = next((c for c in cols if not pd.api.types.is_float_dtype(df[c])), cols[0])
    y = next((c for c in floats if c != x), next((c for c in numeric if c != x), None))
    return x, y, None


def quick_mark(df: pd.DataFrame, x: str, y: str | None, color: str | None, mark: str) -> str:
    """The mark ``auto`` stands for: heatmap (two discrete axes and a colour), line (time on x),
    bar (discrete x), point (otherwise)."""
    if mark != "auto":
        return mark
    if y is not None and _discrete(df[x]) and _discrete(df[y]) and color is not None:
        return "heatmap"
    if column_kind(df[x]) == "temporal":
        return "line"
    if _discrete(df[x]):
        return "bar"
    return "point"


def quick_chart(df: pd.DataFrame, x: str, y: str | None, color: str | None = None, mark: str = "auto", *,
                width: int = 640, height: int = 320, description: str = "sql-chart") -> alt.Chart:
    """A chart of a query result: ``x`` against ``y`` (None: the number of rows), coloured by ``color``.

    ``mark``: one of :data:`QUICK_MARKS` (``auto`` picks one, see :func:`quick_mark`).
    Only the columns used are kept, and at most :data:`QUICK_MAX_ROWS` rows.
    """
    used = list(dict.fromkeys(c for c in (x, y, color) if c is not None))
    d = df[used].head(QUICK_MAX_ROWS).reset_index(drop=True)
    mark = quick_mark(d, x, y, color, mark)

    def enc(col: str, axis: str):
        kind = column_kind(d[col])
        if axis in ("x", "y") and mark in ("bar", "heatmap") and _discrete(d[col]):
            kind = "ordinal" if kind == "quantitative" else kind
        if axis in ("x", "y") and mark == "heatmap":
            kind = "ordinal" if kind == "quantitative" else kind
        cls = {"x": alt.X, "y": alt.Y, "color": alt.Color}[axis]
        return cls(field=_field(col), type=kind, title=str(col))

    base = alt.Chart(d)
    m = {"bar": base.mark_bar(), "line": base.mark_line(point=True), "point": base.mark_point(filled=True),
         "area": base.mark_area(opacity=0.7), "heatmap": base.mark_rect()}[mark]
    y_enc = enc(y, "y") if y is not None else alt.Y("count()", title="rows")
    e = dict(x=enc(x, "x"), y=y_enc,
             tooltip=[alt.Tooltip(field=_field(c), type=column_kind(d[c]), title=str(c)) for c in used])
    if color is not None:
        e["color"] = enc(color, "color")
        if mark == "heatmap" and column_kind(d[color]) == "quantitative":
            e["color"] = alt.Color(field=_field(color), type="quantitative", title=str(color),
                                   scale=alt.Scale(scheme=SEQUENTIAL))
    return m.encode(**e).properties(width=width, height=height, description=description)


# -- hidden states: the t-SNE map and per-layer profiles ---------------------------------------------
MODALITY_COLORS = {"text": "#1f77b4", "image": "#ff7f0e"}
CORRECT_COLORS = {"correct": "#2ca02c", "wrong": "#d62728", "unknown": "#b0b0b0"}


def _map_color(p: pd.DataFrame, field: str, title: str) -> alt.Color:
    values = sorted(p["color"].dropna().unique().tolist())
    # under the map: on its right the legend would run past the column into the norm chart beside it
    legend = alt.Legend(orient="bottom", direction="horizontal", columns=6, symbolLimit=40, symbolStrokeWidth=0,
                        labelLimit=120)
    if field == "modality" and set(values) <= set(MODALITY_COLORS) | {"(none)"}:
        dom = [v for v in MODALITY_COLORS if v in values] + [v for v in values if v not in MODALITY_COLORS]
        rng = [MODALITY_COLORS.get(v, "#b0b0b0") for v in dom]
        return alt.Color("color:N", title=title, scale=alt.Scale(domain=dom, range=rng), legend=legend)
    if field == "correct":
        dom = [v for v in CORRECT_COLORS if v in values]
        return alt.Color("color:N", title=title, scale=alt.Scale(domain=dom, range=[CORRECT_COLORS[v] for v in dom]),
                         legend=legend)
    scheme = "tableau10" if len(values) <= 10 else "tableau20"
    return alt.Color("color:N", title=title, scale=alt.Scale(scheme=scheme),
                     legend=None if field == "example_id" or len(values) > 40 else legend)


def hidden_map(points: pd.DataFrame, *, color_field: str, color_title: str, path: pd.DataFrame | None = None,
               layer: int | None = None, width: int = 560, height: int = 500,
               description: str = "hidden-map") -> alt.LayerChart:
    """A 2-D map (t-SNE) of hidden states, one point per token; click a point to select it.

    Parameters
    ----------
    points : x, y, color (text of the colouring field), label (the token), group (``sample`` or
        ``this example``: the selected example's tokens, drawn larger and outlined), example_id,
        token_idx, role, modality, text, answer, correct_text and optionally image (a data URI of a
        patch's crop: the tooltip shows it).
    color_field, color_title : the colouring field's name (``modality``, ``role``, ``example_id``,
        ``answer``, ``correct``) and legend title.
    path : the selected token's positions on the maps of every layer: layer, x, y. Drawn as a
        line through the layers with each point labelled by its layer; the point of ``layer`` is
        ringed.
    description : the spec's description, which names the chart.
    """
    p = points.copy()
    p["z"] = (p["group"] != "sample").astype(int)
    if "image" not in p:
        p["image"] = None
    click = alt.selection_point(name="tok", fields=["example_id", "token_idx"], on="click", clear=False)
    zoom = alt.selection_interval(name="zoom", bind="scales")
    # the domains padded past the outermost points (and the path's), so that a point at the edge is drawn
    # whole rather than cut in half by the frame; t-SNE coordinates have no meaningful zero
    both = p if path is None or not len(path) else pd.concat([p[["x", "y"]], path[["x", "y"]]])
    xs = alt.X("x:Q", axis=None, scale=alt.Scale(domain=_pad_domain(both.x), nice=False, zero=False))
    ys = alt.Y("y:Q", axis=None, scale=alt.Scale(domain=_pad_domain(both.y), nice=False, zero=False))
    # The tooltip is one object per point, so that only patches carry an ``image`` key (vega-tooltip
    # draws that key as a picture; a text token's missing image would show as a broken one).
    rows = {"token": "datum.label", "role": "datum.role", "modality": "datum.modality",
            "example": "datum.example_id", "text": "datum.text", "answer": "datum.answer",
            "prediction": "datum.correct_text", "on the map as": "datum.group"}
    fields = ", ".join(f"'{k}': {v}" for k, v in rows.items())
    tip = f"isValid(datum.image) ? {{{fields}, 'image': datum.image}} : {{{fields}}}"
    dots = alt.Chart(p).transform_calculate(tip=tip).mark_circle().encode(
        x=xs, y=ys, color=_map_color(p, color_field, color_title),
        size=alt.condition("datum.group != 'sample'", alt.value(90), alt.value(18)),
        opacity=alt.condition("datum.group != 'sample'", alt.value(1.0), alt.value(0.55)),
        stroke=alt.condition("datum.group != 'sample'", alt.value("black"), alt.value(None)),
        strokeWidth=alt.value(1.2), order=alt.Order("z:Q"), tooltip=alt.Tooltip("tip:N"),
    ).add_params(click, zoom)
    layers: list = [dots]
    if path is not None and len(path):
        q = path.copy()
        q["layer"] = q["layer"].astype(int)
        q["tag"] = "L" + q["layer"].astype(str)
        q["current"] = q["layer"] == (layer if layer is not None else -1)
        base = alt.Chart(q).encode(x=xs, y=ys)
        layers += [
            base.mark_line(color=SELECT_COLOR, strokeWidth=2, opacity=0.9).encode(order=alt.Order("layer:Q")),
            base.mark_point(filled=True, color=SELECT_COLOR, opacity=1).encode(
                size=alt.condition("datum.current", alt.value(160), alt.value(50)),
                tooltip=[alt.Tooltip("layer:Q"), alt.Tooltip("x:Q", format=".2f"), alt.Tooltip("y:Q", format=".2f")]),
            base.mark_text(dx=9, dy=-9, fontSize=12, fontWeight="bold", color=SELECT_COLOR).encode(text="tag:N"),
        ]
    return alt.layer(*layers).properties(width=width, height=height, description=description, autosize=PAD)


def layer_profile(d: pd.DataFrame, *, value: str, value_title: str, color: str = "scope",
                  dash: str | None = None, layer: int | None = None, width: int = 260, height: int = 170,
                  description: str = "layer-profile") -> alt.LayerChart:
    """A value per layer as lines with points (x: hidden-state layer, 0 = embedding output).

    ``d`` has layer, ``value``, ``color`` and (optionally) ``dash`` columns: one line per
    (color, dash) pair, e.g. a modality's mean norm for the selected example (solid) and over all
    examples (dashed). ``layer`` marks the layer shown elsewhere with a dotted rule.
    """
    legend = alt.Legend(orient="bottom", direction="vertical", labelLimit=260, symbolType="stroke")
    scale = (alt.Scale(domain=list(MODALITY_COLORS), range=list(MODALITY_COLORS.values()))
             if color == "modality" else alt.Undefined)
    x = alt.X("layer:O", title="hidden-state layer (0 = embeddings)", axis=alt.Axis(labelAngle=0))
    y = alt.Y(f"{value}:Q", title=value_title, scale=alt.Scale(zero=False))
    enc = dict(x=x, y=y, color=alt.Color(f"{color}:N", title=None, legend=legend, scale=scale))
    if dash:
        # the first scope in ``d`` (the selected example) solid, the next dashed, whatever their names'
        # alphabetical order (which Vega-Lite would follow otherwise)
        order = list(dict.fromkeys(d[dash].tolist()))
        enc["strokeDash"] = alt.StrokeDash(f"{dash}:N", title=None, legend=legend, scale=alt.Scale(
            domain=order, range=[[1, 0], [5, 3], [1, 3], [8, 3, 2, 3]][:len(order)]))
    # points in their own layer: a line mark with points would draw its legend as dots, hiding the dashes
    dots = alt.Chart(d).mark_point(filled=True, size=30).encode(
        x=x, y=y, color=alt.Color(f"{color}:N", legend=None, scale=scale),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip(f"{value}:Q", format=".4f", title=value_title),
                 alt.Tooltip(f"{color}:N")] + ([alt.Tooltip(f"{dash}:N")] if dash else []))
    layers = [alt.Chart(d).mark_line().encode(**enc), dots]
    if layer is not None:
        layers.insert(0, alt.Chart(pd.DataFrame({"layer": [int(layer)]})).mark_rule(
            color="grey", strokeDash=[3, 3]).encode(x="layer:O"))
    return alt.layer(*layers).properties(width=width, height=height, description=description, autosize=PAD)


# -- probes ---------------------------------------------------------------------------------
PROBE_COLORS = {"probe": "#4c78a8", "control": "#9d9d9d"}


def probe_curve(rows: pd.DataFrame, *, metric: str, significant: float, description: str = "probe-curve") -> alt.Chart:
    """A probe's score by layer, one panel per stream: the probe and its control task (permuted labels)
    as two lines; layers whose permutation p-value is under ``significant`` are filled points, the others
    hollow.

    ``rows``: the probes table's stream, layer, value, control, selectivity, p_value, n, n_vectors.
    """
    d = rows.copy()
    long = pd.concat([
        d.assign(series="probe", score=d.value),
        d.assign(series="control", score=d.control),
    ], ignore_index=True)
    color = alt.Color("series:N", title=None, scale=alt.Scale(domain=list(PROBE_COLORS),
                                                              range=list(PROBE_COLORS.values())),
                      legend=alt.Legend(orient="right", labelExpr="datum.label == 'probe' ? 'probe (filled: "
                                        f"p < {significant:g})' : 'control (permuted labels)'"))
    base = alt.Chart(long).encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("score:Q", title=metric, scale=alt.Scale(zero=False)),
        color=color,
        tooltip=[alt.Tooltip("stream:N"), alt.Tooltip("layer:O"), alt.Tooltip("series:N"),
                 alt.Tooltip("score:Q", format=".3f", title=metric), alt.Tooltip("selectivity:Q", format=".3f"),
                 alt.Tooltip("p_value:Q", format=".3g", title="p"), alt.Tooltip("n:Q", title="examples"),
                 alt.Tooltip("n_vectors:Q", title="vectors")],
    )
    lines = base.mark_line().encode(strokeDash=alt.StrokeDash(
        "series:N", legend=None, scale=alt.Scale(domain=["probe", "control"], range=[[1, 0], [4, 3]])))
    points = base.transform_filter("datum.series == 'probe'").mark_point(size=70, strokeWidth=2).encode(
        fill=alt.condition(f"datum.p_value < {significant}", alt.value(PROBE_COLORS["probe"]), alt.value("white")))
    return alt.layer(lines, points).properties(width=420, height=220).facet(
        row=alt.Row("stream:N", title="stream")).properties(description=description)


def confusion_heatmap(labels: list[str], counts: list[list[int]], *, cell: int = 34,
                      description: str = "probe-confusion") -> alt.Chart:
    """A confusion matrix (rows: the true label, columns: the probe's out-of-fold prediction); colour:
    the share of the true label's vectors, text: the count."""
    rows = []
    for i, t in enumerate(labels):
        total = sum(counts[i]) or 1
        for j, p in enumerate(labels):
            rows.append({"true": t, "predicted": p, "count": int(counts[i][j]), "share": counts[i][j] / total})
    d = pd.DataFrame(rows)
    base = alt.Chart(d).encode(
        x=alt.X("predicted:N", sort=list(labels), title="predicted (out of fold)", axis=alt.Axis(labelAngle=0,
                                                                                            orient="top")),
        y=alt.Y("true:N", sort=list(labels), title="true label"))
    rect = base.mark_rect(stroke="white").encode(
        color=alt.Color("share:Q", scale=alt.Scale(scheme=SEQUENTIAL, domain=[0, 1]), title="share of the row"),
        tooltip=["true:N", "predicted:N", "count:Q", alt.Tooltip("share:Q", format=".1%")])
    text = base.mark_text(fontSize=11).encode(
        text="count:Q", color=alt.condition("datum.share > 0.5", alt.value("black"), alt.value("white")))
    return alt.layer(rect, text).properties(width=cell * len(labels), height=cell * len(labels),
                                            description=description, autosize=PAD)


# -- interventions ------------------------------------------------------------------------------
CURVE_DASH = {"deletion": [1, 0], "insertion": [5, 3]}


def effect_scale(values: pd.Series) -> alt.Scale:
    """A diverging scale symmetric around 0 at the values' largest magnitude, however small: an
    ablation's effect on a score has its own units (no ±1 floor as for z-scores); blue is a drop."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    a = float(v.abs().max()) if len(v) else 0.0
    a = a if a > 0 else 1.0
    return alt.Scale(scheme=DIVERGING, reverse=True, domain=[-a, a], domainMid=0)


def head_scatter(d: pd.DataFrame, *, x: str, y: str, x_title: str, y_title: str, color: str | None = None,
                 width: int = 360, height: int = 260, description: str = "iv-scatter") -> alt.LayerChart:
    """One point per head: ``x`` against ``y`` (``d`` has stream, layer, head and both columns), with a
    dotted rule at y = 0; the tooltip names the head. ``color``: a column telling series apart."""
    tip = [alt.Tooltip("stream:N"), alt.Tooltip("layer:Q"), alt.Tooltip("head:Q"),
           alt.Tooltip(f"{x}:Q", format=".4g", title=x_title), alt.Tooltip(f"{y}:Q", format=".4g", title=y_title)]
    enc = dict(x=alt.X(f"{x}:Q", title=x_title, scale=alt.Scale(zero=False)),
               y=alt.Y(f"{y}:Q", title=y_title, scale=alt.Scale(zero=False)), tooltip=tip)
    if color:
        enc["color"] = alt.Color(f"{color}:N", title=None, legend=alt.Legend(orient="bottom"))
    rule = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="grey", strokeDash=[2, 3]).encode(y="y:Q")
    points = alt.Chart(d).mark_circle(size=60, opacity=0.8).encode(**enc)
    return alt.layer(rule, points).properties(width=width, height=height, description=description, autosize=PAD)


def knockout_lines(d: pd.DataFrame, *, metric: str, description: str = "iv-knockout") -> alt.Chart:
    """Knockout: the mean effect by the window's first layer, one line per set pair (and stream), and
    the share of examples whose answer changed below it."""
    d = d.copy()
    several = d["stream"].nunique() > 1
    d["edges"] = d["method"] + (" · " + d["stream"].astype(str) if several else "")
    x = alt.X("layer:O", title="first layer of the window", axis=alt.Axis(labelAngle=0))
    color = alt.Color("edges:N", title="blocked", legend=alt.Legend(orient="right"))
    tip = [alt.Tooltip("edges:N", title="blocked"), alt.Tooltip("window:N", title="layers"),
           alt.Tooltip("effect:Q", format=".4g", title=f"mean Δ {metric}"),
           alt.Tooltip("changed:Q", format=".1%", title="answer changed"), alt.Tooltip("n:Q", title="examples")]
    effect = alt.Chart(d).mark_line(point=True).encode(
        x=x, y=alt.Y("effect:Q", title=f"mean Δ {metric}"), color=color, tooltip=tip).properties(width=420, height=200)
    changed = alt.Chart(d).mark_line(point=True).encode(
        x=x, y=alt.Y("changed:Q", title="answer changed", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        color=color, tooltip=tip).properties(width=420, height=110)
    return alt.vconcat(effect, changed).properties(description=description)


def region_curves(d: pd.DataFrame, *, value: str, value_title: str,
                  description: str = "iv-curves") -> alt.Chart:
    """Deletion and insertion curves side by side: ``value`` against the fraction of image tokens
    removed (deletion) or kept (insertion), one line per ranking method."""
    tip = [alt.Tooltip("method:N"), alt.Tooltip("curve:N"), alt.Tooltip("fraction:Q", format=".0%"),
           alt.Tooltip(f"{value}:Q", format=".4g", title=value_title),
           alt.Tooltip("changed:Q", format=".1%", title="answer changed"), alt.Tooltip("n:Q", title="examples")]
    return alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("fraction:Q", title="fraction of the image tokens",
                axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        y=alt.Y(f"{value}:Q", title=value_title, scale=alt.Scale(zero=False)),
        color=alt.Color("method:N", title="ranked by", legend=alt.Legend(orient="right")),
        tooltip=tip,
    ).properties(width=330, height=230).facet(
        column=alt.Column("curve:N", title=None, sort=list(CURVE_DASH))).properties(description=description)


def box_effects_bars(d: pd.DataFrame, *, metric: str, description: str = "iv-boxes") -> alt.Chart:
    """Box regions: the mean effect of removing a box's image tokens, one bar per box label."""
    h = max(60, 22 * len(d))
    return alt.Chart(d).mark_bar().encode(
        y=alt.Y("label:N", sort=d["label"].tolist(), title="box label"),
        x=alt.X("effect:Q", title=f"mean Δ {metric} with the box removed"),
        color=alt.condition("datum.effect < 0", alt.value("#4c78a8"), alt.value("#e45756")),
        tooltip=[alt.Tooltip("label:N"), alt.Tooltip("effect:Q", format=".4g", title=f"mean Δ {metric}"),
                 alt.Tooltip("changed:Q", format=".1%", title="answer changed"), alt.Tooltip("boxes:Q"),
                 alt.Tooltip("examples:Q"), alt.Tooltip("fraction:Q", format=".1%", title="share of the image tokens")],
    ).properties(width=420, height=h, description=description, autosize=PAD)
