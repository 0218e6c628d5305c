"""Dual encoders (CLIP, SigLIP): token table, attention and statistics checked against the model.

Tiny random CLIPModel / SiglipModel (32 px images, 8 px patches -> a 4 x 4 grid; 2 layers and
2 heads per tower) with tokenizers built from a word list, saved with their processors; nothing
is downloaded. Expected values come from the model's parameters and its own outputs
(``vision_model_output.attentions`` ...) run without hooks, never from pipeline code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.models.conformance import extract
from pipeline.models import load_adapter
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_image, write_manifest

IMG, PS, G = 32, 8, 4  # image size, patch size, grid
MAX_TEXT = 12
SCENES = [  # (original size (w, h), text)
    ((32, 32), "what color is the circle ?"),
    ((96, 64), "is there a red square left of the circle ?"),  # CLIP: scaled by 1/2, cropped 8 px from the left
    ((40, 80), "how many ?"),
    ((64, 48), "the blue triangle is left of the green square and the red circle ?"),  # truncated
]


def _bpe():
    """A byte-pair vocabulary in which every word of WORDS is one token."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for c in sorted({c for w in WORDS for c in w}):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in WORDS:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return vocab, merges


def _siglip_tokenizer():
    """Like SigLIP's: no bos, ``</s>`` as eos *and* pad, no attention mask in its outputs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>", pad_token="</s>",
                                   model_input_names=["input_ids"])


def _peaked(model):
    """Larger query/key weights: peaked, distinct attention rows (HF's init is near uniform)."""
    with torch.no_grad():
        for tower in (model.text_model, model.vision_model):
            for layer in tower.encoder.layers:
                layer.self_attn.q_proj.weight.normal_(0.0, 0.4)
                layer.self_attn.k_proj.weight.normal_(0.0, 0.4)
        model.vision_model.embeddings.position_embedding.weight.normal_(0.0, 0.5)


def make_tiny_dual(out, kind: str):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    vision = dict(image_size=IMG, patch_size=PS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(0)
    if kind == "clip":
        vocab, merges = _bpe()
        tok = tf.CLIPTokenizer(vocab=vocab, merges=merges)
        ip = tf.CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
        proc = tf.CLIPProcessor(image_processor=ip, tokenizer=tok)
        text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=MAX_TEXT, bos_token_id=0, eos_token_id=1,
                    pad_token_id=1)
        cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model = tf.CLIPModel(cfg).eval()
    else:
        tok = _siglip_tokenizer()
        ip = tf.SiglipImageProcessor(size={"height": IMG, "width": IMG})
        proc = tf.SiglipProcessor(image_processor=ip, tokenizer=tok)
        text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=MAX_TEXT, pad_token_id=1, eos_token_id=1)
        cfg = tf.SiglipConfig(text_config=text, vision_config=vision)
        model = tf.SiglipModel(cfg).eval()
    cfg.vlatlas_random_weights = True
    _peaked(model)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def scene_rows(mdir=None) -> list[dict]:
    rows = [{"id": f"s{i}", "image": noise_image(size, seed=i), "text": t} for i, (size, t) in enumerate(SCENES)]
    rows[0]["boxes"] = [{"label": "circle", "box": [0, 0, 16, 16]}]
    return rows


def loader(kind: str):
    return dec.auto_loader("CLIPModel" if kind == "clip" else "SiglipModel")


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """The text ids and each tower's own attention, the example alone (no padding from the batch)."""
    enc, o = ref_outputs(s.case.run, s.model, s.proc, s.images, s.texts)[ex]
    return conf.Reference(ids=enc["input_ids"][0].tolist(), patches={"text": 0, "vision": G * G},
                          attentions={"text": [x[0].numpy() for x in o.text_model_output.attentions],
                                      "vision": [x[0].numpy() for x in o.vision_model_output.attentions]})


CASES = [conf.FamilyCase(id=kind, family=kind, run=kind, make_model=lambda out, kind=kind: make_tiny_dual(out, kind),
                         rows=scene_rows, load=loader(kind), reference=conformance_reference, text_stream="text",
                         streams=("text", "vision"), statistic=("vision", 1, 1, "entropy"), page_column="text",
                         skip=frozenset({"answer"}))  # a similarity, not an answer: test_similarity_is_the_models_own
         for kind in ("clip", "siglip")]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def dual(request, tmp_path_factory):
    """(kind, model dir, lake root, reference model, processor, images, texts); the suite's lake."""
    return (request.param, *dec.parts(conf.subject(CASES[["clip", "siglip"].index(request.param)], tmp_path_factory)))


@conf.memo  # shared with the conformance suite: the model runs once per example
def ref_outputs(kind, model, proc, images, texts):
    """The model run by transformers alone, one example at a time (no padding from the batch)."""
    outs = []
    for im, t in zip(images, texts):
        pad = "max_length" if kind == "siglip" else True
        enc = proc(images=[im], text=[t], return_tensors="pt", padding=pad, truncation=True, max_length=MAX_TEXT)
        with torch.no_grad():
            o = model(**enc, output_attentions=True, output_hidden_states=True)
        outs.append((enc, o))
    return outs


def test_registered_and_streams(dual):
    kind, mdir, lake, *_ = dual
    from pipeline.models import FAMILIES

    assert kind in FAMILIES
    a = load_adapter(str(mdir))
    assert set(a.streams()) == {"text", "vision"}
    assert a.model.config._attn_implementation == "eager"


def test_token_table_matches_the_models_inputs(dual, lake_df):
    kind, mdir, lake, model, proc, images, texts = dual
    tok = proc.tokenizer
    for ex, ((enc, _), im) in enumerate(zip(ref_outputs(kind, model, proc, images, texts), images)):
        t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [kind, ex])
        text = t[t.stream == "text"]
        vis = t[t.stream == "vision"]
        assert list(t.stream) == ["text"] * len(text) + ["vision"] * len(vis)  # text first
        ids = enc["input_ids"][0].tolist()
        assert list(text.seq_pos) == list(range(len(ids)))
        if kind == "clip":
            assert text.role.iloc[0] == "bos" and text.role.iloc[-1] == "eos"
            assert set(text.role.iloc[1:-1]) == {"word"}
        else:  # padded to max_length and attended: pads kept, after one eos
            assert len(text) == MAX_TEXT
            n = len(tok(texts[ex], truncation=True, max_length=MAX_TEXT)["input_ids"])
            assert list(text.role) == ["word"] * (n - 1) + ["eos"] + ["pad"] * (MAX_TEXT - n)
        first = 1 if kind == "clip" else 0
        assert len(vis) == first + G * G
        if first:
            assert vis.role.iloc[0] == "image_cls"
        p = vis[vis.role == "patch"]
        assert list(zip(p.patch_row, p.patch_col)) == [(r, c) for r in range(G) for c in range(G)]
        assert list(p.seq_pos) == [first + r * G + c for r in range(G) for c in range(G)]


def test_patch_boxes_in_original_pixels(dual, lake_df):
    kind, *_ = dual
    lake = dual[2]
    # example 1 is 96 x 64. CLIP: shortest side 64 -> 32 (scale 1/2), 48 x 32 cropped at x 8..40
    # of the resized image, so patch (0, 0) covers resized x 8..16 = original x 16..32, y 0..16.
    # SigLIP: squashed to 32 x 32 (x scale 1/3, y scale 1/2): patch (0, 0) is x 0..24, y 0..16.
    t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = 1 AND role = 'patch' "
                "ORDER BY token_idx", [kind])
    box = t[["x0", "y0", "x1", "y1"]].to_numpy()
    if kind == "clip":
        assert box[0] == pytest.approx([16, 0, 32, 16])
        assert box[G * G - 1] == pytest.approx([16 + 3 * 16, 48, 80, 64])
    else:
        assert box[0] == pytest.approx([0, 0, 24, 16])
        assert box[G * G - 1] == pytest.approx([72, 48, 96, 64])
    # example 2 is 40 x 80 (portrait). CLIP: 32 x 64 cropped at y 16..48; scale 0.8 -> patch (0, 0)
    # covers original x 0..10, y 20..30.
    t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = 2 AND role = 'patch' "
                "ORDER BY token_idx", [kind])
    box = t[["x0", "y0", "x1", "y1"]].to_numpy()
    assert box[0] == pytest.approx([0, 20, 10, 30] if kind == "clip" else [0, 0, 10, 20])


def test_hidden_state_0_of_each_patch_from_the_models_parameters(dual, lake_df):
    """hidden 0 of patch (r, c) = patch_embedding(pixels)[:, r, c] + position_embedding[[1 +] r*G + c]
    (then CLIP's pre_layrnorm: CLIP's own hidden_states[0] is the input of block 0)."""
    kind, mdir, lake, model, proc, images, texts = dual
    vm = model.vision_model
    first = 1 if kind == "clip" else 0
    for ex, (enc, _) in enumerate(ref_outputs(kind, model, proc, images, texts)):
        with torch.no_grad():
            pe = vm.embeddings.patch_embedding(enc["pixel_values"])[0]  # [dim, G, G]
            pos = vm.embeddings.position_embedding.weight  # [positions, dim]
            exp = torch.stack([pe[:, r, c] + pos[first + r * G + c] for r in range(G) for c in range(G)])
            if kind == "clip":
                cls = vm.embeddings.class_embedding + pos[0]
                exp = vm.pre_layrnorm(torch.cat([cls[None], exp]))[first:]
        got = dec.stored_patch_vectors(lake_df, lake, kind, ex)
        np.testing.assert_allclose(got, exp.numpy(), atol=2e-2, rtol=2e-2)


def test_every_pair_of_a_towers_tokens_is_stored(dual, lake_df):
    """Each stream's weights lie within its own tokens, and every pair a query can see is in the lake (CLIP's
    causal text mask hides the rest). (The weights = the model's own, rows summing to 1: the conformance suite.)"""
    kind, mdir, lake, model, proc, images, texts = dual
    for ex in range(len(SCENES)):
        toks = lake_df(lake, "SELECT token_idx, stream, seq_pos FROM tokens WHERE run = ? AND example_id = ?",
                       [kind, ex])
        for stream in ("text", "vision"):
            st = toks[toks.stream == stream]
            off = int(st.token_idx.min())
            for layer in range(2):
                a = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = ? AND "
                            "example_id = ? AND stream = ? AND layer = ?", [kind, ex, stream, layer])
                assert a.query_idx.min() >= off and a.key_idx.min() >= off
                assert set(a.query_idx) <= set(st.token_idx) and set(a.key_idx) <= set(st.token_idx)
                n = len(st)
                # every pair a query can see is stored, and no other: CLIP's causal text mask hides the keys
                # after each query (weight 0.0, not stored); SigLIP's text and both towers see every key
                assert len(a) == 2 * (n * (n + 1) // 2 if (kind, stream) == ("clip", "text") else n * n)  # 2 heads


def test_head_stats_by_hand(dual, lake_df):
    kind, mdir, lake, model, proc, images, texts = dual
    ex, layer, head = 1, 1, 1
    enc, o = ref_outputs(kind, model, proc, images, texts)[ex]
    toks = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [kind, ex])
    stats = lake_df(lake, "SELECT stream, stat, value FROM head_stats WHERE run = ? AND example_id = ? AND "
                    "layer = ? AND head = ?", [kind, ex, layer, head])
    got = {(r.stream, r.stat): r.value for r in stats.itertuples()}
    for stream, att in (("text", o.text_model_output.attentions), ("vision", o.vision_model_output.attentions)):
        st = toks[toks.stream == stream]
        seq = st.seq_pos.to_numpy()
        A = att[layer][0, head].numpy()[np.ix_(seq, seq)].astype(np.float64)  # [query, key] in token order
        special = st.role.isin(["cls", "sep", "bos", "eos", "image_cls"]).to_numpy()
        n = len(seq)
        ent = -(A * np.log(np.clip(A, 1e-30, None))).sum(1) / math.log(n)
        assert got[(stream, "entropy")] == pytest.approx(ent.mean(), abs=2e-4)
        assert got[(stream, "max")] == pytest.approx(A.max(1).mean(), abs=2e-4)
        assert got[(stream, "sink")] == pytest.approx(A[:, special].sum(1).mean(), abs=2e-4)
        # one modality per stream: cross-modal statistics have no query rows / no keys
        if stream == "text":
            assert got[(stream, "t2t")] == pytest.approx(1.0, abs=1e-4)
            assert got[(stream, "t2i")] == pytest.approx(0.0, abs=1e-6)
            for s in ("i2t", "i2i", "i2i_noself", "img_entropy"):
                assert math.isnan(got[(stream, s)]) or got[(stream, s)] is None
        else:
            assert got[(stream, "i2i")] == pytest.approx(1.0, abs=1e-4)
            assert got[(stream, "i2t")] == pytest.approx(0.0, abs=1e-6)
            for s in ("t2i", "t2t", "img_entropy"):
                assert math.isnan(got[(stream, s)]) or got[(stream, s)] is None
        for s in ("grounding", "pointing"):
            assert got[(stream, s)] is None or math.isnan(got[(stream, s)])


def test_similarity_is_the_models_own(dual, lake_df):
    kind, mdir, lake, model, proc, images, texts = dual
    ex = lake_df(lake, "SELECT example_id, prediction, meta FROM examples WHERE run = ? ORDER BY example_id", [kind])
    for (enc, o), row in zip(ref_outputs(kind, model, proc, images, texts), ex.itertuples()):
        s = float(o.logits_per_image[0, 0])
        meta = json.loads(row.meta)
        assert meta["similarity"] == pytest.approx(s, abs=1e-4)
        assert float(row.prediction) == pytest.approx(s, abs=1e-4)
    meta3 = json.loads(ex.meta.iloc[3])
    assert meta3.get("truncated") is True  # the long text of scene 3
    runs = lake_df(lake, "SELECT model_family, streams FROM runs WHERE run = ?", [kind])
    assert runs.model_family.iloc[0] == kind
    assert set(json.loads(runs.streams.iloc[0])) == {"text", "vision"}


def _charts(at) -> set[str]:
    """The descriptions (names) of the charts a page draws."""
    return {json.loads(e.proto.spec).get("description") for e in at.get("vega_lite_chart")}


def _infos(at) -> str:
    return " | ".join(str(e.value) for e in at.info)


def test_head_summary_of_each_tower_is_the_lakes(dual, monkeypatch, raw_df):
    """The heatmap of each stream = mean over the examples of head_stats' values, per (layer, head), computed
    here from the Parquet files; each tower's statistic selector marks the other modality's statistics
    as having no values (no text queries in the vision tower, no image queries in the text tower)."""
    from tests.app.test_app import heatmap, open_app

    kind, mdir, lake, *_ = dual
    wants = {}
    for stream in ("text", "vision"):
        at = open_app(lake, monkeypatch, page="app_pages/head_summary.py", run=kind, ex=1, stream=stream,
                      stat="entropy", layer=0, head=0)
        assert at.selectbox(key="w_stream").value == stream
        want = raw_df(lake, "SELECT layer, head, avg(value) AS v, count(value) AS n FROM {head_stats} WHERE run = ? "
                      "AND stream = ? AND stat = 'entropy' GROUP BY layer, head ORDER BY layer, head", [kind, stream])
        d = heatmap(at)
        assert d[["layer", "head"]].to_numpy().tolist() == want[["layer", "head"]].to_numpy().tolist()
        assert len(want) == 2 * 2 and (want.n == len(SCENES)).all()
        np.testing.assert_allclose(d.value.to_numpy(float), want.v.to_numpy(float), atol=1e-6)
        wants[stream] = want.v.to_numpy(float)
        counts = raw_df(lake, "SELECT stat, count(value) AS n FROM {head_stats} WHERE run = ? AND stream = ? "
                        "GROUP BY stat", [kind, stream])
        stat_box = at.selectbox(key="w_stat")
        assert sorted(stat_box.options) == sorted(s if n else f"{s} (no values)" for s, n in zip(counts.stat, counts.n))
        no_values = {"text": ("i2t", "i2i"), "vision": ("t2i", "t2t")}[stream]
        assert all(f"{s} (no values)" in stat_box.options for s in no_values), stat_box.options
    assert not np.allclose(wants["text"], wants["vision"])  # the two towers' heatmaps tell the streams apart


def test_attention_page_of_each_tower(dual, monkeypatch, raw_df):
    """Within one tower there is no text → image or image → text attention: the text tower shows only the
    text → text matrix, the vision tower only image → image; the weights shown are the lake's rows."""
    from tests.app.test_app import chart_data, open_app

    kind, mdir, lake, *_ = dual
    ex, layer, head = 1, 1, 1
    tok = raw_df(lake, "SELECT * FROM {tokens} WHERE run = ? AND example_id = ? ORDER BY token_idx", [kind, ex])

    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=kind, ex=ex, stream="text", layer=layer,
                  head=head)
    assert at.selectbox(key="w_stream").value == "text"
    assert _charts(at) == {"text-text"}
    info = _infos(at)
    assert "Stream `text` has no text queries or no image keys." in info
    assert "Stream `text` has no image-patch queries." in info
    tt_caption = next(c.value for c in at.caption if c.value.startswith("**text → text**"))
    assert "sums to 1 over its text keys" in tt_caption and "image keys" not in tt_caption.split("(")[0]
    assert not [w for w in at.get("button_group") if "Query text tokens" in str(w.proto.label)]
    m = chart_data(at, "text-text", "weight")
    text = tok[tok.stream == "text"]
    assert set(m.query_idx) == set(m.key_idx) == set(text.token_idx)
    assert len(m) == len(text) ** 2
    a = raw_df(lake, "SELECT query_idx, key_idx, weight FROM {attention} WHERE run = ? AND stream = 'text' AND "
               "layer = ? AND example_id = ? AND head = ?", [kind, layer, ex, head])
    w = a.set_index(["query_idx", "key_idx"]).weight.astype(float)
    np.testing.assert_allclose(m.weight.to_numpy(float),
                               w.reindex(list(zip(m.query_idx, m.key_idx))).fillna(0).to_numpy(), atol=1e-6)
    assert m.weight.max() > 0.1

    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=kind, ex=ex, stream="vision", layer=layer,
                  head=head, patches="r1c2")
    assert at.selectbox(key="w_stream").value == "vision"
    assert _charts(at) == {"image-image"}
    info = _infos(at)
    assert "Stream `vision` has no text queries or no image keys." in info
    assert "Stream `vision` has no image queries or no text keys." in info
    assert "Stream `vision` has no text queries or no text keys." in info
    ii = chart_data(at, "image-image", "weight")
    patches = tok[(tok.stream == "vision") & (tok.role == "patch")]
    assert sorted(ii.token_idx) == sorted(patches.token_idx)
    q = int(patches[(patches.patch_row == 1) & (patches.patch_col == 2)].token_idx.iloc[0])
    assert ii[ii.selected].token_idx.tolist() == [q]
    row = dec.raw_row(raw_df, lake, dec.RowAt(kind, "vision", ex, layer, head, q))
    np.testing.assert_allclose(ii.weight.to_numpy(float), row.reindex(ii.token_idx).to_numpy(), atol=1e-6)


def test_a_model_without_attention_weights_is_a_clear_error(dual, tmp_path):
    from transformers import AutoProcessor, CLIPModel, SiglipModel

    from pipeline.capture import NoAttentionError
    from pipeline.models.dual import DualEncoderAdapter

    kind, mdir, *_ = dual
    sdpa = (CLIPModel if kind == "clip" else SiglipModel).from_pretrained(mdir, attn_implementation="sdpa").eval()
    adapter = DualEncoderAdapter(sdpa, AutoProcessor.from_pretrained(mdir))
    manifest = write_manifest(tmp_path / "data", [{"id": "a", "image": noise_image((32, 32)), "text": "red"}])
    with pytest.raises(NoAttentionError, match="eager"):
        extract(str(mdir), manifest, tmp_path / "lake", "sdpa", adapter=adapter, progress=False)
