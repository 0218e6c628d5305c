"""A small, complete, internally consistent synthetic lake for tests and development.

``make_synthetic_lake(root)`` writes one run through :class:`lake.writer.LakeWriter`
the way the pipeline does: the ``runs`` row, then one chunk at a time every
table's rows. No model is involved: attention is the softmax of seeded random
logits (every query row sums to 1), head statistics are computed from that full
attention in numpy (the formulas of ``pipeline/stats.py``), and images are real
PNGs drawn with PIL.

Each example's token table is, per stream::

    [CLS] w1 .. wn [SEP]            text, roles cls / word / sep, text_pos 0..n+1
    [IMG]                           image, role image_cls
    a 3 x 4 grid of patches         image, role patch, stored in a SHUFFLED
                                    token_idx order (sequence order != raster order)

The image tokens are tile 0 (the base image). A *tiled* example (``tiles=``) has two tiles
besides, as tiling families (LLaVA-NeXT, Idefics3) crop the image: tile 1 the left half and tile
2 the right half, each a 6 x 4 grid of half-size patches (each shuffled like the base's), with
boxes in pixels of the original image and rows/columns counted within the tile.

The returned :class:`SynthLake` keeps the full float64 attention of every
``(example_id, stream, layer)`` so tests can compute expected values
independently of ``lake/queries.py``.

Run ``python -m tests.lakegen DIR`` to write a lake for the app by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw

from lake.schema import ATTENTION, EXAMPLES, HEAD_STATS, HIDDEN_STATES, IMAGES, TOKENS
from lake.writer import LakeWriter

GRID_H, GRID_W = 3, 4  # default patch rows, patch columns
PATCH_PX = 40  # pixels per patch side; the default image is 160 x 120
SPECIAL = ("cls", "sep", "bos", "eos", "image_cls")

TEXTS = [
    "is the circle red",
    "how many squares are there",
    "is the square left of the circle",
    "what color is the triangle",
    "are there two circles",
    "is the triangle blue",
    "what shape is green",
]
ANSWERS = ["yes", "2", "no", "blue", "yes", "no", "circle"]
PREDICTIONS = ["yes", "3", "no", "blue", "no", "no", "circle"]
QTYPES = ["color", "count", "spatial", "color", "count", "color", "shape"]
COLORS = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 190, 30)]


@dataclass
class SynthLake:
    """What was written, for tests to check against.

    attention : ``{(example_id, stream, layer): array [head, query, key]}``, full
        float64 attention in the stream's own token order (query/key index ``i``
        is the stream's ``token_idx - offset[stream]``).
    stored : same keys, the weights as stored (pruned to 0, rounded to float16 precision,
        stored as float32).
    offset : first token_idx of each stream.
    stats : long DataFrame example_id, stream, layer, head, stat, value as written.
    """

    root: Path
    run: str
    streams: tuple[str, ...]
    n_layers: int
    n_heads: int
    examples: pd.DataFrame
    tokens: pd.DataFrame
    attention: dict = field(default_factory=dict)
    stored: dict = field(default_factory=dict)
    offset: dict = field(default_factory=dict)
    stats: pd.DataFrame | None = None
    keep_attention: str = "all"

    def tokens_of(self, example_id: int, stream: str | None = None) -> pd.DataFrame:
        stream = stream or self.streams[0]
        t = self.tokens
        return t[(t.example_id == example_id) & (t.stream == stream)].sort_values("token_idx")


def draw_image(i: int, width: int = GRID_W * PATCH_PX, height: int = GRID_H * PATCH_PX) -> bytes:
    """A PNG of a few coloured shapes, different for each ``i``."""
    img = Image.new("RGB", (width, height), (235, 235, 228))
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(1000 + i)
    for j in range(3):
        x, y = int(rng.integers(5, width - 45)), int(rng.integers(5, height - 45))
        c = COLORS[(i + j) % len(COLORS)]
        kind = (i + j) % 3
        if kind == 0:
            d.ellipse([x, y, x + 38, y + 38], fill=c)
        elif kind == 1:
            d.rectangle([x, y, x + 36, y + 36], fill=c)
        else:
            d.polygon([(x + 19, y), (x + 38, y + 38), (x, y + 38)], fill=c)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tile_grids(grid: tuple[int, int], tiled: bool) -> list[tuple[int, tuple[int, int], int, float]]:
    """``(tile, (rows, cols), patch side in pixels, left edge in pixels)`` of an example's image
    tokens: the base image, and for a tiled example its left and right halves at half-size patches."""
    gh, gw = grid
    out = [(0, (gh, gw), PATCH_PX, 0.0)]
    if tiled:
        half = PATCH_PX // 2
        out += [(1, (2 * gh, gw), half, 0.0), (2, (2 * gh, gw), half, gw * half)]
    return out


def n_image_tokens(grid: tuple[int, int], tiled: bool = False) -> int:
    """The image [CLS] and every tile's patches."""
    return 1 + sum(g[0] * g[1] for _, g, _, _ in tile_grids(grid, tiled))


def _token_rows(example_id: int, words: list[str], stream: str, offset: int,
                rng: np.random.Generator, grid: tuple[int, int], tiled: bool = False) -> list[dict]:
    rows = []
    text = ["[CLS]", *words, "[SEP]"]
    for i, w in enumerate(text):
        role = "cls" if i == 0 else "sep" if i == len(text) - 1 else "word"
        rows.append(dict(token_idx=i, modality="text", role=role, token=w, text_pos=i))
    rows.append(dict(token_idx=len(text), modality="image", role="image_cls", token=None, tile=0))
    for tile, (th, tw), p, left in tile_grids(grid, tiled):
        raster = [(r, c) for r in range(th) for c in range(tw)]
        order = rng.permutation(len(raster))  # sequence order != raster order
        for k in order:
            r, c = raster[k]
            rows.append(dict(token_idx=len(rows), modality="image", role="patch", token=None, tile=tile,
                             patch_row=r, patch_col=c, x0=left + c * p, y0=r * p, x1=left + (c + 1) * p,
                             y1=(r + 1) * p))
    for row in rows:
        row["seq_pos"] = row["token_idx"]
        row["token_idx"] += offset
        row.update(example_id=example_id, stream=stream)
        for k in ("text_pos", "patch_row", "patch_col", "x0", "y0", "x1", "y1", "tile"):
            row.setdefault(k, None)
    return rows


def _prune(a: np.ndarray, keep: str) -> np.ndarray:
    """Weights kept by the policy (others set to 0); ``a`` is [head, query, key]."""
    if keep == "all":
        return a.copy()
    if keep.startswith("topk:"):
        k = int(keep.split(":")[1])
        thresh = -np.sort(-a, axis=-1)[..., k - 1: k]  # k-th largest per row
        return np.where(a >= thresh, a, 0.0)
    raise ValueError(f"synthetic lake supports keep 'all' or 'topk:K', not {keep!r}")


def head_stats_np(a: np.ndarray, tok: pd.DataFrame, kept: np.ndarray) -> dict[str, np.ndarray]:
    """The head statistics of ``a`` [head, query, key] for one example; ``{stat: [head]}``."""
    mod = tok.modality.to_numpy()
    role = tok.role.to_numpy()
    text, image = mod == "text", mod == "image"
    patch = role == "patch"
    special = np.isin(role, SPECIAL)
    n = len(tok)
    mass_img = a[..., image].sum(-1)  # [head, query]
    mass_txt = a[..., text].sum(-1)
    diag = np.einsum("hqq->hq", a)
    ent = -(a * np.log(np.clip(a, 1e-30, None))).sum(-1) / np.log(n)
    p = a[..., patch] / a[..., patch].sum(-1, keepdims=True)
    img_ent = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1) / np.log(patch.sum())
    return {
        "t2i": mass_img[:, text].mean(-1),
        "t2t": mass_txt[:, text].mean(-1),
        "i2t": mass_txt[:, image].mean(-1),
        "i2i": mass_img[:, image].mean(-1),
        "i2i_noself": (mass_img - diag)[:, image].mean(-1),
        "entropy": ent.mean(-1),
        "sink": a[..., special].sum(-1).mean(-1),
        "max": a.max(-1).mean(-1),
        "img_entropy": img_ent[:, text].mean(-1),
        "grounding": np.full(a.shape[0], np.nan),  # no boxes in this manifest
        "kept_mass": kept.sum(-1).mean(-1),
    }


def make_synthetic_lake(root, run: str = "synth", n_examples: int = 6, *, n_layers: int = 2,
                        n_heads: int = 2, hidden_size: int = 8, streams: tuple[str, ...] = ("self",),
                        keep_attention: str = "all", random_weights: bool = False,
                        images_missing: tuple[int, ...] = (), chunk_size: int = 4, seed: int = 0,
                        status: str = "complete", created_at: datetime | None = None,
                        grid: tuple[int, int] = (GRID_H, GRID_W), tiles: tuple[int, ...] = ()) -> SynthLake:
    """Write a synthetic run into the lake at ``root`` and return what was written.

    Parameters
    ----------
    root : lake root (created if missing; other runs in it are kept).
    run : run name.
    n_examples : number of examples; 0 writes only the ``runs`` row (an empty run).
    n_layers, n_heads, hidden_size : shape of every stream.
    streams : stream names; each gets its own copy of the token table (own token_idx).
    keep_attention : ``all`` or ``topk:K``, the pruning applied before storing weights.
    random_weights : recorded in the run's capture JSON (the app warns about it).
    images_missing : example ids whose image is not written to the ``images`` table.
    chunk_size : examples per writer chunk (several chunks exercise several files).
    seed : seeds attention logits, patch order and hidden states.
    status, created_at : the ``runs`` row's fields (the app lists newest runs first).
    grid : (rows, columns) of image patches, each ``PATCH_PX`` pixels square.
    tiles : example ids whose image is tiled: besides the base image (tile 0), tile 1 (left half)
        and tile 2 (right half) at half-size patches (:func:`tile_grids`).
    """
    gh, gw = grid
    img_w, img_h = gw * PATCH_PX, gh * PATCH_PX
    root = Path(root)
    rng = np.random.default_rng(seed)
    w = LakeWriter(root, run, metadata={"vlatlas.synthetic": "1"})
    capture = {"keep_attention": keep_attention, "keep_hidden": "all", "random_weights": random_weights,
               "dtype": "float32", "chunk_size": chunk_size}
    w.write_run_row(dict(
        run=run, model="synthetic/tiny-vilt", model_family="vilt", revision="synthetic", dtype="float32",
        attn_implementation="eager",
        streams=json.dumps({s: {"layers": n_layers, "heads": n_heads, "hidden_size": hidden_size}
                            for s in streams}),
        manifest="synthetic.jsonl", n_examples=n_examples, capture=json.dumps(capture), status=status,
        created_at=created_at or datetime(2025, 1, 1, tzinfo=timezone.utc), software_version="0.1.0"))

    lake = SynthLake(root=root, run=run, streams=tuple(streams), n_layers=n_layers, n_heads=n_heads,
                     examples=pd.DataFrame(), tokens=pd.DataFrame(), keep_attention=keep_attention)
    ex_rows, tok_rows, stat_rows = [], [], []
    images: dict[int, tuple[str, bytes]] = {}
    for i in range(n_examples):
        png = draw_image(i, img_w, img_h)
        image_id = hashlib.sha256(png).hexdigest()
        images[i] = (image_id, png)
        words = TEXTS[i % len(TEXTS)].split()
        n_text = len(words) + 2
        n_tok = n_text + n_image_tokens(grid, i in tiles)
        ex_rows.append(dict(
            example_id=i, source_id=f"s{i:03d}", split="val" if i % 3 == 2 else "train",
            text=TEXTS[i % len(TEXTS)], answer=ANSWERS[i % len(ANSWERS)],
            prediction=PREDICTIONS[i % len(PREDICTIONS)],
            correct=ANSWERS[i % len(ANSWERS)] == PREDICTIONS[i % len(PREDICTIONS)],
            image_id=image_id, image_width=img_w, image_height=img_h, grid_h=gh, grid_w=gw,
            n_tokens=n_tok * len(streams), boxes=None,
            meta=json.dumps({"qtype": QTYPES[i % len(QTYPES)], "difficulty": "hard" if i % 2 else "easy"})))
        for si, s in enumerate(streams):
            off = si * n_tok
            lake.offset[s] = off
            rows = _token_rows(i, words, s, off, rng, grid, i in tiles)
            tok_rows.extend(rows)
            tok = pd.DataFrame(rows).sort_values("token_idx").reset_index(drop=True)
            for layer in range(n_layers):
                a = _softmax(rng.normal(scale=2.0, size=(n_heads, n_tok, n_tok)))  # [head, query, key]
                kept = _prune(a, keep_attention)
                lake.attention[(i, s, layer)] = a
                lake.stored[(i, s, layer)] = kept.astype(np.float16).astype(np.float64)
                for stat, vals in head_stats_np(a, tok, kept).items():
                    for h, v in enumerate(vals):
                        stat_rows.append(dict(example_id=i, stream=s, layer=layer, head=h, stat=stat,
                                              value=None if np.isnan(v) else float(v)))
    lake.examples = pd.DataFrame(ex_rows)
    lake.tokens = pd.DataFrame(tok_rows)
    lake.stats = pd.DataFrame(stat_rows)

    for chunk in range((n_examples + chunk_size - 1) // chunk_size):
        ids = list(range(chunk * chunk_size, min(n_examples, (chunk + 1) * chunk_size)))
        parts: dict[str, list] = {}
        ex = [r for r in ex_rows if r["example_id"] in ids]
        parts["examples"] = [({}, pa.Table.from_pylist(ex, schema=EXAMPLES.schema))]
        tk = [{k: r[k] for k in TOKENS.schema.names} for r in tok_rows if r["example_id"] in ids]
        parts["tokens"] = [({}, pa.Table.from_pylist(tk, schema=TOKENS.schema))]
        st = [r for r in stat_rows if r["example_id"] in ids]
        parts["head_stats"] = [({}, pa.Table.from_pylist(st, schema=HEAD_STATS.schema))]
        att_parts, hid_parts = [], []
        for s in streams:
            off = lake.offset[s]
            for layer in range(n_layers):
                cols: dict[str, list] = {k: [] for k in ATTENTION.schema.names}
                for i in ids:
                    kept = lake.stored[(i, s, layer)]
                    h, q, k = np.nonzero(kept)
                    cols["example_id"].append(np.full(len(h), i, np.int64))
                    cols["head"].append(h.astype(np.int16))
                    cols["query_idx"].append((q + off).astype(np.int32))
                    cols["key_idx"].append((k + off).astype(np.int32))
                    cols["weight"].append(kept[h, q, k].astype(np.float16).astype(np.float32))  # float16-rounded
                att_parts.append(({"stream": s, "layer": layer},
                                  pa.table({k: np.concatenate(v) for k, v in cols.items()}, schema=ATTENTION.schema)))
            for layer in range(n_layers + 1):
                hrows = []
                for i in ids:
                    for r in (r for r in tok_rows if r["example_id"] == i and r["stream"] == s):
                        vec = rng.normal(size=hidden_size).astype(np.float32)
                        hrows.append(dict(example_id=i, token_idx=r["token_idx"], norm=float(np.linalg.norm(vec)),
                                          vec=vec.astype(np.float16).astype(np.float32).tolist()))
                hid_parts.append(({"stream": s, "layer": layer},
                                  pa.Table.from_pylist(hrows, schema=HIDDEN_STATES.schema)))
        parts["attention"] = att_parts
        parts["hidden_states"] = hid_parts
        img = [dict(image_id=images[i][0], png=images[i][1], width=img_w, height=img_h)
               for i in ids if i not in images_missing]
        parts["images"] = [({}, pa.Table.from_pylist(img, schema=IMAGES.schema))]
        w.write_chunk(chunk, parts)
    return lake


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vlatlas-synth-lake")
    make_synthetic_lake(out, "synth", n_examples=8)
    make_synthetic_lake(out, "synth-2streams", n_examples=4, streams=("vision", "text"), seed=1,
                        keep_attention="topk:4", random_weights=True)
    make_synthetic_lake(out, "empty", n_examples=0)
    print(out)
