"""LLaVA-NeXT and LLaVA-OneVision (any-resolution decoder LVLMs): token tables with tiles, image newlines
and unpadding (and OneVision's pooling), generated answers, attention, hidden states and statistics checked
against the models themselves.

Tiny random models (language model: Llama, 2 layers, 2 heads, width 32; vision tower: 32 px crops, 8 px
patches -> 4 x 4 features a crop, 2 layers; LLaVA-NeXT a CLIP tower with a [CLS], LLaVA-OneVision a SigLIP
tower without one) with ``image_grid_pinpoints`` [[32, 32], [32, 64], [64, 32], [64, 64]], processors built
from files the tests write (word-level tokenizer with ``<image>``; the PIL image processors). OneVision's
``vision_aspect_ratio`` is ``anyres_max_1``, so its larger canvases are pooled bilinearly. Nothing is
downloaded. Expected values come from the models' own ``generate``, modules and outputs on one example at a
time (no batch padding; the lake is built with batches of 2, padded on the left), and from independent
arithmetic on the image sizes (best resolution, resize, centring pad, unpadding, tile grid).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models.test_llava import assert_rows_as_generated
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

CROP, PS, S = 32, 8, 4  # crop size, tower patch size, features a side of one crop
PINS = [[32, 32], [32, 64], [64, 32], [64, 64]]
IMAGE_ID, VIDEO_ID, EOS, PAD = 4, 5, 2, 3
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": EOS, "<pad>": PAD, "<image>": IMAGE_ID, "<video>": VIDEO_ID,
         **{w: i + 6 for i, w in enumerate(WORDS)}}
SUPPRESSED = VOCAB["the"]  # the checkpoint's own generation config suppresses it
SCENES = [  # (original size (w, h), question, answer), the best resolution (h, w) the processor picks
    ((40, 24), "what color is the circle ?", "red"),
    ((24, 56), "is there a red square left of the circle ?", "yes"),
    ((50, 50), "how many ?", None),
    ((20, 20), "what shape is the blue triangle ?", "triangle"),
]
BEST = [(32, 64), (64, 32), (64, 64), (32, 32)]
FAMILIES = ["llava_next", "llava_onevision"]
RUN = "anyres"


def tokenizer():
    """A word-level fast tokenizer with ``<image>`` and ``<video>``, padding on the left."""
    return word_tokenizer(VOCAB, ("<image>", "<video>"), bos="<s>", bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>", padding_side="left")


def image_processor(family):
    if family == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                          image_grid_pinpoints=PINS)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINS)


ONEVISION_SETTINGS = {"num_image_tokens": S * S, "vision_feature_select_strategy": "full",
                      "vision_aspect_ratio": "anyres_max_1"}


def processor(family):
    """LLaVA-NeXT: transformers' own processor. LLaVA-OneVision's cannot be built without torchvision (its
    video processor); the adapter's assembled one (checked against transformers' own below)."""
    import transformers as tf

    if family == "llava_next":
        return tf.LlavaNextProcessor(image_processor=image_processor(family), tokenizer=tokenizer(), patch_size=PS,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    from pipeline.models.llava_next import OnevisionImageTextProcessor

    return OnevisionImageTextProcessor(image_processor(family), tokenizer(), **ONEVISION_SETTINGS)


def make_tiny(out, family: str, seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    text = dec.tiny_lm("llama", len(VOCAB), num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS,
                       pad_token_id=PAD)
    tower = dec.tiny_tower(None, CROP, PS)
    if family == "llava_next":
        cfg = tf.LlavaNextConfig(vision_config=dict(tower, model_type="clip_vision_model"), text_config=text,
                                 image_token_id=IMAGE_ID, vision_feature_select_strategy="default",
                                 vision_feature_layer=-2, image_grid_pinpoints=PINS)
    else:
        cfg = tf.LlavaOnevisionConfig(vision_config=dict(tower, model_type="siglip_vision_model"), text_config=text,
                                      image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                                      vision_feature_select_strategy="full", vision_feature_layer=-1,
                                      image_grid_pinpoints=PINS, vision_aspect_ratio="anyres_max_1")
    model = dec.random_model(tf.LlavaNextForConditionalGeneration if family == "llava_next"
                             else tf.LlavaOnevisionForConditionalGeneration, cfg, seed)
    dec.sharpen_with_positions(model)
    dec.save(model, out, eos=[EOS, PAD], pad=PAD, suppress=[SUPPRESSED])
    if family == "llava_next":
        processor(family).save_pretrained(out)
    else:  # the files a released checkpoint has: tokenizer, image processor, processor settings
        tokenizer().save_pretrained(out)
        image_processor(family).save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaOnevisionProcessor",
                                                               **ONEVISION_SETTINGS}))
    return out


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 20, 12])


def loader(family: str):
    def load(mdir):
        import transformers as tf

        cls = tf.LlavaNextForConditionalGeneration if family == "llava_next" else \
            tf.LlavaOnevisionForConditionalGeneration
        return dec.load_eager(cls, mdir), processor(family)
    return load


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer (cut after eos), the teacher-forced attention, the tower crop by crop."""
    enc, g = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    ids = enc["input_ids"][0].tolist()
    new, gen = dec.answer(g, ids, (EOS, PAD))
    with torch.no_grad():
        o = s.model(input_ids=torch.tensor([ids + gen]), pixel_values=enc["pixel_values"],
                    image_sizes=enc["image_sizes"], output_attentions=True)
        v = s.model.model.vision_tower(enc["pixel_values"][0], output_attentions=True)
    want, crops, _ = expected_image_tokens(s.case.family, *s.images[ex].size)
    return conf.Reference(ids=ids, generated=gen,
                          patches={"lm": sum(w[0] == "patch" for w in want), "vision": len(crops) * S * S},
                          attentions=dec.attentions(o, v, tiled=True),
                          prediction=s.proc.tokenizer.decode(new, skip_special_tokens=True).strip())


CASES = [conf.FamilyCase(id=family, family=family, run=RUN, make_model=lambda out, family=family: make_tiny(out, family),
                         rows=scene_rows, load=loader(family), reference=conformance_reference, image_token=IMAGE_ID,
                         page_example=2, crops=("vision",))  # the tower runs crop by crop
         for family in FAMILIES]


@pytest.fixture(scope="module", params=FAMILIES)
def anyres(request, tmp_path_factory):
    """(family, model dir, lake root, reference model, processor, images, texts); the suite's lake."""
    return (request.param, *dec.parts(conf.subject(CASES[FAMILIES.index(request.param)], tmp_path_factory)))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    """The model alone on one example: its inputs and its own greedy generation with attentions (under its
    generation config: the suppressed word, both eos ids)."""
    enc = proc(images=[image], text=[f"<image> {text}"], return_tensors="pt")
    return enc, dec.generate_with_attentions(model, enc, MAX_NEW_TOKENS, [SUPPRESSED, IMAGE_ID])


def tokens(lake_df, lake, ex):
    return lake_df(lake, f"SELECT * FROM tokens WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])


# -- the expected layout, computed here from the image size alone ------------------------------------------
def expected_image_tokens(family: str, W: int, H: int):
    """[(role, tile, patch_row, patch_col, box)] of the image tokens of ``lm`` in order, and the crops'
    patch boxes ``{tile: [16 boxes]}``, by arithmetic on the processor's documented steps."""
    bh, bw = BEST[[s for s, _, _ in SCENES].index((W, H))]
    nph, npw = bh // CROP, bw // CROP
    # base image: the original stretched to 32 x 32
    crops = {0: [(c * PS * W / CROP, r * PS * H / CROP, (c + 1) * PS * W / CROP, (r + 1) * PS * H / CROP)
                 for r in range(S) for c in range(S)]}
    # tiles: the original resized keeping its aspect ratio into bh x bw, centred, cut into 32 px tiles
    scale_w, scale_h = bw / W, bh / H
    if scale_w < scale_h:
        nw, nh = bw, min(math.ceil(H * scale_w), bh)
    else:
        nh, nw = bh, min(math.ceil(W * scale_h), bw)
    px, py = (bw - nw) // 2, (bh - nh) // 2

    def orig(x, y):
        return (min(max((x - px) * W / nw, 0), W), min(max((y - py) * H / nh, 0), H))

    for t in range(nph * npw):
        tr, tc = divmod(t, npw)
        crops[t + 1] = [orig(tc * CROP + c * PS, tr * CROP + r * PS) + orig(tc * CROP + (c + 1) * PS,
                                                                            tr * CROP + (r + 1) * PS)
                        for r in range(S) for c in range(S)]
    # unpadding of the (nph S) x (npw S) feature map
    ch, cw = nph * S, npw * S
    if W / H > cw / ch:
        pad = (ch - int(round(H * cw / W, 7))) // 2
        rows, cols = range(pad, ch - pad), range(cw)
    else:
        pad = (cw - int(round(W * ch / H, 7))) // 2
        rows, cols = range(ch), range(pad, cw - pad)

    def cell(R, C):
        return 1 + (R // S) * npw + C // S, R % S, C % S, crops[1 + (R // S) * npw + C // S][(R % S) * S + C % S]

    out = [("patch", 0, r, c, crops[0][r * S + c]) for r in range(S) for c in range(S)]
    uh, uw = len(rows), len(cols)
    ratio = math.sqrt(uh * uw / (1 * S * S)) if family == "llava_onevision" else 0
    pooled = ratio > 1.1
    gh, gw = (int(uh // ratio), int(uw // ratio)) if pooled else (uh, uw)
    for i in range(gh):
        row = []
        for j in range(gw):
            if pooled:
                rr = [rows[0] + k for k in range(math.floor(i * uh / gh), math.ceil((i + 1) * uh / gh))]
                cc = [cols[0] + k for k in range(math.floor(j * uw / gw), math.ceil((j + 1) * uw / gw))]
                bs = [cell(R, C)[3] for R in rr for C in cc]
                box = (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs))
                row.append(("patch", cell(rr[len(rr) // 2], cc[len(cc) // 2])[0], i, j, box))
            else:
                row.append(("patch",) + cell(rows[i], cols[j]))
        bs = [x[4] for x in row]
        out += row + [("image_newline", row[-1][1], None, None,
                       (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs)))]
    return out, crops, pooled


# -- tests -----------------------------------------------------------------------------------------------
def test_registered_and_streams(anyres):
    family, mdir, *_ = anyres
    from pipeline.models import FAMILIES as REGISTERED

    assert family in REGISTERED
    a = load_adapter(str(mdir))
    assert a.family == family
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}
    assert a.model.config.text_config._attn_implementation == "eager"


def test_onevision_processor_is_transformers_own(anyres, monkeypatch):
    """The assembled OneVision processor gives exactly what ``LlavaOnevisionProcessor`` gives (built here
    without its video processor, which needs torchvision); the adapter loads the assembled one."""
    import transformers as tf

    from pipeline.models.llava_next import OnevisionImageTextProcessor

    family, mdir, lake, model, proc, images, texts = anyres
    if family != "llava_onevision":
        pytest.skip("LLaVA-NeXT's processor is transformers' own")
    dec.assert_processor_is_theirs(
        monkeypatch, lambda: tf.LlavaOnevisionProcessor(image_processor=image_processor(family), tokenizer=tokenizer(),
                                                        video_processor=None, **ONEVISION_SETTINGS),
        proc, images, [f"<image> {t}" for t in texts])
    assert isinstance(load_adapter(str(mdir)).processor, OnevisionImageTextProcessor)


def test_pooling_is_exercised(anyres):
    family = anyres[0]
    pooled = [expected_image_tokens(family, W, H)[2] for (W, H), _, _ in SCENES]
    assert pooled == ([False] * 4 if family == "llava_next" else [True, True, True, False])


def test_token_table_matches_the_models_inputs(anyres, lake_df):
    family, mdir, lake, model, proc, images, texts = anyres
    cls = family == "llava_next"  # CLIP tower: a [CLS] per crop; SigLIP: none
    lengths = []
    for ex, (im, text) in enumerate(zip(images, texts)):
        W, H = im.size
        enc, g = reference(model, proc, im, text)
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)
        ids, P = dec.prompt(enc)
        _, gen = dec.answer(g, ids, (EOS, PAD))
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        want, crops, _ = expected_image_tokens(family, W, H)
        assert len(img) == len(want)
        assert list(img.role) == [w[0] for w in want]  # the newlines where the model puts them
        assert [int(x) for x in img.tile] == [w[1] for w in want]
        p = img[img.role == "patch"]
        wp = [w for w in want if w[0] == "patch"]
        assert list(zip(p.patch_row.astype(int), p.patch_col.astype(int))) == [(w[2], w[3]) for w in wp]
        assert img[img.role == "image_newline"].patch_row.isna().all()
        np.testing.assert_allclose(img[["x0", "y0", "x1", "y1"]].to_numpy(float), np.array([w[4] for w in want]),
                                   atol=1e-4)
        txt = lm[lm.modality == "text"]
        assert txt.tile.isna().all()
        gl = lm[lm.role == "generated"]
        assert len(gl) == len(gen) >= 1  # their pieces and places: the conformance suite
        lengths.append(len(gen))
        # the tower: one block per crop (base image then the tiles), [CLS] first where the tower has one
        n_crops = enc["pixel_values"].shape[1]
        assert n_crops == len(crops)
        n = S * S + cls
        assert len(vis) == n_crops * n and list(vis.seq_pos) == list(range(n_crops * n))
        assert [int(x) for x in vis.tile] == [c for c in range(n_crops) for _ in range(n)]
        vp = vis[vis.role == "patch"]
        assert (vis.role == "image_cls").sum() == n_crops * cls
        assert list(zip(vp.patch_row, vp.patch_col)) == [(r, c) for _ in range(n_crops) for r in range(S)
                                                         for c in range(S)]
        np.testing.assert_allclose(vp[["x0", "y0", "x1", "y1"]].to_numpy(float),
                                   np.array([b for c in range(n_crops) for b in crops[c]]), atol=1e-4)
    assert max(lengths) >= 2  # some answer longer than its eos


def test_answer_is_the_models_greedy_generation(anyres, lake_df):
    """The suppressed word never comes (the prediction = generate's: the conformance suite)."""
    family, mdir, lake, model, proc, images, texts = anyres
    ex = lake_df(lake, f"SELECT example_id, answer, prediction, correct FROM examples WHERE run = '{RUN}' "
                 "ORDER BY example_id")
    assert len(ex) == len(SCENES)
    dec.assert_never_generated((reference(model, proc, im, text) for im, text in zip(images, texts)), SUPPRESSED)


def test_lm_attention_is_generates_own(anyres, lake_df):
    """(= the teacher-forced pass's, rows summing to 1: the conformance suite.)"""
    family, mdir, lake, model, proc, images, texts = anyres
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, g = reference(model, proc, im, text)
        P = enc["input_ids"].shape[1]
        n = int((tokens(lake_df, lake, ex).stream == "lm").sum())
        for stream in ("lm", "vision"):
            for layer in range(2):
                a = lake_df(lake, f"SELECT head, query_idx, key_idx, weight FROM attention WHERE run = '{RUN}' AND "
                            "example_id = ? AND stream = ? AND layer = ?", [ex, stream, layer])
                if stream == "vision":
                    assert a.query_idx.min() >= n and a.key_idx.min() >= n
                    continue
                assert_rows_as_generated(dec.square(a, n), g, layer, P)


def test_vision_attention_is_the_towers_own_crop_by_crop(anyres, lake_df):
    family, mdir, lake, model, proc, images, texts = anyres
    n = S * S + (family == "llava_next")
    # example 2: 4 tiles + the base image; example 3, batched with it: 1 tile + the base (padded crops)
    for ex, layer in ((2, 0), (2, 1), (3, 1)):
        enc = proc(images=[images[ex]], text=[f"<image> {texts[ex]}"], return_tensors="pt")
        with torch.no_grad():
            o = model.model.vision_tower(enc["pixel_values"][0], output_attentions=True)
        t = tokens(lake_df, lake, ex)
        vis = t[t.stream == "vision"].set_index("token_idx")
        a = lake_df(lake, f"SELECT head, query_idx, key_idx, weight FROM attention WHERE run = '{RUN}' AND "
                    "example_id = ? AND stream = 'vision' AND layer = ?", [ex, layer])
        q, k = vis.seq_pos[a.query_idx].to_numpy(), vis.seq_pos[a.key_idx].to_numpy()
        same = (q // n) == (k // n)
        assert (vis.tile[a.query_idx].to_numpy() == q // n).all()
        np.testing.assert_allclose(a.weight.to_numpy(np.float32)[~same], 0.0, atol=1e-6)  # crops never mix
        crop = q[same] // n
        exp = o.attentions[layer].numpy()[crop, a["head"].to_numpy()[same], q[same] % n, k[same] % n]
        np.testing.assert_allclose(a.weight.to_numpy(np.float32)[same], exp, atol=2e-3)
        assert same.sum() == 2 * len(enc["pixel_values"][0]) * n * n


def test_lm_hidden_state_0_is_the_models_packed_features(anyres, lake_df):
    """hidden 0 of ``lm`` at the image tokens is the model's own packed features (base image, unpadded
    tiles, newlines, OneVision's pooling) in order: the token table's order is the model's."""
    family, mdir, lake, model, proc, images, texts = anyres
    for ex in (0, 2):
        enc = proc(images=[images[ex]], text=[f"<image> {texts[ex]}"], return_tensors="pt")
        with torch.no_grad():
            feats = model.model.get_image_features(enc["pixel_values"], enc["image_sizes"]).pooler_output[0]
            newline = model.model.image_newline.numpy()
        h = lake_df(lake, f"SELECT t.role, t.modality, h.vec FROM hidden_states h JOIN tokens t USING (run, "
                    f"example_id, token_idx) WHERE h.run = '{RUN}' AND h.example_id = ? AND h.stream = 'lm' AND "
                    "h.layer = 0 ORDER BY h.token_idx", [ex])
        img = h[h.modality == "image"]
        got = np.stack(img.vec.to_list()).astype(np.float32)
        np.testing.assert_allclose(got, feats.numpy(), atol=2e-2, rtol=2e-2)
        nl = got[(img.role == "image_newline").to_numpy()]
        np.testing.assert_allclose(nl, np.broadcast_to(newline, nl.shape), atol=2e-2, rtol=2e-2)


def test_vision_hidden_states_are_the_towers_own(anyres, lake_df):
    family, mdir, lake, model, proc, images, texts = anyres
    ex = 1
    enc = proc(images=[images[ex]], text=[f"<image> {texts[ex]}"], return_tensors="pt")
    with torch.no_grad():
        o = model.model.vision_tower(enc["pixel_values"][0], output_hidden_states=True)
    h = lake_df(lake, f"SELECT h.layer, t.seq_pos, h.vec FROM hidden_states h JOIN tokens t USING (run, example_id, "
                f"token_idx) WHERE h.run = '{RUN}' AND h.example_id = ? AND h.stream = 'vision' "
                "ORDER BY h.layer, t.seq_pos", [ex])
    for layer in (0, 2):  # the embeddings (after CLIP's pre-layernorm) and the last block
        got = np.stack(h[h.layer == layer].vec.to_list()).astype(np.float32)
        exp = o.hidden_states[layer].reshape(-1, 32).numpy()
        if layer == 0 and family == "llava_next":
            exp = model.model.vision_tower.pre_layrnorm(o.hidden_states[0]).reshape(-1, 32).detach().numpy()
        np.testing.assert_allclose(got, exp, atol=2e-2, rtol=2e-2)


TOWER_MODULES = ("model.vision_tower.pre_layrnorm", "model.vision_tower.encoder.layers.0.mlp")


@pytest.mark.parametrize("anyres", ["llava_next"], indirect=True)
def test_tower_modules_are_their_own_output_crop_by_crop(anyres, tmp_path):
    """A tower MLP (layer 0) and the pre-layernorm (no layer; it runs before the stream's first attention,
    so it is laid out at the batch's end) captured over a batch of crops: at every example, each vision
    token's row is the module's own output on that example's crops alone, at its crop and patch
    (``seq_pos = crop * n + patch``), examples 2 and 3 batched (5 and 2 crops: example 3 padded)."""
    from lake.catalog import Catalog

    family, mdir, lake, model, proc, images, texts = anyres
    s = conf.built(lake)
    out = conf.build_lake(mdir, s.data / "manifest.jsonl", tmp_path / "lake", s.case,
                          capture_modules=",".join(TOWER_MODULES), keep_attention="none", keep_hidden="all",
                          explain=None)
    got = Catalog(out).df("SELECT a.module, a.layer, a.example_id, a.norm, a.vec, t.seq_pos, t.stream "
                          "FROM activations a JOIN tokens t USING (run, example_id, token_idx) WHERE a.run = ?", [RUN])
    assert set(got.module) == set(TOWER_MODULES) and set(got.stream) == {"vision"}
    assert set(got[got.module == TOWER_MODULES[1]].layer) == {0}
    assert got[got.module == TOWER_MODULES[0]].layer.isna().all()
    n = S * S + 1  # CLIP: [CLS] + 4 x 4 patches a crop
    mods = dict(model.named_modules())
    for ex in range(len(images)):
        enc = proc(images=[images[ex]], text=[f"<image> {texts[ex]}"], return_tensors="pt")
        own = {}
        handles = [mods[m].register_forward_hook(lambda mod, a, o, m=m: own.__setitem__(m, o)) for m in TOWER_MODULES]
        try:
            with torch.no_grad():
                model.model.vision_tower(enc["pixel_values"][0])
        finally:
            for h in handles:
                h.remove()
        crops = len(enc["pixel_values"][0])
        for m in TOWER_MODULES:
            rows = got[(got.module == m) & (got.example_id == ex)].sort_values("seq_pos")
            assert list(rows.seq_pos) == list(range(crops * n)), (m, ex)  # every token of every crop, once
            want = own[m].numpy()[rows.seq_pos.to_numpy() // n, rows.seq_pos.to_numpy() % n]  # [token, dim]
            np.testing.assert_allclose(rows.norm.to_numpy(np.float64), np.linalg.norm(want, axis=1), rtol=1e-3,
                                       atol=1e-3, err_msg=f"{m} ex {ex}")
            np.testing.assert_allclose(np.stack(rows.vec.to_list()).astype(np.float32), want, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("anyres", ["llava_next"], indirect=True)
def test_a_pooled_tower_module_is_refused(anyres, tmp_path):
    """CLIP's post-layernorm runs on each crop's [CLS] (``[crop, dim]`` over the batch's crops): not a
    vector per crop token, so not regrouped per example but refused with one line (the tower's blocks
    are captured: the conformance suite)."""
    family, mdir, lake, model, proc, images, texts = anyres
    s = conf.built(lake)
    crops = sum(len(expected_image_tokens(family, *images[ex].size)[1]) for ex in (0, 1))  # the first batch
    with pytest.raises(ValueError) as e:
        conf.build_lake(mdir, s.data / "manifest.jsonl", tmp_path / "lake", s.case,
                        capture_modules="model.vision_tower.post_layernorm", limit=2, keep_attention="none",
                        keep_hidden="none", explain=None)
    msg = str(e.value)
    assert "\n" not in msg and f"module model.vision_tower.post_layernorm outputs shape [{crops}, 32]" in msg, msg


def test_head_stats_by_hand(anyres, lake_df):
    family, mdir, lake, model, proc, images, texts = anyres
    ex, layer, head = 0, 1, 1
    enc, g = reference(model, proc, images[ex], texts[ex])
    t = tokens(lake_df, lake, ex)
    lm = t[t.stream == "lm"]
    o = dec.rerun(model, g, len(lm), pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"])
    A = o.attentions[layer][0, head].numpy().astype(np.float64)
    text, image = (lm.modality == "text").to_numpy(), (lm.modality == "image").to_numpy()
    st = lake_df(lake, f"SELECT stat, value FROM head_stats WHERE run = '{RUN}' AND example_id = ? AND "
                 "stream = 'lm' AND layer = ? AND head = ?", [ex, layer, head])
    got = dict(zip(st.stat, st.value))
    assert got["i2t"] == pytest.approx(A[image][:, text].sum(1).mean(), abs=2e-4)
    # t2i of one word: the question word "circle" to every image token, by hand, against the lake's row
    dec.assert_circle_mass(lake_df, lake, RUN, lm, A, (ex, layer, head))


def test_attention_page_offers_the_tiles(anyres, monkeypatch):
    """The Attention page offers the tile selector with the example's tiles (every page on the lake: the
    conformance suite)."""
    from tests.app.test_app import open_app

    family, mdir, lake, *_ = anyres
    for ex, tiles in ((2, ["base image", "tile 1", "tile 2", "tile 3", "tile 4"]),
                      (0, ["base image", "tile 1", "tile 2"])):
        for stream in ("lm", "vision"):
            at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=RUN, ex=ex, stream=stream)
            sb = [s for s in at.selectbox if s.key == "w_tile"]
            assert sb and sb[0].label == "Image tokens of", (ex, stream)
            assert sb[0].options == ["all tiles on the original image"] + tiles
            sb[0].set_value(1).run()
            assert not at.exception and at.session_state["tile"] == 1
