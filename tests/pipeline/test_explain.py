"""pipeline/explain.py against independent computations: explicit loops and matrix products in
numpy, a per-head value/output computation, a model built with one massive activation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.capture_config import ExplainSet
from pipeline.explain import (lens_topk, massive, norm_weighted, relevancy_self, rollout_step, sinks,
                              value_norms)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def attention(rng, B, H, S, valid):
    """Random attention rows over valid keys; rows and columns of padding zero."""
    a = softmax(rng.normal(size=(B, H, S, S)) * 2)
    a = a * valid[:, None, None, :]
    a = a / a.sum(-1, keepdims=True)
    return a * valid[:, None, :, None]


def parse_explain(text):
    return ExplainSet.parse(text).methods


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
    token is the sink, in dimension 3, before and after a layer. (|h_d| / rms(h) is at most sqrt(D),
    so the paper's threshold of 20 needs a model wider than 400.)"""
    torch.manual_seed(0)
    D, S = 1024, 8
    layer = torch.nn.TransformerEncoderLayer(D, 2, 64, dropout=0.0, batch_first=True)
    emb = torch.randn(2, S, D)
    emb[0, 1, 3] = 400.0  # the massive activation
    valid = torch.ones(2, S, dtype=torch.bool)
    with torch.no_grad():
        h1 = layer(emb)
    flag, dim, value = sinks(emb, valid)
    assert flag.nonzero().tolist() == [[0, 1]] and dim[0, 1].item() == 3
    rms = emb[0, 1].pow(2).mean().sqrt().item()
    assert value[0, 1].item() == pytest.approx(400.0 / rms, rel=1e-5)
    assert massive(emb)[0, 1, 3].item() == pytest.approx(400.0 / rms, rel=1e-5)
    # a layer norm keeps the ratio (it is scale-free): still the only sink after the layer
    flag1, dim1, _ = sinks(h1, valid)
    assert flag1.nonzero().tolist() == [[0, 1]] and dim1[0, 1].item() == 3
    # padding is never a sink
    emb[1, 5, 7] = 500.0
    valid[1, 5] = False
    assert sinks(emb, valid)[0].nonzero().tolist() == [[0, 1]]


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


# -- the capture: --explain on real (tiny) models, checked against the lake's own full attention ----------
from pipeline.extraction.run import extract  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.models.decoders import assert_lens_is_lm_head  # noqa: E402
from tests.tiny import make_manifest, make_sink_vilt  # noqa: E402


def lake_df(root, sql, params=None):
    from lake.catalog import Catalog

    with Catalog(root) as cat:
        return cat.df(sql, params)


def explained_run(make, tmp: Path, run: str, n: int, explain: str, **capture) -> tuple[Path, Path, Path]:
    """Build a tiny model with ``make(folder)``, a manifest of ``n`` examples, and extract run ``run``
    with ``--explain explain`` (batch 2, nothing stored unless ``capture`` says): (model, manifest, lake)."""
    mdir = make(tmp / "model")
    manifest = make_manifest(tmp / "data", n=n)
    lake = tmp / "lake"
    opts = dict(batch_size=2, keep_attention="none", keep_hidden="none", progress=False, workers=0)
    extract(str(mdir), manifest, lake, run, explain=explain, **{**opts, **capture})
    return mdir, manifest, lake


def dense(att: pd.DataFrame, n: int, heads: int) -> np.ndarray:
    a = np.zeros((heads, n, n))
    a[att["head"].to_numpy(), att.query_idx.to_numpy(), att.key_idx.to_numpy()] = att.weight.to_numpy()
    return a


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A ViLT 512 wide whose [CLS] embedding has one massive dimension (a sink by construction), run
    with every weight stored and --explain rollout,value,sinks."""
    mdir, _, lake = explained_run(make_sink_vilt, tmp_path_factory.mktemp("explain"), "ex", 5, "sinks,value,rollout",
                                  keep_attention="all")
    return lake, mdir


def test_explain_is_recorded_and_bad_methods_are_refused(explained, tmp_path):
    import json

    lake, mdir = explained
    cap = json.loads(lake_df(lake, "SELECT capture FROM runs").capture[0])
    assert cap["explain"] == "rollout,value,sinks"
    with pytest.raises(ValueError, match="unknown method"):
        extract(str(mdir), tmp_path / "none.jsonl", tmp_path / "l", "x", explain="values")


def test_rollout_rows_equal_the_product_of_the_stored_attention(explained):
    lake, _ = explained
    tok = lake_df(lake, "SELECT example_id, token_idx, modality, role FROM tokens ORDER BY ALL")
    roll = lake_df(lake, "SELECT example_id, layer, target, token_idx, value FROM relevancy "
                         "WHERE method = 'rollout' ORDER BY ALL")
    att = lake_df(lake, "SELECT example_id, layer, head, query_idx, key_idx, weight FROM attention")
    assert len(roll) > 0
    for ex, t in tok.groupby("example_id"):
        n = len(t)
        text = t.token_idx[t.modality == "text"].to_numpy()
        patch = t.token_idx[t.role == "patch"].to_numpy()
        r = np.eye(n)
        for layer in (0, 1):
            a = dense(att[(att.example_id == ex) & (att.layer == layer)], n, 2).mean(0) + np.eye(n)
            r = (a / a.sum(-1, keepdims=True)) @ r
            got = roll[(roll.example_id == ex) & (roll.layer == layer)]
            assert len(got) == len(text) * len(patch)  # every text query over every patch
            want = r[got.target.to_numpy(), got.token_idx.to_numpy()]
            np.testing.assert_allclose(got.value.to_numpy(), want, atol=3e-3)  # stored weights are float16


def test_value_norms_against_the_model_per_head(explained):
    """||W_O^h (W_V^h x + b_V^h)|| from the model's own weights and the value layer's input."""
    lake, mdir = explained
    from pipeline.data import read_manifest
    from pipeline.extraction.inputs import prepare_batch
    from pipeline.models import load_adapter

    ad = load_adapter(str(mdir))  # the checkpoint's model, run the way extraction runs it (seeded patches)
    model = ad.model
    vn = lake_df(lake, "SELECT example_id, layer, head, token_idx, norm FROM value_norms")
    tok = lake_df(lake, "SELECT example_id, token_idx, seq_pos FROM tokens")
    assert set(vn.layer) == {0, 1} and set(vn["head"]) == {0, 1}
    # every token of every example has a norm per head and layer
    assert len(vn) == len(tok) * 2 * 2
    # through the model: the value layer's input (the block's normalised input), whose rows are in
    # the token table's seq_pos order, times the weights, one head at a time
    layer = model.vilt.encoder.layer[1]
    d = 512 // 2
    W_V, b_V = layer.attention.attention.value.weight.detach().numpy(), layer.attention.attention.value.bias.detach().numpy()
    W_O = layer.attention.output.dense.weight.detach().numpy()
    seen = {}
    h = layer.attention.attention.value.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0].detach()))
    rows, _ = read_manifest(next((lake.parent / "data").glob("*.jsonl")))
    b = prepare_batch(ad, rows[:2], set())  # example 0's batch in the extraction (ViLT pads per batch)
    with torch.no_grad():
        ad.forward(b["inputs"], example_ids=[0, 1])
    h.remove()
    x = seen["x"][0].numpy()  # [seq, 512]
    t0 = tok[tok.example_id == 0].sort_values("token_idx")
    got = vn[(vn.example_id == 0) & (vn.layer == 1)]
    for hd in (0, 1):
        for ti, sp in zip(t0.token_idx, t0.seq_pos):
            v = W_V[hd * d:(hd + 1) * d] @ x[sp] + b_V[hd * d:(hd + 1) * d]
            want = np.linalg.norm(W_O[:, hd * d:(hd + 1) * d] @ v)
            g = got[(got["head"] == hd) & (got.token_idx == ti)].norm.iloc[0]
            assert g == pytest.approx(want, rel=1e-4)


def test_value_weighted_and_sink_statistics_from_the_lake(explained):
    """t2i_norm from a_ij n_h(j); sink_mass and t2i_nosink from the sinks table's tokens."""
    lake, _ = explained
    tok = lake_df(lake, "SELECT example_id, token_idx, modality, role FROM tokens ORDER BY ALL")
    att = lake_df(lake, "SELECT example_id, layer, head, query_idx, key_idx, weight FROM attention")
    vn = lake_df(lake, "SELECT example_id, layer, head, token_idx, norm FROM value_norms")
    sk = lake_df(lake, "SELECT example_id, layer, token_idx, dim FROM sinks")
    st = lake_df(lake, "SELECT example_id, layer, head, stat, value FROM head_stats")
    stat = {(r.example_id, r.layer, r.head, r.stat): r.value for r in st.itertuples()}
    # the [CLS] token (token 0, role cls) is the sink of every example at hidden-state layer 0, in dimension 5
    cls0 = sk[sk.layer == 0]
    assert sorted(cls0.example_id) == sorted(tok.example_id.unique()) and set(cls0.token_idx) == {0}
    assert set(cls0.dim) == {5}
    for ex, t in tok.groupby("example_id"):
        n = len(t)
        text = (t.modality == "text").to_numpy()
        image = (t.modality == "image").to_numpy()
        for layer in (0, 1):
            A = dense(att[(att.example_id == ex) & (att.layer == layer)], n, 2)
            sink = np.zeros(n, bool)
            sink[sk[(sk.example_id == ex) & (sk.layer == layer)].token_idx.to_numpy()] = True
            for hd in (0, 1):
                nv = vn[(vn.example_id == ex) & (vn.layer == layer) & (vn["head"] == hd)].sort_values("token_idx")
                W = A[hd] * nv.norm.to_numpy()[None, :]
                W = W / W.sum(-1, keepdims=True)
                assert stat[(ex, layer, hd, "t2i_norm")] == pytest.approx(W[text][:, image].sum(-1).mean(), abs=2e-3)
                assert stat[(ex, layer, hd, "sink_mass")] == pytest.approx(A[hd][:, sink].sum(-1).mean(), abs=2e-3)
                R = A[hd] * ~sink[None, :]
                R = R / R.sum(-1, keepdims=True)
                assert stat[(ex, layer, hd, "t2i_nosink")] == pytest.approx(R[text][:, image].sum(-1).mean(), abs=2e-3)
    assert any(v > 0.01 for (e, l, h, s), v in stat.items() if s == "sink_mass" and l == 0)


@pytest.mark.parametrize("family", ["clip", "blip", "llava"])
def test_every_family_fills_the_explain_tables(family, tmp_path):
    """CLIP (two towers), BLIP (a fused vision qkv and cross attention), LLaVA (a decoder with
    generated tokens): value norms for every key token of every stream, layer and head, rollout for
    the streams where text meets image, and value-weighted statistics equal to the lake's own
    attention times the stored norms."""
    from tests.models.test_blip import make_tiny_blip
    from tests.models.test_dual import make_tiny_dual
    from tests.models.test_llava import make_tiny_llava

    make = {"clip": lambda o: make_tiny_dual(o, "clip"), "blip": lambda o: make_tiny_blip(o, "vqa"),
            "llava": make_tiny_llava}[family]
    _, _, lake = explained_run(make, tmp_path, family, 3, "rollout,value,sinks", keep_attention="all")
    import json

    streams = json.loads(lake_df(lake, "SELECT streams FROM runs").streams[0])
    keys = {"cross": "vision"} if family == "blip" else {}
    ntok = lake_df(lake, "SELECT stream, count(*) AS n FROM tokens GROUP BY stream").set_index("stream").n
    vn = lake_df(lake, "SELECT stream, count(*) AS n FROM value_norms GROUP BY stream").set_index("stream").n
    for s, shape in streams.items():
        assert vn[s] == ntok[keys.get(s, s)] * shape["heads"] * shape["layers"], s
    roll = lake_df(lake, "SELECT DISTINCT stream FROM relevancy WHERE method = 'rollout'").stream.tolist()
    assert roll == (["lm"] if family == "llava" else [])  # the one stream whose queries are text and keys patches
    # t2i_norm / i2i_norm of every stream with a square attention, from the lake alone
    att = lake_df(lake, "SELECT stream, example_id, layer, head, query_idx, key_idx, weight FROM attention")
    norms = lake_df(lake, "SELECT stream, example_id, layer, head, token_idx, norm FROM value_norms")
    tok = lake_df(lake, "SELECT stream, example_id, token_idx, modality FROM tokens")
    st = lake_df(lake, "SELECT stream, example_id, layer, head, stat, value FROM head_stats "
                       "WHERE stat IN ('t2i_norm', 'i2i_norm')")
    checked = 0
    for r in st.dropna().itertuples():
        if r.stream == "cross":
            continue
        t = tok[(tok.stream == r.stream) & (tok.example_id == r.example_id)].sort_values("token_idx")
        idx = t.token_idx.to_numpy()
        pos = {v: i for i, v in enumerate(idx)}
        a = att[(att.stream == r.stream) & (att.example_id == r.example_id) & (att.layer == r.layer)
                & (att["head"] == r.head)]
        A = np.zeros((len(idx), len(idx)))
        A[[pos[q] for q in a.query_idx], [pos[k] for k in a.key_idx]] = a.weight
        nv = norms[(norms.stream == r.stream) & (norms.example_id == r.example_id) & (norms.layer == r.layer)
                   & (norms["head"] == r.head)].set_index("token_idx").norm.reindex(idx).to_numpy()
        W = A * nv[None, :]
        W = W / W.sum(-1, keepdims=True).clip(min=1e-30)
        q = (t.modality == ("text" if r.stat == "t2i_norm" else "image")).to_numpy()
        k = (t.modality == "image").to_numpy()
        assert r.value == pytest.approx(W[q][:, k].sum(-1).mean(), abs=3e-3), (r.stream, r.stat)
        checked += 1
    assert checked > 0


def test_lens_on_llava_is_the_models_own_next_token_at_the_last_layer(tmp_path):
    """The logit lens of a decoder: at the last layer it is the model's own output, so for greedy
    generation the most likely item at each position is the token generated next; at every layer the
    stored probabilities equal lm_head(norm(h)) of the stored hidden vectors (float16-rounded)."""
    from tests.models.test_llava import make_tiny_llava

    mdir, _, lake = explained_run(make_tiny_llava, tmp_path, "lens", 3, "lens", keep_hidden="all")
    lens = lake_df(lake, "SELECT example_id, layer, token_idx, rank, vocab_id, piece, prob FROM lens")
    tok = lake_df(lake, "SELECT example_id, token_idx, role, token, seq_pos FROM tokens WHERE stream = 'lm'")
    assert set(lens.layer) == {0, 1, 2} and set(lens["rank"]) == set(range(5))
    assert len(lens) == len(tok) * 3 * 5  # every lm token, every hidden-state layer, top 5
    top = lens[(lens["rank"] == 0) & (lens.layer == 2)].set_index(["example_id", "token_idx"])
    checked = 0
    for ex, t in tok.groupby("example_id"):
        t = t.sort_values("seq_pos")
        gen = t[t.role == "generated"]
        for _, g in gen.iterrows():
            prev = t[t.seq_pos == g.seq_pos - 1].token_idx.iloc[0]
            assert top.loc[(ex, prev), "piece"] == g.token  # greedy: the argmax is what came next
            checked += 1
    assert checked > 0
    # every layer: against lm_head(norm(h)) of the stored vectors
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    hs = lake_df(lake, "SELECT example_id, layer, token_idx, vec FROM hidden_states WHERE stream = 'lm'")
    assert_lens_is_lm_head(model, lens, hs)


def test_lens_needs_a_decoder(tmp_path):
    mdir = make_sink_vilt(tmp_path / "m")
    with pytest.raises(ValueError, match="needs a decoder LVLM"):
        extract(str(mdir), make_manifest(tmp_path / "d", n=1), tmp_path / "l", "x", explain="lens", progress=False)


def _chefer_numpy(attns, grads, b, row):
    """The rule by hand for example ``b``: R = I; R += mean_h[(G * A)^+] R per layer; row ``row``."""
    S = attns[0].shape[-1]
    R = np.eye(S)
    for a, g in zip(attns, grads):
        A, G = a[b].detach().numpy().astype(np.float64), g[b].numpy().astype(np.float64)
        cam = np.maximum(A * G, 0).mean(0)
        R = R + cam @ R
    return R[row]


def test_relevancy_of_vilt_and_clip_against_autograd(tmp_path):
    """--explain relevancy: each token's relevancy to the prediction (ViLT: the predicted answer's logit,
    read at [CLS]; CLIP: the image-text similarity, read at the pooled token of each tower), against
    the rule applied by hand to the model's own attentions and their autograd gradients."""
    from pipeline.data import read_manifest
    from pipeline.extraction.inputs import prepare_batch
    from pipeline.models import load_adapter
    from tests.models.test_dual import make_tiny_dual
    from tests.tiny import make_tiny_vilt

    manifest = make_manifest(tmp_path / "data", n=2)
    rows, _ = read_manifest(manifest)
    for family, mdir in (("vilt", make_tiny_vilt(tmp_path / "vilt")), ("clip", make_tiny_dual(tmp_path / "clip", "clip"))):
        lake = tmp_path / f"lake-{family}"
        extract(str(mdir), manifest, lake, family, batch_size=2, keep_attention="none", keep_hidden="none",
                explain="relevancy", progress=False, workers=0)
        rel = lake_df(lake, "SELECT example_id, stream, token_idx, value, target, layer, method FROM relevancy")
        tok = lake_df(lake, "SELECT example_id, stream, token_idx, seq_pos, role FROM tokens")
        assert rel.target.isna().all() and rel.layer.isna().all() and set(rel.method) == {"relevancy"}
        assert len(rel) == len(tok)  # every token of every stream the output reads
        ad = load_adapter(str(mdir))
        b = prepare_batch(ad, rows, set())
        out = ad.forward(b["inputs"], example_ids=[0, 1], grad=True)
        if family == "vilt":
            score = out.logits.max(-1).values
            towers = {"self": (out.attentions, lambda e: 0)}
        else:
            score = torch.diagonal(out.logits_per_image)
            txt = out.text_model_output  # the pooled token: the position whose final state the model pooled
            proj = torch.nn.functional.normalize(ad.model.text_projection(txt.last_hidden_state), dim=-1)
            pos = (proj * torch.nn.functional.normalize(out.text_embeds, dim=-1)[:, None, :]).sum(-1).argmax(-1)
            towers = {"text": (txt.attentions, lambda e: int(pos[e])),
                      "vision": (out.vision_model_output.attentions, lambda e: 0)}
        for stream, (attns, pooled) in towers.items():
            grads = torch.autograd.grad(score.sum(), attns, retain_graph=True)
            for e in (0, 1):
                want = _chefer_numpy(attns, grads, e, pooled(e))
                t = tok[(tok.example_id == e) & (tok.stream == stream)]
                got = rel[(rel.example_id == e) & (rel.stream == stream)].set_index("token_idx").value
                np.testing.assert_allclose(got.loc[t.token_idx].to_numpy(), want[t.seq_pos.to_numpy()],
                                           rtol=1e-4, atol=1e-6, err_msg=f"{family} {stream} example {e}")
    with pytest.raises(ValueError, match="BLIP explains the image-text matching head"):
        from tests.models.test_blip import make_tiny_blip

        extract(str(make_tiny_blip(tmp_path / "blip", "vqa")), manifest, tmp_path / "l", "x", explain="relevancy",
                progress=False)


def test_relevancy_of_llava_generated_tokens_against_autograd(tmp_path):
    """A decoder: every generated token is a target, scored by its logit at the position before it
    and read there; checked against the rule by hand on the model's own teacher-forced attentions."""
    from pipeline.data import read_manifest
    from pipeline.extraction.inputs import prepare_batch
    from pipeline.models import load_adapter
    from tests.models.test_llava import make_tiny_llava

    mdir, manifest, lake = explained_run(make_tiny_llava, tmp_path, "llava", 2, "relevancy")
    rel = lake_df(lake, "SELECT example_id, stream, target, token_idx, value FROM relevancy")
    tok = lake_df(lake, "SELECT example_id, token_idx, seq_pos, role, token FROM tokens WHERE stream = 'lm'")
    assert set(rel.stream) == {"lm"} and rel.target.notna().all()
    gen = tok[tok.role == "generated"]
    assert sorted(map(tuple, rel[["example_id", "target"]].drop_duplicates().to_numpy().tolist())) == \
        sorted(map(tuple, gen[["example_id", "token_idx"]].to_numpy().tolist()))  # one target per generated token
    ad = load_adapter(str(mdir))
    rows, _ = read_manifest(manifest)
    inputs = ad.prepare(prepare_batch(ad, rows, set())["inputs"])
    out = ad.model(**ad._model_inputs(inputs), use_cache=False, output_attentions=True, return_dict=True)
    attns, logits, ids = out.attentions, out.logits, inputs["input_ids"]
    checked = 0
    for r in gen.itertuples():
        t = tok[tok.example_id == r.example_id]
        pos = int(r.seq_pos)
        score = logits[r.example_id, pos - 1, ids[r.example_id, pos]]
        grads = torch.autograd.grad(score, attns, retain_graph=True)
        want = _chefer_numpy(attns, grads, r.example_id, pos - 1)
        got = rel[(rel.example_id == r.example_id) & (rel.target == r.token_idx)].set_index("token_idx").value
        np.testing.assert_allclose(got.loc[t.token_idx].to_numpy(), want[t.seq_pos.to_numpy()], rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == len(gen) > 0


# -- the app: the Attention page's methods, against the lake ----------------------------------------------
@pytest.fixture(scope="module")
def explained_app_lake(tmp_path_factory):
    mdir, manifest, lake = explained_run(make_sink_vilt, tmp_path_factory.mktemp("explain-app"), "ex", 3,
                                         "relevancy,rollout,value", keep_attention="all", batch_size=3)
    extract(str(mdir), manifest, lake, "plain", batch_size=3, keep_attention="all", keep_hidden="none",
            progress=False, workers=0)
    return lake


def test_attention_page_methods_show_the_lake(explained_app_lake, monkeypatch):
    from tests.app.test_app import chart_data, open_app

    lake = explained_app_lake
    tok = lake_df(lake, "SELECT token_idx, text_pos, role, modality FROM tokens WHERE run = 'ex' AND example_id = 1")
    patches = tok[tok.role == "patch"].token_idx.to_numpy()
    first_word = tok[tok.role == "word"].sort_values("text_pos").iloc[0]
    q = int(first_word.token_idx)
    att = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = 'ex' AND example_id = 1 AND layer = 1")
    vn = lake_df(lake, "SELECT head, token_idx, norm FROM value_norms WHERE example_id = 1 AND layer = 1")
    n = len(tok)

    def shown(at, col="token_idx"):
        d = chart_data(at, "text-image", "weight")
        return d.set_index(col).weight.reindex(patches).to_numpy()

    # value-weighted, head 1: a * n renormalised over the row, for the first word, over the patches
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="ex", ex=1, layer=1, head=1, method="value",
                  tokens=int(first_word.text_pos))
    A = dense(att.assign(weight=att.weight), n, 2)[1]
    nv = vn[vn["head"] == 1].set_index("token_idx").norm.reindex(range(n)).to_numpy()
    w = A[q] * nv
    np.testing.assert_allclose(shown(at), (w / w.sum())[patches], atol=1e-4)
    # rollout after layer 1: the stored rows
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="ex", ex=1, layer=1, method="rollout",
                  tokens=int(first_word.text_pos))
    ro = lake_df(lake, "SELECT token_idx, value FROM relevancy WHERE method = 'rollout' AND example_id = 1 "
                       "AND layer = 1 AND target = ?", [q]).set_index("token_idx").value
    np.testing.assert_allclose(shown(at), ro.reindex(patches).to_numpy(), atol=1e-6)
    # relevancy of the prediction, over the patches and the text
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="ex", ex=1, method="relevancy")
    rel = lake_df(lake, "SELECT token_idx, value FROM relevancy WHERE method = 'relevancy' AND example_id = 1"
                  ).set_index("token_idx").value
    np.testing.assert_allclose(shown(at), rel.reindex(patches).to_numpy(), atol=1e-6)
    assert "Prediction → image" in [s.value for s in at.subheader]
    assert any("**Method: relevancy**" in str(c.value) for c in at.caption)
    # a run without --explain has plain attention whatever the URL asks
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="plain", ex=1, layer=1, head=1,
                  method="value", tokens=int(first_word.text_pos))
    assert not any("**Method:" in str(c.value) for c in at.caption)
    np.testing.assert_allclose(shown(at), A[q][patches], atol=1e-6)
    # the Compare page takes the new statistics (open_app fails on any exception): two slices of run "ex"
    at = open_app(lake, monkeypatch, page="app_pages/compare.py", run="ex", cmp_stat="t2i_norm", a_correct="true",
                  b_correct="false")
    assert at.session_state["cmp_stat"] == "t2i_norm"


def test_hidden_states_page_shows_the_lens(tmp_path, monkeypatch):
    from tests.app.test_app import open_app
    from tests.models.test_llava import make_tiny_llava

    mdir, manifest, lake = explained_run(make_tiny_llava, tmp_path, "lens", 2, "lens", keep_hidden="all")
    extract(str(mdir), manifest, lake, "nolens", batch_size=2, keep_attention="none", keep_hidden="all",
            progress=False, workers=0)  # before the app opens the lake (it keeps its catalog)
    tok = lake_df(lake, "SELECT token_idx FROM tokens WHERE stream = 'lm' AND example_id = 0 AND role = 'patch' "
                        "ORDER BY token_idx LIMIT 1").token_idx[0]
    at = open_app(lake, monkeypatch, page="app_pages/hidden_states.py", run="lens", ex=0, stream="lm", tok=int(tok))
    want = lake_df(lake, "SELECT layer, rank, piece, prob FROM lens WHERE example_id = 0 AND token_idx = ?", [int(tok)])
    grid = next(d.value for d in at.dataframe if "#1" in d.value.columns)
    for r in want[want["rank"] == 0].itertuples():
        assert grid.loc[r.layer, "#1"] == f"{r.piece} ({r.prob:.2f})"
    assert len(grid) == 3 and list(grid.columns) == ["#1", "#2", "#3", "#4", "#5"]
    assert not [c for c in at.caption if "none for run" in str(c.value)]
    # the same decoder extracted without --explain lens: the page says so instead of showing nothing
    at = open_app(lake, monkeypatch, page="app_pages/hidden_states.py", run="nolens", ex=0, stream="lm", tok=int(tok))
    assert at.session_state["run"] == "nolens" and not [d for d in at.dataframe if "#1" in d.value.columns]
    note = [str(c.value) for c in at.caption if "Logit lens" in str(c.value)]
    assert note and "none for run **nolens**" in note[0] and "extracted without `--explain lens`" in note[0], note


def test_head_summary_leaves_sink_tokens_out(explained, monkeypatch):
    """On a --explain sinks run the Head summary offers the statistic without the sink tokens."""
    from tests.app.test_app import chart_data, open_app

    lake, _ = explained
    st = lake_df(lake, "SELECT layer, head, value FROM head_stats WHERE example_id = 0 AND stream = 'self' "
                       "AND stat = 't2i_nosink'")
    at = open_app(lake, monkeypatch, page="app_pages/head_summary.py", run="ex", ex=0, stat="t2i", nosink="true", scope="example")
    toggle = next(t for t in at.toggle if t.label == "Leave sink tokens out")
    assert toggle.value is True
    d = chart_data(at, "head-summary", "layer")
    d = d[d.col != "mean"].assign(head=lambda x: x.col.astype(int)).sort_values(["layer", "head"])
    np.testing.assert_allclose(d.value.to_numpy(), st.sort_values(["layer", "head"]).value.to_numpy(), atol=1e-6)
    assert "t2i_nosink" in " ".join(str(c.value) for c in at.caption)
    raw = lake_df(lake, "SELECT layer, head, value FROM head_stats WHERE example_id = 0 AND stream = 'self' "
                        "AND stat = 't2i'")
    assert not np.allclose(st.sort_values(["layer", "head"]).value, raw.sort_values(["layer", "head"]).value)


def test_relevancy_of_blip_matching_against_the_bimodal_rule(tmp_path):
    """BLIP's image-text matching: the cross-attention rule (Chefer et al. 2021, eq. 10-11) applied by
    hand to the model's own vision, text and cross attentions and their autograd gradients."""
    from pipeline.data import read_manifest
    from pipeline.extraction.inputs import prepare_batch
    from pipeline.models import load_adapter
    from tests.models.test_blip import make_tiny_blip

    mdir, manifest, lake = explained_run(lambda o: make_tiny_blip(o, "retrieval"), tmp_path, "blip", 2, "relevancy")
    rel = lake_df(lake, "SELECT example_id, stream, token_idx, value FROM relevancy WHERE method = 'relevancy'")
    tok = lake_df(lake, "SELECT example_id, stream, token_idx, seq_pos FROM tokens")
    assert set(rel.stream) == {"text", "vision"}
    ad = load_adapter(str(mdir))
    rows, _ = read_manifest(manifest)
    inputs = prepare_batch(ad, rows, set())["inputs"]
    m = ad.model
    got: dict[str, list] = {"vision": [], "text": [], "cross": []}
    hooks = [l.self_attn.register_forward_hook(lambda mod, a, o: got["vision"].append(o[1]))
             for l in m.vision_model.encoder.layers]
    for layer in m.text_encoder.encoder.layer:
        hooks.append(layer.attention.self.register_forward_hook(lambda mod, a, o: got["text"].append(o[1])))
        hooks.append(layer.crossattention.self.register_forward_hook(lambda mod, a, o: got["cross"].append(o[1])))
    out = m(**{k: inputs[k] for k in ("input_ids", "pixel_values", "attention_mask")}, use_itm_head=True,
            output_attentions=True, return_dict=True)
    for h in hooks:
        h.remove()
    score = out.itm_score[:, 1].sum()
    flat = got["vision"] + got["text"] + got["cross"]
    grads = torch.autograd.grad(score, flat)
    nv, nt = len(got["vision"]), len(got["text"])
    G = {"vision": grads[:nv], "text": grads[nv:nv + nt], "cross": grads[nv + nt:]}

    def cam(a, g, e):
        return np.maximum(a[e].detach().numpy() * g[e].numpy(), 0).mean(0).astype(np.float64)

    for e in (0, 1):
        Si, St = got["vision"][0].shape[-1], got["text"][0].shape[-1]
        Rii = np.eye(Si)
        for a, g in zip(got["vision"], G["vision"]):
            Rii = Rii + cam(a, g, e) @ Rii
        tmask = inputs["attention_mask"][e].numpy().astype(bool)
        Rtt, Rti = np.diag(tmask.astype(float)), np.zeros((St, Si))
        for a, g, ca, cg in zip(got["text"], G["text"], got["cross"], G["cross"]):
            c = cam(a, g, e)
            Rtt, Rti = Rtt + c @ Rtt, Rti + c @ Rti
            hat = Rtt - np.diag(tmask.astype(float))
            sums = hat.sum(-1, keepdims=True)
            bar = np.divide(hat, sums, out=np.zeros_like(hat), where=sums != 0) + np.diag(tmask.astype(float))
            Rti = Rti + bar.T @ cam(ca, cg, e) @ Rii
        for stream, want in (("text", Rtt[0]), ("vision", Rti[0])):
            t = tok[(tok.example_id == e) & (tok.stream == stream)]
            r = rel[(rel.example_id == e) & (rel.stream == stream)].set_index("token_idx").value
            np.testing.assert_allclose(r.loc[t.token_idx].to_numpy(), want[t.seq_pos.to_numpy()], rtol=1e-4,
                                       atol=1e-6, err_msg=f"{stream} example {e}")
