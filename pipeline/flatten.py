"""Tensors -> Arrow tables: pruning, casting, long format. No I/O.

The pruning policy decides which weights of the full attention are stored in
the ``attention`` table (statistics are always computed before pruning):

- ``all``: every weight between valid tokens;
- ``topk:K``: the ``K`` largest keys of each query row;
- ``mass:P``: the largest keys of each row, in descending order, until their
  mass reaches ``P`` (the key that crosses ``P`` is kept);
- ``cross``: only weights between tokens of different modalities;
- ``none``: nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from lake.schema import ATTENTION, HEAD_STATS, HIDDEN_STATES


@dataclass(frozen=True)
class KeepPolicy:
    kind: str  # all / topk / mass / cross / none
    k: int | None = None
    p: float | None = None

    @classmethod
    def parse(cls, text: str) -> "KeepPolicy":
        """Parse ``all``, ``topk:K``, ``mass:P``, ``cross`` or ``none``."""
        t = (text or "all").strip().lower()
        if t in ("all", "cross", "none"):
            return cls(t)
        name, _, arg = t.partition(":")
        try:
            if name == "topk":
                k = int(arg)
                if k >= 1:
                    return cls("topk", k=k)
            elif name == "mass":
                p = float(arg)
                if 0 < p <= 1:
                    return cls("mass", p=p)
        except ValueError:
            pass
        raise ValueError(
            f"--keep-attention {text!r} is not understood: use all, topk:K (K >= 1), "
            "mass:P (0 < P <= 1), cross or none"
        )

    def __str__(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind == "mass":
            return f"mass:{self.p:g}"
        return self.kind

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})


def keep_mask(attn: torch.Tensor, valid: torch.Tensor, modality_image: torch.Tensor,
              policy: KeepPolicy, key_valid: torch.Tensor | None = None,
              key_image: torch.Tensor | None = None) -> torch.Tensor:
    """Which weights to store.

    Parameters
    ----------
    attn : ``[batch, head, query, key]`` attention in token order.
    valid : ``[batch, token]`` real tokens of each example.
    modality_image : ``[batch, token]`` True for image tokens.
    policy : the pruning policy.
    key_valid, key_image : ``[batch, key]`` the same for the keys, when they are another
        stream's tokens (cross attention); default ``valid`` / ``modality_image``.

    Returns
    -------
    ``[batch, head, query, key]`` bool.
    """
    key_valid = valid if key_valid is None else key_valid
    key_image = modality_image if key_image is None else key_image
    pair = (valid[:, :, None] & key_valid[:, None, :])[:, None]  # [batch, 1, query, key]
    if policy.kind == "all":
        return pair.expand_as(attn)
    if policy.kind == "none":
        return torch.zeros_like(attn, dtype=torch.bool)
    if policy.kind == "cross":
        cross = modality_image[:, :, None] != key_image[:, None, :]  # [batch, query, key]
        return pair & cross[:, None]
    scores = attn.masked_fill(~pair, -1.0)  # invalid keys sort last
    if policy.kind == "topk":
        k = min(policy.k, attn.shape[-1])
        idx = scores.topk(k, dim=-1).indices  # [batch, head, query, k]
        keep = torch.zeros_like(attn, dtype=torch.bool).scatter_(-1, idx, True)
        return keep & pair
    if policy.kind == "mass":
        sorted_w, order = scores.sort(dim=-1, descending=True)  # [batch, head, query, key]
        before = sorted_w.clamp(min=0).cumsum(-1) - sorted_w.clamp(min=0)  # mass before each key
        keep_sorted = before < policy.p - 1e-7
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return keep & pair
    raise ValueError(f"unknown policy {policy}")


def attention_table(attn: torch.Tensor, keep: torch.Tensor, example_ids: list[int],
                    token_offset: list[int] | None = None, key_offset: list[int] | None = None) -> pa.Table:
    """Long-format rows of the ``attention`` table (one layer, one stream).

    ``token_offset[b]`` (default 0) is the ``token_idx`` of the stream's first token in
    example ``b``'s token table: slot ``j`` of the stream is token ``token_offset[b] + j``.
    ``key_offset`` (default ``token_offset``) is the same for the keys, when they are another
    stream's tokens (cross attention).
    Rows come out sorted by example, head, query, key.
    """
    b, h, q, k = torch.nonzero(keep, as_tuple=True)
    w = attn[b, h, q, k].to(torch.float16).cpu().numpy()
    bn = b.cpu().numpy()
    ex = np.asarray(example_ids, dtype=np.int64)[bn]
    off = np.zeros(len(example_ids), np.int64) if token_offset is None else np.asarray(token_offset, np.int64)
    koff = off if key_offset is None else np.asarray(key_offset, np.int64)
    return pa.table(
        {
            "example_id": pa.array(ex, pa.int64()),
            "head": pa.array(h.cpu().numpy().astype(np.int16), pa.int16()),
            "query_idx": pa.array((q.cpu().numpy() + off[bn]).astype(np.int32), pa.int32()),
            "key_idx": pa.array((k.cpu().numpy() + koff[bn]).astype(np.int32), pa.int32()),
            "weight": pa.array(w, pa.float16()),
        },
        schema=ATTENTION.schema,
    )


def kept_mass(attn: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid query rows of the row mass kept: ``[batch, head]``."""
    kept = (attn.float() * keep).sum(-1)  # [batch, head, query]
    w = valid[:, None, :].float()
    n = w.sum(-1).clamp(min=1)
    return (kept * w).sum(-1) / n


def head_stats_table(stats: dict[str, torch.Tensor], example_ids: list[int], stream: str,
                     layer: int) -> pa.Table:
    """Rows of ``head_stats`` from ``{stat: [batch, head]}``; NaN becomes null."""
    names = sorted(stats)
    vals = torch.stack([stats[s].float() for s in names], 0).cpu().numpy()  # [stat, batch, head]
    n_stat, n_b, n_h = vals.shape
    s_idx, b_idx, h_idx = np.meshgrid(np.arange(n_stat), np.arange(n_b), np.arange(n_h), indexing="ij")
    v = vals.reshape(-1)
    return pa.table(
        {
            "example_id": pa.array(np.asarray(example_ids, np.int64)[b_idx.reshape(-1)], pa.int64()),
            "stream": pa.array([stream] * v.size, pa.string()),
            "layer": pa.array(np.full(v.size, layer, np.int32), pa.int32()),
            "head": pa.array(h_idx.reshape(-1).astype(np.int16), pa.int16()),
            "stat": pa.array(np.asarray(names, dtype=object)[s_idx.reshape(-1)], pa.string()),
            "value": pa.array(v.astype(np.float32), pa.float32(), mask=np.isnan(v)),
        },
        schema=HEAD_STATS.schema,
    )


def hidden_table(hidden: torch.Tensor, valid: torch.Tensor, example_ids: list[int],
                 token_offset: list[int] | None = None) -> pa.Table:
    """Rows of ``hidden_states`` from ``[batch, token, dim]`` in the stream's token order;
    ``token_offset`` as in :func:`attention_table`."""
    b, t = torch.nonzero(valid, as_tuple=True)
    off = np.zeros(len(example_ids), np.int64) if token_offset is None else np.asarray(token_offset, np.int64)
    vec = hidden[b, t].float()  # [rows, dim]
    norm = vec.norm(dim=-1).cpu().numpy().astype(np.float32)
    flat = vec.to(torch.float16).cpu().numpy().reshape(-1)
    dim = hidden.shape[-1]
    offsets = np.arange(0, (len(norm) + 1) * dim, dim, dtype=np.int32)
    vecs = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float16()))
    return pa.table(
        {
            "example_id": pa.array(np.asarray(example_ids, np.int64)[b.cpu().numpy()], pa.int64()),
            "token_idx": pa.array((t.cpu().numpy() + off[b.cpu().numpy()]).astype(np.int32), pa.int32()),
            "norm": pa.array(norm, pa.float32()),
            "vec": vecs,
        },
        schema=HIDDEN_STATES.schema,
    )
