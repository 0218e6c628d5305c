"""LLaVA (decoder LVLM): token table, generated tokens, attention and statistics checked against the model.

A tiny random LlavaForConditionalGeneration (CLIP vision tower: 32 px images, 8 px patches -> a
4 x 4 grid, 2 layers; Llama language model: 2 layers, 2 heads) with a LlavaProcessor made of a
CLIPImageProcessor and a word-level tokenizer with an ``<image>`` special token, all built from
files; nothing is downloaded. Expected values come from the model's own ``generate`` and outputs
run without hooks, one example at a time (no batch padding), never from pipeline code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

IMG, PS, G = 32, 8, 4
IMAGE_ID = 4
SCENES = [  # (original size (w, h), question, answer)
    ((32, 32), "what color is the circle ?", "red"),
    ((96, 64), "is there a red square left of the circle ?", "yes"),  # scaled by 1/2, cropped 8 px from the left
    ((40, 80), "how many ?", None),
    ((64, 48), "what shape is the blue triangle ?", "triangle"),
]


def llava_tokenizer():
    """A word-level fast tokenizer with ``<image>`` at IMAGE_ID, padding on the left; and its vocab."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": IMAGE_ID,
             **{w: i + 5 for i, w in enumerate(WORDS)}}
    tok = word_tokenizer(vocab, ("<image>",), bos="<s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         padding_side="left")
    return tok, vocab


def make_tiny_llava(out, strategy: str = "default", seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok, vocab = llava_tokenizer()
    ip = tf.CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PS,
                             vision_feature_select_strategy=strategy, num_additional_image_tokens=1)
    vision = dec.tiny_tower("clip_vision_model", IMG, PS)
    text = dec.tiny_lm("llama", len(vocab), num_key_value_heads=2)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                         vision_feature_select_strategy=strategy, vision_feature_layer=-2,
                         image_seq_length=G * G + (strategy == "full"))
    model = dec.random_model(tf.LlavaForConditionalGeneration, cfg, seed)
    dec.sharpen_with_positions(model)
    return dec.save(model, out, proc)


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 16, 16])


load = dec.auto_loader("LlavaForConditionalGeneration")


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """The model alone: its prompt ids, greedy answer, teacher-forced attention and tower attention."""
    model, proc = s.model, s.proc
    enc, g = reference(model, proc, s.images[ex], s.texts[ex])
    ids = enc["input_ids"][0].tolist()
    gen = g.sequences[0, len(ids):].tolist()
    gen = gen[:gen.index(2) + 1] if 2 in gen else gen
    with torch.no_grad():  # the teacher-forced pass, by transformers alone; the tower on its own
        o = model(input_ids=torch.tensor([ids + gen]), pixel_values=enc["pixel_values"], output_attentions=True)
        v = model.model.vision_tower(enc["pixel_values"], output_attentions=True)
    h, w = enc["pixel_values"].shape[-2:]
    return conf.Reference(
        ids=ids, generated=gen, patches={"lm": (h // PS) * (w // PS), "vision": (h // PS) * (w // PS)},
        attentions=dec.attentions(o, v),
        prediction=proc.tokenizer.decode(g.sequences[0, len(ids):], skip_special_tokens=True).strip())


def case(strategy: str) -> conf.FamilyCase:
    return conf.FamilyCase(
        id=f"llava-{strategy}", family="llava", run="llava", make_model=lambda out: make_tiny_llava(out, strategy),
        rows=scene_rows, load=load, reference=conformance_reference, image_token=IMAGE_ID,
        statistic=("lm", 1, 1, "t2i"), page_example=1,
        skip=frozenset() if strategy == "default" else frozenset({"pages"}))  # the pages once are enough


CASES = [case("default"), case("full")]


@pytest.fixture(scope="module", params=["default", "full"])
def llava(request, tmp_path_factory):
    """(strategy, model dir, lake root, reference model, processor, images, texts); the lake is the
    conformance suite's (batches of 2 pad on the left)."""
    return (request.param, *dec.parts(conf.subject(CASES[["default", "full"].index(request.param)], tmp_path_factory)))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    """The model alone on one example: its inputs and its own greedy generation with attentions."""
    enc = proc(images=[image], text=[f"<image> {text}"], return_tensors="pt")
    return enc, dec.generate_with_attentions(model, enc, MAX_NEW_TOKENS, [IMAGE_ID])


def tokens(lake_df, lake, ex):
    return lake_df(lake, "SELECT * FROM tokens WHERE run = 'llava' AND example_id = ? ORDER BY token_idx", [ex])


def test_registered_and_streams(llava):
    _, mdir, *_ = llava
    from pipeline.models import FAMILIES

    assert "llava" in FAMILIES
    a = load_adapter(str(mdir))
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}
    assert a.model.config._attn_implementation == "eager"


def test_token_table_matches_the_models_inputs(llava, lake_df):
    strategy, mdir, lake, model, proc, images, texts = llava
    full = strategy == "full"
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, g = reference(model, proc, im, text)
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)  # lm first
        ids, P = dec.prompt(enc)
        gen = g.sequences[0, P:].tolist()
        gen = gen[:gen.index(2) + 1] if 2 in gen else gen
        assert list(lm.seq_pos) == list(range(P + len(gen)))  # no left pads from the batch, in order
        img = lm[lm.modality == "image"]
        assert len(img) == G * G + full
        if full:
            assert img.role.iloc[0] == "image_cls" and pd_isnull(img.patch_row.iloc[0])
        p = img[img.role == "patch"]
        assert list(zip(p.patch_row, p.patch_col)) == [(r, c) for r in range(G) for c in range(G)]
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert txt.role.iloc[0] == "bos" and set(txt.role.iloc[1:]) == {"word"}
        assert list(lm.text_pos.dropna().astype(int)) == list(range(len(lm) - len(img)))
        assert len(gen) >= 2  # the generated tokens' pieces and places: the conformance suite
        # the vision tower: CLS then the patches in raster order; lm image tokens share their boxes
        assert vis.role.iloc[0] == "image_cls" and len(vis) == 1 + G * G
        vp = vis[vis.role == "patch"]
        assert list(zip(vp.patch_row, vp.patch_col)) == [(r, c) for r in range(G) for c in range(G)]
        assert list(vp.seq_pos) == [1 + r * G + c for r in range(G) for c in range(G)]
        np.testing.assert_allclose(p[["x0", "y0", "x1", "y1"]].to_numpy(float),
                                   vp[["x0", "y0", "x1", "y1"]].to_numpy(float))


def pd_isnull(x):
    import pandas as pd

    return pd.isna(x)


def test_patch_boxes_in_original_pixels(llava, lake_df):
    lake = llava[2]
    # example 1 is 96 x 64: shortest side 64 -> 32 (scale 1/2), 48 x 32 cropped at x 8..40, so
    # patch (0, 0) covers original x 16..32, y 0..16
    t = tokens(lake_df, lake, 1)
    for stream in ("lm", "vision"):
        p = t[(t.stream == stream) & (t.role == "patch")]
        box = p[["x0", "y0", "x1", "y1"]].to_numpy(float)
        assert box[0] == pytest.approx([16, 0, 32, 16])
        assert box[G * G - 1] == pytest.approx([64, 48, 80, 64])


def assert_rows_as_generated(A: np.ndarray, g, layer: int, P: int) -> None:
    """An ``lm`` layer's stored attention ``A`` (``[head, n, n]``, the example's lm tokens in sequence
    order) against ``generate``'s own (``g.attentions``, with ``output_attentions``): the prompt's rows
    equal the prefill step, and the row of generated token ``s - 1`` equals step ``s`` (the last token was
    never fed back) over the keys that step saw (a sliding layer's cache holds only its window), 0 on
    every other key."""
    n = A.shape[-1]
    np.testing.assert_allclose(A[:, :P, :P], g.attentions[0][layer][0].numpy(), atol=2e-3)
    for s in range(1, min(len(g.attentions), n - P + 1)):  # step s: query = generated token s - 1
        step = g.attentions[s][layer][0, :, 0].numpy()  # [head, keys the step saw]
        row = A[:, P + s - 1]
        seen = P + s - step.shape[-1]  # the first key the step saw
        np.testing.assert_allclose(row[:, seen:P + s], step, atol=2e-3)
        assert np.abs(row[:, :seen]).max(initial=0) < 1e-6 and np.abs(row[:, P + s:]).max(initial=0) < 1e-6


def test_attention_equals_generates_own(llava, lake_df):
    """Teacher forcing reproduces generation: prompt rows = generate's prefill step, the row of
    generated token s = generate's step s + 1 (the step that fed it back in). (Rows summing to 1: the
    conformance suite.)"""
    strategy, mdir, lake, model, proc, images, texts = llava
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, g = reference(model, proc, im, text)
        P = enc["input_ids"].shape[1]
        t = tokens(lake_df, lake, ex)
        lm = t[t.stream == "lm"]
        n = len(lm)
        for stream in ("lm", "vision"):
            for layer in range(2):
                a = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = 'llava' AND "
                            "example_id = ? AND stream = ? AND layer = ?", [ex, stream, layer])
                if stream == "vision":
                    assert a.query_idx.min() >= n and a.key_idx.min() >= n
                    continue
                assert a.query_idx.max() < n and a.key_idx.max() < n
                assert_rows_as_generated(dec.square(a, n), g, layer, P)


def test_lm_hidden_state_0_is_the_projected_patch_or_the_word_embedding(llava, lake_df):
    """hidden 0 of ``lm`` is the language model's input: image token k carries the projector's
    output for patch k (``default``) or tower position k (``full``, token 0 the CLS)."""
    strategy, mdir, lake, model, proc, images, texts = llava
    ex = 3
    enc = proc(images=[images[ex]], text=[f"<image> {texts[ex]}"], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(enc["pixel_values"]).pooler_output[0]  # [n_image_tokens, dim]
        emb = model.model.language_model.embed_tokens.weight
    h = lake_df(lake, "SELECT t.role, t.modality, t.token, t.patch_row, t.patch_col, h.vec FROM hidden_states h "
                "JOIN tokens t USING (run, example_id, token_idx) WHERE h.run = 'llava' AND h.example_id = ? "
                "AND h.stream = 'lm' AND h.layer = 0 ORDER BY h.token_idx", [ex])
    img = h[h.modality == "image"]
    got = np.stack(img.vec.to_list()).astype(np.float32)
    np.testing.assert_allclose(got, feats.numpy(), atol=2e-2, rtol=2e-2)
    p = img[img.role == "patch"]
    k = (p.patch_row * G + p.patch_col).astype(int).to_numpy() + (strategy == "full")
    np.testing.assert_allclose(np.stack(p.vec.to_list()).astype(np.float32), feats.numpy()[k], atol=2e-2, rtol=2e-2)
    txt = h[h.modality == "text"]
    ids = proc.tokenizer.convert_tokens_to_ids(list(txt.token))
    np.testing.assert_allclose(np.stack(txt.vec.to_list()).astype(np.float32), emb[ids].detach().numpy(), atol=2e-2)


def test_head_stats_by_hand(llava, lake_df):
    strategy, mdir, lake, model, proc, images, texts = llava
    ex, layer, head = 1, 1, 1
    enc, g = reference(model, proc, images[ex], texts[ex])
    t = tokens(lake_df, lake, ex)
    lm = t[t.stream == "lm"]
    o = dec.rerun(model, g, len(lm), pixel_values=enc["pixel_values"])
    A = o.attentions[layer][0, head].numpy().astype(np.float64)  # [query, key], sequence = token order here
    text = (lm.modality == "text").to_numpy()
    image = (lm.modality == "image").to_numpy()
    patch = (lm.role == "patch").to_numpy()
    st = lake_df(lake, "SELECT stat, value FROM head_stats WHERE run = 'llava' AND example_id = ? AND "
                 "stream = 'lm' AND layer = ? AND head = ?", [ex, layer, head])
    got = dict(zip(st.stat, st.value))
    assert got["i2t"] == pytest.approx(A[image][:, text].sum(1).mean(), abs=2e-4)
    gen = (lm.role == "generated").to_numpy()
    # generated tokens are text queries: t2i includes them
    assert gen.sum() >= 2 and text[gen].all()
    q = A[text]
    q = q[q[:, patch].sum(1) > 0]  # causal: text before the image (the bos) sees no patch
    assert len(q) < text.sum()
    pm = q[:, patch]
    p = pm / pm.sum(1, keepdims=True)
    ent = -(p * np.log(np.clip(p, 1e-30, None))).sum(1) / math.log(patch.sum())
    assert got["img_entropy"] == pytest.approx(ent.mean(), abs=2e-4)


def _charts(at) -> set[str]:
    """The descriptions (names) of the charts a page draws."""
    return {json.loads(e.proto.spec).get("description") for e in at.get("vega_lite_chart")}


def _pills(at) -> list[str]:
    """The labels of the Attention page's query text tokens ([] when the page offers none)."""
    groups = [w for w in at.get("button_group") if "Query text tokens" in str(w.proto.label)]
    return [o.content for g in groups for o in g.proto.options]


def _raw_block(raw_df, lake, stream, ex, layer, head):
    """{(query_idx, key_idx): weight} of one head, read straight from the Parquet files."""
    a = raw_df(lake, "SELECT query_idx, key_idx, weight FROM {attention} WHERE run = 'llava' AND stream = ? AND "
               "layer = ? AND example_id = ? AND head = ?", [stream, layer, ex, head])
    assert len(a), "the block must be in the lake"
    return a.set_index(["query_idx", "key_idx"]).weight.astype(float)


def _weights(block, queries, keys) -> np.ndarray:
    """The block's weights at these (query, key) pairs, 0 where the lake has none."""
    return block.reindex(list(zip(queries, keys))).fillna(0.0).to_numpy()


@pytest.mark.parametrize("llava", ["default"], indirect=True)
def test_head_summary_of_each_stream_is_the_lakes(llava, monkeypatch, raw_df):
    """The heatmap = mean over the examples of head_stats' values per (layer, head), computed here from
    the Parquet files: text -> image and entropy in the language model, entropy in the vision tower
    (which has no text queries: its t2i is marked as having no values)."""
    from tests.app.test_app import heatmap, open_app

    strategy, mdir, lake, *_ = llava
    wants = {}
    for stream, stat in (("lm", "t2i"), ("lm", "entropy"), ("vision", "entropy")):
        at = open_app(lake, monkeypatch, page="app_pages/head_summary.py", run="llava", ex=1, stream=stream,
                      stat=stat, layer=0, head=0)
        box = at.selectbox(key="w_stream")
        assert box.value == stream and set(box.options) == {"lm", "vision"}
        want = raw_df(lake, "SELECT layer, head, avg(value) AS v, count(value) AS n FROM {head_stats} WHERE "
                      "run = 'llava' AND stream = ? AND stat = ? GROUP BY layer, head ORDER BY layer, head",
                      [stream, stat])
        d = heatmap(at)
        assert d[["layer", "head"]].to_numpy().tolist() == want[["layer", "head"]].to_numpy().tolist()
        assert len(want) == 2 * 2 and (want.n == len(SCENES)).all()
        np.testing.assert_allclose(d.value.to_numpy(float), want.v.to_numpy(float), atol=1e-6)
        wants[stream, stat] = want.v.to_numpy(float)
        stat_box = at.selectbox(key="w_stat")
        if stream == "lm":
            assert "t2i" in stat_box.options and "i2t" in stat_box.options  # one sequence holds both modalities
        else:
            assert "t2i (no values)" in stat_box.options and "img_entropy (no values)" in stat_box.options
    assert not np.allclose(wants["lm", "entropy"], wants["vision", "entropy"])


@pytest.mark.parametrize("llava", ["default"], indirect=True)
def test_attention_page_of_the_language_model_and_the_tower(llava, monkeypatch, raw_df):
    """In ``lm`` the image tokens sit in the text's sequence: all four panels, the generated tokens among
    the queries (marked ✦); a generated token's text -> image row and the text -> text matrix (causal:
    0 on later keys) are the lake's weights. The vision tower shows image -> image only."""
    from tests.app.test_app import chart_data, open_app

    strategy, mdir, lake, *_ = llava
    ex, layer, head = 1, 1, 0
    tok = raw_df(lake, "SELECT * FROM {tokens} WHERE run = 'llava' AND example_id = ? ORDER BY token_idx", [ex])
    lm = tok[tok.stream == "lm"]
    text = lm[lm.modality == "text"].sort_values("text_pos")
    gen = text[text.role == "generated"]
    assert len(gen) >= 1
    g = gen.iloc[0]
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="llava", ex=ex, stream="lm", layer=layer,
                  head=head, tokens=int(g.text_pos), patches="r1c2")
    assert at.selectbox(key="w_stream").value == "lm"
    assert _charts(at) == {"text-image", "image-image", "image-text", "text-text"}
    assert not [i.value for i in at.info if "Stream `lm` has no" in str(i.value)]
    assert _pills(at) == [f"{int(t.text_pos)} · {t.token}" + (" ✦" if t.role == "generated" else "")
                          for t in text.itertuples()]
    block = _raw_block(raw_df, lake, "lm", ex, layer, head)
    patches = lm[lm.role == "patch"]
    ti = chart_data(at, "text-image", "weight")
    assert sorted(ti.token_idx) == sorted(patches.token_idx)
    np.testing.assert_allclose(ti.weight.to_numpy(float), _weights(block, [int(g.token_idx)] * len(ti), ti.token_idx),
                               atol=1e-6)
    assert ti.weight.sum() > 0  # a generated token sees the image
    q = int(patches[(patches.patch_row == 1) & (patches.patch_col == 2)].token_idx.iloc[0])
    it = chart_data(at, "image-text", "weight")
    assert sorted(it.token_idx) == sorted(text.token_idx)
    np.testing.assert_allclose(it.weight.to_numpy(float), _weights(block, [q] * len(it), it.token_idx), atol=1e-6)
    assert (it[it.token_idx > q].weight == 0).all()  # causal: a patch sees no later word
    m = chart_data(at, "text-text", "weight")
    assert set(m.query_idx) == set(m.key_idx) == set(text.token_idx) and len(m) == len(text) ** 2
    np.testing.assert_allclose(m.weight.to_numpy(float), _weights(block, m.query_idx, m.key_idx), atol=1e-6)
    assert (m[m.key_idx > m.query_idx].weight == 0).all() and m[m.query_idx == g.token_idx].weight.sum() > 0
    assert any("generated" in str(c.value) for c in at.caption if "text → text" in str(c.value))

    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="llava", ex=ex, stream="vision",
                  layer=layer, head=head, patches="r1c2")
    assert at.selectbox(key="w_stream").value == "vision"
    assert _charts(at) == {"image-image"} and not _pills(at)
    info = " | ".join(str(i.value) for i in at.info)
    assert "Stream `vision` has no text queries or no image keys." in info
    assert "Stream `vision` has no text queries or no text keys." in info
    vp = tok[(tok.stream == "vision") & (tok.role == "patch")]
    ii = chart_data(at, "image-image", "weight")
    assert sorted(ii.token_idx) == sorted(vp.token_idx)
    vq = int(vp[(vp.patch_row == 1) & (vp.patch_col == 2)].token_idx.iloc[0])
    assert ii[ii.selected].token_idx.tolist() == [vq]
    vblock = _raw_block(raw_df, lake, "vision", ex, layer, head)
    np.testing.assert_allclose(ii.weight.to_numpy(float), _weights(vblock, [vq] * len(ii), ii.token_idx), atol=1e-6)


def test_prompt_uses_the_processors_chat_template(llava):
    from transformers import AutoProcessor

    from pipeline.models.llava import LlavaAdapter

    _, mdir, _, model, *_ = llava
    proc = AutoProcessor.from_pretrained(mdir)
    a = LlavaAdapter(model, proc)
    assert a.prompt("how many ?") == "<image> how many ?"  # no template: "<image> question"
    proc.chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                          "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                          "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    assert a.prompt("how many ?") == "USER: <image>\nhow many ? ASSISTANT:"


@pytest.mark.parametrize("llava", ["default"], indirect=True)  # the pages once are enough
def test_attention_page_marks_the_generated_tokens(llava, monkeypatch, lake_df):
    """Generated word -> image and generated word -> question word are offered on the Attention page."""
    from tests.app.test_app import open_app

    strategy, mdir, lake, *_ = llava
    gen = lake_df(lake, "SELECT text_pos, token FROM tokens WHERE run = 'llava' AND example_id = 1 "
                        "AND stream = 'lm' AND role = 'generated' ORDER BY text_pos")
    if gen.empty:
        pytest.skip("the tiny model generated nothing for this example")
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="llava", ex=1, stream="lm")
    assert not at.exception
    (pills,) = [w for w in at.get("button_group") if "Query text tokens" in str(w.proto.label)]
    labels = list(pills.proto.options) if hasattr(pills.proto, "options") else []
    text = " ".join(str(o) for o in labels) or str(pills.proto)
    marked = [f"{int(p)} · {t} ✦" for p, t in zip(gen.text_pos, gen.token)]
    assert all(m in text for m in marked), (marked, text[:500])
