"""Token-table builders: one example's rows of the ``tokens`` table, from column parts.

A part is a dict of equal-length lists with the keys of :data:`COLUMNS` (``box`` a 4-tuple in
original pixels or None, ``tile`` the crop an image token comes from); :func:`stack_columns` puts
an example's parts one after another and numbers them. :func:`text_columns`, :func:`image_columns`,
:func:`crop_columns` (:func:`padded_crops`) and :func:`lm_columns` build the parts every family
shares; :func:`token_table` builds a single-stream table from arrays (ViLT). :func:`boxed_masks`
reads a finished table back for the grounding statistics. Nothing here imports torch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lake.schema import ROLES_SPECIAL, TOKENS
from pipeline.models.geometry import PatchGrid

TOKEN_SCHEMA = pa.schema([f for f in TOKENS.schema if f.name != "example_id"])
COLUMNS = ("stream", "modality", "role", "token", "seq_pos", "patch_row", "patch_col", "box", "tile")


def token_rows(**cols) -> pa.Table:
    """A token table from its columns (lists, one value per token). ``tile`` may be left out: image
    tokens are then tile 0 (the base image) and text tokens null; a tiling family gives its own."""
    if "tile" not in cols:
        cols["tile"] = [0 if m == "image" else None for m in cols["modality"]]
    return pa.table(cols, schema=TOKEN_SCHEMA)


def _part(**cols) -> dict[str, list]:
    return {k: list(cols[k]) for k in COLUMNS}


def text_columns(stream: str, pieces: list[str], roles: list[str], seq_pos: list[int]) -> dict[str, list]:
    """Token-table columns of text tokens (see :func:`stack_columns`)."""
    n = len(pieces)
    return _part(stream=[stream] * n, modality=["text"] * n, role=roles, token=pieces, seq_pos=seq_pos,
                 patch_row=[None] * n, patch_col=[None] * n, box=[None] * n, tile=[None] * n)


def image_columns(grid: PatchGrid, stream: str, image_cls: bool) -> dict[str, list]:
    """Token-table columns of a vision tower's tokens: its image ``[CLS]`` (when it has one; boxed
    with the whole processed image) then the patches in raster order; ``seq_pos`` as the tower
    sees them (``[CLS]`` 0, patch ``(r, c)`` at ``[1 +] r * cols + c``: ``flatten(2)`` is row-major)."""
    first = 1 if image_cls else 0
    n, cells = first + len(grid.cells), grid.cells
    return _part(stream=[stream] * n, modality=["image"] * n, role=["image_cls"] * first + ["patch"] * len(cells),
                 token=[None] * n, seq_pos=list(range(first)) + [first + r * grid.cols + c for r, c in cells],
                 patch_row=[None] * first + [r for r, _ in cells], patch_col=[None] * first + [c for _, c in cells],
                 box=([grid.whole] if first else []) + list(grid.boxes), tile=[0] * n)


def crop_columns(crops: list[tuple[int, list[tuple], tuple | None]], cols: int, cls: bool) -> dict[str, list]:
    """The ``vision`` stream's token-table columns of one example whose crops the tower saw one after
    another: ``crops`` in the tower's order, each ``(tile, boxes of its patches in raster order, its
    whole box)``; each crop's tokens are its image ``[CLS]`` (when ``cls``, boxed as the whole crop) then
    its patches, ``cols`` a row, and ``seq_pos`` is ``crop * n + token``."""
    out = {k: [] for k in COLUMNS}
    first = 1 if cls else 0
    for j, (tile, boxes, whole) in enumerate(crops):
        n = len(boxes) + first
        for q in range(n):
            head = q < first
            r, c = divmod(q - first, cols) if not head else (None, None)
            for key, v in zip(COLUMNS, ("vision", "image", "image_cls" if head else "patch", None, j * n + q, r, c,
                                        whole if head else boxes[q - first], tile)):
                out[key].append(v)
    return out


def padded_crops(part: dict[str, list], n: int, padded: int, slot_tiles: list[int]) -> dict[str, list]:
    """:func:`crop_columns`' part for a tower that pads each crop's ``n`` tokens to ``padded`` and always
    sees ``len(slot_tiles)`` crops, the unused ones zeros (Mllama's tiles): every token at its place in
    that sequence (``crop * padded + token``, the tower's order), the padding kept (a crop's last
    ``padded - n`` tokens, an unused slot's every token: role ``pad``, modality image, no patch, no box;
    slot ``j``'s tokens are tile ``slot_tiles[j]``)."""
    out = {k: list(v) for k, v in part.items()}
    out["seq_pos"] = [s // n * padded + s % n for s in part["seq_pos"]]
    used = len(part["seq_pos"]) // n
    pads = [(j, q) for j in range(used) for q in range(n, padded)]
    pads += [(j, q) for j in range(used, len(slot_tiles)) for q in range(padded)]
    for j, q in pads:
        for key, v in zip(COLUMNS, ("vision", "image", "pad", None, j * padded + q, None, None, None, slot_tiles[j])):
            out[key].append(v)
    order = sorted(range(len(out["seq_pos"])), key=out["seq_pos"].__getitem__)
    return {k: [v[i] for i in order] for k, v in out.items()}


def lm_columns(pieces: list[str], roles: list[str], pos: list[int], is_img: list[bool],
               image_rows: list[tuple]) -> dict[str, list]:
    """One example's ``lm`` token-table columns: image token ``k`` (``is_img``) takes ``image_rows[k]`` =
    (role, tile, patch_row, patch_col, box in original pixels); a text token its role (``roles``, one per
    token) and word piece; ``seq_pos`` counts from the example's first real token (``pos``: the tokens'
    sequence positions)."""
    cols = {k: [] for k in COLUMNS}
    k = 0
    for p, img, piece, text_role in zip(pos, is_img, pieces, roles):
        role, tile, pr, pc, bx = image_rows[k] if img else (text_role, None, None, None, None)
        for key, v in zip(COLUMNS, ("lm", "image" if img else "text", role, None if img else piece, p - pos[0],
                                    pr, pc, bx, tile)):
            cols[key].append(v)
        k += img
    return cols


def query_columns(stream: str, n: int) -> dict[str, list]:
    """Token-table columns of ``n`` learned query tokens (a perceiver's latents): modality ``image``, role
    ``query``, no patch and no box (a query reads the whole image), ``seq_pos`` ``0..n-1``."""
    return _part(stream=[stream] * n, modality=["image"] * n, role=["query"] * n, token=[None] * n,
                 seq_pos=list(range(n)), patch_row=[None] * n, patch_col=[None] * n, box=[None] * n, tile=[0] * n)


def shuffled_rows(crops: list[tuple[int, list[tuple], tuple | None]], blocks: list[list[tuple[int, int]]],
                  side: int, merged: int) -> list[tuple]:
    """The ``lm`` image tokens of crops folded by a pixel shuffle (InternVL, Aya Vision): per crop in the
    tower's order (``(tile, its patches' boxes in raster order, ...)``, ``side`` patches a side), token
    ``k`` of ``blocks`` (the tower patches ``(row, col)`` each token holds) at ``divmod(k, merged)`` of the
    crop's shuffled grid, boxed as the union of its patches' boxes."""
    return [("patch", tile, k // merged, k % merged, union([boxes[r * side + c] for r, c in blk]))
            for tile, boxes, *_ in crops for k, blk in enumerate(blocks)]


def plain_rows(grid, cls: bool) -> list[tuple]:
    """The ``lm`` image tokens of a plain tower: (the tower's CLS when ``cls``, then) one per patch in
    raster order, tile 0, boxed as the patch."""
    head = [("image_cls", 0, None, None, grid.whole)] if cls else []
    return head + [("patch", 0, r, c, box) for (r, c), box in zip(grid.cells, grid.boxes)]


def merged_columns(image, gh: int, gw: int, m: int, vis_seq: list[int]) -> tuple[list[tuple], dict[str, list]]:
    """A packed tower's ``gh x gw`` patches of one image, merged ``m x m`` into ``lm`` image tokens (Qwen-VL,
    Pixtral): ``lm`` image token ``k`` is merged block ``k`` of the ``(gh / m) x (gw / m)`` grid, row-major,
    boxed in pixels of the original ``image`` (each axis by the resize ratio); then the ``vision`` columns,
    the patches in raster order at ``vis_seq``, their positions in the tower's sequence."""
    W, H = image.size
    fx, fy = W / gw, H / gh  # original pixels per tower patch (the resize ratio's inverse)
    bw = gw // m
    rows = []
    for k in range((gh // m) * bw):
        R, C = divmod(k, bw)  # merged block k, row-major
        rows.append(("patch", 0, R, C, (C * m * fx, R * m * fy, (C + 1) * m * fx, (R + 1) * m * fy)))
    nv = gh * gw
    r, c = np.divmod(np.arange(nv), gw)
    x0, y0, x1, y1 = (c * fx).tolist(), (r * fy).tolist(), ((c + 1) * fx).tolist(), ((r + 1) * fy).tolist()
    vision = _part(stream=["vision"] * nv, modality=["image"] * nv, role=["patch"] * nv, token=[None] * nv,
                   seq_pos=vis_seq, patch_row=r.tolist(), patch_col=c.tolist(), box=list(zip(x0, y0, x1, y1)),
                   tile=[0] * nv)
    return rows, vision


def stack_columns(*parts: dict[str, list]) -> pa.Table:
    """One example's token table from column parts, in order: ``token_idx`` numbers the rows,
    ``text_pos`` the text tokens. The first part's keys decide: without ``tile`` image tokens are
    tile 0 (:func:`token_rows`)."""
    cols = {k: [v for p in parts for v in p[k]] for k in parts[0]}
    box = cols.pop("box")
    text_pos, i = [], 0
    for m in cols["modality"]:
        text_pos.append(i if m == "text" else None)
        i += m == "text"
    extra = {"tile": cols["tile"]} if "tile" in cols else {}
    return token_rows(token_idx=list(range(len(box))), stream=cols["stream"], modality=cols["modality"],
                      role=cols["role"], token=cols["token"], seq_pos=cols["seq_pos"], text_pos=text_pos,
                      patch_row=cols["patch_row"], patch_col=cols["patch_col"],
                      **{name: [None if b is None else b[j] for b in box]
                         for j, name in enumerate(("x0", "y0", "x1", "y1"))}, **extra)


def token_table(*, n_text: int, n_image: int, stream: str, roles_text, roles_image, pieces, seq,
                patch_row, patch_col, x0, y0, x1, y1, tile=None) -> pa.Table:
    """One stream's token table from arrays: ``n_text`` text tokens then ``n_image`` image tokens.

    ``roles_text``/``pieces`` cover the text tokens; ``roles_image``, ``patch_row``/``patch_col``
    (-1 = none), the box ``x0..y1`` and ``tile`` (default 0, the base image) the image tokens;
    ``seq`` every token's sequence position.
    """
    n = n_text + n_image
    nulls_t = np.ones(n_text, bool)
    pr, pc = np.asarray(patch_row, np.int32), np.asarray(patch_col, np.int32)

    def img(values, dtype, mask=None):
        full = np.concatenate([np.zeros(n_text, dtype), np.asarray(values, dtype)])
        m = np.concatenate([nulls_t, np.zeros(n_image, bool) if mask is None else mask])
        return pa.array(full, mask=m)

    return pa.table({
        "token_idx": pa.array(np.arange(n, dtype=np.int32)),
        "stream": pa.array([stream] * n, pa.string()),
        "modality": pa.array(["text"] * n_text + ["image"] * n_image, pa.string()),
        "role": pa.array(list(roles_text) + list(roles_image), pa.string()),
        "token": pa.array(list(pieces) + [None] * n_image, pa.string()),
        "seq_pos": pa.array(np.asarray(seq, np.int32)),
        "text_pos": pa.array(np.arange(n, dtype=np.int32), mask=np.arange(n) >= n_text),
        "patch_row": img(pr, np.int32, pr < 0),
        "patch_col": img(pc, np.int32, pc < 0),
        "x0": img(x0, np.float32), "y0": img(y0, np.float32), "x1": img(x1, np.float32), "y1": img(y1, np.float32),
        "tile": img(np.zeros(n_image) if tile is None else tile, np.int16),
    }, schema=TOKEN_SCHEMA)


def union(boxes) -> tuple:
    """The smallest box holding every box of ``boxes`` (``(x0, y0, x1, y1)`` each)."""
    return (min(x[0] for x in boxes), min(x[1] for x in boxes), max(x[2] for x in boxes), max(x[3] for x in boxes))


def role_is_special(role: str) -> bool:
    return role in ROLES_SPECIAL


def column(t: pa.Table, name: str, dtype=None) -> np.ndarray:
    a = t.column(name).to_numpy(zero_copy_only=False)
    return a if dtype is None else a.astype(dtype)


def boxed_masks(tokens: pa.Table, boxes: list[dict] | None, pieces_of) -> tuple[np.ndarray, np.ndarray]:
    """Which text tokens belong to a boxed word, and which patches lie in that word's box.

    Parameters
    ----------
    tokens : one example's token table (one stream).
    boxes : the manifest's ``[{"label": word, "box": [x0, y0, x1, y1]}]``.
    pieces_of : ``label -> list of word pieces`` (the model's tokenizer).

    Returns
    -------
    ``boxed`` ``[token]`` bool, and ``in_box`` ``[token, token]`` bool (token ``j``'s box
    contains patch ``k``). A patch is in a box when its centre is; when no patch centre is,
    the patch holding the box's centre stands for it.
    """
    n = tokens.num_rows
    boxed = np.zeros(n, bool)
    in_box = np.zeros((n, n), bool)
    if not boxes or n == 0:
        return boxed, in_box
    role = column(tokens, "role")
    modality = column(tokens, "modality")
    patches = np.flatnonzero(role == "patch")
    words_at = np.flatnonzero(modality == "text")
    words = [(w or "").lower() for w in column(tokens, "token")[words_at]]
    if len(patches):
        x0p, x1p = column(tokens, "x0", float)[patches], column(tokens, "x1", float)[patches]
        y0p, y1p = column(tokens, "y0", float)[patches], column(tokens, "y1", float)[patches]
        cxp, cyp = (x0p + x1p) / 2, (y0p + y1p) / 2
    for b in boxes:
        pieces = [p.lower() for p in pieces_of(b["label"])]
        if not pieces or not len(patches):
            continue
        x0, y0, x1, y1 = b["box"]
        inside = patches[(x0 <= cxp) & (cxp <= x1) & (y0 <= cyp) & (cyp <= y1)]
        if not len(inside):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            inside = patches[(x0p <= cx) & (cx < x1p) & (y0p <= cy) & (cy < y1p)][:1]
        if not len(inside):
            continue
        m = len(pieces)
        for s in range(len(words) - m + 1):  # word matching: a few dozen text tokens at most
            if words[s:s + m] == pieces:
                js = words_at[s:s + m]
                boxed[js] = True
                in_box[np.ix_(js, inside)] = True
    return boxed, in_box
