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
        """Model inputs for a batch, and notes per example (e.g. truncation)."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        """Run the model with attention on; returns its outputs."""

    def layout(self, inputs: dict[str, torch.Tensor], images: list, boxes: list) -> BatchLayout:
        """The batch's layout; valid once ``forward`` has embedded the batch."""

    def predict(self, outputs: Any, answers: list[str | None]) -> list[Prediction]:
        """What the model answered for each example."""


def token_rows(**cols) -> pa.Table:
    return pa.table(cols, schema=TOKEN_SCHEMA)


def role_is_special(role: str) -> bool:
    return role in ROLES_SPECIAL


def normalise_answer(text: str | None) -> str | None:
    return None if text is None else " ".join(str(text).lower().strip().split())


def boxed_masks(tokens: pa.Table, boxes: list[dict] | None, pieces_of) -> tuple[list[bool], list[list[bool]]]:
    """Which text tokens belong to a boxed word, and which patches lie in that word's box.

    Parameters
    ----------
    tokens : one example's token table (one stream).
    boxes : the manifest's ``[{"label": word, "box": [x0, y0, x1, y1]}]``.
    pieces_of : ``label -> list of word pieces`` (the model's tokenizer).

    Returns
    -------
    ``boxed[j]`` for every token, and ``in_box[j][k]`` (token ``j``'s box
    contains patch ``k``). A patch is in a box when its centre is; when no
    patch centre is, the patch holding the box's centre stands for it.
    """
    t = tokens.to_pydict()
    n = len(t["role"])
    boxed = [False] * n
    in_box = [[False] * n for _ in range(n)]
    if not boxes:
        return boxed, in_box
    words = [(j, (t["token"][j] or "").lower()) for j in range(n) if t["modality"][j] == "text"]
    patches = [k for k in range(n) if t["role"][k] == "patch"]
    for b in boxes:
        pieces = [p.lower() for p in pieces_of(b["label"])]
        x0, y0, x1, y1 = b["box"]
        inside = [k for k in patches
                  if x0 <= (t["x0"][k] + t["x1"][k]) / 2 <= x1 and y0 <= (t["y0"][k] + t["y1"][k]) / 2 <= y1]
        if not inside:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            inside = [k for k in patches
                      if t["x0"][k] <= cx < t["x1"][k] and t["y0"][k] <= cy < t["y1"][k]][:1]
        if not pieces or not inside:
            continue
        for s in range(len(words) - len(pieces) + 1):
            if [w for _, w in words[s:s + len(pieces)]] == pieces:
                for j, _ in words[s:s + len(pieces)]:
                    boxed[j] = True
                    for k in inside:
                        in_box[j][k] = True
    return boxed, in_box


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted path such as ``vilt.encoder.layer.3.attention``."""
    m = root
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def stream_layout(tables, orders, boxes, pieces_of) -> StreamLayout:
    """Pad per-example orders into ``[batch, token]`` tensors and build the masks."""
    B = len(tables)
    N = max(len(o) for o in orders)
    seq = torch.zeros(B, N, dtype=torch.long)
    valid = torch.zeros(B, N, dtype=torch.bool)
    text, image, patch, special = (torch.zeros(B, N, dtype=torch.bool) for _ in range(4))
    in_box = torch.zeros(B, N, N, dtype=torch.bool)
    boxed = torch.zeros(B, N, dtype=torch.bool)
    for b, (t, o) in enumerate(zip(tables, orders)):
        n = len(o)
        seq[b, :n] = torch.tensor(o)
        valid[b, :n] = True
        d = t.to_pydict()
        text[b, :n] = torch.tensor([m == "text" for m in d["modality"]])
        image[b, :n] = torch.tensor([m == "image" for m in d["modality"]])
        patch[b, :n] = torch.tensor([r == "patch" for r in d["role"]])
        special[b, :n] = torch.tensor([role_is_special(r) for r in d["role"]])
        bx, ib = boxed_masks(t, boxes[b], pieces_of)
        boxed[b, :n] = torch.tensor(bx)
        in_box[b, :n, :n] = torch.tensor(ib)
    return StreamLayout(seq, valid, TokenMasks(valid, text, image, patch, special, in_box, boxed), [0] * B)


def stream_shapes(configs: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{stream: {"layers", "heads", "hidden_size"}}`` from each stream's (sub-)config."""
    return {s: {"layers": c.num_hidden_layers, "heads": c.num_attention_heads, "hidden_size": c.hidden_size}
            for s, c in configs.items()}


def stream_hook_points(model: torch.nn.Module, configs: dict[str, Any], paths: dict[str, dict[str, str]],
                       keep_hidden: set[int] | None,
                       first_hidden: dict[str, torch.nn.Module] | None = None) -> list[HookPoint]:
    """Hook points of every stream: each layer's attention (index 1 of its module's output) and the
    hidden states kept (``keep_hidden``: hidden-state layers, None = all).

    ``paths[stream]`` maps ``attention`` and ``hidden`` (formatted with ``layer``) and ``hidden_0``
    (the module whose output is hidden state 0) to module paths; a stream without ``hidden`` keeps
    no hidden states. ``first_hidden[stream]`` replaces the ``hidden_0`` module.
    """
    pts: list[HookPoint] = []
    for stream, p in paths.items():
        n = configs[stream].num_hidden_layers
        pts += [HookPoint(stream, i, "attention", module_at(model, p["attention"].format(layer=i)), index=1)
                for i in range(n)]
        if "hidden" not in p:
            continue
        if keep_hidden is None or 0 in keep_hidden:
            first = (first_hidden or {}).get(stream) or module_at(model, p["hidden_0"])
            pts.append(HookPoint(stream, 0, "hidden", first))
        pts += [HookPoint(stream, i + 1, "hidden", module_at(model, p["hidden"].format(layer=i)))
                for i in range(n) if keep_hidden is None or i + 1 in keep_hidden]
    return pts


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
