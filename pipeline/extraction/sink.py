"""The device side of extraction: what happens to each hooked tensor while the model runs.

:class:`BatchSink` receives every layer's attention, hidden state and value projection during the
forward pass (``pipeline.capture``). Statistics are computed on the device from the attention in the
model's own sequence order (the token masks are scattered to it once per batch), the weights to keep
are selected there too (:mod:`pipeline.extraction.keep`), and the ``--explain`` methods run beside
them (value norms, sinks, rollout, the logit lens; gradient relevancy in a second pass,
:func:`relevancy`). Nothing comes to the host until the batch is done: then :meth:`BatchSink.finish`
moves every result in one transfer, as the typed results of :mod:`pipeline.extraction.outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from lake.schema import EXPLAIN_STATS, STATS
from pipeline.capture import HookPoint, ModuleOutputError
from pipeline.capture_config import Budget, Capture, KeepNone
from pipeline.explain import lens_topk, norm_weighted, relevancy_cross, relevancy_self, rollout_step, sinks, value_norms
from pipeline.extraction.keep import SeqLayout, row_mean_mass, select, select_budget_seq, seq_in_box, seq_layout
from pipeline.extraction.outputs import (ActivationOut, HiddenOut, KeptOut, LensOut, Out, RelevancyOut, SinksOut,
                                         StatsOut, ValueOut)
from pipeline.models.base import BatchLayout, StreamLayout
from pipeline.models.towers import STREAM, ProbedTower
from pipeline.stats import TokenMasks, head_stats


def stat_order(explain=()) -> list[str]:
    """The statistics a run computes, in the order of the per-layer statistics block."""
    return sorted(set(STATS).union(*(EXPLAIN_STATS.get(m, ()) for m in explain)))


@dataclass(frozen=True)
class SinkBatch:
    """One batch as the sink sees it: the encoded inputs (on the device), the images and boxes the
    token layout is built from, the example ids, and ``with_vec`` ``[batch]`` bool: the examples
    whose hidden vectors are stored."""

    inputs: dict
    images: list
    boxes: list
    example_ids: list[int]
    with_vec: np.ndarray


@dataclass(frozen=True)
class _Attention:
    """One attention layer as :meth:`BatchSink._explained` reads it."""

    point: HookPoint
    attn: torch.Tensor  # [batch, head, Sq, Sk] sequence order
    masks: TokenMasks  # the queries' masks, sequence order
    kmasks: TokenMasks | None  # the keys' masks for a cross stream, else None
    q_seq: SeqLayout
    sl: StreamLayout


def gather_tokens(attn: torch.Tensor, sl: StreamLayout, key_sl: StreamLayout | None = None) -> torch.Tensor:
    """``[batch, head, seq, seq_k]`` in sequence order -> ``[batch, head, token, token_k]`` in token order.

    Rows follow ``sl``, columns ``key_sl`` (``sl`` itself unless a cross stream's keys are another's).
    """
    key_sl = sl if key_sl is None else key_sl
    B, H, _, Sk = attn.shape
    idx, kidx = sl.seq_index, key_sl.seq_index  # [batch, token], [batch, token_k]
    N, Nk = idx.shape[1], kidx.shape[1]
    rows = attn.gather(2, idx[:, None, :, None].expand(B, H, N, Sk))  # [batch, head, token, seq_k]
    a = rows.gather(3, kidx[:, None, None, :].expand(B, H, N, Nk))  # [batch, head, token, token_k]
    pair = (sl.valid[:, :, None] & key_sl.valid[:, None, :])[:, None]  # [batch, 1, token, token_k]
    return a * pair


class BatchSink:
    """Receives each layer's tensors during the forward pass; keeps every result on the device."""

    def __init__(self, adapter, batch: SinkBatch, capture: Capture, device, sites: dict | None = None):
        """``capture``: the run's policy, and the --explain methods computed in the same pass; ``sites``:
        where each --capture-modules module sits (:func:`pipeline.extraction.modules.module_points`)."""
        self.adapter, self.inputs, self.images, self.boxes = adapter, batch.inputs, batch.images, batch.boxes
        self.example_ids = batch.example_ids
        self.policy = capture.attention
        self.device = device
        self.explain = capture.explain
        self.stat_order = stat_order(self.explain)
        self._vnorm: dict[tuple[str, int], torch.Tensor] = {}  # value norms, sequence order
        self._sink: dict[tuple[str, int], torch.Tensor] = {}  # sink flags of each block's input, sequence order
        self._roll: dict[str, torch.Tensor] = {}  # rollout so far, per stream
        self._vec_rows = torch.as_tensor(np.flatnonzero(batch.with_vec), dtype=torch.long)
        self.layout: BatchLayout | None = None
        self._streams: dict[str, StreamLayout] = {}
        self._seq_cache: dict[tuple[str, int], SeqLayout] = {}
        self.sites = sites or {}
        self._seq_len: dict[str, int] = {}  # each stream's sequence length in this batch, from its attention
        # module outputs seen before their stream's length, with their own shapes
        self._pending: list[tuple[HookPoint, torch.Tensor, list[int]]] = []
        self._modules_seen: set[str] = set()
        self.out: list[Out] = []

    def stream(self, name: str) -> StreamLayout:
        if self.layout is None:
            self.layout = self.adapter.layout(self.inputs, self.images, self.boxes)
        if name not in self._streams:
            self._streams[name] = self.layout.streams[name].to(self.device)
        return self._streams[name]

    def _seq(self, name: str, S: int) -> SeqLayout:
        """The stream's masks scattered to the model's sequence order (length ``S``), cached."""
        key = (name, S)
        if key not in self._seq_cache:
            self._seq_cache[key] = seq_layout(self.stream(name), S)
        return self._seq_cache[key]

    def __call__(self, point: HookPoint, tensor: torch.Tensor) -> None:
        if point.kind == "module":
            self._module(point, tensor)
            return
        sl = self.stream(point.stream)
        if point.kind == "attention":
            self._seq_len.setdefault(point.stream, tensor.shape[2])
        if point.kind == "value":
            self._value(point, tensor)
            return
        if point.kind == "attention":
            key_stream = self.layout.keys.get(point.stream)  # cross attention: keys of another stream
            ksl = sl if key_stream is None else self.stream(key_stream)
            q_seq = self._seq(point.stream, tensor.shape[2])
            k_seq = q_seq if key_stream is None else self._seq(key_stream, tensor.shape[3])
            # statistics in the model's own order: the masks move, not the matrix
            masks = q_seq.masks if key_stream is None else replace(q_seq.masks, in_box=seq_in_box(sl, ksl, q_seq, k_seq))
            stats = head_stats(tensor, masks, None if key_stream is None else k_seq.masks)
            kept = None
            if isinstance(self.policy, Budget):
                kept = select_budget_seq(tensor, self.policy, sl, q_seq, k_seq)
            elif not isinstance(self.policy, KeepNone):
                a = gather_tokens(tensor.float(), sl, ksl)  # [batch, head, token, token_k]
                kept = select(a, sl.valid, sl.masks.image, self.policy, (ksl.valid, ksl.masks.image))
            stats["kept_mass"] = (row_mean_mass(kept.mass, sl.valid) if kept is not None
                                  else torch.zeros_like(stats["t2i"]))
            if self.explain:
                kmasks = None if key_stream is None else k_seq.masks
                stats.update(self._explained(_Attention(point, tensor, masks, kmasks, q_seq, sl)))
            nan = torch.full_like(stats["t2i"], float("nan"))
            block = torch.stack([stats.get(s, nan).float() for s in self.stat_order], 0)  # [stat, batch, head]
            self.out.append(StatsOut(point.stream, point.layer, block))
            if kept is not None:
                self.out.append(KeptOut(point.stream, point.layer, kept, key_stream))
        else:
            if "sinks" in self.explain:
                valid = self._seq(point.stream, tensor.shape[1]).masks.valid
                flag, dim, ratio = sinks(tensor, valid)
                self._sink[(point.stream, point.layer)] = flag
                tok = sl.seq_index
                self.out.append(SinksOut(point.stream, point.layer, ratio=ratio.gather(1, tok),
                                         flag=flag.gather(1, tok) & sl.valid, dim=dim.gather(1, tok)))
            lens = "lens" in self.explain and hasattr(self.adapter, "lens") and point.stream == "lm"
            if not (lens or point.store):
                return
            tok = sl.seq_index
            h = tensor.gather(1, tok[:, :, None].expand(-1, -1, tensor.shape[-1]))  # [batch, token, dim]
            if lens:
                norm, head = self.adapter.lens()
                with torch.no_grad():
                    p, ids = lens_topk(h.reshape(-1, h.shape[-1]), norm, head)
                k = p.shape[-1]
                self.out.append(LensOut(point.stream, point.layer, prob=p.reshape(*tok.shape, k),
                                        ids=ids.reshape(*tok.shape, k), mask=sl.valid))
            if not point.store:
                return
            norm, vec = self._stored(h)
            self.out.append(HiddenOut(point.stream, point.layer, norm=norm, vectors=vec))

    def _stored(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``hidden_states`` and ``activations`` keep of ``h`` ``[batch, token, dim]``: every token's
        norm, and the vectors (float16) of the examples whose vectors are stored (None when none is)."""
        norm = h.float().norm(dim=-1)  # [batch, token]
        vec = h[self._vec_rows.to(h.device)].to(torch.float16) if len(self._vec_rows) else None
        return norm, vec

    def _module(self, point: HookPoint, tensor: torch.Tensor) -> None:
        """A --capture-modules module's output: laid over its stream's tokens now, or once the streams it
        may belong to have run their attention (a clone: the model may reuse the tensor)."""
        if point.name in self._modules_seen:  # a module the pass runs twice would store its tokens twice
            raise ModuleOutputError(f"--capture-modules: module {point.name} runs more than once in the model's "
                                    "forward pass, so its output is not one vector per token; capture a module "
                                    "that runs once")
        self._modules_seen.add(point.name)
        shape = list(tensor.shape)
        tower = getattr(self.adapter, "tower", None)
        if self.sites[point.name].stream == STREAM and isinstance(tower, ProbedTower):
            # a tower whose batch is crops or one packed sequence: regrouped now, while it knows the
            # batch's make-up, as its own hooks regroup its hidden states (the vision stream's order)
            per = tower.regroup(tensor)
            tensor = tensor if per is None else per
        if all(s in self._seq_len for s in self.sites[point.name].streams):
            self.out.append(self._activation(point, tensor, shape))
        else:
            self._pending.append((point, tensor.clone(), shape))

    def _activation(self, point: HookPoint, t: torch.Tensor, shape: list[int]) -> ActivationOut:
        """One vector per token of a stream: ``[batch, seq, dim]`` over the stream's sequence (gathered in
        token order, as hidden states are; a crop-by-crop or packed tower's output regrouped per example
        first, :meth:`_module`), or ``[batch, n, dim]`` with one row per image token of a stream (LLaVA's
        projector: the image's patch features, in order). Anything else (a pooled output, a tower
        output of another token count) is refused with one line naming the module's own ``shape``."""
        site = self.sites[point.name]
        B = len(self.example_ids)
        found = None
        if t.dim() == 3 and t.shape[0] == B:
            for s in site.streams:  # the stream's own sequence
                if self._seq_len.get(s) == t.shape[1]:
                    sl = self.stream(s)
                    found = s, sl.seq_index, sl.valid
                    break
            for s in site.streams if found is None else ():  # one row per image token, in order
                sl = self.stream(s)
                sel = sl.masks.image & sl.valid
                if t.shape[1] and bool((sel.sum(1) == t.shape[1]).all()):
                    found = s, (sel.long().cumsum(1) - 1).clamp(min=0), sel
                    break
        if found is None:
            where = " or ".join(f"{s} ({self._seq_len.get(s, '?')} positions)" for s in site.streams)
            raise ModuleOutputError(f"--capture-modules: module {point.name} outputs shape {shape}, which is "
                                    f"not one vector per token of the batch's {B} examples over the {where} stream's "
                                    "sequence or image tokens (a pooled output, or a tower's of another token count, "
                                    "cannot be stored)")
        stream, index, mask = found
        norm, vec = self._stored(t.gather(1, index[:, :, None].expand(-1, -1, t.shape[-1])))  # [batch, token, dim]
        return ActivationOut(stream, point.layer, module=point.name, norm=norm, vectors=vec, mask=mask)

    def _value(self, point: HookPoint, tensor: torch.Tensor) -> None:
        """A value projection's output: every head's value norms, kept for the layer's attention."""
        if point.part is not None:
            i, n = point.part
            w = tensor.shape[-1] // n
            tensor = tensor[..., i * w:(i + 1) * w]
        norms = value_norms(tensor, point.out.weight.detach(), point.heads, point.kv_heads)  # [batch, head, seq]
        self._vnorm[(point.stream, point.layer)] = norms
        key_stream = self.layout.keys.get(point.stream) if self.layout is not None else None
        ksl = self.stream(key_stream or point.stream)
        tok = ksl.seq_index[:, None, :].expand(-1, norms.shape[1], -1)
        self.out.append(ValueOut(point.stream, point.layer, norm=norms.gather(2, tok),
                                 key_stream=key_stream or point.stream))

    def _explained(self, c: _Attention) -> dict[str, torch.Tensor]:
        """The --explain statistics of one layer, and its rollout rows."""
        point, attn, masks, kmasks, q_seq, sl = c.point, c.attn, c.masks, c.kmasks, c.q_seq, c.sl
        square = kmasks is None  # self-attention: rollout and sinks apply
        out: dict[str, torch.Tensor] = {}
        key = (point.stream, point.layer)
        if key in self._vnorm:
            s = head_stats(norm_weighted(attn, self._vnorm.pop(key)), masks, kmasks)
            out.update({f"{k}_norm": s[k] for k in ("t2i", "t2t", "i2t", "i2i", "sink")})
        if square and key in self._sink:
            flag = self._sink.pop(key)  # the tokens massive in this block's input
            a = attn.float()
            on_sinks = (a * flag[:, None, None, :].float()).sum(-1)  # [batch, head, query]
            out["sink_mass"] = row_mean_mass(on_sinks, masks.valid)
            rest = a * (~flag)[:, None, None, :].float()
            rest = rest / rest.sum(-1, keepdim=True).clamp(min=1e-30)
            s = head_stats(rest, masks)
            out.update({f"{k}_nosink": s[k] for k in ("t2i", "t2t", "i2t", "i2i", "entropy", "grounding",
                                                        "pointing")})
        if square and "rollout" in self.explain:
            r = rollout_step(attn, q_seq.masks.valid, self._roll.get(point.stream))
            self._roll[point.stream] = r
            tok = sl.seq_index  # [batch, token]
            n = tok.shape[1]
            rt = r.gather(1, tok[:, :, None].expand(-1, -1, r.shape[2])).gather(2, tok[:, None, :].expand(-1, n, -1))
            block = (sl.masks.text & sl.valid)[:, :, None] & (sl.masks.patch & sl.valid)[:, None, :]
            target = torch.arange(n, device=tok.device)[None].expand(tok.shape[0], n)  # every query explained
            self.out.append(RelevancyOut(point.stream, point.layer, "rollout", values=rt, mask=block, target=target))
        return out

    def finish(self) -> list[Out]:
        """Bring every layer's results to the host in one go (one synchronisation)."""
        self.out += [self._activation(p, t, shape) for p, t, shape in self._pending]
        self._pending = []
        moved = [o.to_host() for o in self.out]
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        return [o.to_numpy() for o in moved]


def relevancy(adapter, inputs, ids, sink: BatchSink, points: list[HookPoint]) -> None:
    """Gradient-weighted relevancy (Chefer et al. 2021), a second pass with autograd: for every target
    of ``adapter.relevancy_targets`` (an encoder's prediction; each token a decoder generated), the
    gradient of its score with respect to every attention of its stream, ``R = I + sum Ā R``, and the
    row of the token the score is read at, in token order."""
    grabbed: dict[tuple[str, int], torch.Tensor] = {}

    def grab(p: HookPoint):
        def fn(module, args, output):
            grabbed[(p.stream, p.layer)] = output[p.index]
        return fn

    att = [p for p in points if p.kind == "attention"]
    handles = [p.module.register_forward_hook(grab(p)) for p in att]
    try:
        outputs = adapter.forward(inputs, example_ids=ids, grad=True)
    finally:
        for h in handles:
            h.remove()
    targets = adapter.relevancy_targets(inputs, outputs)
    att = {}  # stream -> its attentions, layer by layer
    for (s, l) in sorted(grabbed):
        att.setdefault(s, []).append(grabbed[(s, l)])
    for i, t in enumerate(targets):
        active = t["active"]
        if not bool(active.any()):
            continue
        streams = ("vision", "text", "cross") if t.get("rule") == "cross" else (t["stream"],)
        flat = [a for s in streams for a in att[s]]
        grads = torch.autograd.grad((t["score"] * active).sum(), flat, retain_graph=i < len(targets) - 1,
                                    allow_unused=True)
        grads = iter([torch.zeros_like(a) if g is None else g for a, g in zip(flat, grads)])
        gs = {s: [next(grads) for _ in att[s]] for s in streams}
        a = {s: [x.detach() for x in att[s]] for s in streams}
        seq = {s: sink._seq(s, a[s][0].shape[-1]) for s in streams if s != "cross"}
        b = torch.arange(len(active), device=active.device)
        row = t["row"].to(active.device)
        if t.get("rule") == "cross":
            r_tt, r_ti = relevancy_cross(a, gs, seq["vision"].masks.valid, seq["text"].masks.valid)
            rows = {"text": r_tt[b, row], "vision": r_ti[b, row]}  # [batch, S], sequence order
        else:
            s = t["stream"]
            rows = {s: relevancy_self(a[s], gs[s], seq[s].masks.valid)[b, row]}
        target = None
        if t["target"] is not None:  # sequence position -> token_idx within the stream
            target = seq[t["stream"]].token_of.gather(1, t["target"].to(active.device)[:, None])[:, 0]
        for s, vals in rows.items():
            sl = sink.stream(s)
            mask = sl.valid & active.to(sl.valid.device)[:, None]  # [batch, token]
            sink.out.append(RelevancyOut(s, -1, "relevancy", values=vals.gather(1, sl.seq_index)[:, None, :],
                                         mask=mask[:, None, :], target=None if target is None else target[:, None]))


