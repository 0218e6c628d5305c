"""The default attention budget (``budget:K:P:C``) against the spec computed row by row in numpy,
on random attention in every key layout the selection has a plan for: image keys in a block at the
end (ViLT) or the start of the sequence, modalities interleaved, keys of one modality only (a cross
stream), with padding positions and a token order that differs from the sequence order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.capture_config import AttentionPolicy as KeepPolicy
from pipeline.extraction.keep import seq_layout, select_budget_seq
from pipeline.extraction.rows import kept_rows
from pipeline.models.base import StreamLayout
from pipeline.stats import TokenMasks


def spec(w: np.ndarray, other: np.ndarray, k: int, p: float, c: int) -> dict[int, float]:
    """Keys kept from one row: the largest in descending order until their mass reaches ``p`` (at most
    ``k``, weights > 0), plus the ``c`` largest positive weights on keys of the other modality."""
    order = np.argsort(-w, kind="stable")
    kept, mass = [], 0.0
    for j in order[:k]:
        if mass >= p - 1e-7 or w[j] <= 0:
            break
        kept.append(int(j))
        mass += w[j]
    kept += [int(j) for j in order if other[j] and w[j] > 0][:c]
    return {j: float(w[j]) for j in kept}


def layout(image_seq: np.ndarray, n_tokens: np.ndarray, perm: np.ndarray, S: int) -> StreamLayout:
    """Token order: token j of example b sits at sequence position ``perm[b][j]``; ``image_seq[b, s]``
    says whether position s holds an image token."""
    B = len(n_tokens)
    N = int(n_tokens.max())
    seq = torch.zeros(B, N, dtype=torch.long)
    valid = torch.zeros(B, N, dtype=torch.bool)
    image = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        n = int(n_tokens[b])
        seq[b, :n] = torch.as_tensor(perm[b][:n])
        valid[b, :n] = True
        image[b, :n] = torch.as_tensor(image_seq[b][perm[b][:n]])
    zero = torch.zeros_like(valid)
    return StreamLayout(seq, valid, TokenMasks(valid, valid & ~image, image, image, zero), [0] * B)


def random_attention(B, H, S, n_tokens, perm, rng) -> torch.Tensor:
    """Softmax rows over each example's real key positions (padding positions get exactly 0)."""
    logits = torch.as_tensor(rng.normal(0, 2.5, (B, H, S, S)), dtype=torch.float32)
    mask = torch.full((B, 1, 1, S), float("-inf"))
    for b in range(B):
        mask[b, 0, 0, torch.as_tensor(perm[b][:int(n_tokens[b])])] = 0
    return torch.softmax(logits + mask, -1)


CASES = {
    "image block at the end": lambda S: np.arange(S) >= S // 3,
    "image block at the start": lambda S: np.arange(S) < S // 2,
    "interleaved": lambda S: (np.arange(S) % 3) == 1,
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("policy", ["budget:8:0.9:2", "budget:3:0.5:4", "budget:1:1:1"])
def test_budget_matches_the_spec(case, policy):
    rng = np.random.default_rng(7)
    B, H, S = 3, 2, 24
    pol = KeepPolicy.parse(policy)
    n_tokens = np.array([S, S - 5, S - 2])
    image_seq = np.stack([CASES[case](S)] * B)
    # token order != sequence order: text tokens first, then image tokens, each in sequence order;
    # the last positions of a shorter example are padding
    perm = [np.concatenate([np.flatnonzero(~image_seq[b][:n]), np.flatnonzero(image_seq[b][:n])])
            for b, n in enumerate(n_tokens)]
    sl = layout(image_seq, n_tokens, perm, S)
    a = random_attention(B, H, S, n_tokens, perm, rng)
    q = seq_layout(sl, S)
    kept = select_budget_seq(a, pol, sl, q, q)
    host = type(kept)(kept.weight.numpy(), kept.keep.numpy(), None, kept.index.numpy())
    rows = kept_rows(host, list(range(B)), [0] * B, [0] * B)
    got: dict[tuple, dict[int, float]] = {}
    for b, h, qi, ki, w in zip(rows["example_id"], rows["head"], rows["query_idx"], rows["key_idx"], rows["weight"]):
        got.setdefault((b, h, qi), {})[int(ki)] = float(w)
    n_rows = 0
    for b in range(B):
        n = int(n_tokens[b])
        A = a[b].numpy()[:, perm[b][:n]][:, :, perm[b][:n]]  # [head, token, token] in token order
        img = image_seq[b][perm[b][:n]]
        for h in range(H):
            for qi in range(n):
                want = spec(A[h, qi], img != img[qi], pol.k, pol.p, pol.c)
                have = got.get((b, h, qi), {})
                assert set(have) == set(want), (case, b, h, qi)
                np.testing.assert_allclose([have[k] for k in sorted(want)], [want[k] for k in sorted(want)],
                                           atol=1e-3)
                n_rows += 1
    assert len(got) == n_rows  # no rows for padding
    # kept mass per row is the sum of the stored weights
    mass = kept.mass.numpy()
    for (b, h, qi), have in got.items():
        assert mass[b, h, qi] == pytest.approx(sum(have.values()), abs=2e-3)


def test_keys_of_one_modality():
    """A cross stream: text queries over image keys only. Every key is of the other modality for a
    text query, so its cross keys are its own largest keys, even when its mass is reached at once."""
    rng = np.random.default_rng(3)
    B, H, S = 2, 2, 10
    pol = KeepPolicy.parse("budget:8:0.5:3")
    n = np.array([S, S])
    perm = [np.arange(S)] * B
    q_sl = layout(np.zeros((B, S), bool), n, perm, S)  # text queries
    k_sl = layout(np.ones((B, S), bool), n, perm, S)  # image keys
    logits = torch.as_tensor(rng.normal(0, 1, (B, H, S, S)), dtype=torch.float32)
    logits[..., 0] += 8  # one dominant key: the mass is reached by the first key alone
    a = torch.softmax(logits, -1)
    kept = select_budget_seq(a, pol, q_sl, seq_layout(q_sl, S), seq_layout(k_sl, S))
    for b in range(B):
        for h in range(H):
            for qi in range(S):
                w = a[b, h, qi].numpy()
                want = spec(w, np.ones(S, bool), pol.k, pol.p, pol.c)
                assert len(want) == 3  # the dominant key + the 2 next largest (cross)
                have = set(kept.index[b, h, qi][kept.keep[b, h, qi]].tolist())
                assert have == set(want)
