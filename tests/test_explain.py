"""pipeline/explain.py against independent computations: explicit loops and matrix products in
numpy, a per-head value/output computation, a model built with one massive activation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.explain import (lens_topk, massive, norm_weighted, parse_explain, relevancy_self, rollout_step,
                              sink_dims, sink_tokens, value_norms)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def attention(rng, B, H, S, valid):
    """Random attention rows over valid keys; rows and columns of padding zero."""
    a = softmax(rng.normal(size=(B, H, S, S)) * 2)
    a = a * valid[:, None, None, :]
    a = a / a.sum(-1, keepdims=True)
    return a * valid[:, None, :, None]


def test_parse_explain():
    assert parse_explain(None) == ()
    assert parse_explain("sinks, Rollout,value") == ("rollout", "value", "sinks")
    with pytest.raises(ValueError, match="unknown method.*rolout"):
        parse_explain("rolout")


def test_rollout_is_the_explicit_matrix_product():
    rng = np.random.default_rng(0)
    B, H, S, L = 2, 3, 6, 4
    valid = np.ones((B, S), bool)
    valid[1, 4:] = False  # the second example has 4 tokens
    layers = [attention(rng, B, H, S, valid) for _ in range(L)]
    r = None
    got = []
    for a in layers:
        r = rollout_step(torch.tensor(a), torch.tensor(valid), r)
        got.append(r.numpy())
    for b in range(B):
        n = int(valid[b].sum())
        want = np.eye(n)
        for l, a in enumerate(layers):
            m = a[b, :, :n, :n].mean(0) + np.eye(n)
            m = m / m.sum(-1, keepdims=True)
            want = m @ want
            np.testing.assert_allclose(got[l][b, :n, :n], want, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got[l][b, :n, :n].sum(-1), 1.0, rtol=1e-5)
        assert np.all(got[-1][b, n:, :] == 0) and np.all(got[-1][b, :, n:] == 0)


def test_value_norms_per_head_by_hand():
    torch.manual_seed(0)
    B, S, H, d, D = 2, 5, 4, 3, 7
    v_proj = torch.nn.Linear(D, H * d)
    o_proj = torch.nn.Linear(H * d, D)
    x = torch.randn(B, S, D)
    with torch.no_grad():
        got = value_norms(v_proj(x), o_proj.weight, H)
    assert got.shape == (B, H, S)
    W_V, b_V, W_O = v_proj.weight.detach().numpy(), v_proj.bias.detach().numpy(), o_proj.weight.detach().numpy()
    for b in range(B):
        for h in range(H):
            for j in range(S):
                v = W_V[h * d:(h + 1) * d] @ x[b, j].numpy() + b_V[h * d:(h + 1) * d]
                f = W_O[:, h * d:(h + 1) * d] @ v
                assert got[b, h, j].item() == pytest.approx(np.linalg.norm(f), rel=1e-5)


def test_value_norms_with_grouped_query_heads():
    """Grouped-query attention: query heads 2g and 2g+1 share value head g."""
    torch.manual_seed(1)
    B, S, H, KV, d = 1, 3, 4, 2, 2
    values = torch.randn(B, S, KV * d)
    w_out = torch.randn(5, H * d)
    got = value_norms(values, w_out, H, KV)
    for h in range(H):
        g = h // (H // KV)
        for j in range(S):
            f = w_out[:, h * d:(h + 1) * d] @ values[0, j, g * d:(g + 1) * d]
            assert got[0, h, j].item() == pytest.approx(f.norm().item(), rel=1e-5)


def test_norm_weighted_rows():
    a = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])  # [1, 1, 2, 3]
    n = torch.tensor([[[1.0, 3.0, 2.0]]])
    got = norm_weighted(a, n)[0, 0].numpy()
    np.testing.assert_allclose(got[0], [0.5 / 2.0, 1.5 / 2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got[1], np.array([0.2, 0.9, 1.0]) / 2.1, rtol=1e-6)


def test_sinks_on_a_model_with_one_massive_activation():
    """A transformer whose second token gets a huge value in dimension 3 from its embedding: that
    dimension is the sink dimension and the token the sink. (|h_d| / rms(h) is at most sqrt(D), so
    the paper's threshold of 20 needs a model wider than 400.)"""
    torch.manual_seed(0)
    D, S = 1024, 8
    layer = torch.nn.TransformerEncoderLayer(D, 2, 64, dropout=0.0, batch_first=True)
    emb = torch.randn(2, S, D)
    emb[0, 1, 3] = 400.0  # the massive activation
    with torch.no_grad():
        h1 = layer(emb)
    valid = torch.ones(2, S, dtype=torch.bool)
    dims = sink_dims(emb, valid)
    assert dims.nonzero().flatten().tolist() == [3]
    flags = sink_tokens(emb, dims)
    assert flags.nonzero().tolist() == [[0, 1]]
    ratio = massive(emb)[0, 1, 3].item()
    rms = emb[0, 1].pow(2).mean().sqrt().item()
    assert ratio == pytest.approx(400.0 / rms, rel=1e-5)
    # a layer norm keeps the ratio (it is scale-free): the token is still the only sink after the layer
    assert sink_tokens(h1, dims).nonzero().tolist() == [[0, 1]]
    # padding never defines a sink dimension
    emb[1, 5, 7] = 500.0
    valid[1, 5] = False
    assert sink_dims(emb, valid).nonzero().flatten().tolist() == [3]


def test_lens_is_lm_head_of_the_norm():
    torch.manual_seed(0)
    D, V = 8, 30
    norm = torch.nn.LayerNorm(D)
    head = torch.nn.Linear(D, V, bias=False)
    h = torch.randn(4, D)
    with torch.no_grad():
        p, ids = lens_topk(h, norm, head, k=3)
        want = torch.softmax(head(norm(h)), -1)
    for i in range(4):
        order = np.argsort(-want[i].numpy())[:3]
        assert ids[i].tolist() == order.tolist()
        np.testing.assert_allclose(p[i].numpy(), want[i].numpy()[order], rtol=1e-6)


def test_relevancy_against_autograd_reimplementation():
    """The Chefer rule, computed here with explicit per-layer loops over a real autograd graph."""
    torch.manual_seed(0)
    B, H, S, D, L = 1, 2, 5, 8, 3
    wq = [torch.randn(D, D, requires_grad=True) for _ in range(L)]
    wk = [torch.randn(D, D, requires_grad=True) for _ in range(L)]
    x0 = torch.randn(B, S, D)
    x = x0
    attns = []
    for l in range(L):
        q = (x @ wq[l]).reshape(B, S, H, D // H).transpose(1, 2)
        k = (x @ wk[l]).reshape(B, S, H, D // H).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, -1)
        a.retain_grad()
        attns.append(a)
        v = x.reshape(B, S, H, D // H).transpose(1, 2)
        x = x + (a @ v).transpose(1, 2).reshape(B, S, D)
    score = x[0, 0].pow(2).sum()
    score.backward()
    got = relevancy_self([a.detach() for a in attns], [a.grad for a in attns], torch.ones(B, S, dtype=torch.bool))
    # independent: numpy, one layer at a time
    R = np.eye(S)
    for a in attns:
        A, G = a.detach().numpy()[0], a.grad.numpy()[0]
        cam = np.zeros((S, S))
        for h in range(H):
            cam += np.maximum(A[h] * G[h], 0)
        cam /= H
        R = R + cam @ R
    np.testing.assert_allclose(got[0].numpy(), R, rtol=1e-5, atol=1e-7)
