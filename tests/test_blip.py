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
import pandas as pd
import pytest
import torch

from pipeline.extract import extract
from pipeline.models import load_adapter
from tests.tiny import noise_image, write_manifest, write_vocab

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


@pytest.fixture(scope="module", params=["vqa", "retrieval"])
def blip(request, tmp_path_factory):
    from PIL import Image
    from transformers import AutoProcessor, BlipForImageTextRetrieval, BlipForQuestionAnswering

    head = request.param
    tmp = tmp_path_factory.mktemp(head)
    mdir = make_tiny_blip(tmp / "model", head)
    rows = [{"id": f"s{i}", "image": noise_image(size, seed=i), "text": t, **({"answer": a} if a else {})}
            for i, (size, t, a) in enumerate(SCENES)]
    rows[0]["boxes"] = [{"label": "circle", "box": [0, 0, 16, 16]}]
    manifest = write_manifest(tmp / "data", rows)
    lake = tmp / "lake"
    extract(str(mdir), manifest, lake, head, batch_size=2, keep_attention="all", keep_hidden="all", progress=False)
    cls = BlipForQuestionAnswering if head == "vqa" else BlipForImageTextRetrieval
    model = cls.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(mdir)
    images = [Image.open(tmp / "data" / "images" / f"s{i}.png").convert("RGB") for i in range(len(SCENES))]
    return head, mdir, lake, model, proc, images, [t for _, t, _ in SCENES]


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
    tok = proc.tokenizer
    for ex, (enc, _) in enumerate(ref_outputs(model, proc, images, texts)):
        t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [head, ex])
        assert list(t.token_idx) == list(range(len(t)))
        text, vis = t[t.stream == "text"], t[t.stream == "vision"]
        assert list(t.stream) == ["text"] * len(text) + ["vision"] * len(vis)
        ids = enc["input_ids"][0].tolist()
        assert list(text.token) == tok.convert_ids_to_tokens(ids)
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
        h = lake_df(lake, "SELECT h.vec FROM hidden_states h JOIN tokens t USING (run, example_id, token_idx) "
                    "WHERE h.run = ? AND h.example_id = ? AND h.stream = 'vision' AND h.layer = 0 "
                    "AND t.role = 'patch' ORDER BY h.token_idx", [head, ex])
        got = np.stack(h.vec.to_list()).astype(np.float32)
        np.testing.assert_allclose(got, exp.numpy(), atol=2e-2, rtol=2e-2)


def test_attention_equals_the_models_own_and_rows_sum_to_one(blip, lake_df):
    head, mdir, lake, model, proc, images, texts = blip
    for ex, (enc, att) in enumerate(ref_outputs(model, proc, images, texts)):
        toks = lake_df(lake, "SELECT token_idx, stream, seq_pos FROM tokens WHERE run = ? AND example_id = ?",
                       [head, ex])
        text, vis = toks[toks.stream == "text"], toks[toks.stream == "vision"]
        for stream, (qs, ks) in {"vision": (vis, vis), "text": (text, text), "cross": (text, vis)}.items():
            qseq, kseq = qs.set_index("token_idx").seq_pos, ks.set_index("token_idx").seq_pos
            for layer in range(2):
                a = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = ? AND "
                            "example_id = ? AND stream = ? AND layer = ?", [head, ex, stream, layer])
                assert set(a.query_idx) == set(qs.token_idx) and set(a.key_idx) == set(ks.token_idx)
                sums = a.groupby(["head", "query_idx"]).weight.sum()
                np.testing.assert_allclose(sums.to_numpy(dtype=np.float32), 1.0, atol=1e-2)
                ref = att[stream][layer][0].numpy()  # [head, seq_q, seq_k]
                if stream == "cross":
                    assert ref.shape[1:] == (len(qs), len(ks))
                exp = ref[a["head"].to_numpy(), qseq[a.query_idx].to_numpy(), kseq[a.key_idx].to_numpy()]
                np.testing.assert_allclose(a.weight.to_numpy(dtype=np.float32), exp, atol=2e-3)
                assert len(a) == ref.shape[0] * len(qs) * len(ks)


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
    head, mdir, lake, model, proc, images, texts = blip
    ex = lake_df(lake, "SELECT * FROM examples WHERE run = ? ORDER BY example_id", [head])
    for (enc, _), row, (_, _, ans) in zip(ref_outputs(model, proc, images, texts), ex.itertuples(), SCENES):
        with torch.no_grad():
            if head == "vqa":
                gen = model.generate(**enc, max_new_tokens=10)
                exp = proc.tokenizer.decode(gen[0], skip_special_tokens=True).strip()
                assert row.prediction == exp
                if ans is None:
                    assert row.correct is None or pd.isna(row.correct)
                else:
                    assert row.correct == (exp == ans)
            else:
                p = float(torch.softmax(model(**enc).itm_score, -1)[0, 1])
                assert float(row.prediction) == pytest.approx(p, abs=1e-4)
                assert json.loads(row.meta)["itm_match_probability"] == pytest.approx(p, abs=1e-5)
    assert json.loads(ex.meta.iloc[3]).get("truncated") is True
    runs = lake_df(lake, "SELECT model_family, streams FROM runs WHERE run = ?", [head])
    assert runs.model_family.iloc[0] == "blip"
    assert set(json.loads(runs.streams.iloc[0])) == {"vision", "text", "cross"}


def test_app_pages_on_the_blip_lake(blip, monkeypatch):
    from tests.test_app import open_app

    head, mdir, lake, *_ = blip
    for page in ("app_pages/examples.py", "app_pages/head_summary.py", "app_pages/attention.py",
                 "app_pages/hidden_states.py", "app_pages/sql.py", "app_pages/compare.py"):
        at = open_app(lake, monkeypatch, page=page, run=head, ex=0)
        assert not at.exception, (page, at.exception)
    for stream in ("vision", "text", "cross"):
        for page in ("app_pages/head_summary.py", "app_pages/attention.py"):
            at = open_app(lake, monkeypatch, page=page, run=head, ex=0, stream=stream)
            assert not at.exception, (page, stream, at.exception)
        at = open_app(lake, monkeypatch, page="app_pages/head_summary.py", run=head, ex=0, stream=stream, scope="example")
        box = next(w for w in at.selectbox if w.label == "Stream")
        assert set(box.options) == {"vision", "text", "cross"} and box.value == stream
