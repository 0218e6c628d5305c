"""BLIP (VQA and ITM): streams vision, text and cross, checked against the model's own outputs.

Tiny random BlipForQuestionAnswering / BlipForImageTextRetrieval (32 px images, 8 px patches ->
a 4 x 4 grid; 2 layers and 2 heads per tower) with a BertTokenizer built from a word list, saved
with their processors; nothing is downloaded. Expected values come from the model's parameters
and its own submodules run without hooks (``vision_model(..., output_attentions=True)``,
``text_encoder(..., output_attentions=True).cross_attentions``, ``generate``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import noise_image, write_vocab

IMG, PS, G = 32, 8, 4
MAX_TEXT = 12
SCENES = [  # (original size (w, h), text, answer)
    ((32, 32), "what color is the circle ?", "red"),
    ((96, 64), "is there a red square left of the circle ?", "yes"),  # x scale 1/3, y scale 1/2
    ((40, 80), "how many ?", "no"),
    ((64, 48), "the blue triangle is left of the green square and the red circle ?", None),  # truncated
]


def make_tiny_blip(out, head: str):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab_src.txt")
    tok = tf.BertTokenizer(vocab=str(vocab), do_lower_case=True)
    ip = tf.BlipImageProcessor(size={"height": IMG, "width": IMG})
    proc = tf.BlipProcessor(image_processor=ip, tokenizer=tok)
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_TEXT, encoder_hidden_size=32,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    vision = dict(image_size=IMG, patch_size=PS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    cfg = tf.BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)
    cfg.vlatlas_random_weights = True
    torch.manual_seed(0)
    model = (tf.BlipForQuestionAnswering if head == "vqa" else tf.BlipForImageTextRetrieval)(cfg).eval()
    with torch.no_grad():  # peaked, distinct attention rows (HF's init is near uniform)
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.qkv.weight.normal_(0.0, 0.4)
        for layer in model.text_encoder.encoder.layer:
            for att in (layer.attention.self, layer.crossattention.self):
                att.query.weight.normal_(0.0, 0.4)
                att.key.weight.normal_(0.0, 0.4)
        model.vision_model.embeddings.position_embedding.normal_(0.0, 0.5)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    vocab.unlink()
    return out


def scene_rows(mdir=None) -> list[dict]:
    rows = [{"id": f"s{i}", "image": noise_image(size, seed=i), "text": t, **({"answer": a} if a else {})}
            for i, (size, t, a) in enumerate(SCENES)]
    rows[0]["boxes"] = [{"label": "circle", "box": [0, 0, 16, 16]}]
    return rows


def loader(head: str):
    return dec.auto_loader("BlipForQuestionAnswering" if head == "vqa" else "BlipForImageTextRetrieval")


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """The text ids, each stream's own attention and (VQA) the model's own generated answer."""
    enc, att = ref_outputs(s.model, s.proc, s.images, s.texts)[ex]
    prediction = None
    if s.case.run == "vqa":
        with torch.no_grad():
            gen = s.model.generate(**enc, max_new_tokens=10)
        prediction = s.proc.tokenizer.decode(gen[0], skip_special_tokens=True).strip()
    return conf.Reference(ids=enc["input_ids"][0].tolist(), patches={"text": 0, "vision": G * G},
                          attentions={k: [x[0].numpy() for x in v] for k, v in att.items()}, prediction=prediction)


CASES = [conf.FamilyCase(id=f"blip-{head}", family="blip", run=head, rows=scene_rows, load=loader(head),
                         make_model=lambda out, head=head: make_tiny_blip(out, head), reference=conformance_reference,
                         text_stream="text", streams=("cross", "text", "vision"), hidden=("text", "vision"),
                         statistic=("text", 1, 1, "entropy"), page_example=0, page_column="text",
                         # ITM's prediction is a probability: test_prediction_is_the_models_own
                         skip=frozenset() if head == "vqa" else frozenset({"answer"}))
         for head in ("vqa", "retrieval")]


@pytest.fixture(scope="module", params=["vqa", "retrieval"])
def blip(request, tmp_path_factory):
    """(head, model dir, lake root, reference model, processor, images, texts); the suite's lake."""
    return (request.param, *dec.parts(conf.subject(CASES[["vqa", "retrieval"].index(request.param)], tmp_path_factory)))


@conf.memo  # shared with the conformance suite: the model runs once per example
def ref_outputs(model, proc, images, texts):
    """Per example (no batch padding): inputs, vision attentions, text self- and cross-attentions."""
    outs = []
    for im, t in zip(images, texts):
        enc = proc(images=[im], text=[t], return_tensors="pt", truncation=True, max_length=MAX_TEXT)
        with torch.no_grad():
            v = model.vision_model(pixel_values=enc["pixel_values"], output_attentions=True)
            img = v.last_hidden_state
            te = model.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    encoder_hidden_states=img,
                                    encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long),
                                    output_attentions=True)
        outs.append((enc, {"vision": v.attentions, "text": te.attentions, "cross": te.cross_attentions}))
    return outs


def test_registered_and_streams(blip):
    head, mdir, *_ = blip
    from pipeline.models import FAMILIES

    assert "blip" in FAMILIES
    a = load_adapter(str(mdir))
    assert set(a.streams()) == {"vision", "text", "cross"}
    assert a.model.config._attn_implementation == "eager"


def test_token_table_matches_the_models_inputs(blip, lake_df):
    head, mdir, lake, model, proc, images, texts = blip
    for ex, (enc, _) in enumerate(ref_outputs(model, proc, images, texts)):
        t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [head, ex])
        text, vis = t[t.stream == "text"], t[t.stream == "vision"]
        assert list(t.stream) == ["text"] * len(text) + ["vision"] * len(vis)
        ids = enc["input_ids"][0].tolist()
        assert list(text.seq_pos) == list(range(len(ids)))
        assert list(text.role) == ["cls"] + ["word"] * (len(ids) - 2) + ["sep"]
        assert len(vis) == 1 + G * G and vis.role.iloc[0] == "image_cls"
        p = vis[vis.role == "patch"]
        assert list(zip(p.patch_row, p.patch_col)) == [(r, c) for r in range(G) for c in range(G)]
        assert list(p.seq_pos) == [1 + r * G + c for r in range(G) for c in range(G)]
    # example 1 is 96 x 64 squashed to 32 x 32: patch (0, 0) is x 0..24, y 0..16
    t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = 1 AND role = 'patch' "
                "ORDER BY token_idx", [head])
    box = t[["x0", "y0", "x1", "y1"]].to_numpy()
    assert box[0] == pytest.approx([0, 0, 24, 16])
    assert box[G * G - 1] == pytest.approx([72, 48, 96, 64])


def test_hidden_state_0_of_each_patch_from_the_models_parameters(blip, lake_df):
    head, mdir, lake, model, proc, images, texts = blip
    emb = model.vision_model.embeddings
    for ex, (enc, _) in enumerate(ref_outputs(model, proc, images, texts)):
        with torch.no_grad():
            pe = emb.patch_embedding(enc["pixel_values"])[0]  # [dim, G, G]
            pos = emb.position_embedding[0]
            exp = torch.stack([pe[:, r, c] + pos[1 + r * G + c] for r in range(G) for c in range(G)])
        got = dec.stored_patch_vectors(lake_df, lake, head, ex)
        np.testing.assert_allclose(got, exp.numpy(), atol=2e-2, rtol=2e-2)


def test_cross_stats_by_hand(blip, lake_df):
    head, mdir, lake, model, proc, images, texts = blip
    for ex, layer, h in ((1, 1, 1), (0, 0, 0)):
        enc, att = ref_outputs(model, proc, images, texts)[ex]
        toks = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [head, ex])
        st = lake_df(lake, "SELECT stat, value FROM head_stats WHERE run = ? AND example_id = ? AND "
                     "stream = 'cross' AND layer = ? AND head = ?", [head, ex, layer, h])
        got = dict(zip(st.stat, st.value))
        text, vis = toks[toks.stream == "text"], toks[toks.stream == "vision"]
        A = att["cross"][layer][0, h].numpy()[np.ix_(text.seq_pos, vis.seq_pos)].astype(np.float64)
        patch = (vis.role == "patch").to_numpy()
        P = A[:, patch] / A[:, patch].sum(1, keepdims=True)
        img_ent = -(P * np.log(P)).sum(1) / math.log(patch.sum())
        ent = -(A * np.log(A)).sum(1) / math.log(len(vis))
        assert got["t2i"] == pytest.approx(1.0, abs=1e-4)
        assert got["t2t"] == pytest.approx(0.0, abs=1e-6)
        assert got["img_entropy"] == pytest.approx(img_ent.mean(), abs=2e-4)
        assert got["entropy"] == pytest.approx(ent.mean(), abs=2e-4)
        assert got["max"] == pytest.approx(A.max(1).mean(), abs=2e-4)
        assert got["sink"] == pytest.approx(A[:, 0].mean(), abs=2e-4)  # the image [CLS]
        for s in ("i2t", "i2i", "i2i_noself"):
            assert got[s] is None or math.isnan(got[s])
        if ex == 0:  # "circle" has a box [0, 0, 16, 16]: patches (0..1, 0..1) of the 32 x 32 image
            q = text.index[text.token == "circle"][0] - text.index[0]
            rc = list(zip(vis.patch_row[patch], vis.patch_col[patch]))
            inside = np.array([r < 2 and c < 2 for r, c in rc])
            assert got["grounding"] == pytest.approx(P[q, inside].sum(), abs=2e-4)
            assert got["pointing"] == float(inside[np.argmax(A[q, patch])])


def test_prediction_is_the_models_own(blip, lake_df):
    """ITM: the prediction is the model's match probability; the long text is marked truncated. (VQA's
    generated answer, the family and the streams: the conformance suite.)"""
    head, mdir, lake, model, proc, images, texts = blip
    ex = lake_df(lake, "SELECT * FROM examples WHERE run = ? ORDER BY example_id", [head])
    if head == "retrieval":
        for (enc, _), row in zip(ref_outputs(model, proc, images, texts), ex.itertuples()):
            with torch.no_grad():
                p = float(torch.softmax(model(**enc).itm_score, -1)[0, 1])
            assert float(row.prediction) == pytest.approx(p, abs=1e-4)
            assert json.loads(row.meta)["itm_match_probability"] == pytest.approx(p, abs=1e-5)
    assert json.loads(ex.meta.iloc[3]).get("truncated") is True


def _charts(at) -> set[str]:
    """The descriptions (names) of the charts a page draws."""
    return {json.loads(e.proto.spec).get("description") for e in at.get("vega_lite_chart")}


def _infos(at) -> str:
    return " | ".join(str(e.value) for e in at.info)


def _pills(at) -> list[str]:
    """The labels of the Attention page's query text tokens ([] when the page offers none)."""
    groups = [w for w in at.get("button_group") if "Query text tokens" in str(w.proto.label)]
    return [o.content for g in groups for o in g.proto.options]


def test_head_summary_of_each_stream_is_the_lakes(blip, monkeypatch, raw_df):
    """The heatmap of each stream = mean over the examples of head_stats' values per (layer, head),
    computed here from the Parquet files; the statistic selector marks as empty what the stream cannot
    have (cross: no image queries; vision: no text queries; text: no image keys to spread over)."""
    from tests.app.test_app import heatmap, open_app

    head, mdir, lake, *_ = blip
    wants = {}
    for stream, stat in (("vision", "entropy"), ("text", "entropy"), ("cross", "entropy"), ("cross", "img_entropy")):
        at = open_app(lake, monkeypatch, page="app_pages/head_summary.py", run=head, ex=0, stream=stream, stat=stat,
                      layer=0, head=0)
        box = at.selectbox(key="w_stream")
        assert box.value == stream and set(box.options) == {"vision", "text", "cross"}
        want = raw_df(lake, "SELECT layer, head, avg(value) AS v, count(value) AS n FROM {head_stats} WHERE run = ? "
                      "AND stream = ? AND stat = ? GROUP BY layer, head ORDER BY layer, head", [head, stream, stat])
        d = heatmap(at)
        assert d[["layer", "head"]].to_numpy().tolist() == want[["layer", "head"]].to_numpy().tolist()
        assert len(want) == 2 * 2 and (want.n == len(SCENES)).all()
        np.testing.assert_allclose(d.value.to_numpy(float), want.v.to_numpy(float), atol=1e-6)
        wants[stream, stat] = want.v.to_numpy(float)
        counts = raw_df(lake, "SELECT stat, count(value) AS n FROM {head_stats} WHERE run = ? AND stream = ? "
                        "GROUP BY stat", [head, stream])
        stat_box = at.selectbox(key="w_stat")
        assert sorted(stat_box.options) == sorted(s if n else f"{s} (no values)" for s, n in zip(counts.stat, counts.n))
        no_values = {"vision": ("t2i", "img_entropy"), "text": ("img_entropy", "i2i"), "cross": ("i2t", "i2i")}[stream]
        assert all(f"{s} (no values)" in stat_box.options for s in no_values), stat_box.options
        if stream == "cross":
            assert "t2i" in stat_box.options and "img_entropy" in stat_box.options
    ent = [wants[s, "entropy"] for s in ("vision", "text", "cross")]
    assert all(not np.allclose(a, b) for i, a in enumerate(ent) for b in ent[i + 1:])  # streams tell apart


def test_attention_page_of_each_stream(blip, monkeypatch, raw_df):
    """The panels follow the stream: vision shows image → image only, text shows text → text only, and
    cross (text queries over image keys) shows text → image only, with the text stream's tokens as its
    queries and the vision stream's patches as its keys. The weights shown are the lake's rows."""
    from tests.app.test_app import chart_data, open_app

    head, mdir, lake, *_ = blip
    ex, layer, h = 0, 1, 1
    tok = raw_df(lake, "SELECT * FROM {tokens} WHERE run = ? AND example_id = ? ORDER BY token_idx", [head, ex])
    text = tok[tok.stream == "text"].sort_values("text_pos")
    patches = tok[(tok.stream == "vision") & (tok.role == "patch")]

    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=head, ex=ex, stream="vision", layer=layer,
                  head=h, patches="r1c2")
    assert at.selectbox(key="w_stream").value == "vision"
    assert _charts(at) == {"image-image"} and not _pills(at)
    info = _infos(at)
    assert "Stream `vision` has no text queries or no image keys." in info
    assert "Stream `vision` has no image queries or no text keys." in info
    assert "Stream `vision` has no text queries or no text keys." in info
    ii = chart_data(at, "image-image", "weight")
    assert sorted(ii.token_idx) == sorted(patches.token_idx)
    q = int(patches[(patches.patch_row == 1) & (patches.patch_col == 2)].token_idx.iloc[0])
    assert ii[ii.selected].token_idx.tolist() == [q]
    row = dec.raw_row(raw_df, lake, dec.RowAt(head, "vision", ex, layer, h, q))
    np.testing.assert_allclose(ii.weight.to_numpy(float), row.reindex(ii.token_idx).to_numpy(), atol=1e-6)

    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=head, ex=ex, stream="text", layer=layer,
                  head=h)
    assert at.selectbox(key="w_stream").value == "text"
    assert _charts(at) == {"text-text"} and not _pills(at)
    info = _infos(at)
    assert "Stream `text` has no text queries or no image keys." in info
    assert "Stream `text` has no image-patch queries." in info
    m = chart_data(at, "text-text", "weight")
    assert set(m.query_idx) == set(m.key_idx) == set(text.token_idx) and len(m) == len(text) ** 2
    a = raw_df(lake, "SELECT query_idx, key_idx, weight FROM {attention} WHERE run = ? AND stream = 'text' AND "
               "layer = ? AND example_id = ? AND head = ?", [head, layer, ex, h])
    w = a.set_index(["query_idx", "key_idx"]).weight.astype(float)
    np.testing.assert_allclose(m.weight.to_numpy(float), w.reindex(list(zip(m.query_idx, m.key_idx))).to_numpy(),
                               atol=1e-6)

    circle = text[text.token == "circle"].iloc[0]
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=head, ex=ex, stream="cross", layer=layer,
                  head=h, tokens=int(circle.text_pos))
    assert at.selectbox(key="w_stream").value == "cross"
    assert _charts(at) == {"text-image"}
    info = _infos(at)
    assert "Stream `cross` has no image-patch queries." in info
    assert "Stream `cross` has no text queries or no text keys." in info
    assert _pills(at) == [f"{int(t.text_pos)} · {t.token}" for t in text.itertuples()]  # the text stream's tokens
    ti = chart_data(at, "text-image", "weight")
    assert sorted(ti.token_idx) == sorted(patches.token_idx)  # keys: the vision stream's patches
    row = dec.raw_row(raw_df, lake, dec.RowAt(head, "cross", ex, layer, h, int(circle.token_idx)))
    np.testing.assert_allclose(ti.weight.to_numpy(float), row.reindex(ti.token_idx).to_numpy(), atol=1e-6)
    assert any(f"text → image mass {ti.weight.sum():.4f}" in str(c.value) for c in at.caption)
