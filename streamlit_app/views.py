"""Pure transformations behind the attention views: no SQL, no Streamlit.

An attention *block* is the sparse long DataFrame ``query_idx, key_idx,
weight`` of one example at ``(stream, layer, head)`` (``weight = A[query,
key]``); pairs that are absent were pruned and count as 0. Token tables are
the example's rows of ``tokens``. Patch positions always come from
``patch_row``/``patch_col`` and the pixel boxes ``x0..y1``, never from the
sequence order (ViLT permutes its patches).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.capture_config import AttentionPolicy, KeepAll

# viridis at 0, 0.1, ..., 1: the sequential scale of every weight in the app
VIRIDIS = np.array([
    [68, 1, 84], [72, 36, 117], [65, 68, 135], [53, 95, 141], [42, 120, 142], [33, 145, 140],
    [34, 168, 132], [68, 191, 112], [122, 209, 81], [189, 223, 38], [253, 231, 37]], dtype=np.float64)


def colormap(v: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] of values ``v`` in [0, 1] on the viridis scale; shape ``v.shape + (3,)``."""
    v = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64)), 0, 1)
    xs = np.linspace(0, 1, len(VIRIDIS))
    return np.stack([np.interp(v, xs, VIRIDIS[:, c]) for c in range(3)], axis=-1)


# -- which tokens a stream's queries and keys are --------------------------------------
# cross streams: (the stream whose tokens are the queries, the stream whose tokens are the keys)
CROSS_STREAMS = {"cross": ("text", "vision"), "qformer_cross": ("qformer", "vision"), "perceiver": ("perceiver", "vision"),
                 "lm_cross": ("lm", "vision")}


def stream_tokens(tokens: pd.DataFrame, stream: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(query tokens, key tokens) of a stream.

    A cross stream's queries and keys are other streams' tokens (docs/DESIGN.md): BLIP's ``cross``
    has the ``text`` stream's tokens as queries and the ``vision`` stream's as keys; BLIP-2's
    ``qformer_cross`` the Q-Former's learned query tokens (role ``query``; InstructBLIP's instruction
    tokens do not attend to the image) and the ``vision`` stream's tokens. Every other stream attends
    within its own tokens.
    """
    if stream in CROSS_STREAMS:
        qs, ks = CROSS_STREAMS[stream]
        q, k = tokens[tokens.stream == qs], tokens[tokens.stream == ks]
        if stream == "qformer_cross":
            q = q[q.role == "query"]
    else:
        q = k = tokens[tokens.stream == stream]
    if q.empty or k.empty:  # token table without this stream's rows: use them all
        q = k = tokens
    return q, k


def query_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    """The learned query tokens (role ``query``: BLIP-2's Q-Former queries, in the LM or the Q-Former), in
    sequence order; query token ``k`` of the LM carries Q-Former query ``k``."""
    return tokens[tokens.role == "query"].sort_values(["seq_pos", "token_idx"])


def query_label(t) -> str:
    """``"q3"``: a learned query token by its rank."""
    return f"q{int(t.seq_pos)}"


def compose_through_queries(lm_to_queries: pd.DataFrame, qformer_queries: pd.DataFrame, cross: pd.DataFrame,
                            patches: pd.DataFrame) -> pd.DataFrame:
    """``patches`` with a ``weight`` column: attention composed through the learned query tokens,
    ``c[p] = Σ_k a[k] · C[k, p]``.

    ``lm_to_queries`` are the LM's query tokens with ``weight`` ``a[k]`` (what the selected LM tokens
    put on query token ``k``, :func:`mean_rows`); ``qformer_queries`` the Q-Former's query tokens; the
    ``k``-th of each in sequence order is the same query (the LM's carries the Q-Former's output).
    ``cross`` is the ``qformer_cross`` block (``query_idx`` a Q-Former query token, ``key_idx`` a
    vision token, ``weight = C[k, key]``). Pairs absent from the block count as 0. Not an attention the
    model computes: a product of two attentions, as in attention rollout.
    """
    lm_q, qf_q = query_tokens(lm_to_queries), query_tokens(qformer_queries)
    if len(lm_q) != len(qf_q):
        raise ValueError(f"the LM has {len(lm_q)} query tokens and the Q-Former {len(qf_q)}")
    a = pd.Series(lm_q.weight.to_numpy(dtype=np.float64), index=qf_q.token_idx.astype(int).to_numpy())
    c = cross[cross.query_idx.isin(a.index) & cross.key_idx.isin(patches.token_idx)]
    contrib = c.weight.to_numpy(dtype=np.float64) * a.reindex(c.query_idx.astype(int)).to_numpy()
    s = pd.Series(contrib, index=c.key_idx.astype(int).to_numpy()).groupby(level=0).sum()
    out = patches.copy()
    out["weight"] = out.token_idx.map(s).fillna(0.0).astype(float)
    return out


def text_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    """The text tokens (those with a text position), in text order."""
    return tokens[(tokens.modality == "text") & tokens.text_pos.notna()].sort_values(["text_pos", "token_idx"])


def patch_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    return tokens[(tokens.role == "patch") & tokens.patch_row.notna() & tokens.patch_col.notna()]


def token_label(t: pd.Series | tuple) -> str:
    """``"3 · red"``: text position and word piece (or the role of a token with no text); a token the
    model generated (a decoder's answer) is marked ``"12 · red ✦"``."""
    pos = t.text_pos if pd.notna(t.text_pos) else t.seq_pos
    mark = " ✦" if t.role == "generated" else ""
    return f"{int(pos)} · {t.token if isinstance(t.token, str) else t.role}{mark}"


def object_word(text_q: pd.DataFrame, boxes) -> int | None:
    """The text position of the first word that names one of the example's boxed objects (the
    manifest's ``[{"label": word, "box": …}]``), or None. A word matches when its piece, lowercased
    and without the tokenizer's word marks, equals the label's first word."""
    try:
        items = json.loads(boxes) if isinstance(boxes, str) else (boxes or [])
    except ValueError:
        return None
    labels = {str(b.get("label", "")).lower().split()[0] for b in items
              if isinstance(b, dict) and str(b.get("label", "")).strip()}
    for t in text_q.itertuples():
        piece = _piece(t)
        if t.role == "word" and piece and piece in labels:
            return int(t.text_pos)
    return None


# Words that name nothing in a picture (English question and function words): a first view without a
# boxed object opens on a content word, never on "is" or "the".
STOP_WORDS = frozenset("""
    a an the is are was were be been being am do does did has have had what which who whom whose where when
    how why there here this that these those it its they them their he she his her i you we of in on at to
    from by for with about as into onto over under and or but not no nor any some many much more most very
    can could should would will may might must shall than then so if s""".split())


def _piece(t) -> str:
    """A token's word piece, lowercased and without the tokenizer's word marks."""
    return t.token.lower().lstrip("#Ġ▁ ") if isinstance(t.token, str) else ""


def content_word(text_q: pd.DataFrame, image_mass: pd.Series | None = None) -> int | None:
    """The text position of the word a first view opens on when no word names a boxed object: of the
    content words (role ``word``, a piece with a letter or digit, not in :data:`STOP_WORDS`), the one
    whose query row puts the most mass on the image (``image_mass``: by token_idx), the first in the
    text on a tie or when no mass is known. None when the text has no content word."""
    words = [t for t in text_q.itertuples() if t.role == "word" and any(ch.isalnum() for ch in _piece(t))
             and _piece(t) not in STOP_WORDS]
    if not words:
        return None
    masses = image_mass if image_mass is not None else pd.Series(dtype=float)
    best = max(words, key=lambda t: (float(masses.get(int(t.token_idx), 0.0)), -float(t.text_pos)))
    return int(best.text_pos)


def image_mass(block: pd.DataFrame, queries: pd.DataFrame, keys: pd.DataFrame) -> pd.Series:
    """Each query row's mass on ``keys``: the sum of its weights over them (float64), by query token_idx."""
    sel = block[block.query_idx.isin(queries.token_idx) & block.key_idx.isin(keys.token_idx)]
    return sel.weight.astype(np.float64).groupby(sel.query_idx.astype(int)).sum()


def patch_label(t) -> str:
    """``"r1c2"`` (row, column) of a patch of the base image; ``"t1r1c2"`` of a patch of tile 1."""
    tile = getattr(t, "tile", None)
    prefix = f"t{int(tile)}" if tile is not None and not pd.isna(tile) and int(tile) > 0 else ""
    return f"{prefix}r{int(t.patch_row)}c{int(t.patch_col)}"


# -- tiles: the base image (tile 0) and the crops or tiles of a tiling family (1..) ---------------
def tiles(patches: pd.DataFrame) -> list[int]:
    """The tiles the patches belong to, in order (``[0]`` for a single image, and for a lake written
    before tiles)."""
    if "tile" not in patches or patches.empty:
        return [0] if len(patches) else []
    return sorted({int(t) for t in patches.tile.fillna(0)})


def tile_label(tile) -> str:
    """What the Attention page calls a choice of image tokens."""
    if tile == "all":
        return "all tiles on the original image"
    return "base image" if int(tile) == 0 else f"tile {int(tile)}"


def of_tile(patches: pd.DataFrame, tile) -> pd.DataFrame:
    """The patches of one tile (all of them for ``"all"``)."""
    if tile == "all" or "tile" not in patches:
        return patches
    return patches[patches.tile.fillna(0).astype(int) == int(tile)]


def tile_boxes(patches: pd.DataFrame, selected="all") -> pd.DataFrame:
    """One row per tile: tile, outline (its label), x0, y0, x1, y1 (the union of its patches' boxes, in
    pixels of the original image) and selected (the tile shown, or every tile for ``"all"``)."""
    p = patches.assign(tile=patches.tile.fillna(0).astype(int) if "tile" in patches else 0)
    b = p.groupby("tile").agg(x0=("x0", "min"), y0=("y0", "min"), x1=("x1", "max"), y1=("y1", "max")).reset_index()
    b.insert(1, "outline", [tile_label(t) for t in b.tile])
    b["selected"] = True if selected == "all" else b.tile == int(selected)
    return b


# -- slicing a block ------------------------------------------------------------------
def mean_rows(block: pd.DataFrame, queries: list[int], keys: pd.DataFrame) -> pd.DataFrame:
    """``keys`` with a ``weight`` column: the mean over ``queries`` of ``A[q, key]``.

    A query without a stored weight on a key contributes 0, so the mean is the
    sum divided by the number of queries.
    """
    out = keys.copy()
    if not len(queries):
        out["weight"] = 0.0
        return out
    sel = block[block.query_idx.isin(queries) & block.key_idx.isin(keys.token_idx)]
    s = sel.groupby("key_idx").weight.sum() / len(queries)
    out["weight"] = out.token_idx.map(s).fillna(0.0).astype(float)
    return out


def matrix(block: pd.DataFrame, queries: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """Long DataFrame of every (query, key) pair of two token sets with its weight (0 where absent).

    Columns: query_idx, key_idx, query, key (labels), query_order, key_order, weight.
    """
    q = queries.assign(query=[token_label(t) for t in queries.itertuples()], query_order=range(len(queries)))
    k = keys.assign(key=[token_label(t) for t in keys.itertuples()], key_order=range(len(keys)))
    grid = q[["token_idx", "query", "query_order"]].rename(columns={"token_idx": "query_idx"}).merge(
        k[["token_idx", "key", "key_order"]].rename(columns={"token_idx": "key_idx"}), how="cross")
    w = block.set_index(["query_idx", "key_idx"]).weight
    idx = pd.MultiIndex.from_arrays([grid.query_idx, grid.key_idx])
    grid["weight"] = w.reindex(idx).fillna(0.0).to_numpy() if len(w) else 0.0
    return grid


def row_mass(block: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
    """``queries`` (token rows) with ``mass``: the sum of each query row's stored weights over every key.

    Stored weights are the true weights of the kept pairs, so with pruned weights
    this is exactly the share of the row's attention mass that is stored (1 when
    nothing was pruned). On a mean-over-heads block it is that share averaged over heads.
    """
    out = queries.copy()
    s = block.groupby("query_idx").weight.sum() if len(block) else pd.Series(dtype=float)
    out["mass"] = out.token_idx.map(s).fillna(0.0).astype(float)
    return out


def keep_description(keep: str | None) -> str:
    """One sentence on what a run's ``keep_attention`` policy stores (``pipeline.capture_config``, which
    imports no torch), or the policy's text when it is not understood."""
    text = str(keep or "all")
    try:
        return AttentionPolicy.parse(text).describe()
    except ValueError:
        return f"weights kept by `{text}`"


def is_pruned(keep: str | None) -> bool:
    """Whether a run's ``keep_attention`` leaves out some weights (anything but ``all``)."""
    try:
        return not isinstance(AttentionPolicy.parse(keep), KeepAll)
    except ValueError:
        return True


# -- the image side ---------------------------------------------------------------------
def image_size(example: dict, patches: pd.DataFrame) -> tuple[int, int]:
    """(width, height) of the original image: the example's, else the extent of the patch boxes."""
    def ok(v) -> bool:
        return v is not None and not pd.isna(v) and v > 0

    w, h = example.get("image_width"), example.get("image_height")
    if ok(w) and ok(h):
        return int(w), int(h)
    if len(patches):
        return max(1, int(patches.x1.max())), max(1, int(patches.y1.max()))
    return 1, 1


def patch_grid(patches: pd.DataFrame, grid_h: int | None = None, grid_w: int | None = None) -> np.ndarray:
    """``[grid_h, grid_w]`` array with each patch's ``weight`` at ``(patch_row, patch_col)`` (0 elsewhere)."""
    rows = patches.patch_row.astype(int).to_numpy()
    cols = patches.patch_col.astype(int).to_numpy()
    gh = max(int(grid_h or 0), int(rows.max()) + 1 if len(rows) else 1)
    gw = max(int(grid_w or 0), int(cols.max()) + 1 if len(cols) else 1)
    g = np.zeros((gh, gw))  # [grid_h, grid_w]
    g[rows, cols] = patches.weight.to_numpy(dtype=np.float64)
    return g


def _grid_heat(patches: pd.DataFrame, width: int, height: int, dw: int, dh: int) -> np.ndarray:
    """``[dh, dw]``: one grid of patches' weights, upsampled bilinearly and placed where its boxes lie
    (0 outside the grid)."""
    g = patch_grid(patches).astype(np.float32)  # [grid_h, grid_w]
    sx, sy = dw / width, dh / height
    # cell size and the grid's origin in display pixels, from the boxes (robust to missing patches)
    pw = float((patches.x1 - patches.x0).median()) * sx
    ph = float((patches.y1 - patches.y0).median()) * sy
    x0 = float((patches.x0 * sx - patches.patch_col * pw).median())
    y0 = float((patches.y0 * sy - patches.patch_row * ph).median())
    ew, eh = max(1, round(g.shape[1] * pw)), max(1, round(g.shape[0] * ph))
    heat = np.asarray(Image.fromarray(g, mode="F").resize((ew, eh), Image.Resampling.BILINEAR))  # [eh, ew]
    out = np.zeros((dh, dw), np.float32)
    ox, oy = round(x0), round(y0)
    # clip the heat's extent to the image
    top, left = max(oy, 0), max(ox, 0)
    h_, w_ = min(dh, oy + eh) - top, min(dw, ox + ew) - left
    if h_ > 0 and w_ > 0:
        out[top: top + h_, left: left + w_] = heat[top - oy: top - oy + h_, left - ox: left - ox + w_]
    return out


def heat(patches: pd.DataFrame, width: int, height: int, display: tuple[int, int]) -> np.ndarray:
    """``[dh, dw]`` heat of the patches' ``weight`` on the original image at display size ``(dw, dh)``.

    Each tile's patches form a grid (``patch_row``, ``patch_col`` within the tile), upsampled
    bilinearly and placed at its boxes ``x0..y1``; the tiles' grids are summed, so where tiles
    overlap (the base image lies under every crop) a pixel holds the sum of the weights of the tokens
    that cover it: the attention that lands on that spot of the image through any token showing it.
    """
    dw, dh = display
    groups = [g for _, g in patches.groupby(patches.tile.fillna(0).astype(int))] if len(tiles(patches)) > 1 \
        else [patches]
    return np.sum([_grid_heat(g, width, height, dw, dh) for g in groups], axis=0)


def overlay(png: bytes | None, patches: pd.DataFrame, width: int, height: int, display_width: int = 420,
            vmax: float | None = None, max_alpha: float = 0.8) -> tuple[bytes, int, int]:
    """The image with a smooth heatmap of the patches' ``weight`` laid over it.

    Each patch's weight is placed at its ``(patch_row, patch_col)`` on the grid;
    the grid, spanning the patches' pixel boxes (``x0..y1``, pixels of the
    original ``width`` × ``height`` image), is upsampled bilinearly to display
    pixels, coloured with viridis and alpha-blended (alpha grows with the
    weight) over the dimmed image. Patches of several tiles are summed where
    they overlap (:func:`heat`); the colour scale then tops at the heat's
    largest value unless ``vmax`` is given.

    Returns JPEG bytes and the display size (w, h).
    """
    dw = int(display_width)
    dh = max(1, round(dw * height / max(width, 1)))
    if png is None:  # no image in the lake: the heatmap on a neutral canvas
        img = Image.new("RGB", (dw, dh), (128, 128, 128))
    else:
        img = Image.open(io.BytesIO(png)).convert("RGB").resize((dw, dh), Image.Resampling.LANCZOS)
    base = np.asarray(img, dtype=np.float64) * 0.75  # [dh, dw, 3], dimmed so the heat stands out
    if len(patches):
        h = heat(patches, width, height, (dw, dh))  # [dh, dw]
        top = float(patches.weight.max()) if len(tiles(patches)) <= 1 else float(h.max())
        vmax = float(vmax if vmax is not None else top)
        v = h / vmax if vmax > 0 else np.zeros_like(h)
        rgb = colormap(v)  # [dh, dw, 3]
        alpha = (max_alpha * np.clip(v, 0, 1))[..., None]  # [dh, dw, 1]: 0 where there is no heat
        base = base * (1 - alpha) + rgb * alpha
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=88)
    return buf.getvalue(), dw, dh


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def thumbnail_uri(png: bytes, longest: int = 96) -> str:
    """A small JPEG data URI of an image, for tables."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.thumbnail((longest, longest))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return data_uri(buf.getvalue())


def patches_in_box(patches: pd.DataFrame, box: dict) -> list[int]:
    """token_idx of the patches whose centre lies in an interval selection ``{"x0": [a, b], "y0": [c, d]}``."""
    xs = next((v for k, v in box.items() if k.startswith("x")), None)
    ys = next((v for k, v in box.items() if k.startswith("y")), None)
    cx = (patches.x0 + patches.x1) / 2
    cy = (patches.y0 + patches.y1) / 2
    m = pd.Series(True, index=patches.index)
    if xs:
        m &= cx.between(min(xs), max(xs))
    if ys:
        m &= cy.between(min(ys), max(ys))
    return patches[m].token_idx.astype(int).tolist()


def examples_table(rows: pd.DataFrame, thumbs: dict[str, str]) -> pd.DataFrame:
    """Rows of ``examples`` for display: image thumbnail first, meta JSON keys as ``meta.<key>`` columns."""
    t = pd.DataFrame({"image": [thumbs.get(i) for i in rows.image_id]})
    for col in ("example_id", "text", "answer", "prediction", "correct", "split", "source_id"):
        t[col] = rows[col].to_numpy()
    metas = [json.loads(m) if isinstance(m, str) and m.strip().startswith("{") else {} for m in rows.meta]
    for key in sorted({k for m in metas for k in m}):
        t[f"meta.{key}"] = [None if m.get(key) is None else m[key] if isinstance(m[key], str) else json.dumps(m[key])
                            for m in metas]
    return t


def answer_line(answer) -> str:
    """An example's answer as the pages show it: ``answer **X**``, or "no answer given" for a
    missing or blank one (never "answer None")."""
    missing = answer is None or (not isinstance(answer, str) and pd.isna(answer)) or not str(answer).strip()
    return "no answer given" if missing else f"answer **{answer}**"


def prediction_line(prediction, label: str = "prediction") -> str:
    """A prediction as the pages show it: ``prediction **X**``, or "no prediction"."""
    missing = prediction is None or (not isinstance(prediction, str) and pd.isna(prediction))
    return f"no {label}" if missing else f"{label} **{prediction}**"
