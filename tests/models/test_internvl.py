"""InternVL (``InternVLForConditionalGeneration``): dynamic tiling with a thumbnail, pixel shuffle, ``<img>``/
``</img>`` markers; token table, generated answer, attention and statistics checked against the model itself.

Tiny random model: InternVL vision tower (32 px crops, 8 px patches -> 4 x 4 patches a crop, a [CLS], 2 layers),
pixel shuffle 0.5 (-> 2 x 2 image tokens a crop, each a 2 x 2 block of patches), Qwen2 language model (2 layers,
2 heads, width 32). Image processor: ``GotOcr2ImageProcessorPil`` with ``max_patches`` 4; processor:
``InternVLProcessor`` without a video processor (assembled by the adapter from files the test writes).
Nothing is downloaded. Expected layouts come from independent arithmetic on the image sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models.test_llava import assert_rows_as_generated
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

CROP, PS, S, M = 32, 8, 4, 2  # crop size, tower patch size, patches a side, shuffled tokens a side
EOS, PAD, IMG, IMG_END, CTX, VIDEO = 2, 3, 4, 5, 6, 7
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": EOS, "<pad>": PAD, "<img>": IMG, "</img>": IMG_END, "<IMG_CONTEXT>": CTX,
         "<video>": VIDEO, **{w: i + 8 for i, w in enumerate(WORDS)}}
SUPPRESSED = VOCAB["the"]
SCENES = [  # (original size (w, h), question, answer), tile grid (rows, cols) get_optimal_tiled_canvas picks
    ((64, 30), "what color is the circle ?", "red"),
    ((24, 56), "is there a red square left of the circle ?", "yes"),
    ((50, 50), "how many ?", None),
    ((40, 44), "what shape is the blue triangle ?", "triangle"),
]
GRIDS = [(1, 2), (2, 1), (2, 2), (1, 1)]
RUN = "intern"


def tokenizer():
    return word_tokenizer(
        VOCAB, ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), bos="<s>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", padding_side="left", extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def image_processor():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": CROP, "width": CROP}, min_patches=1, max_patches=4,
                                    crop_to_patches=True)


def make_tiny(out, seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    text = dec.tiny_lm("qwen2", len(VOCAB), num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS,
                       pad_token_id=PAD)
    vision = dec.tiny_tower(None, [CROP, CROP], [PS, PS])
    cfg = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=CTX, downsample_ratio=0.5,
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = dec.random_model(tf.InternVLForConditionalGeneration, cfg, seed)
    dec.sharpen(model.model.vision_tower.encoder.layer, "attention")
    with torch.no_grad():  # layer scales at 1 (HF starts them at the config's layer_scale_init_value)
        for layer in model.model.vision_tower.encoder.layer:
            layer.lambda_1.fill_(1.0)
            layer.lambda_2.fill_(1.0)
    dec.sharpen(model.model.language_model.layers)
    dec.save(model, out, tokenizer(), image_processor(), eos=[EOS, PAD], pad=PAD, suppress=[SUPPRESSED])
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                           "image_seq_length": M * M}))
    return out


def processor():
    """The adapter's assembled processor (InternVL's own needs torchvision for its video processor; checked
    against transformers' ``InternVLProcessor`` below)."""
    from pipeline.models.internvl import InternVLImageTextProcessor

    return InternVLImageTextProcessor(image_processor(), tokenizer(), image_seq_length=M * M)


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 20, 12])


def load(mdir):
    import transformers as tf

    return dec.load_eager(tf.InternVLForConditionalGeneration, mdir), processor()


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer (cut after eos), the teacher-forced attention, the tower crop by crop."""
    enc, g = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    ids = enc["input_ids"][0].tolist()
    new, gen = dec.answer(g, ids, (EOS, PAD))
    with torch.no_grad():
        o = s.model(input_ids=torch.tensor([ids + gen]), pixel_values=enc["pixel_values"], output_attentions=True)
        v = s.model.model.vision_tower(enc["pixel_values"], output_attentions=True)
    crops = enc["pixel_values"].shape[0]
    return conf.Reference(ids=ids, generated=gen, patches={"lm": crops * M * M, "vision": crops * S * S},
                          attentions=dec.attentions(o, v, tiled=True),
                          prediction=s.proc.tokenizer.decode(new, skip_special_tokens=True).strip())


CASES = [conf.FamilyCase(id="internvl", family="internvl", run=RUN, make_model=make_tiny, rows=scene_rows, load=load,
                         reference=conformance_reference, image_token=CTX, page_example=2,
                         crops=("vision",))]  # the tower runs crop by crop


@pytest.fixture(scope="module")
def intern(tmp_path_factory):
    return dec.parts(conf.subject(CASES[0], tmp_path_factory))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    enc = proc(images=[image], text=[f"<IMG_CONTEXT> {text}"], return_tensors="pt")
    return enc, dec.generate_with_attentions(model, enc, MAX_NEW_TOKENS, [SUPPRESSED, CTX])


def tokens(lake_df, lake, ex):
    return lake_df(lake, f"SELECT * FROM tokens WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])


def expected(W, H, grid):
    """Crops in the processor's order as (tile, patch boxes), and the image tokens [(tile, row, col, box)]."""
    rows, cols = grid
    crops = []
    if rows * cols > 1:
        sx, sy = W / (cols * CROP), H / (rows * CROP)
        for t in range(rows * cols):
            tr, tc = divmod(t, cols)
            crops.append((t + 1, [((tc * CROP + c * PS) * sx, (tr * CROP + r * PS) * sy,
                                   (tc * CROP + (c + 1) * PS) * sx, (tr * CROP + (r + 1) * PS) * sy)
                                  for r in range(S) for c in range(S)]))
    crops.append((0, [(c * PS * W / CROP, r * PS * H / CROP, (c + 1) * PS * W / CROP, (r + 1) * PS * H / CROP)
                      for r in range(S) for c in range(S)]))
    toks = []
    for t, boxes in crops:
        for i in range(M):
            for j in range(M):  # token (i, j) holds patches rows 2i..2i+1, columns 2j..2j+1
                bs = [boxes[r * S + c] for r in (2 * i, 2 * i + 1) for c in (2 * j, 2 * j + 1)]
                toks.append((t, i, j, (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs),
                                       max(b[3] for b in bs))))
    return crops, toks


def test_registered_and_processor(intern, monkeypatch):
    """Registered; the assembled processor gives exactly what transformers' ``InternVLProcessor`` gives (built
    here without its video processor)."""
    import transformers as tf

    from pipeline.models import FAMILIES
    from pipeline.models.internvl import InternVLImageTextProcessor

    mdir, lake, model, proc, images, texts = intern
    assert "internvl" in FAMILIES
    dec.assert_processor_is_theirs(
        monkeypatch, lambda: tf.InternVLProcessor(image_processor=image_processor(), tokenizer=tokenizer(),
                                                  video_processor=None, image_seq_length=M * M),
        proc, images, [f"<IMG_CONTEXT> {t}" for t in texts])
    a = load_adapter(str(mdir))
    assert a.family == "internvl" and isinstance(a.processor, InternVLImageTextProcessor)
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}


def test_pixel_shuffle_blocks(intern):
    """The adapter's reading of the model's own pixel_shuffle: token (i, j) is the 2 x 2 block at (2i, 2j)."""
    a = load_adapter(str(intern[0]))
    assert a.token_blocks() == [[(2 * i + di, 2 * j + dj) for di in (0, 1) for dj in (0, 1)]
                                for i in range(M) for j in range(M)]


def test_token_table_matches_the_models_inputs(intern, lake_df):
    mdir, lake, model, proc, images, texts = intern
    for ex, (im, text) in enumerate(zip(images, texts)):
        W, H = im.size
        enc, g = reference(model, proc, im, text)
        crops, want = expected(W, H, GRIDS[ex])
        assert enc["pixel_values"].shape[0] == len(crops)
        t = tokens(lake_df, lake, ex)
        lm, vis = t[t.stream == "lm"], t[t.stream == "vision"]
        ids, P = dec.prompt(enc)
        _, gen = dec.answer(g, ids, (EOS, PAD))
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        assert len(img) == len(want) == len(crops) * M * M
        assert [int(x) for x in img.tile] == [w[0] for w in want]
        assert list(zip(img.patch_row.astype(int), img.patch_col.astype(int))) == [(w[1], w[2]) for w in want]
        np.testing.assert_allclose(img[["x0", "y0", "x1", "y1"]].to_numpy(float), np.array([w[3] for w in want]),
                                   atol=1e-4)
        assert list(lm[lm.token == "<img>"].role) == ["vision_start"]
        assert list(lm[lm.token == "</img>"].role) == ["vision_end"]
        first, last = img.seq_pos.min(), img.seq_pos.max()
        assert ids[first - 1] == IMG and ids[last + 1] == IMG_END
        gl = lm[lm.role == "generated"]
        assert len(gl) == len(gen) >= 1  # their pieces and places: the conformance suite
        n = S * S + 1
        assert len(vis) == len(crops) * n and list(vis.seq_pos) == list(range(len(crops) * n))
        assert [int(x) for x in vis.tile] == [c for c, _ in crops for _ in range(n)]
        assert (vis.role == "image_cls").sum() == len(crops)
        vp = vis[vis.role == "patch"]
        np.testing.assert_allclose(vp[["x0", "y0", "x1", "y1"]].to_numpy(float),
                                   np.array([b for _, bs in crops for b in bs]), atol=1e-4)


def test_answer_is_the_models_greedy_generation(intern, lake_df):
    """The suppressed word never comes (the prediction = generate's: the conformance suite)."""
    mdir, lake, model, proc, images, texts = intern
    ex = lake_df(lake, f"SELECT example_id, prediction FROM examples WHERE run = '{RUN}' ORDER BY example_id")
    assert len(ex) == len(SCENES)
    dec.assert_never_generated((reference(model, proc, im, text) for im, text in zip(images, texts)), SUPPRESSED)


def test_lm_attention_is_generates_own(intern, lake_df):
    """(= the teacher-forced pass's, rows summing to 1, the tower's crop by crop: the conformance suite.)"""
    mdir, lake, model, proc, images, texts = intern
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, g = reference(model, proc, im, text)
        P = enc["input_ids"].shape[1]
        n = int((tokens(lake_df, lake, ex).stream == "lm").sum())
        for layer in range(2):
            a = lake_df(lake, f"SELECT head, query_idx, key_idx, weight FROM attention WHERE run = '{RUN}' AND "
                        "example_id = ? AND stream = 'lm' AND layer = ?", [ex, layer])
            assert_rows_as_generated(dec.square(a, n), g, layer, P)


def test_hidden_states_are_the_models_own(intern, lake_df):
    """``lm`` hidden 0 at the image tokens is the model's own shuffled, projected features in order (tiles, then
    the thumbnail); ``vision`` hidden states are the tower's, crop after crop."""
    mdir, lake, model, proc, images, texts = intern
    for ex in (0, 2):
        enc = proc(images=[images[ex]], text=[f"<IMG_CONTEXT> {texts[ex]}"], return_tensors="pt")
        with torch.no_grad():
            feats = model.model.get_image_features(enc["pixel_values"], vision_feature_layer=-1,
                                                   vision_feature_select_strategy="default").pooler_output
            o = model.model.vision_tower(enc["pixel_values"], output_hidden_states=True)
        h = lake_df(lake, f"SELECT t.modality, h.vec FROM hidden_states h JOIN tokens t USING (run, example_id, "
                    f"token_idx) WHERE h.run = '{RUN}' AND h.example_id = ? AND h.stream = 'lm' AND h.layer = 0 "
                    "ORDER BY h.token_idx", [ex])
        got = np.stack(h[h.modality == "image"].vec.to_list()).astype(np.float32)
        np.testing.assert_allclose(got, feats.reshape(-1, 32).numpy(), atol=2e-2, rtol=2e-2)
        v = lake_df(lake, f"SELECT h.layer, t.seq_pos, h.vec FROM hidden_states h JOIN tokens t USING (run, "
                    f"example_id, token_idx) WHERE h.run = '{RUN}' AND h.example_id = ? AND h.stream = 'vision' "
                    "ORDER BY h.layer, t.seq_pos", [ex])
        for layer in (0, 2):
            got = np.stack(v[v.layer == layer].vec.to_list()).astype(np.float32)
            np.testing.assert_allclose(got, o.hidden_states[layer].reshape(-1, 32).numpy(), atol=2e-2, rtol=2e-2)


def test_t2i_of_a_word_by_hand(intern, lake_df):
    mdir, lake, model, proc, images, texts = intern
    ex, layer, head = 0, 1, 1
    enc, g = reference(model, proc, images[ex], texts[ex])
    lm = tokens(lake_df, lake, ex)
    lm = lm[lm.stream == "lm"]
    o = dec.rerun(model, g, len(lm), pixel_values=enc["pixel_values"])
    A = o.attentions[layer][0, head].numpy().astype(np.float64)
    # t2i of one word: the question word "circle" to every image token, by hand, against the lake's row
    dec.assert_circle_mass(lake_df, lake, RUN, lm, A, (ex, layer, head))


def test_attention_page_offers_the_tiles(intern, monkeypatch):
    """(Every page on the lake: the conformance suite.)"""
    from tests.app.test_app import open_app

    mdir, lake, *_ = intern
    for ex, tiles in ((2, ["base image", "tile 1", "tile 2", "tile 3", "tile 4"]), (0, ["base image", "tile 1",
                                                                                         "tile 2"])):
        for stream in ("lm", "vision"):
            at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=RUN, ex=ex, stream=stream)
            sb = [s for s in at.selectbox if s.key == "w_tile"]
            assert sb and sb[0].options == ["all tiles on the original image"] + tiles, (ex, stream)
