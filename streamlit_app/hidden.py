"""Pure transformations behind the Hidden states page: no SQL, no Streamlit.

Hidden vectors arrive from DuckDB as a column of float lists (``vec``) and are
stacked into ``[tokens, dim]`` float32 matrices. Similarities are cosine
similarities of the full vectors, ``cos(u, v) = u·v / (|u| |v|)``, never
distances on a 2-D map.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

from streamlit_app import views

# what the map's points can be coloured by: option -> (column, legend title)
COLOR_BY = {
    "modality": ("modality", "modality"),
    "role": ("role", "role"),
    "example": ("example_id", "example"),
    "answer": ("answer", "answer"),
    "correct": ("correct", "prediction correct"),
}
NN_SCOPES = {
    "example": "tokens of the same example",
    "sample": "tokens of the map's sample (all examples)",
}


def matrix(vecs) -> np.ndarray:
    """A column of float lists as a ``[rows, dim]`` float32 matrix."""
    arr = vecs.to_numpy() if isinstance(vecs, pd.Series) else np.asarray(vecs, dtype=object)
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    return np.stack(arr).astype(np.float32, copy=False)  # [rows, dim]


def cosine_to(m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``[rows]`` cosine similarity of every row of ``m`` to the vector ``q`` (0 for zero vectors)."""
    m = np.asarray(m, np.float64)
    q = np.asarray(q, np.float64)
    den = np.linalg.norm(m, axis=1) * np.linalg.norm(q)
    return np.divide(m @ q, den, out=np.zeros(len(m)), where=den > 0)


def nearest_other_modality(cands: pd.DataFrame, query_vec: np.ndarray, query_modality: str, k: int = 10,
                           exclude: tuple[int, int] | None = None) -> pd.DataFrame:
    """The ``k`` candidates of the *other* modality most similar to a token in the hidden space.

    Parameters
    ----------
    cands : candidate tokens: example_id, token_idx, modality, vec (and any other columns, kept).
    query_vec : the selected token's hidden vector at the same layer.
    query_modality : its modality; candidates of this modality are left out.
    k : how many to return.
    exclude : (example_id, token_idx) to leave out (the token itself).

    Returns
    -------
    ``cands``' rows (without ``vec``) with ``rank`` (1 = most similar) and
    ``cosine``, sorted by decreasing cosine (ties by example_id, token_idx).
    """
    other = cands[cands.modality.notna() & (cands.modality != query_modality)]
    if exclude is not None:
        other = other[~((other.example_id == exclude[0]) & (other.token_idx == exclude[1]))]
    out = other.drop(columns=["vec"]).copy()
    if other.empty:
        out["cosine"] = pd.Series(dtype=float)
        out["rank"] = pd.Series(dtype=int)
        return out
    out["cosine"] = cosine_to(matrix(other.vec), query_vec)
    out = out.sort_values(["cosine", "example_id", "token_idx"], ascending=[False, True, True], kind="stable")
    out = out.head(int(k)).reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def token_text(t) -> str:
    """How a token is named in the UI: its word piece, ``patch r1c2`` (``patch t1r1c2`` for a patch of
    tile 1 of a tiled image, as the Attention page names it), or its role."""
    tok = getattr(t, "token", None)
    if isinstance(tok, str):
        return tok
    r, c = getattr(t, "patch_row", None), getattr(t, "patch_col", None)
    if r is not None and c is not None and pd.notna(r) and pd.notna(c):
        return f"patch {views.patch_label(t)}"
    role = getattr(t, "role", None)
    return f"[{role}]" if isinstance(role, str) else "?"


def token_labels(tokens: pd.DataFrame) -> pd.Series:
    """``token_text`` of every row."""
    return pd.Series([token_text(t) for t in tokens.itertuples(index=False)], index=tokens.index, dtype=object)


def map_points(points: pd.DataFrame, color: str) -> pd.DataFrame:
    """The map's rows ready to draw: ``label`` (the token's name), ``color`` (the chosen field, as text)
    and ``correct_text``."""
    col, _ = COLOR_BY.get(color, COLOR_BY["modality"])
    p = points.copy()
    p["label"] = token_labels(p) if len(p) else pd.Series(dtype=object)
    if col == "correct":
        p["color"] = p.correct.map({True: "correct", False: "wrong"}).fillna("unknown")
    elif col == "example_id":
        p["color"] = "#" + p.example_id.astype(str)
    else:
        p["color"] = p[col].astype(object).where(p[col].notna(), "(none)").astype(str)
    return p


def patch_crop(image: bytes | Image.Image, box: tuple[float, float, float, float], image_size: tuple[int, int],
               size: int = 48) -> bytes:
    """The pixels of one patch box (pixels of the original image) cut from the stored image, as an image
    ``size`` pixels wide (PNG or JPEG bytes, whichever is smaller).

    ``image`` is the stored PNG (or it decoded); it may be a thumbnail, so boxes
    are scaled by its size over the original's ``image_size`` (width, height).
    """
    img = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image)).convert("RGB")
    w, h = image_size
    sx, sy = img.width / max(w, 1), img.height / max(h, 1)
    x0, y0 = int(round(box[0] * sx)), int(round(box[1] * sy))
    x1, y1 = max(int(round(box[2] * sx)), x0 + 1), max(int(round(box[3] * sy)), y0 + 1)
    crop = img.crop((x0, y0, x1, y1))
    ch = max(1, round(size * crop.height / max(crop.width, 1)))
    crop = crop.resize((size, ch), Image.Resampling.NEAREST if crop.width < size else Image.Resampling.LANCZOS)
    return _smallest(crop)


def _smallest(img: Image.Image) -> bytes:
    """The image as PNG or JPEG, whichever is smaller (flat synthetic patches: PNG; photos: JPEG)."""
    out = []
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 85})):  # PNG optimize=True: 3x the time, ~5% smaller
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return min(out, key=len)


def image_uri(data: bytes) -> str:
    """A data URI of PNG or JPEG bytes."""
    return views.data_uri(data, "image/png" if data[:4] == b"\x89PNG" else "image/jpeg")


def patch_crops(points: pd.DataFrame, pngs: dict[str, bytes], sizes: dict[str, tuple[int, int]],
                size: int = 40) -> pd.Series:
    """Data URIs of the patch crops of the rows of ``points`` (None for text tokens and missing images).

    ``points`` has image_id, x0, y0, x1, y1; ``pngs`` and ``sizes`` map image_id to the stored PNG
    and the original (width, height).
    """
    out = pd.Series([None] * len(points), index=points.index, dtype=object)
    has = points.x0.notna() & points.image_id.isin(list(pngs))

    def one_image(item) -> list[tuple[object, str]]:
        image_id, g = item
        img = Image.open(io.BytesIO(pngs[image_id])).convert("RGB")  # decode once, crop many
        return [(i, image_uri(patch_crop(img, (r.x0, r.y0, r.x1, r.y1), sizes[image_id], size)))
                for i, r in zip(g.index, g.itertuples(index=False))]

    # PIL decodes and encodes outside the GIL: a few threads share the images
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for pairs in pool.map(one_image, points[has].groupby("image_id", sort=False)):
            for i, uri in pairs:
                out[i] = uri
    return out


def sample_crops(cat, run: str, stream: str, layer: int, max_images: int) -> dict:
    """{(example_id, token_idx): data URI} of the patch crops of a map's sample, read through ``cat``
    (a catalog); {} when the sample spans more than ``max_images`` images (the tooltips then show the
    patch's row and column only)."""
    from lake import queries

    pts = queries.embedding_map(cat, run, stream, layer)
    pts = pts[pts.x0.notna()]
    ids = pts.image_id.dropna().unique().tolist()
    if not ids or len(ids) > max_images:
        return {}
    pngs = queries.images_png(cat, ids)
    sizes = {i: (int(w), int(h)) for i, w, h in zip(pts.image_id, pts.image_width, pts.image_height)}
    uris = patch_crops(pts, {i: bytes(p) for i, p in zip(pngs.image_id, pngs.png)}, sizes)
    return {(int(e), int(t)): u for e, t, u in zip(pts.example_id, pts.token_idx, uris) if u}


def profile(example: pd.DataFrame, overall: pd.DataFrame, value: str, example_label: str,
            overall_label: str) -> pd.DataFrame:
    """One example's per-layer values and the same over many examples, stacked with a ``scope`` column."""
    a = example.assign(scope=example_label)
    b = overall.assign(scope=overall_label)
    out = pd.concat([a, b], ignore_index=True)
    out[value] = out[value].astype(float)
    out["layer"] = out["layer"].astype(int)
    return out
