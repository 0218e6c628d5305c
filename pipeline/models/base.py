"""The adapter protocol: what the pipeline needs to know about a model family.

An adapter (a subclass of :class:`Adapter`) loads a model and its processor (eager attention),
turns manifest rows into model inputs (:class:`Inputs`: the model's inputs plus the adapter's own
state for the batch), names the tensors to capture (``HookPoint``), runs the model
(:class:`ForwardOutput`, one shape for every family), and, once the model has embedded a batch,
returns its *layout* (:class:`BatchLayout`): the token table of every example and, per stream,
where each token of the table sits in the model's sequence (:class:`StreamLayout`). Positions come
from the model's own bookkeeping (ViLT, for one, samples and permutes image patches inside its
embedding layer). Pixel boxes come from ``pipeline.models.geometry``.

What families share lives beside this module, by subject: ``family.py`` (a family's declaration),
``decoder.py`` (the decoder LVLMs' two passes), ``towers.py`` (vision towers as strategies),
``tokens.py`` (token-table builders), ``hooks.py`` (module paths to hook points) and
``processors.py`` (processors built without torchvision).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lake.schema import ROLES_SPECIAL
from pipeline.capture import HookPoint
from pipeline.models.hooks import stream_hook_points, stream_shapes
from pipeline.models.tokens import boxed_masks, column
from pipeline.stats import TokenMasks

__all__ = ["GEN_START", "Adapter", "BatchLayout", "ForwardOutput", "Inputs", "Prediction", "StreamLayout",
           "checked_architecture", "conform", "cross_layout", "encoder_relevancy_targets", "map_inputs",
           "normalise_answer", "query_cross_layout", "require_eager", "split_stream_layouts",
           "stacked_layouts", "stream_layout"]


GEN_START = "gen_start"  # Inputs.state key of a decoder's batch: [batch] long, index of the first generated token


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


class Inputs(dict):
    """One batch as the adapter encoded it: the model's inputs, and the adapter's own state.

    The mapping holds exactly the model's inputs (``model(**inputs)``); ``state`` holds what the
    adapter keeps about the batch for itself (a tokenizer's padding mask, where the generated
    tokens start, the patch positions ViLT sampled), never passed to the model. Both travel
    together from ``encode`` through ``prepare`` and ``forward`` to ``layout``; :meth:`map` applies
    a function to the tensors of both (to numpy for the input workers' pipe, to the device).
    """

    def __init__(self, tensors=(), state: dict[str, Any] | None = None):
        super().__init__(tensors)
        self.state: dict[str, Any] = dict(state or {})

    def map(self, fn) -> "Inputs":
        return Inputs({k: fn(v) for k, v in self.items()}, {k: fn(v) for k, v in self.state.items()})

    def to(self, device) -> "Inputs":
        return self.map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)

    def __reduce__(self):
        return Inputs, (dict(self), self.state)

    def __repr__(self) -> str:
        return f"Inputs({dict.__repr__(self)}, state={list(self.state)})"


def map_inputs(inputs, fn):
    """``fn`` over every tensor of a batch's inputs: an :class:`Inputs` keeps its state; a plain
    dict (an adapter outside :class:`Adapter`) stays a plain dict."""
    return inputs.map(fn) if isinstance(inputs, Inputs) else {k: fn(v) for k, v in inputs.items()}


@dataclass
class ForwardOutput:
    """What ``Adapter.forward`` returns, for every family.

    ``outputs`` is the model's own output object (its attributes read through: ``result.logits``);
    ``generated`` a decoder's generated ids per example (up to and including eos; None for an
    encoder); ``model_inputs`` the inputs the model ran on.
    """

    outputs: Any
    generated: list[list[int]] | None = None
    model_inputs: dict[str, Any] | None = None

    def __getattr__(self, name: str):
        if name.startswith("__") or "outputs" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["outputs"], name)


class Adapter(ABC):
    """The protocol of a model family, and what the families share.

    The pipeline (``pipeline.extraction``) calls, per run: :meth:`load` (through
    ``pipeline.models.load_adapter``), :meth:`streams`, :meth:`hook_points`; per batch, in input
    workers: :meth:`encode` (then :meth:`rejects`, or :meth:`check_image` per image when the
    processor fails on the batch); on the model's device: :meth:`prepare` (uncaptured),
    :meth:`forward` (captured), :meth:`layout` (the token tables) and :meth:`predict`.

    A family supplies :meth:`model_class` (which transformers class loads a checkpoint),
    :meth:`encode`, :meth:`run` (the model call), :meth:`layout` and :meth:`predict`, and sets
    ``configs`` (stream -> its sub-config) and ``paths`` (stream -> native module paths: see
    :func:`stream_hook_points`) in ``__init__``. Optional capabilities, detected with ``hasattr``:
    ``relevancy_targets(inputs, result)`` (``--explain relevancy``; ``relevancy_unavailable``, a
    reason, where a checkpoint's head cannot) and ``lens()`` (``--explain lens``: final norm and
    unembedding).
    """

    family: str = ""
    model: torch.nn.Module
    # roles a text token may have by its id, checked in this order (``_text_role``)
    TEXT_ROLES: tuple[str, ...] = ("bos", "eos", "cls", "sep", "pad")
    # sub-configs whose attention implementation must be eager once loaded (``require_eager``)
    EAGER_PARTS: tuple[str, ...] = ("text_config", "vision_config")

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu"):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.configs: dict[str, Any] = {}
        self.paths: dict[str, dict[str, str]] = {}
        self.first_hidden: dict[str, torch.nn.Module] = {}

    # -- loading ------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def model_class(cls, config, model_id: str):
        """The transformers class (or its name) that loads this checkpoint; raise
        ``NotImplementedError`` with the reason for a checkpoint the family cannot take."""

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_id, revision=revision)

    @classmethod
    def load(cls, model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
             revision: str | None = None) -> "Adapter":
        """Model (eager attention: SDPA and flash attention compute no weights) and processor from a
        Hugging Face id or a local folder."""
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_id, revision=revision)
        klass = cls.model_class(config, model_id)
        if isinstance(klass, str):
            klass = getattr(transformers, klass)
        model = klass.from_pretrained(model_id, revision=revision, attn_implementation="eager", dtype=dtype)
        require_eager(model, model_id, klass.__name__, cls.EAGER_PARTS)
        processor = cls.load_processor(model_id, revision)
        return cls(model.to(device).eval(), processor, device)

    # -- streams and hooks ----------------------------------------------------------
    def streams(self) -> dict[str, dict[str, int]]:
        """``{stream: {"layers": L, "heads": H, "hidden_size": D}}``."""
        return stream_shapes(self.configs)

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        """The tensors to capture; hidden states only for layers in ``keep_hidden`` (None = all)."""
        return stream_hook_points(self.model, self.configs, self.paths, keep_hidden,
                                  first_hidden=self.first_hidden or None, explain=explain)

    # -- inputs ---------------------------------------------------------------------
    def check_image(self, image) -> None:
        """Raise ``pipeline.data.BadInput`` (stage ``image``) for an image this model's processor
        cannot prepare, so that one example is skipped instead of its batch failing. By default
        every image the loader accepts can be resized (and cropped) to the model's size."""

    def rejects(self, inputs: Inputs, images: list) -> dict[int, str]:
        """``{position in the batch: why}`` for the examples of an encoded batch that the processor
        prepared but the model cannot take (read from the inputs, so the processor runs once)."""
        return {}

    @abstractmethod
    def encode(self, texts: list[str], images: list) -> tuple[Inputs, list[list[tuple[str, str]]]]:
        """Model inputs for a batch, on the host (it runs in input worker processes; the pipeline
        moves the tensors to the device), and notes per example (e.g. truncation)."""

    def prepare(self, inputs: Inputs) -> Inputs:
        """Run before the captured pass, without hooks, on the device: a decoder generates its answer
        here and appends it to the inputs. Encoders have nothing to do."""
        return inputs

    def truncation_notes(self, texts: list[str]) -> list[list[tuple[str, str]]]:
        """A note per example whose text is longer than ``self.max_text`` tokens (it is truncated)."""
        notes = []
        for t in texts:
            n = len(self.tokenizer(t, add_special_tokens=True)["input_ids"])
            notes.append([("text", f"text truncated from {n} to {self.max_text} tokens (the model's limit)")]
                         if n > self.max_text else [])
        return notes

    def _model_inputs(self, inputs) -> dict[str, Any]:
        """The model's inputs of a batch (an :class:`Inputs`' mapping; a plain dict without the
        bookkeeping keys older adapters kept in it)."""
        return {k: v for k, v in inputs.items() if not k.startswith("vlatlas_")}

    # -- the model --------------------------------------------------------------------
    def forward(self, inputs: Inputs, example_ids: list[int] | None = None, grad: bool = False) -> ForwardOutput:
        """The captured pass with attention on. ``example_ids`` seed anything random per example
        (ViLT's patch sampling), so that results do not depend on the batch; ``grad`` builds the
        autograd graph (``--explain relevancy``'s second pass)."""
        kw = self._model_inputs(inputs)
        with torch.set_grad_enabled(grad):
            out = self.run(inputs, kw, example_ids)
        return ForwardOutput(out, self.generated(inputs), kw)

    @abstractmethod
    def run(self, inputs: Inputs, model_inputs: dict[str, Any], example_ids: list[int] | None) -> Any:
        """Call the model on ``model_inputs``; returns its own output object."""

    def generated(self, inputs: Inputs) -> list[list[int]] | None:
        """A decoder's generated ids per example (None for an encoder)."""
        return None

    # -- token tables -----------------------------------------------------------------
    @abstractmethod
    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        """The batch's token tables and, per stream, where each token sits in the model's sequence;
        valid once ``forward`` has embedded the batch."""

    marker_roles: dict[int, str] = {}  # a family's marker tokens by id -> role (image and chat-turn markers)

    def _text_role(self, token_id: int, piece: str | None = None, real: bool = True) -> str:
        """A text token's role: ``pad`` where it is padding (``real`` False), else its role in
        ``marker_roles``, else the first of ``TEXT_ROLES`` whose tokenizer id it is, else ``word``."""
        if not real:
            return "pad"
        if token_id in self.marker_roles:
            return self.marker_roles[token_id]
        tok = self.tokenizer
        for role in self.TEXT_ROLES:
            if getattr(tok, f"{role}_token_id", None) == token_id:
                return role
        return "word"

    def _pieces(self, label: str) -> list[str]:
        """A box label's word pieces, as the tokenizer cuts it (for grounding statistics)."""
        return self.tokenizer.tokenize(label)

    # -- answers ------------------------------------------------------------------------
    @abstractmethod
    def predict(self, result: ForwardOutput, answers: list[str | None]) -> list[Prediction]:
        """What the model answered for each example."""


def conform(adapter):
    """An adapter written before :class:`Adapter` had ``prepare``, ``check_image`` and ``rejects``
    as optional methods: give such an instance the base's defaults, so the pipeline can call all
    three. An :class:`Adapter` is returned as it is."""
    if not isinstance(adapter, Adapter):
        for name, default in (("prepare", lambda inputs: inputs), ("check_image", lambda image: None),
                              ("rejects", lambda inputs, images: {})):
            if not hasattr(adapter, name):
                setattr(adapter, name, default)
    return adapter


def checked_architecture(config, model_id: str, arch: str | None, family: str, what: str = "") -> str:
    """``arch``, the transformers class that loads a family's checkpoints, once the checkpoint's config
    declares it (or declares no architecture); else ``NotImplementedError`` saying what the checkpoint is
    (``what``: a note after the class's name)."""
    given = getattr(config, "architectures", None)
    if arch is None or arch not in (given or [arch]):
        raise NotImplementedError(f"{model_id!r} is a {given}; VL-Atlas's {family} adapter handles {arch}{what}")
    return arch


def normalise_answer(text: str | None) -> str | None:
    return None if text is None else " ".join(str(text).lower().strip().split())


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
        modality, role = column(t, "modality"), column(t, "role")
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


def stacked_layouts(tables: list[pa.Table], sizes: list[dict[str, int]], orders: dict[str, list],
                    boxes, pieces_of) -> dict[str, StreamLayout]:
    """Layouts of streams whose tokens follow one another in each example's token table: ``sizes[b]``
    maps each stream, in table order, to its number of tokens in example ``b``; ``orders[stream][b]``
    its tokens' places in the stream's sequence. Each stream's ``token_offset`` is where it starts."""
    out, offsets = {}, [0] * len(tables)
    for stream in sizes[0]:
        sl = stream_layout([t.slice(o, sz[stream]) for t, o, sz in zip(tables, offsets, sizes)], orders[stream],
                           boxes, pieces_of)
        sl.token_offset = list(offsets)
        out[stream] = sl
        offsets = [o + sz[stream] for o, sz in zip(offsets, sizes)]
    return out


def query_cross_layout(queries: StreamLayout, keys: StreamLayout) -> StreamLayout:
    """A cross stream whose queries are learned query tokens (no words): its queries' layout (the rows), with grounding masks shaped over the keys'
    tokens (``in_box`` ``[batch, query, key]``) and empty: its queries are image tokens, with no words."""
    B, nq, nk = queries.valid.shape[0], queries.valid.shape[1], keys.valid.shape[1]
    return replace(queries, masks=replace(queries.masks, in_box=torch.zeros(B, nq, nk, dtype=torch.bool),
                                          boxed=torch.zeros(B, nq, dtype=torch.bool)))


def cross_layout(layout: BatchLayout, query: str, key: str, boxes, pieces_of) -> StreamLayout:
    """A cross stream's layout: its rows are stream ``query``'s tokens and its columns stream ``key``'s
    (``BatchLayout.keys``), so it is ``query``'s layout with the grounding masks over those two token
    sets (``in_box[b, q, k]``: query token ``q``'s word box holds key token ``k``, a patch)."""
    q, k = layout.streams[query], layout.streams[key]
    (B, nq), nk = q.valid.shape, k.valid.shape[1]
    in_box = torch.zeros(B, nq, nk, dtype=torch.bool)
    boxed = torch.zeros(B, nq, dtype=torch.bool)
    for b, t in enumerate(layout.tokens):
        qo, ko = q.token_offset[b], k.token_offset[b]
        mq, mk = int(q.valid[b].sum()), int(k.valid[b].sum())
        bx, ib = boxed_masks(t, boxes[b], pieces_of)  # over the whole table
        boxed[b, :mq] = torch.from_numpy(bx[qo:qo + mq])
        in_box[b, :mq, :mk] = torch.from_numpy(ib[qo:qo + mq, ko:ko + mk])
    return replace(q, masks=replace(q.masks, in_box=in_box, boxed=boxed))
