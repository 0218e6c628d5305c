"""Which attention weights a run stores, selected on the device: the attention policies of
``pipeline.capture_config`` acted on (matched by type), and the stream's token masks scattered to the
model's sequence order.

Two representations of what is kept leave the device (see :class:`Kept`): *dense* (``all``,
``cross``, ``mass``) is the whole ``[batch, head, query, key]`` weight block with a keep mask;
*sparse* (``topk``, ``budget``) is, per query row, ``slots`` key indices in ascending key order with
their weights and a keep flag, so a bounded policy never moves or scans the full matrix on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.capture_config import AttentionPolicy, Budget, KeepAll, KeepCross, KeepNone, Mass, TopK
from pipeline.extraction.outputs import Kept
from pipeline.stats import TokenMasks


def keep_mask(attn: torch.Tensor, valid: torch.Tensor, modality_image: torch.Tensor, policy: AttentionPolicy,
              keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Which weights to store.

    Parameters
    ----------
    attn : ``[batch, head, query, key]`` attention in token order.
    valid : ``[batch, token]`` real tokens of each example.
    modality_image : ``[batch, token]`` True for image tokens.
    policy : the pruning policy.
    keys : ``(key_valid, key_image)``, ``[batch, key]`` each, the same for the keys when they are
        another stream's tokens (cross attention); default ``(valid, modality_image)``.

    Returns
    -------
    ``[batch, head, query, key]`` bool.
    """
    key_valid, key_image = (valid, modality_image) if keys is None else keys
    pair = (valid[:, :, None] & key_valid[:, None, :])[:, None]  # [batch, 1, query, key]
    match policy:
        case KeepAll():  # the keys the query can see: raw weight > 0 (a masked key's is exactly 0.0, KeepAll)
            return pair & (attn > 0)
        case KeepNone():
            return torch.zeros_like(attn, dtype=torch.bool)
        case KeepCross():
            cross = modality_image[:, :, None] != key_image[:, None, :]  # [batch, query, key]
            return pair & cross[:, None]
        case TopK(k=k):
            scores = attn.masked_fill(~pair, -1.0)  # invalid keys sort last
            idx = scores.topk(min(k, attn.shape[-1]), dim=-1).indices  # [batch, head, query, k]
            keep = torch.zeros_like(attn, dtype=torch.bool).scatter_(-1, idx, True)
            return keep & pair
        case Mass(p=p):
            scores = attn.masked_fill(~pair, -1.0)  # invalid keys sort last
            sorted_w, order = scores.sort(dim=-1, descending=True)  # [batch, head, query, key]
            before = sorted_w.clamp(min=0).cumsum(-1) - sorted_w.clamp(min=0)  # mass before each key
            keep_sorted = before < p - 1e-7
            keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
            return keep & pair
    raise ValueError(f"{policy} is selected in sequence order: use select_budget_seq")


def select(attn: torch.Tensor, valid: torch.Tensor, modality_image: torch.Tensor, policy: AttentionPolicy,
           keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> Kept:
    """Apply ``policy`` on the device to attention in token order: the weights to store and the row
    mass they keep.

    Arguments as :func:`keep_mask`. ``topk`` comes back as per-row slots, sorted by key; ``all``,
    ``cross`` and ``mass`` as a dense mask. ``budget`` is selected on the attention in sequence
    order, by :func:`select_budget_seq`.
    """
    if isinstance(policy, Budget):
        raise ValueError("budget policies are selected in sequence order: use select_budget_seq")
    key_valid, key_image = (valid, modality_image) if keys is None else keys
    a = attn.float()
    if not policy.sparse:
        keep = keep_mask(a, valid, modality_image, policy, (key_valid, key_image))
        return Kept(a.to(torch.float16), keep, (a * keep).sum(-1))
    pair = (valid[:, :, None] & key_valid[:, None, :])[:, None]  # [batch, 1, query, key]
    n_keys = a.shape[-1]
    scores = a.masked_fill(~pair, -1.0)  # invalid keys sort last
    vals, idx = scores.topk(min(policy.k, n_keys), dim=-1)  # [batch, head, query, k], descending
    keep = vals >= 0  # a valid pair
    order = torch.where(keep, idx, idx + n_keys).argsort(-1)  # kept slots first, by key
    idx, keep = idx.gather(-1, order), keep.gather(-1, order)
    w = a.gather(-1, idx)
    return Kept(w.to(torch.float16), keep, (w * keep).sum(-1), idx.to(torch.int32))


@dataclass
class SeqLayout:
    """A stream's token masks scattered to the model's sequence order.

    ``masks`` are ``[batch, seq]`` (``in_box`` ``[batch, seq, seq]``), so the statistics can run on
    the attention exactly as the model returns it; ``token_of[b, s]`` is the token slot at sequence
    position ``s`` (-1 for positions that are no token: padding).
    """

    masks: TokenMasks
    token_of: torch.Tensor  # [batch, seq] long
    plans: dict = field(default_factory=dict)  # cross-key plans of select_budget_seq, by key layout


def seq_layout(sl, S: int) -> SeqLayout:
    """Scatter the token-order masks of ``sl`` (a ``StreamLayout``) to sequence positions ``0..S-1``."""
    B = sl.valid.shape[0]
    dev = sl.valid.device
    b, j = torch.nonzero(sl.valid, as_tuple=True)
    pos = sl.seq_index[b, j]
    token_of = torch.full((B, S), -1, dtype=torch.long, device=dev)
    token_of[b, pos] = j

    def scatter(mask):
        out = torch.zeros(B, S, dtype=torch.bool, device=dev)
        out[b, pos] = mask[b, j]
        return out

    m = sl.masks
    in_box = boxed = None
    if m.boxed is not None:
        boxed = scatter(m.boxed)
    if m.in_box is not None and m.boxed is not None and m.in_box.shape[1] == m.in_box.shape[2] == sl.valid.shape[1]:
        in_box = _pairs_to_seq(m.in_box, sl.seq_index, sl.seq_index, S, S)
    n_boxed = int(m.boxed.sum(-1).max()) if m.boxed is not None and m.boxed.numel() else 0  # once per batch
    return SeqLayout(TokenMasks(scatter(m.valid), scatter(m.text), scatter(m.image), scatter(m.patch),
                                scatter(m.special), in_box, boxed, n_boxed), token_of)


def seq_in_box(sl, ksl, q_seq: SeqLayout, k_seq: SeqLayout) -> torch.Tensor | None:
    """A cross stream's ``in_box`` (queries of ``sl``, keys of ``ksl``) in sequence order."""
    if sl.masks.in_box is None:
        return None
    return _pairs_to_seq(sl.masks.in_box, sl.seq_index, ksl.seq_index, q_seq.token_of.shape[1],
                         k_seq.token_of.shape[1])


def _pairs_to_seq(pairs: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
    """``[batch, query token, key token]`` bool -> ``[batch, Sq, Sk]`` in sequence positions
    (``q_index``/``k_index``: ``[batch, token]`` sequence position of each token slot)."""
    out = torch.zeros(pairs.shape[0], Sq, Sk, dtype=torch.bool, device=pairs.device)
    bb, q, k = torch.nonzero(pairs, as_tuple=True)
    out[bb, q_index[bb, q], k_index[bb, k]] = True
    return out


def select_budget_seq(attn: torch.Tensor, policy: Budget, sl, q_seq: SeqLayout, k_seq: SeqLayout) -> Kept:
    """``budget:K:P:C`` on the attention in the model's sequence order; the result in token order.

    Only ``[.., K + C]`` slots per row are reordered, never the full matrix. Keys that are no token
    (padding) have zero weight and are never kept (a kept weight is always > 0).
    """
    a = attn.float()  # [batch, head, Sq, Sk]
    Sk = a.shape[-1]
    vals, idx = a.topk(min(policy.k, Sk), dim=-1)  # descending
    pos = vals.clamp(min=0)
    before = pos.cumsum(-1) - pos
    keep = (vals > 0) & (before < policy.p - 1e-7)
    cross = None
    if policy.c:
        plan = q_seq.plans.get(id(k_seq))
        if plan is None:
            plan = q_seq.plans[id(k_seq)] = _cross_plan(q_seq.masks, k_seq.masks, policy.c, vals.shape[-1])
        cross = _cross_top(a, policy.c, (q_seq.masks, k_seq.masks), (vals, idx), plan)
    if cross is not None:
        cvals, cidx = cross
        dup = ((cidx[..., :, None] == idx[..., None, :]) & keep[..., None, :]).any(-1)
        vals, idx, keep = torch.cat([vals, cvals], -1), torch.cat([idx, cidx], -1), torch.cat([keep, (cvals > 0) & ~dup], -1)
    B, H, _, slots = idx.shape
    # rows: sequence positions -> token order
    rows = sl.seq_index[:, None, :, None].expand(B, H, -1, slots)
    vals, idx, keep = vals.gather(2, rows), idx.gather(2, rows), keep.gather(2, rows)
    keep = keep & sl.valid[:, None, :, None]
    # keys: sequence positions -> token slots
    tok = k_seq.token_of.gather(1, idx.reshape(B, -1)).view_as(idx)
    keep = keep & (tok >= 0)
    n_tok = k_seq.token_of.shape[1] + 1  # more than any token slot
    order = torch.where(keep, tok, tok + n_tok + n_tok).argsort(-1)  # kept slots first, by key
    tok, keep, vals = tok.gather(-1, order), keep.gather(-1, order), vals.gather(-1, order)
    return Kept(vals.to(torch.float16), keep, (vals * keep).sum(-1), tok.clamp(min=0).to(torch.int32))


def _cross_plan(qm: TokenMasks, km: TokenMasks, c: int, k: int) -> tuple:
    """How :func:`_cross_top` finds a batch's cross-modal keys (decided once per batch and stream
    pair, on the host): ``("none",)``, ``("own", keys_are_image)``, ``("block", first, last)`` or
    ``("full",)``."""
    kimg, ktxt = km.image & km.valid, km.text & km.valid  # [batch, Sk]
    qimg, qtxt = bool((qm.image & qm.valid).any()), bool((qm.text & qm.valid).any())
    has_img, has_txt = bool(kimg.any()), bool(ktxt.any())
    if not ((qimg and has_txt) or (qtxt and has_img)):
        return ("none",)  # no query has a key of the other modality
    if (not has_img or not has_txt) and c <= k:
        return ("own", has_img)
    Sk = kimg.shape[1]
    cols = torch.arange(Sk, device=kimg.device)
    first = int(torch.where(kimg, cols, Sk).min())
    last = int(torch.where(kimg, cols, -1).max()) + 1
    inside_txt = bool((ktxt & (cols >= first) & (cols < last)).any())
    if not inside_txt and (last == Sk or first == 0) and min(last - first, Sk - (last - first)) >= c:
        return ("block", first, last)
    return ("full",)


def _cross_top(a: torch.Tensor, c: int, masks: tuple[TokenMasks, TokenMasks], top: tuple[torch.Tensor, torch.Tensor],
               plan: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``c`` largest weights of each row on keys of the other modality (values, key positions),
    or None when no row has such a key. Non-positive values mark slots that hold no such key.

    Two plans spare a pass over the whole matrix: ``own``, keys all of one modality (queries of that
    modality have none; for the others every key is "other", so their cross keys are their own top
    ``c``: ``vals``/``idx`` are each row's descending top keys), and ``block``, image keys in one
    block at either end of the sequence in every example (text queries look in the block, image
    queries outside it). ``masks``: the queries' and the keys' masks; ``top``: ``(vals, idx)``.
    """
    (qm, km), (vals, idx) = masks, top
    if plan[0] == "none":
        return None
    if plan[0] == "own":
        same = (qm.image if plan[1] else qm.text)[:, None, :, None]  # queries of the keys' one modality
        v = vals[..., :c]
        return torch.where(same, torch.zeros_like(v), v), idx[..., :c]
    if plan[0] == "block":
        first, last = plan[1], plan[2]
        Sk = a.shape[-1]
        iv, ii = a[..., first:last].topk(c, dim=-1)  # for text queries
        base = 0 if last == Sk else last
        tv, ti = (a[..., :first] if last == Sk else a[..., last:]).topk(c, dim=-1)  # for image queries
        q_is_img = qm.image[:, None, :, None]
        return torch.where(q_is_img, tv, iv), torch.where(q_is_img, ti + base, ii + first)
    other = (qm.image[:, :, None] != km.image[:, None, :]) & km.valid[:, None, :]  # [batch, Sq, Sk]
    return (a * other[:, None]).topk(min(c, a.shape[-1]), dim=-1)


def kept_mass(attn: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid query rows of the row mass kept: ``[batch, head]``."""
    return row_mean_mass((attn.float() * keep).sum(-1), valid)


def row_mean_mass(mass: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[batch, head, query]`` row masses -> their mean over valid query rows, ``[batch, head]``."""
    w = valid[:, None, :].float()
    n = w.sum(-1).clamp(min=1)
    return (mass * w).sum(-1) / n
