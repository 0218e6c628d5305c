"""Idefics3 (decoder LVLM with image splitting and pixel shuffle): token table with crops, a global image,
``<row_R_col_C>`` / ``<fake_token_around_image>`` / ``<global-img>`` markers and tiles, the answer, and
attention, checked against the model's own inputs and outputs.

A tiny random Idefics3ForConditionalGeneration (SigLIP-like tower: 32 px crops, 8 px patches -> 4 x 4
patches a crop, 2 layers; ``scale_factor`` 2, so one lm image token stands for a 2 x 2 block of patches,
4 tokens a crop; Llama text model, 2 layers) with an Idefics3Processor of the PIL image processor
(longest edge 64, crops of 32, image splitting on) and a word-level tokenizer, all built from files.
Nothing is downloaded. Expected values come from transformers alone, one example at a time, and from
independent arithmetic on the image sizes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.idefics3 import MAX_NEW_TOKENS
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

CROP, PS, SF, LONG = 32, 8, 2, 64
SIDE, POOL = CROP // PS, CROP // PS // SF  # 4 x 4 tower patches, 2 x 2 lm tokens a crop
SEQ = POOL * POOL
LAYOUT = dec.CropLayout(seq=SEQ, pool=POOL, side=SIDE, ps=PS, sf=SF)
MARKS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + \
        [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{m: 4 + i for i, m in enumerate(MARKS)}}
VOCAB.update({w: len(VOCAB) + i for i, w in enumerate(WORDS)})
IMAGE_ID, FAKE, GLOBAL = VOCAB["<image>"], VOCAB["<fake_token_around_image>"], VOCAB["<global-img>"]
SCENES = [  # (original size (w, h), question, answer)
    ((96, 64), "what color is the circle ?", "red"),
    ((40, 80), "is there a red square left of the circle ?", "yes"),
    ((20, 20), "how many ?", None),
]
RUN = "idefics3"


def make_tiny(out, family: str = "idefics3", seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(VOCAB, MARKS, bos="<s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         padding_side="left")
    ipc = tf.Idefics3ImageProcessorPil if family == "idefics3" else tf.SmolVLMImageProcessorPil
    ip = ipc(size={"longest_edge": LONG}, max_image_size={"longest_edge": CROP}, do_image_splitting=True)
    vision = dec.tiny_tower(None, CROP, PS)
    text = dec.tiny_lm("llama", len(VOCAB), num_key_value_heads=2, max_position_embeddings=256)
    Config, Model = ((tf.Idefics3Config, tf.Idefics3ForConditionalGeneration) if family == "idefics3" else
                     (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration))
    cfg = Config(vision_config=vision, text_config=text, scale_factor=SF, image_token_id=IMAGE_ID, pad_token_id=3)
    model = dec.random_model(Model, cfg, seed)
    dec.sharpen(list(model.model.vision_model.encoder.layers) + list(model.model.text_model.layers))
    dec.save(model, out)
    if family == "idefics3":
        tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=SEQ).save_pretrained(out)
    else:  # SmolVLMProcessor needs torchvision and num2words: its files, written by hand
        tok.save_pretrained(out)
        ip.save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps({"image_seq_len": SEQ,
                                                               "processor_class": "SmolVLMProcessor"}))
    return out


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 40, 40])


def loader(family: str):
    def load(mdir):
        import transformers as tf

        from pipeline.models.idefics3 import Idefics3Adapter

        Model = tf.Idefics3ForConditionalGeneration if family == "idefics3" else tf.SmolVLMForConditionalGeneration
        return dec.load_eager(Model, mdir), Idefics3Adapter.load_processor(str(mdir))
    return load


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer, the teacher-forced attention, the tower crop by crop."""
    enc, gen, o = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    with torch.no_grad():
        v = s.model.model.vision_model(pixel_values=enc["pixel_values"][0], output_attentions=True)
    crops = enc["pixel_values"].shape[1]
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen,
                          patches={"lm": crops * SEQ, "vision": crops * SIDE * SIDE},
                          attentions=dec.attentions(o, v, tiled=True),
                          prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())


CASES = [conf.FamilyCase(id=family, family=family, run=RUN, make_model=lambda out, family=family: make_tiny(out, family),
                         rows=scene_rows, load=loader(family), reference=conformance_reference, image_token=IMAGE_ID,
                         page_example=0, crops=("vision",))  # the tower runs crop by crop
         for family in ("idefics3", "smolvlm")]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def idefics(request, tmp_path_factory):
    return dec.parts(conf.subject(CASES[["idefics3", "smolvlm"].index(request.param)], tmp_path_factory))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    enc = proc(images=[[image]], text=[f"<image>{text}"], return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k not in ("rows", "cols")}
    gen = dec.greedy(model, enc, MAX_NEW_TOKENS, [IMAGE_ID])
    ids = torch.tensor([enc["input_ids"][0].tolist() + gen])
    with torch.no_grad():
        o = model(input_ids=ids, pixel_values=enc["pixel_values"], pixel_attention_mask=enc["pixel_attention_mask"],
                  attention_mask=torch.ones_like(ids), output_attentions=True)
    return enc, gen, o


def tokens(lake_df, lake, ex):
    return lake_df(lake, f"SELECT * FROM tokens WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])


def grid_of(W, H):
    """(rows, cols) of crops, computed here: longest edge to 64 (even short side), sides up to multiples of 32."""
    if W >= H:
        w, h = LONG, int(LONG / (W / H))
        h += h % 2
    else:
        h, w = LONG, int(LONG * (W / H))
        w += w % 2
    if w >= h:
        RW = math.ceil(w / CROP) * CROP
        RH = math.ceil(int(RW / (w / h)) / CROP) * CROP
    else:
        RH = math.ceil(h / CROP) * CROP
        RW = math.ceil(int(RH * (w / h)) / CROP) * CROP
    return (RH // CROP, RW // CROP) if (RH > CROP or RW > CROP) else (0, 0)


def expected_crops(W, H):
    """Per crop in the processor's order: (tile, origin x, origin y, scale x, scale y) in original pixels."""
    rows, cols = grid_of(W, H)
    out = [(1 + r * cols + c, c * CROP, r * CROP, W / (cols * CROP), H / (rows * CROP))
           for r in range(rows) for c in range(cols)]
    return out + [(0, 0, 0, W / CROP, H / CROP)], rows, cols


def test_registered_and_streams(idefics):
    from pipeline.models import FAMILIES

    assert FAMILIES["idefics3"][0] == "idefics3" and FAMILIES["smolvlm"][0] == "smolvlm"
    a = load_adapter(str(idefics[0]))
    assert type(a).__name__ == "Idefics3Adapter" and a.family == idefics[2].config.model_type
    assert type(a.model).__name__ == type(idefics[2]).__name__
    # SmolVLM's own processor needs torchvision (its video processor): the adapter assembles Idefics3Processor
    assert type(a.processor).__name__ == "Idefics3Processor"
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}


def test_splitting_is_exercised():
    assert grid_of(96, 64) == (2, 2) and grid_of(40, 80) == (2, 1) and grid_of(20, 20) == (2, 2)  # upscaled to 64


def test_token_table_matches_the_models_inputs(idefics, lake_df):
    mdir, lake, model, proc, images, texts = idefics
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen, _ = reference(model, proc, im, text)
        ids, P = dec.prompt(enc)
        W, H = im.size
        crops, rows, cols = expected_crops(W, H)
        assert enc["pixel_values"].shape[1] == len(crops)
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        assert len(img) == SEQ * len(crops) and set(img.role) == {"patch"}
        # markers: one <fake> before each crop and one closing; <row_R_col_C> per crop, <global-img> once
        assert [p for p, i in enumerate(ids) if i == FAKE] == list(lm.seq_pos[lm.role == "image_boundary"])
        assert (lm.role == "image_boundary").sum() == len(crops) + 1
        assert list(lm.token[lm.role == "tile_marker"]) == [f"<row_{r + 1}_col_{c + 1}>" for r in range(rows)
                                                            for c in range(cols)]
        assert list(lm.token[lm.role == "global_marker"]) == ["<global-img>"]
        # boxes computed here: pooled 2 x 2 blocks of 8 px patches, through the crop's place
        q = PS * SF
        exp = [(ox + c * q) * sx for _, ox, oy, sx, sy in crops for r in range(POOL) for c in range(POOL)]
        np.testing.assert_allclose(img.x0.to_numpy(float), exp, atol=1e-3)
        # each marker is followed by its crop's image tokens; the whole original is covered by the global image
        dec.assert_crop_tokens(lm, vis, crops, gen, (W, H), LAYOUT)


def test_t2i_of_a_word_by_hand(idefics, lake_df):
    """The mass the word 'circle' puts on image tokens, head 1 of the last layer, by hand."""
    mdir, lake, model, proc, images, texts = idefics
    _, _, o = reference(model, proc, images[0], texts[0])
    dec.word_t2i_by_hand(lake_df, lake, RUN, o.attentions[1][0, 1].numpy())


def test_smolvlm_prompt_is_transformers_own(idefics):
    """The processor writes SmolVLM's own image prompt (``processing_smolvlm.get_image_prompt_string``)."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    mdir, lake, model, proc, images, texts = idefics
    for im, text in zip(images, texts):
        enc = proc(images=[[im]], text=[f"<image>{text}"], return_tensors="pt")
        rows, cols = grid_of(*im.size)
        own = get_image_prompt_string(rows, cols, SEQ, "<fake_token_around_image>", "<image>", "<global-img>")
        assert enc["input_ids"][0].tolist() == proc.tokenizer(own + text)["input_ids"]


def test_crop_grid_without_markers_is_the_processors(idefics):
    """The crop grid read from a blank image through the processor (no markers given) is the prompt's."""
    a = load_adapter(str(idefics[0]))
    for (W, H), _, _ in SCENES:
        rows, cols = grid_of(W, H)
        n = max(rows * cols, 0) + 1
        assert a.crop_boxes(W, H, n) == a.crop_boxes(W, H, n, [a.tokenizer.convert_tokens_to_ids(
            f"<row_{r + 1}_col_{c + 1}>") for r in range(rows) for c in range(cols)])
        assert a.crop_boxes(W, H, n)[0] == [1 + k for k in range(rows * cols)] + [0]
