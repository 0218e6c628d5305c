"""The adapter protocol: what the pipeline needs to know about a model family.

An adapter loads a model and its processor (eager attention), turns manifest
rows into model inputs, names the tensors to capture (``HookPoint``), and,
once the model has embedded a batch, returns its *layout*: the token table of
every example and, per stream, where each token of the table sits in the
model's sequence. Positions come from the model's own bookkeeping (ViLT, for
one, samples and permutes image patches inside its embedding layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from lake.schema import ROLES_SPECIAL, TOKENS
from pipeline.capture import HookPoint
from pipeline.stats import TokenMasks

TOKEN_SCHEMA = pa.schema([f for f in TOKENS.schema if f.name != "example_id"])


@dataclass
class StreamLayout:
    """Where the tokens of one stream sit in the model's sequence.

    ``seq_index[b, j]`` is the sequence position of the ``j``-th token of
    stream ``s`` of example ``b`` (its token-table order), ``valid[b, j]`` says
    whether slot ``j`` holds a token, and ``token_offset[b]`` is the
    ``token_idx`` of the stream's first token in the example's token table.
    """

    seq_index: torch.Tensor  # [batch, token] long
    valid: torch.Tensor  # [batch, token] bool
    masks: TokenMasks
    token_offset: list[int]

    def to(self, device) -> "StreamLayout":
        m = self.masks
        moved = TokenMasks(
            *(t.to(device) if t is not None else None
              for t in (m.valid, m.text, m.image, m.patch, m.special, m.in_box, m.boxed))
        )
        return StreamLayout(self.seq_index.to(device), self.valid.to(device), moved, self.token_offset)


@dataclass
class BatchLayout:
    tokens: list[pa.Table]  # one token table per example (TOKEN_SCHEMA)
    streams: dict[str, StreamLayout]
    grid: list[tuple[int | None, int | None]]  # (grid_h, grid_w) per example
    notes: list[list[tuple[str, str]]] = field(default_factory=list)
    # Streams whose keys are another stream's tokens (cross attention): ``{"cross": "vision"}``
    # means stream ``cross``'s own layout gives its queries (rows) and the ``vision`` stream's
    # layout its keys (columns); its attention is ``[batch, head, query, key]``, not square, and
    # its ``masks.in_box`` is ``[batch, query, key]`` over those two token sets.
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class Prediction:
    prediction: str | None = None
    correct: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    family: str
    model: torch.nn.Module

    def streams(self) -> dict[str, dict[str, int]]:
        """``{stream: {"layers": L, "heads": H, "hidden_size": D}}``."""

    def hook_points(self, keep_hidden: set[int] | None) -> list[HookPoint]:
        """The tensors to capture; hidden states only for layers in ``keep_hidden`` (None = all)."""

    def check_image(self, image) -> None:
        """Raise ``pipeline.data.BadInput`` (stage ``image``) for an image this model's
        processor cannot prepare, so that one example is skipped instead of its batch failing."""

    def encode(self, texts: list[str], images: list) -> tuple[dict[str, torch.Tensor], list[list[tuple[str, str]]]]:
        """Model inputs for a batch, on the host (it runs in input worker processes; the pipeline
        moves the tensors to the device), and notes per example (e.g. truncation)."""

    def forward(self, inputs: dict[str, torch.Tensor], example_ids: list[int] | None = None) -> Any:
        """Run the model with attention on; returns its outputs. ``example_ids`` seed anything random
        per example (ViLT's patch sampling), so that results do not depend on the batch."""

    def layout(self, inputs: dict[str, torch.Tensor], images: list, boxes: list) -> BatchLayout:
        """The batch's layout; valid once ``forward`` has embedded the batch."""

    def predict(self, outputs: Any, answers: list[str | None]) -> list[Prediction]:
        """What the model answered for each example."""


def token_rows(**cols) -> pa.Table:
    return pa.table(cols, schema=TOKEN_SCHEMA)


def token_table(*, n_text: int, n_image: int, stream: str, roles_text, roles_image, pieces, seq,
                patch_row, patch_col, x0, y0, x1, y1) -> pa.Table:
    """One stream's token table from arrays: ``n_text`` text tokens then ``n_image`` image tokens.

    ``roles_text``/``pieces`` cover the text tokens; ``roles_image``, ``patch_row``/``patch_col``
    (-1 = none) and the box ``x0..y1`` the image tokens; ``seq`` every token's sequence position.
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
    }, schema=TOKEN_SCHEMA)


def role_is_special(role: str) -> bool:
    return role in ROLES_SPECIAL


def normalise_answer(text: str | None) -> str | None:
    return None if text is None else " ".join(str(text).lower().strip().split())


def _col(t: pa.Table, name: str, dtype=None) -> np.ndarray:
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
    role = _col(tokens, "role")
    modality = _col(tokens, "modality")
    patches = np.flatnonzero(role == "patch")
    words_at = np.flatnonzero(modality == "text")
    words = [(w or "").lower() for w in _col(tokens, "token")[words_at]]
    if len(patches):
        x0p, x1p = _col(tokens, "x0", float)[patches], _col(tokens, "x1", float)[patches]
        y0p, y1p = _col(tokens, "y0", float)[patches], _col(tokens, "y1", float)[patches]
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


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted path such as ``vilt.encoder.layer.3.attention``."""
    m = root
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def stream_layout(tables, orders, boxes, pieces_of) -> StreamLayout:
    """Pad per-example orders into ``[batch, token]`` tensors and build the masks (array operations
    on each example's token table; no per-token Python)."""
    B = len(tables)
    N = max(len(o) for o in orders)
    seq = np.zeros((B, N), np.int64)
    valid, text, image, patch, special, boxed = (np.zeros((B, N), bool) for _ in range(6))
    in_box = np.zeros((B, N, N), bool)
    for b, (t, o) in enumerate(zip(tables, orders)):
        n = len(o)
        seq[b, :n] = np.asarray(o, np.int64)
        valid[b, :n] = True
        modality, role = _col(t, "modality"), _col(t, "role")
        text[b, :n] = modality == "text"
        image[b, :n] = modality == "image"
        patch[b, :n] = role == "patch"
        special[b, :n] = np.isin(role, ROLES_SPECIAL)
        bx, ib = boxed_masks(t, boxes[b], pieces_of)
        boxed[b, :n] = bx
        in_box[b, :n, :n] = ib
    tv = torch.from_numpy
    return StreamLayout(tv(seq), tv(valid), TokenMasks(tv(valid), tv(text), tv(image), tv(patch), tv(special),
                                                       tv(in_box), tv(boxed)), [0] * B)


def stream_shapes(configs: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{stream: {"layers", "heads", "hidden_size"}}`` from each stream's (sub-)config."""
    return {s: {"layers": c.num_hidden_layers, "heads": c.num_attention_heads, "hidden_size": c.hidden_size}
            for s, c in configs.items()}


def stream_hook_points(model: torch.nn.Module, configs: dict[str, Any], paths: dict[str, dict[str, str]],
                       keep_hidden: set[int] | None,
                       first_hidden: dict[str, torch.nn.Module] | None = None,
                       explain: tuple[str, ...] = ()) -> list[HookPoint]:
    """Hook points of every stream: each layer's attention (index 1 of its module's output) and the
    hidden states kept (``keep_hidden``: hidden-state layers, None = all).

    ``paths[stream]`` maps ``attention`` and ``hidden`` (formatted with ``layer``) and ``hidden_0``
    (the module whose output is hidden state 0) to module paths; a stream without ``hidden`` keeps
    no hidden states. ``first_hidden[stream]`` replaces the ``hidden_0`` module.

    ``explain`` (``pipeline.explain``): with ``value``, each layer's value projection (``value``,
    ``PATH#i/n`` for part ``i`` of a fused projection) with its output projection (``out``); with
    ``sinks`` or ``lens``, every hidden state, those outside ``keep_hidden`` marked not to be stored.
    """
    pts: list[HookPoint] = []
    for stream, p in paths.items():
        c = configs[stream]
        n = c.num_hidden_layers
        if "value" in explain and "value" in p:
            for i in range(n):
                path, _, part = p["value"].format(layer=i).partition("#")
                pts.append(HookPoint(stream, i, "value", module_at(model, path), index=0, drop=False,
                                     out=module_at(model, p["out"].format(layer=i)), heads=c.num_attention_heads,
                                     kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                                     part=tuple(int(x) for x in part.split("/")) if part else None))
        pts += [HookPoint(stream, i, "attention", module_at(model, p["attention"].format(layer=i)), index=1)
                for i in range(n)]
        if "hidden" not in p:
            continue
        every = "sinks" in explain or "lens" in explain  # both read every layer's hidden state

        def kept(layer: int) -> bool:
            return keep_hidden is None or layer in keep_hidden

        if kept(0) or every:
            first = (first_hidden or {}).get(stream) or module_at(model, p["hidden_0"])
            pts.append(HookPoint(stream, 0, "hidden", first, store=kept(0)))
        pts += [HookPoint(stream, i + 1, "hidden", module_at(model, p["hidden"].format(layer=i)), store=kept(i + 1))
                for i in range(n) if kept(i + 1) or every]
    return pts


def encoder_relevancy_targets(adapter, inputs, outputs) -> list[dict]:
    """``--explain relevancy`` targets of an encoder: one score per example (``relevancy_target``),
    read in each stream at the token the output comes from (``relevancy_rows``)."""
    score = adapter.relevancy_target(outputs)
    active = torch.ones_like(score, dtype=torch.bool)
    return [{"stream": s, "row": row, "score": score, "active": active, "target": None}
            for s, row in adapter.relevancy_rows(inputs).items()]


def require_eager(model: torch.nn.Module, model_id: str, label: str,
                  parts: tuple[str, ...] = ("text_config", "vision_config")) -> None:
    """Refuse a model whose towers did not load with eager attention (SDPA and flash attention
    compute no weights)."""
    for name in parts:
        impl = getattr(getattr(model.config, name, None), "_attn_implementation", "eager")
        if impl not in (None, "eager"):
            raise NotImplementedError(
                f"{label} {model_id!r} loaded its {name.split('_')[0]} part with attn_implementation={impl!r}, "
                "which returns no attention weights; VL-Atlas needs attn_implementation='eager'")


def split_stream_layouts(tables: list[pa.Table], offsets: list[int], first_orders, second_orders, boxes,
                         pieces_of) -> tuple[StreamLayout, StreamLayout]:
    """Layouts of two streams whose tokens share each example's token table: the first stream's
    tokens are rows ``[0, offsets[b])`` and the second's the rest, so the second stream's
    ``token_offset`` is ``offsets``."""
    first = stream_layout([t.slice(0, o) for t, o in zip(tables, offsets)], first_orders, boxes, pieces_of)
    second = stream_layout([t.slice(o) for t, o in zip(tables, offsets)], second_orders, boxes, pieces_of)
    second.token_offset = list(offsets)
    return first, second
