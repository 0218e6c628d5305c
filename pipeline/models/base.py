"""The adapter protocol: what the pipeline needs to know about a model family, and what families share.

An adapter (a subclass of :class:`Adapter`) loads a model and its processor (eager attention),
turns manifest rows into model inputs (:class:`Inputs`: the model's inputs plus the adapter's own
state for the batch), names the tensors to capture (``HookPoint``), runs the model
(:class:`ForwardOutput`, one shape for every family), and, once the model has embedded a batch,
returns its *layout*: the token table of every example and, per stream, where each token of the
table sits in the model's sequence. Positions come from the model's own bookkeeping (ViLT, for
one, samples and permutes image patches inside its embedding layer). Pixel boxes come from
``pipeline.models.geometry``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lake.schema import ROLES_SPECIAL, TOKENS
from pipeline.capture import HookPoint
from pipeline.models.geometry import PatchGrid
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

    The pipeline (``pipeline.extract``) calls, per run: :meth:`load` (through
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


def greedy_generation_config(model: torch.nn.Module, tokenizer, *, suppress: tuple[int, ...] = (),
                             max_new_tokens: int | None = None, default_new_tokens: int = 16,
                             prompt_length: int | None = None):
    """The checkpoint's own generation config, made greedy, for the answer of a decoder.

    A copy of ``model.generation_config``: ``suppress`` added to its ``suppress_tokens`` (a union,
    never a replacement), its ``bad_words_ids``, ``eos_token_id`` (one id or a list) and other
    logits processors kept; ``do_sample`` False and ``num_beams`` 1 (the captured teacher-forced
    pass reproduces greedy decoding only). Length: the checkpoint's ``max_new_tokens`` or
    ``max_length``; ``default_new_tokens`` when it sets neither (transformers' global default,
    ``max_length`` 20 with the prompt, leaves an LVLM's long image prompt no room); a
    ``max_new_tokens`` given here (the user's) caps either. ``pad_token_id`` falls back to the
    tokenizer's, then to the first eos id.
    """
    gc = copy.deepcopy(model.generation_config)
    have = list(gc.suppress_tokens or [])
    gc.suppress_tokens = have + [int(t) for t in suppress if int(t) not in have] or None
    gc.do_sample = False
    gc.num_beams = 1
    if gc.eos_token_id is None:
        gc.eos_token_id = tokenizer.eos_token_id
    if gc.pad_token_id is None:
        eos = eos_ids(gc)
        gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    if gc.max_new_tokens is None and gc.max_length is None:
        gc.max_new_tokens = default_new_tokens
    if max_new_tokens is not None:
        room = gc.max_new_tokens
        if room is None and prompt_length is not None:
            room = gc.max_length - prompt_length
        gc.max_new_tokens = max_new_tokens if room is None else max(0, min(room, max_new_tokens))
    return gc


def eos_ids(generation_config) -> list[int]:
    """A generation config's end-of-sequence ids as a list (it may hold one id or several)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

def first_line(e: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def processor_or(model_id: str, revision: str | None, fallback):
    """``AutoProcessor`` when it builds a processor with an image processor and a tokenizer; else
    ``fallback.from_pretrained(model_id, revision)``: without torchvision a family whose processor
    holds a video processor (Qwen-VL, LLaVA-OneVision) cannot build it, and the fallback assembles one
    from the checkpoint's tokenizer and PIL image processor."""
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(model_id, revision=revision)
        if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
            return proc
        why = f"AutoProcessor gave a {type(proc).__name__}"
    except Exception as e:  # noqa: BLE001 - e.g. the video processor needs torchvision
        why = first_line(e)
    try:
        return fallback.from_pretrained(model_id, revision)
    except Exception as e:  # noqa: BLE001
        raise NotImplementedError(f"cannot build a processor for {model_id!r}: AutoProcessor failed ({why}), and "
                                  f"so did a tokenizer + image processor ({first_line(e)})") from None


GEN_START = "gen_start"  # Inputs.state key of a decoder's batch: [batch] long, index of the first generated token


IMAGE_HOLD = "<|vlatlas_placeholder|>"  # stands for one image token while prompts are expanded


class AssembledProcessor:
    """A family's processor assembled from its image processor and tokenizer where transformers cannot
    build its own without torchvision (:func:`processor_or`): the two, the chat template, and each
    prompt's image placeholder (``image_token``) expanded into the image tokens its image gets."""

    image_token: str

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize)

    def expand(self, texts: list[str], n_images: int, expansion) -> list[str]:
        """``texts`` with the ``i``-th ``image_token`` (counted over all prompts) replaced by
        ``expansion(i)``, a text in which :data:`IMAGE_HOLD` stands for one image token; there must be
        ``n_images`` placeholders."""
        out, i = [], 0
        for t in texts:
            while self.image_token in t:
                t = t.replace(self.image_token, expansion(i), 1)
                i += 1
            out.append(t.replace(IMAGE_HOLD, self.image_token))
        if i != n_images:
            raise ValueError(f"{i} {self.image_token} in the prompts for {n_images} images")
        return out


class Probe(torch.nn.Module):
    """Identity; a capture hook on it sees what the adapter hands it (hidden states the model never
    exposes as a module output)."""

    def forward(self, x):
        return x


class AttnProbe(torch.nn.Module):
    """``(None, weights)``: an attention module's output as the capture hooks read it (index 1), for
    weights the adapter collects itself."""

    def forward(self, w):
        return None, w


class DecoderAdapter(Adapter):
    """A decoder LVLM: :meth:`prepare` generates the answer greedily, without capture, under
    :meth:`generation_config` (the checkpoint's own, see :func:`greedy_generation_config`) and
    appends it to the inputs, cut after its first eos; :meth:`forward` is then one teacher-forced
    pass over prompt + answer, so each generated token's attention row is the one it had when the
    model fed it back. Where the answer starts goes to ``Inputs.state[GEN_START]``."""

    probe: Probe  # the lm's hidden state 0 (what the language model is fed), where a family hooks it

    def _feed_probe(self, module, args, kwargs):
        """A forward pre-hook on the language model: hands its ``inputs_embeds`` (text embeddings with the
        image features scattered in, which no module outputs) to ``self.probe``, the lm's hidden state 0."""
        emb = kwargs.get("inputs_embeds")
        if emb is not None:
            self.probe(emb)

    @staticmethod
    def _watched(probe: torch.nn.Module) -> bool:
        """Whether a hook (a capture) reads the probe: no work for passes nobody captures."""
        return bool(probe._forward_hooks or probe._forward_pre_hooks)

    def run(self, inputs: Inputs, model_inputs: dict[str, Any], example_ids: list[int] | None) -> Any:
        """The teacher-forced pass: the model on prompt + answer, no cache."""
        return self.model(**model_inputs, use_cache=False, return_dict=True)

    def generated(self, inputs: Inputs) -> list[list[int]]:
        """The ids :meth:`prepare` appended to each example (its answer, pads left out)."""
        ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
        start = inputs.state[GEN_START].cpu()
        return [ids[b, int(start[b]):][mask[b, int(start[b]):]].tolist() for b in range(ids.shape[0])]

    def _lm_columns(self, tid: list[int], pos: list[int], is_img: list[bool], start: int,
                    image_rows: list[tuple]) -> dict[str, list]:
        """One example's ``lm`` token-table columns (:func:`stack_columns`' keys and ``tile``): image token
        ``k`` (``is_img``) takes ``image_rows[k]`` = (role, tile, patch_row, patch_col, box in original
        pixels); a text token its role (``generated`` from sequence position ``start`` on) and word piece;
        ``seq_pos`` counts from the example's first real token (``pos``: the tokens' sequence positions)."""
        cols = {k: [] for k in ("stream", "modality", "role", "token", "seq_pos", "patch_row", "patch_col", "box",
                                "tile")}
        k = 0
        for i, p, img, piece in zip(tid, pos, is_img, self.tokenizer.convert_ids_to_tokens(tid)):
            role, tile, pr, pc, bx = image_rows[k] if img else (
                "generated" if p >= start else self._text_role(i), None, None, None, None)
            for key, v in zip(cols, ("lm", "image" if img else "text", role, None if img else piece, p - pos[0],
                                     pr, pc, bx, tile)):
                cols[key].append(v)
            k += img
        return cols

    @abstractmethod
    def generation_config(self, prompt_length: int | None = None):
        """The merged generation config for prompts of ``prompt_length`` tokens."""

    def extend_inputs(self, out: "Inputs", model_inputs: dict, new: torch.Tensor) -> None:
        """Model inputs other than ids and mask that the appended answer ``new`` ([batch, n]) needs
        (Qwen-VL: ``mm_token_type_ids``); none by default."""

    def prepare(self, inputs: "Inputs") -> "Inputs":
        mi = self._model_inputs(inputs)
        P = mi["input_ids"].shape[1]
        gc = self.generation_config(P)
        stops = set(eos_ids(gc))
        with torch.no_grad():
            seq = self.model.generate(**mi, generation_config=gc)
        new = seq[:, P:]  # [batch, n]
        keep = torch.ones_like(new, dtype=torch.bool)
        for b in range(new.shape[0]):
            row = new[b].tolist()
            stop = next((i for i, t in enumerate(row) if t in stops), None)
            if stop is not None:
                keep[b, stop + 1:] = False
        out = Inputs(mi, getattr(inputs, "state", None))
        out["input_ids"] = seq
        out["attention_mask"] = torch.cat([mi["attention_mask"], keep.to(mi["attention_mask"].dtype)], dim=1)
        self.extend_inputs(out, mi, new)
        out.state[GEN_START] = torch.full((seq.shape[0],), P, dtype=torch.long, device=seq.device)
        return out

    def predict(self, outputs: "ForwardOutput", answers: list[str | None]) -> list["Prediction"]:
        """The generated text (special tokens dropped); correct when it matches the answer, normalised."""
        preds = []
        for gen, ans in zip(outputs.generated, answers):
            text = self.tokenizer.decode(gen, skip_special_tokens=True).strip()
            correct = None if ans is None else normalise_answer(text) == normalise_answer(ans)
            preds.append(Prediction(text, correct, {"generated_tokens": len(gen)}))
        return preds

    def forward(self, inputs: "Inputs", example_ids=None, grad: bool = False) -> "ForwardOutput":
        """One teacher-forced pass over prompt + generated tokens (``prepare`` runs first when it has
        not); ``grad``: build the autograd graph (``--explain relevancy``'s second pass)."""
        if GEN_START not in getattr(inputs, "state", {}):
            prepared = self.prepare(inputs)
            inputs.update(prepared)
            if isinstance(inputs, Inputs):
                inputs.state.update(prepared.state)
            else:
                inputs = prepared
        return super().forward(inputs, example_ids, grad)



class LanguageModelExplained:
    """``--explain relevancy`` and ``lens`` for a decoder whose language model ends in a final norm at
    ``LM_NORM`` and the model's ``lm_head`` (a mixin before :class:`DecoderAdapter`; a family without
    it, BLIP-2, offers neither)."""

    LM_NORM = "model.language_model.norm"

    def relevancy_targets(self, inputs, outputs: ForwardOutput) -> list[dict]:
        """Each generated token, scored by its logit at the position before it (the one that predicted
        it) and read there, in the ``lm`` stream."""
        ids, start = inputs["input_ids"], inputs.state[GEN_START]
        logits = outputs.outputs.logits
        dev = logits.device
        out = []
        for s in range(max((len(g) for g in outputs.generated), default=0)):
            active = torch.tensor([s < len(g) for g in outputs.generated], device=dev)
            pos = (start.to(dev) + s).clamp(max=ids.shape[1] - 1)  # the generated token's position
            row = pos - 1
            tok = ids.to(dev).gather(1, pos[:, None])[:, 0]
            score = logits[torch.arange(len(pos), device=dev), row].gather(1, tok[:, None])[:, 0]
            out.append({"stream": "lm", "row": row, "score": score, "active": active, "target": pos})
        return out

    def lens(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The language model's final norm and unembedding, for ``--explain lens``."""
        return module_at(self.model, self.LM_NORM), self.model.lm_head


def probed_points(stream: str, attn: list[AttnProbe], hidden: list[Probe], keep_hidden: set[int] | None,
                  explain: tuple[str, ...] = ()) -> list[HookPoint]:
    """The hook points of a stream whose attention maps and hidden states the adapter's own hooks hand
    to probes (a tower that packs or crops its batch): every layer's attention, and the hidden states
    kept (all of them pass through when ``sinks`` or ``lens`` reads them unstored)."""
    pts = [HookPoint(stream, i, "attention", p, index=1) for i, p in enumerate(attn)]
    every = "sinks" in explain or "lens" in explain
    for i, p in enumerate(hidden):
        kept = keep_hidden is None or i in keep_hidden
        if kept or every:
            pts.append(HookPoint(stream, i, "hidden", p, store=kept))
    return pts


def token_rows(**cols) -> pa.Table:
    """A token table from its columns (lists, one value per token). ``tile`` may be left out: image
    tokens are then tile 0 (the base image) and text tokens null; a tiling family gives its own."""
    if "tile" not in cols:
        cols["tile"] = [0 if m == "image" else None for m in cols["modality"]]
    return pa.table(cols, schema=TOKEN_SCHEMA)


def text_columns(stream: str, pieces: list[str], roles: list[str], seq_pos: list[int]) -> dict[str, list]:
    """Token-table columns of text tokens (see :func:`stack_columns`)."""
    n = len(pieces)
    return {"stream": [stream] * n, "modality": ["text"] * n, "role": list(roles), "token": list(pieces),
            "seq_pos": list(seq_pos), "patch_row": [None] * n, "patch_col": [None] * n, "box": [None] * n}


def image_columns(grid: PatchGrid, stream: str, image_cls: bool) -> dict[str, list]:
    """Token-table columns of a vision tower's tokens: its image ``[CLS]`` (when it has one; boxed
    with the whole processed image) then the patches in raster order; ``seq_pos`` as the tower
    sees them (``[CLS]`` 0, patch ``(r, c)`` at ``[1 +] r * cols + c``: ``flatten(2)`` is row-major)."""
    first = 1 if image_cls else 0
    n, cells = first + len(grid.cells), grid.cells
    return {"stream": [stream] * n, "modality": ["image"] * n,
            "role": ["image_cls"] * first + ["patch"] * len(cells), "token": [None] * n,
            "seq_pos": list(range(first)) + [first + r * grid.cols + c for r, c in cells],
            "patch_row": [None] * first + [r for r, _ in cells], "patch_col": [None] * first + [c for _, c in cells],
            "box": ([grid.whole] if first else []) + list(grid.boxes)}


def stack_columns(*parts: dict[str, list]) -> pa.Table:
    """One example's token table from column parts (:func:`text_columns`, :func:`image_columns`, or
    a family's own with the same keys: ``box`` a 4-tuple in original pixels or None), in order:
    ``token_idx`` numbers the rows, ``text_pos`` the text tokens. A ``tile`` key (every part's) is
    passed on; without it image tokens are tile 0 (:func:`token_rows`)."""
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
