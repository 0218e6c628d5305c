"""Aya Vision (decoder LVLM with tiles, a thumbnail and pixel-shuffle downsampling): token table with
tiles and ``<|START_OF_IMG|>`` / ``TILE_k`` / ``TILE_GLOBAL`` / ``<|END_OF_IMG|>`` markers, boxes, the
answer, and attention, checked against the model's own inputs and outputs.

A tiny random AyaVisionForConditionalGeneration (SigLIP tower: 32 px crops, 8 px patches -> 4 x 4
patches a crop, 2 layers; ``downsample_factor`` 2, so one lm image token stands for a 2 x 2 block of
patches, 4 tokens a crop; Cohere2 text model, 2 layers) with an AyaVisionProcessor of the PIL
GotOcr2 image processor (crops of 32, 1 to 4 tiles) and a word-level tokenizer, all built from files.
Nothing is downloaded. Expected values come from transformers alone, one example at a time, and from
independent arithmetic on the image sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.extraction.run import extract
from pipeline.models import load_adapter
from pipeline.models.aya_vision import MAX_NEW_TOKENS
from tests.tiny import WORDS, noise_image, word_tokenizer, write_manifest

CROP, PS, SF = 32, 8, 2
SIDE, POOL = CROP // PS, CROP // PS // SF  # 4 x 4 tower patches, 2 x 2 lm tokens a crop
SEQ = POOL * POOL
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


def make_tiny(out, seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(VOCAB, MARKS, bos="<BOS_TOKEN>", bos_token="<BOS_TOKEN>", eos_token="<EOS_TOKEN>",
                         pad_token="<PAD>", padding_side="left")
    ip = tf.GotOcr2ImageProcessorPil(size={"height": CROP, "width": CROP}, crop_to_patches=True, min_patches=1,
                                     max_patches=4)
    vision = dict(model_type="siglip_vision_model", image_size=CROP, patch_size=PS, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)
    text = dict(model_type="cohere2", vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = tf.AyaVisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, downsample_factor=SF)
    cfg.vlatlas_random_weights = True
    torch.manual_seed(seed)
    model = tf.AyaVisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # peaked attention, so that a wrong permutation shows
        for layer in list(model.model.vision_tower.encoder.layers) + list(model.model.language_model.layers):
            layer.self_attn.q_proj.weight.normal_(0.0, 0.4)
            layer.self_attn.k_proj.weight.normal_(0.0, 0.4)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 3
    model.save_pretrained(out)
    tf.AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=PS, img_size=CROP,
                          downsample_factor=SF).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def aya(tmp_path_factory):
    import transformers as tf
    from PIL import Image

    tmp = tmp_path_factory.mktemp("aya")
    mdir = make_tiny(tmp / "model")
    rows = [{"id": f"s{i}", "image": noise_image(size, seed=i), "text": t, "answer": a}
            for i, (size, t, a, _) in enumerate(SCENES)]
    rows[0]["boxes"] = [{"label": "circle", "box": [0, 0, 40, 30]}]
    manifest = write_manifest(tmp / "data", rows)
    lake = tmp / "lake"
    extract(str(mdir), manifest, lake, RUN, batch_size=2, keep_attention="all", keep_hidden="all", progress=False)
    model = tf.AyaVisionForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = tf.AutoProcessor.from_pretrained(mdir)
    images = [Image.open(tmp / "data" / "images" / f"s{i}.png").convert("RGB") for i in range(len(SCENES))]
    return mdir, lake, model, proc, images, [t for _, t, _, _ in SCENES]


def reference(model, proc, image, text):
    enc = proc(images=[image], text=[f"<image>{text}"], return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k != "num_patches"}
    with torch.no_grad():
        seq = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, suppress_tokens=[IMAGE_ID])
    P = enc["input_ids"].shape[1]
    gen = seq[0, P:].tolist()
    gen = gen[:gen.index(2) + 1] if 2 in gen else gen
    ids = torch.tensor([enc["input_ids"][0].tolist() + gen])
    with torch.no_grad():
        o = model(input_ids=ids, pixel_values=enc["pixel_values"], attention_mask=torch.ones_like(ids),
                  output_attentions=True)
    return enc, gen, o


def tokens(lake_df, lake, ex):
    return lake_df(lake, f"SELECT * FROM tokens WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])


def lake_attention(lake_df, lake, ex, stream, layer, n, offset=0):
    a = lake_df(lake, f"SELECT head, query_idx, key_idx, weight FROM attention WHERE run = '{RUN}' AND "
                "example_id = ? AND stream = ? AND layer = ?", [ex, stream, layer])
    A = np.zeros((2, n, n), np.float32)
    A[a["head"].to_numpy(), a.query_idx.to_numpy() - offset, a.key_idx.to_numpy() - offset] = a.weight.to_numpy()
    return A


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
        ids = enc["input_ids"][0].tolist()
        P = len(ids)
        W, H = im.size
        rows, cols = SCENES[ex][3]
        crops = expected_crops(W, H, rows, cols)
        assert enc["pixel_values"].shape[0] == len(crops)
        t = tokens(lake_df, lake, ex)
        lm, vis = t[t.stream == "lm"], t[t.stream == "vision"]
        assert list(t.stream) == ["lm"] * len(lm) + ["vision"] * len(vis)
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        assert list(img.seq_pos) == [p for p, i in enumerate(ids) if i == IMAGE_ID]
        assert len(img) == SEQ * len(crops) and set(img.role) == {"patch"}
        # markers: one start and one end; TILE_k before each tile, TILE_GLOBAL before the thumbnail
        assert list(lm.token[lm.role == "vision_start"]) == ["<|START_OF_IMG|>"]
        assert list(lm.token[lm.role == "vision_end"]) == ["<|END_OF_IMG|>"]
        assert list(lm.token[lm.role == "tile_marker"]) == [f"TILE_{k}" for k in range(1, rows * cols + 1)
                                                            if rows * cols > 1]
        assert list(lm.token[lm.role == "global_marker"]) == ["TILE_GLOBAL"]
        tiles = [c[0] for c in crops]
        assert list(img.tile) == [tl for tl in tiles for _ in range(SEQ)]
        for k, p in enumerate(lm.seq_pos[lm.role.isin(["tile_marker", "global_marker"])]):
            assert list(lm.tile.iloc[p + 1:p + 1 + SEQ]) == [tiles[k]] * SEQ
        assert list(zip(img.patch_row, img.patch_col)) == [(r, c) for _ in crops for r in range(POOL)
                                                           for c in range(POOL)]
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert list(txt.token) == proc.tokenizer.convert_ids_to_tokens([i for i in ids if i != IMAGE_ID])
        assert txt.role.iloc[0] == "bos"
        gl = lm[lm.role == "generated"]
        assert len(gen) >= 1 and list(gl.token) == proc.tokenizer.convert_ids_to_tokens(gen)
        # boxes computed here: 2 x 2 blocks of 8 px patches, through the crop's place
        q = PS * SF
        exp = [((ox + c * q) * sx, (oy + r * q) * sy, (ox + (c + 1) * q) * sx, (oy + (r + 1) * q) * sy)
               for _, ox, oy, sx, sy in crops for r in range(POOL) for c in range(POOL)]
        np.testing.assert_allclose(img[["x0", "y0", "x1", "y1"]].to_numpy(float), exp, atol=1e-3)
        # the tower: every crop's 4 x 4 patches, one after another, tiles then the thumbnail
        assert list(vis.seq_pos) == list(range(len(crops) * SIDE * SIDE)) and set(vis.role) == {"patch"}
        assert list(vis.tile) == [tl for tl in tiles for _ in range(SIDE * SIDE)]
        expv = [((ox + c * PS) * sx, (oy + r * PS) * sy, (ox + (c + 1) * PS) * sx, (oy + (r + 1) * PS) * sy)
                for _, ox, oy, sx, sy in crops for r in range(SIDE) for c in range(SIDE)]
        np.testing.assert_allclose(vis[["x0", "y0", "x1", "y1"]].to_numpy(float), expv, atol=1e-3)
        g = img[img.tile == 0]  # the thumbnail covers the whole original
        assert g.x0.min() == pytest.approx(0) and g.x1.max() == pytest.approx(W) and g.y1.max() == pytest.approx(H)


def test_answer_is_generates_own(aya, lake_df):
    mdir, lake, model, proc, images, texts = aya
    ex = lake_df(lake, f"SELECT prediction FROM examples WHERE run = '{RUN}' ORDER BY example_id")
    assert len(ex) == len(SCENES)
    for (im, text), pred in zip(zip(images, texts), ex.prediction):
        _, gen, _ = reference(model, proc, im, text)
        assert pred == proc.tokenizer.decode(gen, skip_special_tokens=True).strip()


def test_lm_attention_is_the_models_own_and_rows_sum_to_one(aya, lake_df):
    mdir, lake, model, proc, images, texts = aya
    for ex in range(len(SCENES)):
        _, gen, o = reference(model, proc, images[ex], texts[ex])
        n = o.attentions[0].shape[-1]
        for layer in range(2):
            A = lake_attention(lake_df, lake, ex, "lm", layer, n)
            np.testing.assert_allclose(A, o.attentions[layer][0].numpy(), atol=2e-3)
            np.testing.assert_allclose(A.sum(-1), 1.0, atol=2e-3)


def test_vision_attention_is_block_diagonal_and_the_towers_own(aya, lake_df):
    mdir, lake, model, proc, images, texts = aya
    for ex in (0, 1):
        enc, _, _ = reference(model, proc, images[ex], texts[ex])
        t = tokens(lake_df, lake, ex)
        lm_n = int((t.stream == "lm").sum())
        C = enc["pixel_values"].shape[0]
        n = SIDE * SIDE
        with torch.no_grad():
            vo = model.model.vision_tower(pixel_values=enc["pixel_values"], output_attentions=True)
        for layer in range(2):
            A = lake_attention(lake_df, lake, ex, "vision", layer, C * n, offset=lm_n)
            np.testing.assert_allclose(A.sum(-1), 1.0, atol=2e-3)
            for k in range(C):
                blk = A[:, k * n:(k + 1) * n, k * n:(k + 1) * n]
                np.testing.assert_allclose(blk, vo.attentions[layer][k].numpy(), atol=2e-3)
                assert A[:, k * n:(k + 1) * n].sum() == pytest.approx(blk.sum(), abs=1e-3)


def test_t2i_of_a_word_by_hand(aya, lake_df):
    """The mass the word 'circle' puts on image tokens, head 1 of the last layer, by hand."""
    mdir, lake, model, proc, images, texts = aya
    _, _, o = reference(model, proc, images[0], texts[0])
    A = o.attentions[1][0, 1].numpy()
    t = tokens(lake_df, lake, 0)
    lm = t[t.stream == "lm"]
    w = int(lm.token_idx[lm.token == "circle"].iloc[0])
    image = lm.token_idx[lm.modality == "image"].to_numpy()
    a = lake_df(lake, f"SELECT key_idx, weight FROM attention WHERE run = '{RUN}' AND example_id = 0 AND "
                "stream = 'lm' AND layer = 1 AND head = 1 AND query_idx = ?", [w])
    mass = a[a.key_idx.isin(image)].weight.sum()
    assert mass == pytest.approx(A[w][image].sum(), abs=2e-3) and mass > 0


def test_app_pages(aya, monkeypatch, raw_df):
    from tests.app.test_app import check_every_page

    lake = aya[1]
    att = sorted(raw_df(lake, "SELECT DISTINCT stream FROM {attention} WHERE run = ?", [RUN]).stream)
    hid = sorted(raw_df(lake, "SELECT DISTINCT stream FROM {hidden_states} WHERE run = ?", [RUN]).stream)
    assert att == hid == ["lm", "vision"]
    examples = raw_df(lake, "SELECT example_id, text, prediction FROM {examples} WHERE run = ? ORDER BY example_id",
                      [RUN])
    check_every_page(lake, monkeypatch, RUN, 0, att, hid, examples, column="prediction")
