"""Interventions on a loaded model: the hooks that apply them, and the model's score of its own answer.

Every intervention runs as a batch of *variants* of one example: the example's inputs repeated, row
``r`` of the batch under intervention ``r``, so one forward pass serves many (a head ablated in each
row, a knockout window in each row, a set of image regions removed in each row).

- :class:`HeadAblation`: a forward pre-hook on a layer's attention output projection (its input is
  the heads' outputs side by side, ``[batch, seq, heads * d]``) replaces head ``h``'s slice in the
  rows that ablate it by the head's mean over the run's examples (a ``[d]`` vector), or by zero.
- :class:`Knockout`: while an attention module of the window runs, its softmax sees ``-inf`` on the
  blocked edges (query in one token set, key in another) of the rows that block them, so blocked
  edges get no weight and the rest of each row is renormalised exactly as the model's softmax
  does; a row with every key blocked gets no weight at all (its attention output is zero).
- :class:`EmbeddingReplace`: a pre-hook on a stream's first block replaces removed image tokens'
  input by the mean of the example's image tokens (``--replace embedding``).
- :class:`Scorer`: the model's score of its original answer, per family class (a decoder's summed
  log-probability of its answer under teacher forcing; a VQA encoder's logit of its predicted class;
  a retrieval head's match logit; a dual encoder's pair similarity), and its answer under the
  intervention (a decoder's greedy generation, a classifier's class).
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pipeline.intervene.spec import InterventionError
from pipeline.models.base import GEN_START, Inputs
from pipeline.models.hooks import layer_slots, module_at
from pipeline.models.towers import ModuleTower

CROSS_QUERIES = {"cross": "text", "qformer_cross": "qformer", "lm_cross": "lm"}  # a cross stream's query stream


# -- where the hooks go ----------------------------------------------------------------------------
def head_count(adapter, stream: str) -> int:
    return int(adapter.configs[stream].num_attention_heads)


def stream_layers(adapter, stream: str) -> int:
    return len(layer_slots(adapter.configs[stream]))


def plain_stream(adapter, stream: str) -> bool:
    """Whether a stream's modules run on the examples' batch (not a tower that crops or packs its images,
    whose batch is not the examples: the variants of an example could not be told apart there)."""
    tower = getattr(adapter, "tower", None)
    if stream == "vision" and tower is not None and not isinstance(tower, ModuleTower):
        return False
    return stream in adapter.paths


def out_module(adapter, stream: str, layer: int) -> torch.nn.Module:
    """The attention output projection of a stream's layer (its input: every head's output)."""
    paths = adapter.paths.get(stream, {})
    if "out" not in paths or not plain_stream(adapter, stream):
        raise InterventionError(f"heads: the {stream} stream of {adapter.family} has no per-example attention "
                                "output projection to ablate heads at (its tower crops or packs its images)")
    slot = layer_slots(adapter.configs[stream])[layer]
    return module_at(adapter.model, paths["out"].format(layer=slot).partition("#")[0])


def attention_module(adapter, stream: str, layer: int) -> torch.nn.Module:
    slot = layer_slots(adapter.configs[stream])[layer]
    return module_at(adapter.model, adapter.paths[stream]["attention"].format(layer=slot))


def first_block(adapter, stream: str) -> torch.nn.Module:
    paths = adapter.paths.get(stream, {})
    if "hidden" not in paths or not plain_stream(adapter, stream):
        raise InterventionError(f"--replace embedding: the {stream} stream of {adapter.family} has no block whose "
                                "input holds the image tokens; use --replace pixels")
    return module_at(adapter.model, paths["hidden"].format(layer=layer_slots(adapter.configs[stream])[0]))


def ablatable_streams(adapter) -> list[str]:
    """Streams whose heads can be ablated: an output projection per layer, on the examples' batch."""
    return [s for s, p in adapter.paths.items() if "out" in p and plain_stream(adapter, s)]


def _first_tensor(args, kwargs, name: str = "hidden_states"):
    if args:
        return args[0], lambda x: ((x,) + tuple(args[1:]), kwargs)
    return kwargs[name], lambda x: (args, {**kwargs, name: x})


# -- head ablation -----------------------------------------------------------------------------------
class HeadAblation:
    """Ablate one head per row: ``rows[r] = (stream, layer, head)`` or None (row ``r`` runs clean).

    ``means[(stream, layer)]``: ``[heads, d]`` each head's mean output (None: ablate to zero)."""

    def __init__(self, adapter, rows: list[tuple[str, int, int] | None], means: dict | None):
        self.adapter, self.rows, self.means = adapter, rows, means

    @contextmanager
    def __call__(self):
        by_site: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for r, site in enumerate(self.rows):
            if site is not None:
                by_site.setdefault(site[:2], []).append((r, site[2]))
        handles = []
        try:
            for (stream, layer), hits in by_site.items():
                module = out_module(self.adapter, stream, layer)
                heads = head_count(self.adapter, stream)
                mean = None if self.means is None else self.means[(stream, layer)]
                handles.append(module.register_forward_pre_hook(self._hook(hits, heads, mean)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, hits, heads: int, mean):
        rows = len(self.rows)

        def fn(module, args):
            x = args[0]
            if x.shape[0] != rows:
                raise RuntimeError(f"head ablation expected {rows} rows, the output projection got {x.shape[0]}")
            d = x.shape[-1] // heads
            x = x.clone()
            for r, h in hits:
                x[r, ..., h * d:(h + 1) * d] = 0 if mean is None else mean[h].to(x.dtype)
            return (x,) + tuple(args[1:])

        return fn


class HeadRecorder:
    """Record (and, with ``grad``, keep for backward) every head's output at the given sites: the input
    of each layer's output projection, ``[batch, seq, heads * d]``."""

    def __init__(self, adapter, sites: list[tuple[str, int]], grad: bool = False):
        self.adapter, self.sites, self.grad = adapter, sites, grad
        self.seen: dict[tuple[str, int], torch.Tensor] = {}

    @contextmanager
    def __call__(self):
        handles = []
        try:
            for site in self.sites:
                handles.append(out_module(self.adapter, *site).register_forward_pre_hook(self._hook(site)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, site):
        def fn(module, args):
            x = args[0]
            if self.grad and x.requires_grad:
                x.retain_grad()
            self.seen[site] = x
            return None

        return fn


# -- knockout --------------------------------------------------------------------------------------------
_ACTIVE = threading.local()  # the block function of the attention module running now (None: none)
_PATCH_LOCK = threading.Lock()
_PATCHED = {"depth": 0, "orig": None}


def _knockout_softmax(input, dim=None, _stacklevel=3, dtype=None):
    orig = _PATCHED["orig"]
    block_fn = getattr(_ACTIVE, "block", None)
    if block_fn is not None and input.dim() == 4 and dim in (-1, 3):
        block = block_fn(input.shape[-2], input.shape[-1], input.device)  # [rows, q, k] bool or None
        if block is not None:
            x = input.masked_fill(block[:, None], float("-inf"))
            out = orig(x, dim=dim, dtype=dtype)
            return torch.nan_to_num(out, nan=0.0)  # a row with every key blocked: no weight anywhere
    return orig(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)


@contextmanager
def _softmax_patched():
    """``torch.nn.functional.softmax`` (which eager attention, and ``nn.Softmax``, call) through
    :func:`_knockout_softmax` for the duration; it acts only while a knockout module runs."""
    import torch.nn.functional as F

    with _PATCH_LOCK:
        if _PATCHED["depth"] == 0:
            _PATCHED["orig"] = F.softmax
            F.softmax = _knockout_softmax
        _PATCHED["depth"] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCHED["depth"] -= 1
            if _PATCHED["depth"] == 0:
                F.softmax = _PATCHED["orig"]


@dataclass
class TokenSets:
    """One example's token sets in one stream, by position in the stream's sequence (queries) and in
    its keys' sequence (``keys``: the same for a self-attention stream)."""

    queries: dict[str, np.ndarray]  # set name -> [positions] bool
    keys: dict[str, np.ndarray]
    generated_from: int | None = None  # a decoder: positions from here on are generated tokens

    def member(self, name: str, side: str, positions: torch.Tensor) -> torch.Tensor:
        table = (self.queries if side == "q" else self.keys).get(name)
        n = 0 if table is None else len(table)
        out = torch.zeros(len(positions), dtype=torch.bool)
        pos = positions.cpu().numpy()
        inside = pos < n
        if table is not None:
            out[torch.from_numpy(inside)] = torch.from_numpy(table[pos[inside]])
        if self.generated_from is not None and name == "generated":
            out |= torch.from_numpy(pos >= self.generated_from)
        return out


class Knockout:
    """Block attention edges per row: ``rows[r] = (stream, layers, from_set, to_set)`` or None.

    ``sets[stream]``: the example's :class:`TokenSets` in that stream. A self-attention stream's
    queries are the last ``q`` of its ``k`` positions (generation with a cache feeds the new ones)."""

    def __init__(self, adapter, rows: list[tuple[str, tuple[int, ...], str, str] | None], sets: dict[str, TokenSets],
                 cross: dict[str, str]):
        self.adapter, self.rows, self.sets, self.cross = adapter, rows, sets, cross

    @contextmanager
    def __call__(self):
        by_site: dict[tuple[str, int], list[tuple[int, str, str]]] = {}
        for r, v in enumerate(self.rows):
            if v is None:
                continue
            stream, layers, a, b = v
            for layer in layers:
                by_site.setdefault((stream, layer), []).append((r, a, b))
        with ExitStack() as stack:
            stack.enter_context(_softmax_patched())
            for (stream, layer), hits in by_site.items():
                m = attention_module(self.adapter, stream, layer)
                fn = self._block_fn(stream, hits)
                stack.callback(m.register_forward_pre_hook(lambda mod, args, fn=fn: _set_block(fn)).remove)
                stack.callback(m.register_forward_hook(lambda mod, args, out: _set_block(None)).remove)
            yield

    def _block_fn(self, stream: str, hits) -> Callable:
        rows = len(self.rows)
        sets = self.sets[stream]
        is_cross = stream in self.cross

        def fn(q: int, k: int, device) -> torch.Tensor:
            kpos = torch.arange(k)
            qpos = torch.arange(q) if is_cross else torch.arange(k - q, k)
            block = torch.zeros(rows, q, k, dtype=torch.bool)
            for r, a, b in hits:
                block[r] = sets.member(a, "q", qpos)[:, None] & sets.member(b, "k", kpos)[None, :]
            return block.to(device)

        return fn


def _set_block(fn) -> None:
    _ACTIVE.block = fn


# -- embedding replacement ----------------------------------------------------------------------------------
class EmbeddingReplace:
    """Replace, per row, the first block's input at the removed image tokens' positions by the mean
    over the example's image tokens (``units``: every image token's position)."""

    def __init__(self, adapter, stream: str, rows: list[list[int]], units: list[int]):
        self.adapter, self.stream, self.rows, self.units = adapter, stream, rows, units

    @contextmanager
    def __call__(self):
        h = first_block(self.adapter, self.stream).register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            h.remove()

    def _hook(self, module, args, kwargs):
        x, put = _first_tensor(args, kwargs)
        if x.dim() != 3 or x.shape[1] <= max(self.units, default=0):
            return None  # a generation step past the prompt: the image tokens are in the cache already
        units = torch.tensor(self.units, device=x.device)
        mean = x[:, units].mean(1)  # [rows, D]
        x = x.clone()
        for r, pos in enumerate(self.rows):
            if pos:
                x[r, torch.tensor(pos, device=x.device)] = mean[r].to(x.dtype)
        return put(x)


# -- scores -------------------------------------------------------------------------------------------------
def repeat_inputs(inputs: Inputs, n: int) -> Inputs:
    """An example's inputs (a batch of one) repeated ``n`` times along the batch."""
    def rep(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if v.shape[0] != 1:
                raise InterventionError("an intervention runs an example's variants as one batch, but this "
                                        f"model's input of shape {tuple(v.shape)} is not one row per example")
            return v.repeat(n, *([1] * (v.dim() - 1)))
        return v
    return inputs.map(rep) if isinstance(inputs, Inputs) else Inputs({k: rep(v) for k, v in inputs.items()})


@dataclass
class Base:
    """One example before any intervention: its inputs (a decoder's with its answer appended), layout,
    score and answer."""

    example_id: int
    inputs: Inputs  # what the scored pass runs on
    prompt: Inputs | None  # a decoder's prompt alone (what generation starts from)
    layout: Any
    metric: float
    answer: str | None
    extra: dict = field(default_factory=dict)  # the scorer's own (the predicted class, the answer's ids)


class Scorer:
    """The model's own score of its original answer (see the module docstring); subclasses per family class."""

    metric = ""

    def __init__(self, adapter):
        self.adapter = adapter

    def base(self, inputs: Inputs, image, boxes, example_id: int) -> Base:
        raise NotImplementedError

    def after(self, base: Base, inputs: Inputs, rows: int) -> tuple[list[float], list[str | None]]:
        """Score ``inputs`` (``rows`` variants of ``base``'s example, hooks applied by the caller)."""
        raise NotImplementedError

    def encode(self, base: Base, text: str, images: list) -> Inputs:
        """The example's inputs with other images (one a row), ready for :meth:`after`."""
        enc, _ = self.adapter.encode([text] * len(images), images)
        return enc.to(self.adapter.device) if isinstance(enc, Inputs) else Inputs(enc).to(self.adapter.device)

    def forward(self, inputs: Inputs, example_id: int, rows: int, grad: bool = False):
        return self.adapter.forward(inputs, example_ids=[example_id] * rows, grad=grad)

    def score_tensor(self, base: Base, out) -> torch.Tensor:
        """``[rows]`` the score, differentiable (attribution patching)."""
        raise NotImplementedError


class EncoderScorer(Scorer):
    """ViLT (VQA: the predicted class's logit; retrieval: the match logit), CLIP/SigLIP (the pair's
    similarity), BLIP's matching head (the "match" logit)."""

    def __init__(self, adapter):
        super().__init__(adapter)
        head = getattr(adapter, "head", None)
        fam = adapter.family
        if fam in ("clip", "siglip"):
            self.kind, self.metric = "similarity", "similarity"
        elif fam == "vilt" and head == "vqa":
            self.kind, self.metric = "vqa", "class_logit"
        elif fam == "vilt" and head == "retrieval":
            self.kind, self.metric = "rank", "rank_logit"
        elif fam == "blip" and head == "retrieval":
            self.kind, self.metric = "itm", "match_logit"
        else:
            raise InterventionError(f"{fam} ({head or 'no head'}) has no score of its answer to intervene on: "
                                    "VL-Atlas scores ViLT's VQA and retrieval heads, CLIP/SigLIP, BLIP's matching "
                                    "head and decoder LVLMs (BLIP's VQA answer decoder is not captured)")

    def score_tensor(self, base: Base, out) -> torch.Tensor:
        if self.kind == "vqa":
            return out.logits[:, base.extra["cls"]]
        if self.kind == "rank":
            return out.logits[:, 0]
        if self.kind == "similarity":
            return torch.diagonal(out.logits_per_image)
        return out.itm_score[:, 1]

    def answers(self, base: Base, out) -> list[str | None]:
        if self.kind == "vqa":
            id2label = self.adapter.model.config.id2label
            return [str(id2label.get(i, id2label.get(str(i), i))) for i in out.logits.argmax(-1).tolist()]
        if self.kind == "itm":
            return ["match" if m else "no match" for m in (out.itm_score.argmax(-1) == 1).tolist()]
        return [None] * out.logits_per_image.shape[0] if self.kind == "similarity" else [None] * out.logits.shape[0]

    def base(self, inputs, image, boxes, example_id) -> Base:
        with torch.no_grad():
            out = self.forward(inputs, example_id, 1)
        layout = self.adapter.layout(inputs, [image], [boxes])
        extra = {"cls": int(out.logits.argmax(-1)[0])} if self.kind == "vqa" else {}
        b = Base(example_id, inputs, None, layout, 0.0, None, extra)
        b.metric = float(self.score_tensor(b, out)[0])
        b.answer = self.answers(b, out)[0]
        return b

    def after(self, base, inputs, rows):
        with torch.no_grad():
            out = self.forward(inputs, base.example_id, rows)
        return self.score_tensor(base, out).float().tolist(), self.answers(base, out)


class DecoderScorer(Scorer):
    """A decoder LVLM: the sum of the log-probabilities of its original answer's tokens under teacher
    forcing; the answer under an intervention is its greedy generation under it."""

    metric = "logprob"

    def with_answer(self, prompt: Inputs, answer: torch.Tensor) -> Inputs:
        """``prompt`` (rows of one prompt) with the original answer's ids appended to every row, as
        ``DecoderAdapter.prepare`` appends a generated one."""
        a = self.adapter
        mi = a._model_inputs(prompt)
        rows, P = mi["input_ids"].shape
        new = answer[None, :].expand(rows, -1).to(mi["input_ids"].device)
        out = Inputs(mi, dict(getattr(prompt, "state", {})))
        out["input_ids"] = torch.cat([mi["input_ids"], new], dim=1)
        out["attention_mask"] = torch.cat([mi["attention_mask"], torch.ones_like(new, dtype=mi["attention_mask"].dtype)], 1)
        a.extend_inputs(out, mi, new)
        out.state[GEN_START] = torch.full((rows,), P, dtype=torch.long, device=new.device)
        return out

    def base(self, inputs, image, boxes, example_id) -> Base:
        a = self.adapter
        prompt = Inputs(a._model_inputs(inputs), dict(getattr(inputs, "state", {})))
        with torch.no_grad():
            full = a.prepare(prompt)
        answer = torch.tensor(a.generated(full)[0], dtype=torch.long)
        full = self.with_answer(prompt, answer)
        b = Base(example_id, full, prompt, None, 0.0, None, {"answer_ids": answer})
        with torch.no_grad():
            out = self.forward(full, example_id, 1)
        b.layout = a.layout(full, [image], [boxes])
        b.metric = float(self.score_tensor(b, out)[0])
        b.answer = self.text(answer.tolist())
        return b

    def text(self, ids: list[int]) -> str:
        return self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def score_tensor(self, base: Base, out) -> torch.Tensor:
        ids = base.extra["answer_ids"]
        n = len(ids)
        if n == 0:
            return out.logits.new_zeros(out.logits.shape[0])
        T = out.logits.shape[1]
        logp = out.logits[:, T - n - 1:T - 1].float().log_softmax(-1)  # the positions that predict each answer token
        return logp.gather(2, ids.to(logp.device)[None, :, None].expand(logp.shape[0], n, 1))[..., 0].sum(1)

    def after(self, base, inputs, rows):
        """``inputs``: the prompt's rows (a variant each), from :meth:`prompt_rows`."""
        a = self.adapter
        full = self.with_answer(inputs, base.extra["answer_ids"])
        with torch.no_grad():
            out = self.forward(full, base.example_id, rows)
            metric = self.score_tensor(base, out).float().tolist()
            gen = a.prepare(Inputs(a._model_inputs(inputs), dict(getattr(inputs, "state", {}))))
        return metric, [self.text(g) for g in a.generated(gen)]

    def encode(self, base, text, images):
        enc = super().encode(base, text, images)
        return Inputs(self.adapter._model_inputs(enc), dict(getattr(enc, "state", {})))


def scorer_for(adapter) -> Scorer:
    from pipeline.models.decoder import DecoderAdapter

    return DecoderScorer(adapter) if isinstance(adapter, DecoderAdapter) else EncoderScorer(adapter)


def base_rows(scorer: Scorer, base: Base) -> Inputs:
    """What a batch of variants repeats: a decoder's prompt (it is generated from, and the answer
    appended), an encoder's inputs."""
    return base.prompt if base.prompt is not None else base.inputs
