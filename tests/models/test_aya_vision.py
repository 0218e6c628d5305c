"""Aya Vision (decoder LVLM with tiles, a thumbnail and pixel-shuffle downsampling): what is particular to
it, the token table's tiles, ``<|START_OF_IMG|>`` / ``TILE_k`` / ``TILE_GLOBAL`` / ``<|END_OF_IMG|>``
markers and boxes, and the sliding-window layer's stored keys; the checks every family passes (the
model's inputs, its attention per stream, generate, a statistic, the pages) run on the same lake from
``tests/models/test_conformance.py`` (``CASES`` below).

A tiny random AyaVisionForConditionalGeneration (SigLIP tower: 32 px crops, 8 px patches -> 4 x 4
patches a crop, 2 layers; ``downsample_factor`` 2, so one lm image token stands for a 2 x 2 block of
patches, 4 tokens a crop; Cohere2 text model, 2 layers, the first sliding over ``WINDOW`` positions)
with an AyaVisionProcessor of the PIL GotOcr2 image processor (crops of 32, 1 to 4 tiles) and a
word-level tokenizer, all built from files.
Nothing is downloaded. Expected values come from transformers alone, one example at a time, and from
independent arithmetic on the image sizes.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

CROP, PS, SF = 32, 8, 2
SIDE, POOL = CROP // PS, CROP // PS // SF  # 4 x 4 tower patches, 2 x 2 lm tokens a crop
SEQ = POOL * POOL
LAYOUT = dec.CropLayout(seq=SEQ, pool=POOL, side=SIDE, ps=PS, sf=SF)
MARKS = ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE_GLOBAL"] + \
        [f"TILE_{k}" for k in range(1, 5)]
VOCAB = {"<unk>": 0, "<BOS_TOKEN>": 1, "<EOS_TOKEN>": 2, "<PAD>": 3, **{m: 4 + i for i, m in enumerate(MARKS)}}
VOCAB.update({w: len(VOCAB) + i for i, w in enumerate(WORDS)})
IMAGE_ID = VOCAB["<|IMG_PATCH|>"]
SCENES = [  # (original size (w, h), question, answer, (rows, cols) of tiles)
    ((96, 40), "what color is the circle ?", "red", (1, 2)),  # aspect 2.4: 2 x 1 is the closest of <= 4 tiles
    ((40, 80), "is there a red square left of the circle ?", "yes", (2, 1)),  # aspect 0.5: 1 x 2
    ((20, 20), "how many ?", None, (1, 1)),  # square: one crop, the whole image
]
RUN = "aya"
WINDOW = 8  # Cohere2's sliding window, short enough to bite in layer 0 (layer 1 attends to the whole prefix)


def make_tiny(out, seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(VOCAB, MARKS, bos="<BOS_TOKEN>", bos_token="<BOS_TOKEN>", eos_token="<EOS_TOKEN>",
                         pad_token="<PAD>", padding_side="left")
    ip = tf.GotOcr2ImageProcessorPil(size={"height": CROP, "width": CROP}, crop_to_patches=True, min_patches=1,
                                     max_patches=4)
    vision = dec.tiny_tower("siglip_vision_model", CROP, PS, vision_use_head=False)
    text = dec.tiny_lm("cohere2", len(VOCAB), num_key_value_heads=2, max_position_embeddings=256,
                       sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    cfg = tf.AyaVisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, downsample_factor=SF)
    model = dec.random_model(tf.AyaVisionForConditionalGeneration, cfg, seed)
    dec.sharpen(dec.tower_and_lm(model))
    return dec.save(model, out, tf.AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=PS, img_size=CROP,
                                                      downsample_factor=SF))


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows([(size, t, a) for size, t, a, _ in SCENES], [0, 0, 40, 30])


load = dec.auto_loader("AyaVisionForConditionalGeneration")


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer, the teacher-forced attention (Cohere2's sliding-window layers as the
    model masks them), the tower crop by crop (tiles, then the thumbnail)."""
    enc, gen, o = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    with torch.no_grad():
        v = s.model.model.vision_tower(pixel_values=enc["pixel_values"], output_attentions=True)
    crops = enc["pixel_values"].shape[0]
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen,
                          patches={"lm": crops * SEQ, "vision": crops * SIDE * SIDE},
                          attentions=dec.attentions(o, v, tiled=True),
                          prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())


CASES = [conf.FamilyCase(id="aya_vision", family="aya_vision", run=RUN, make_model=make_tiny, rows=scene_rows,
                         load=load, reference=conformance_reference, image_token=IMAGE_ID, page_example=0,
                         crops=("vision",))]  # the tower runs crop by crop


@pytest.fixture(scope="module")
def aya(tmp_path_factory):
    return dec.parts(conf.subject(CASES[0], tmp_path_factory))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    enc = proc(images=[image], text=[f"<image>{text}"], return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k != "num_patches"}
    gen = dec.greedy(model, enc, MAX_NEW_TOKENS, [IMAGE_ID])
    ids = torch.tensor([enc["input_ids"][0].tolist() + gen])
    with torch.no_grad():
        o = model(input_ids=ids, pixel_values=enc["pixel_values"], attention_mask=torch.ones_like(ids),
                  output_attentions=True)
    return enc, gen, o


def tokens(lake_df, lake, ex):
    return lake_df(lake, f"SELECT * FROM tokens WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])


def expected_crops(W, H, rows, cols):
    """Per crop in the processor's order (tiles row by row, then the thumbnail when there are tiles):
    (tile, origin x, origin y, scale x, scale y), crop pixels to original pixels."""
    thumb = (0, 0.0, 0.0, W / CROP, H / CROP)
    if rows * cols == 1:
        return [thumb]
    sx, sy = W / (cols * CROP), H / (rows * CROP)
    return [(1 + r * cols + c, c * CROP, r * CROP, sx, sy) for r in range(rows) for c in range(cols)] + [thumb]


def test_registered_and_streams(aya):
    from pipeline.models import FAMILIES

    assert FAMILIES["aya_vision"][0] == "aya_vision"
    a = load_adapter(str(aya[0]))
    assert type(a).__name__ == "AyaVisionAdapter" and a.family == "aya_vision"
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}
    for (W, H), _, _, grid in SCENES:
        assert a.grid_of(W, H) == grid


def test_token_table_matches_the_models_inputs(aya, lake_df):
    mdir, lake, model, proc, images, texts = aya
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen, _ = reference(model, proc, im, text)
        ids, P = dec.prompt(enc)
        W, H = im.size
        rows, cols = SCENES[ex][3]
        crops = expected_crops(W, H, rows, cols)
        assert enc["pixel_values"].shape[0] == len(crops)
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        assert len(img) == SEQ * len(crops) and set(img.role) == {"patch"}
        # markers: one start and one end; TILE_k before each tile, TILE_GLOBAL before the thumbnail
        assert list(lm.token[lm.role == "vision_start"]) == ["<|START_OF_IMG|>"]
        assert list(lm.token[lm.role == "vision_end"]) == ["<|END_OF_IMG|>"]
        assert list(lm.token[lm.role == "tile_marker"]) == [f"TILE_{k}" for k in range(1, rows * cols + 1)
                                                            if rows * cols > 1]
        assert list(lm.token[lm.role == "global_marker"]) == ["TILE_GLOBAL"]
        # the tower: every crop's 4 x 4 patches, tiles then the thumbnail; the thumbnail covers the original
        assert set(vis.role) == {"patch"}
        dec.assert_crop_tokens(lm, vis, crops, gen, (W, H), LAYOUT)


def test_t2i_of_a_word_by_hand(aya, lake_df):
    """The mass the word 'circle' puts on image tokens, head 1 of the last layer, by hand."""
    mdir, lake, model, proc, images, texts = aya
    _, _, o = reference(model, proc, images[0], texts[0])
    dec.word_t2i_by_hand(lake_df, lake, RUN, o.attentions[1][0, 1].numpy())


def test_sliding_window_layer_stores_only_the_window(aya, lake_df):
    """Layer 0 slides: each lm query's stored keys are exactly the last ``WINDOW`` positions up to its own,
    computed here from the window alone; layer 1 is full: every position up to its own."""
    lake = aya[1]
    for ex in range(len(SCENES)):
        a = lake_df(lake, f"SELECT a.layer, a.head, q.seq_pos AS q, k.seq_pos AS k FROM attention a "
                    "JOIN tokens q ON q.run = a.run AND q.example_id = a.example_id AND q.token_idx = a.query_idx "
                    "JOIN tokens k ON k.run = a.run AND k.example_id = a.example_id AND k.token_idx = a.key_idx "
                    f"WHERE a.run = '{RUN}' AND a.example_id = ? AND a.stream = 'lm'", [ex])
        n = int(a.q.max()) + 1
        assert n > WINDOW
        for layer, lo in ((0, lambda q: max(0, q - WINDOW + 1)), (1, lambda q: 0)):
            got = sorted(map(tuple, a[a.layer == layer][["head", "q", "k"]].to_numpy().tolist()))
            assert got == [(h, q, k) for h in range(2) for q in range(n) for k in range(lo(q), q + 1)], (ex, layer)
