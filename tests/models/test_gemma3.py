"""Gemma 3 (decoder LVLM): token table, pooled image tokens, sliding-window and bidirectional image
attention, and the answer, checked against the model's own outputs.

A tiny random Gemma3ForConditionalGeneration (SigLIP tower: 32 px images, 4 px patches -> an 8 x 8
grid, 2 layers; ``mm_tokens_per_image`` 4, so one language-model image token pools a 4 x 4 block of
patches; Gemma 3 text model: 2 layers, one sliding (window 4, shorter than every sequence) and one
global) with a Gemma3Processor of a PIL image processor and a word-level tokenizer, all built from
files; nothing is downloaded. Expected values come from transformers alone, one example at a time.

Pan-and-scan: the same tiny model saved with an image processor that has ``do_pan_and_scan`` (crops
of at least 8 px, aspect ratio 1.2 or more), over a wide, a tall and a square image in one batch
(3, 2 and no crops); the crops' places are written out here from transformers' ``pan_and_scan``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models.test_llava import assert_rows_as_generated
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_image, noise_scene_rows, word_tokenizer

IMG, PS, MM, WINDOW = 32, 4, 4, 4
GRID, POOLED, K = IMG // PS, 2, 4  # tower grid 8 x 8, lm image tokens 2 x 2, block 4 x 4 patches
BOI, IMAGE_ID, EOI = 4, 5, 6
SCENES = [  # (original size (w, h), question, answer)
    ((32, 32), "what color is the circle ?", "red"),
    ((96, 64), "is there a red square left of the circle ?", "yes"),
    ((40, 80), "how many ?", None),
]


def gemma3_tokenizer():
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3, "<start_of_image>": BOI, "<image_soft_token>": IMAGE_ID,
             "<end_of_image>": EOI, **{w: i + 7 for i, w in enumerate(WORDS)}}
    tok = word_tokenizer(
        vocab, ("<start_of_image>", "<image_soft_token>", "<end_of_image>"), bos="<bos>", bos_token="<bos>",
        eos_token="<eos>", pad_token="<pad>", padding_side="left", extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                                                   "eoi_token": "<end_of_image>"})
    return tok, vocab


def make_tiny_gemma3(out, seed: int = 0, **image_processor):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok, vocab = gemma3_tokenizer()
    ip = tf.Gemma3ImageProcessorPil(size={"height": IMG, "width": IMG}, **image_processor)
    proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=MM)
    vision = dec.tiny_tower("siglip_vision_model", IMG, PS)
    text = dec.tiny_lm(None, len(vocab), num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                       layer_types=["sliding_attention", "full_attention"])
    cfg = tf.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=MM, boi_token_index=BOI,
                          eoi_token_index=EOI, image_token_index=IMAGE_ID)
    model = dec.random_model(tf.Gemma3ForConditionalGeneration, cfg, seed)
    dec.sharpen(dec.tower_and_lm(model))
    return dec.save(model, out, proc)


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 16, 16])


load = dec.auto_loader("Gemma3ForConditionalGeneration")


def conformance_reference(s: conf.Subject, ex: int, **kw) -> conf.Reference:
    """The model alone: prompt ids, greedy answer, teacher-forced attention; the tower's own attention
    run on the processor's pixel_values, the whole image then each crop (``kw``: the processor's
    keywords, pan-and-scan), crops never seeing each other."""
    enc, gen, o = reference(s.model, s.proc, s.images[ex], s.texts[ex], **kw)
    crops, _, h, w = enc["pixel_values"].shape
    with torch.no_grad():
        v = s.model.model.vision_tower(enc["pixel_values"], output_attentions=True)
    att = dec.attentions(o, v, tiled=True)
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen, attentions=att,
                          patches={"lm": crops * MM, "vision": crops * (h // PS) * (w // PS)},
                          prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(model dir, lake root, reference model, processor, images, texts); the conformance suite's lake."""
    return dec.parts(conf.subject(CASES[0], tmp_path_factory))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text, **kw):
    """The model alone on one example: its inputs, its greedy answer (cut after eos), and the
    teacher-forced pass over prompt + answer with attentions (``kw``: the processor's keywords)."""
    enc = proc(images=[image], text=[f"<start_of_image> {text}"], return_tensors="pt", **kw)
    gen = dec.greedy(model, enc, MAX_NEW_TOKENS, [IMAGE_ID])
    ids = torch.tensor([enc["input_ids"][0].tolist() + gen])
    tt = torch.cat([enc["token_type_ids"], torch.zeros((1, len(gen)), dtype=torch.long)], dim=1)
    with torch.no_grad():
        o = model(input_ids=ids, pixel_values=enc["pixel_values"], token_type_ids=tt,
                  attention_mask=torch.ones_like(ids), output_attentions=True)
    return enc, gen, o


def tokens(lake_df, lake, ex):
    return lake_df(lake, "SELECT * FROM tokens WHERE run = 'gemma3' AND example_id = ? ORDER BY token_idx", [ex])


def lake_attention(lake_df, lake, ex, stream, layer, n, offset=0):
    a = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = 'gemma3' AND "
                "example_id = ? AND stream = ? AND layer = ?", [ex, stream, layer])
    return dec.square(a, n, offset)


def test_registered_and_streams(gemma3):
    mdir = gemma3[0]
    from pipeline.models import FAMILIES

    assert FAMILIES["gemma3"][0] == "gemma3"
    a = load_adapter(str(mdir))
    assert type(a).__name__ == "Gemma3Adapter" and a.kernel == K
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}


def test_pan_and_scan_off_by_default(gemma3):
    """Without ``do_pan_and_scan`` the adapter passes no pan-and-scan keywords; with it, the image
    processor's settings, the processor's defaults where it sets none."""
    from transformers import AutoProcessor

    from pipeline.models.gemma3 import Gemma3Adapter

    mdir, _, model, *_ = gemma3
    proc = AutoProcessor.from_pretrained(mdir)
    assert Gemma3Adapter(model, proc).pan_and_scan is None
    proc.image_processor.do_pan_and_scan = True
    proc.image_processor.pan_and_scan_min_crop_size = 8
    assert Gemma3Adapter(model, proc).pan_and_scan == {
        "do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2}


def test_token_table_matches_the_models_inputs(gemma3, lake_df):
    mdir, lake, model, proc, images, texts = gemma3
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen, _ = reference(model, proc, im, text)
        ids, P = dec.prompt(enc)
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        assert list(img.seq_pos) == [p for p, i in enumerate(ids) if i == IMAGE_ID] and len(img) == MM
        assert set(img.role) == {"patch"}
        assert list(zip(img.patch_row, img.patch_col)) == [(r, c) for r in range(POOLED) for c in range(POOLED)]
        # the markers around the image have roles of their own
        boi, eoi = ids.index(BOI), ids.index(EOI)
        assert lm.role.iloc[boi] == "vision_start" and lm.role.iloc[eoi] == "vision_end"
        assert eoi == boi + MM + 1 and list(img.seq_pos) == list(range(boi + 1, eoi))
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert txt.role.iloc[0] == "bos"
        gl = lm[lm.role == "generated"]
        assert len(gen) >= 2 and len(gl) == len(gen)  # their pieces and places: the conformance suite
        # the tower: 8 x 8 patches in raster order, no CLS
        assert list(zip(vis.patch_row, vis.patch_col)) == [(r, c) for r in range(GRID) for c in range(GRID)]
        assert list(vis.seq_pos) == list(range(GRID * GRID)) and set(vis.role) == {"patch"}
        # boxes, computed here: the processor resizes W x H to 32 x 32 (no crop, aspect not kept)
        W, H = im.size
        sx, sy = W / IMG, H / IMG
        exp_lm = [(c * K * PS * sx, r * K * PS * sy, (c + 1) * K * PS * sx, (r + 1) * K * PS * sy)
                  for r in range(POOLED) for c in range(POOLED)]
        np.testing.assert_allclose(img[["x0", "y0", "x1", "y1"]].to_numpy(float), exp_lm, atol=1e-3)
        exp_vis = [(c * PS * sx, r * PS * sy, (c + 1) * PS * sx, (r + 1) * PS * sy)
                   for r in range(GRID) for c in range(GRID)]
        np.testing.assert_allclose(vis[["x0", "y0", "x1", "y1"]].to_numpy(float), exp_vis, atol=1e-3)
        # an lm image token's box is the union of its block's tower patches
        vb = vis[["x0", "y0", "x1", "y1"]].to_numpy(float).reshape(GRID, GRID, 4)
        block = vb[K:2 * K, 0:K]  # pooled token (1, 0)
        assert img[["x0", "y0", "x1", "y1"]].to_numpy(float)[2] == pytest.approx(
            [block[..., 0].min(), block[..., 1].min(), block[..., 2].max(), block[..., 3].max()])


def visible(lm, n, sliding: bool) -> np.ndarray:
    """[query, key] which keys a query sees, computed here: causal, or both in the image block;
    a sliding layer keeps only keys less than WINDOW positions away."""
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    img = (lm.modality == "image").to_numpy()
    vis = (k <= q) | (img[:, None] & img[None, :])
    if sliding:
        vis &= np.abs(q - k) < WINDOW
    return vis


def test_lm_attention_is_the_models_own_sliding_and_bidirectional(gemma3, lake_df):
    mdir, lake, model, proc, images, texts = gemma3
    for ex, (im, text) in enumerate(zip(images, texts)):
        _, gen, o = reference(model, proc, im, text)
        lm = tokens(lake_df, lake, ex).query("stream == 'lm'")
        n = len(lm)
        assert n > WINDOW + 2
        for layer, sliding in ((0, True), (1, False)):
            A = lake_attention(lake_df, lake, ex, "lm", layer, n)
            np.testing.assert_allclose(A, o.attentions[layer][0].numpy(), atol=2e-3)
            vis = visible(lm, n, sliding)
            np.testing.assert_allclose(np.where(vis, A, 0).sum(-1), 1.0, atol=1e-3)  # over the visible keys
            assert np.abs(np.where(vis, 0, A)).max() < 1e-6  # nothing elsewhere
            img = np.flatnonzero((lm.modality == "image").to_numpy())
            assert (A[:, img[0], img[-1]] > 0).all()  # the first image token sees the last: bidirectional
            if sliding:
                last = n - 1
                assert np.abs(A[:, last, :last - WINDOW + 1]).max() < 1e-6 and (A[:, last, last - WINDOW + 1:] > 0).all()
            else:
                assert (A[:, n - 1, :] > 0).all()  # a global layer: the last token sees every token


def test_lm_hidden_state_0_is_the_pooled_image_feature(gemma3, lake_df):
    mdir, lake, model, proc, images, texts = gemma3
    ex = 2
    enc = proc(images=[images[ex]], text=[f"<start_of_image> {texts[ex]}"], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(enc["pixel_values"]).pooler_output[0]  # [MM, dim]
    h = lake_df(lake, "SELECT t.modality, t.patch_row, t.patch_col, h.vec FROM hidden_states h JOIN tokens t "
                "USING (run, example_id, token_idx) WHERE h.run = 'gemma3' AND h.example_id = ? AND h.stream = 'lm' "
                "AND h.layer = 0 ORDER BY h.token_idx", [ex])
    img = h[h.modality == "image"]
    k = (img.patch_row * POOLED + img.patch_col).astype(int).to_numpy()
    np.testing.assert_allclose(np.stack(img.vec.to_list()).astype(np.float32), feats.numpy()[k], atol=2e-2, rtol=2e-2)


def test_t2i_by_hand(gemma3, lake_df):
    """t2i/i2t of one head, and one word's weight on the image tokens, by hand from the model's own
    attention: 0 in the sliding layer (the image is outside the word's window), not in the global one."""
    mdir, lake, model, proc, images, texts = gemma3
    ex, head = 1, 1
    _, gen, o = reference(model, proc, images[ex], texts[ex])
    lm = tokens(lake_df, lake, ex).query("stream == 'lm'")
    text, image = (lm.modality == "text").to_numpy(), (lm.modality == "image").to_numpy()
    w = int(np.flatnonzero((lm.token == "circle").to_numpy())[0])
    for layer in (0, 1):
        A = o.attentions[layer][0, head].numpy().astype(np.float64)
        st = lake_df(lake, "SELECT stat, value FROM head_stats WHERE run = 'gemma3' AND example_id = ? AND "
                     "stream = 'lm' AND layer = ? AND head = ?", [ex, layer, head])
        got = dict(zip(st.stat, st.value))
        assert got["t2i"] == pytest.approx(A[text][:, image].sum(1).mean(), abs=2e-4)
        assert got["i2t"] == pytest.approx(A[image][:, text].sum(1).mean(), abs=2e-4)
        word = A[w, image].sum()
        assert (word == pytest.approx(0.0, abs=1e-7)) if layer == 0 else word > 0
        assert word == pytest.approx(lake_attention(lake_df, lake, ex, "lm", layer, len(lm))[head, w, image].sum(),
                                     abs=1e-4)


def test_lm_attention_equals_generates_own(gemma3, lake_df):
    """Teacher forcing reproduces generation: prompt rows = generate's prefill step, the row of
    generated token s = generate's step s + 1; in the sliding layer that step sees only the last
    WINDOW keys (its cache holds no more), and the lake's row is 0 before them."""
    mdir, lake, model, proc, images, texts = gemma3
    ex = 1
    enc = proc(images=[images[ex]], text=[f"<start_of_image> {texts[ex]}"], return_tensors="pt")
    g = dec.generate_with_attentions(model, enc, MAX_NEW_TOKENS, [IMAGE_ID])
    P = enc["input_ids"].shape[1]
    n = int((tokens(lake_df, lake, ex).stream == "lm").sum())
    assert n - P >= 2
    for layer in range(2):
        assert_rows_as_generated(lake_attention(lake_df, lake, ex, "lm", layer, n), g, layer, P)
        for s in range(1, min(len(g.attentions), n - P + 1)):  # the keys each step saw
            assert g.attentions[s][layer].shape[-1] == (WINDOW if layer == 0 else P + s)


def test_chat_template_prompt_has_one_bos(gemma3):
    """A Gemma-style chat template writes ``<bos>`` itself; the encoded prompt has it once."""
    from transformers import AutoProcessor

    from pipeline.models.gemma3 import Gemma3Adapter

    mdir, _, model, _, images, _ = gemma3
    proc = AutoProcessor.from_pretrained(mdir)
    proc.chat_template = ("{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}"
                          "{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }}{% endif %}"
                          "{% endfor %}{% endfor %}")
    a = Gemma3Adapter(model, proc)
    assert a.prompt("how many ?") == "<bos><start_of_image> how many ?"
    inputs, _ = a.encode(["how many ?"], [images[0]])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(1) == 1 and ids[0] == 1 and ids.count(IMAGE_ID) == MM
    assert inputs["token_type_ids"][0].tolist() == [int(i == IMAGE_ID) for i in ids]


# -- pan-and-scan ---------------------------------------------------------------------------------
PAS = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 4,
       "pan_and_scan_min_ratio_to_activate": 1.2}
PAS_SCENES = [  # (original size (w, h), question, answer): 3, 2 and no crops
    ((100, 32), "what color is the circle ?", "red"),
    ((32, 75), "how many ?", None),
    ((32, 32), "is there a red square left of the circle ?", "yes"),
]


def pas_crops(W: int, H: int) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, w, h)`` of each pan-and-scan crop of a ``W x H`` image, written out here from
    transformers' ``Gemma3ImageProcessor.pan_and_scan``: ``n`` crops along the long side (``n`` the
    aspect ratio rounded half up, at most ``W // min_crop_size``, within ``[2, max_num_crops]``), each
    ``ceil(side / n)`` long, the last one cut at the image's edge; none below the ratio or the size."""
    long_, short = max(W, H), min(W, H)
    if long_ / short < PAS["pan_and_scan_min_ratio_to_activate"]:
        return []
    n = min(int(long_ // PAS["pan_and_scan_min_crop_size"]), math.floor(long_ / short + 0.5))
    n = min(PAS["pan_and_scan_max_num_crops"], max(2, n))
    nw, nh = (n, 1) if W >= H else (1, n)
    cw, ch = math.ceil(W / nw), math.ceil(H / nh)
    if min(cw, ch) < PAS["pan_and_scan_min_crop_size"]:
        return []
    return [(x, y, min(cw, W - x), min(ch, H - y)) for y in range(0, nh * ch, ch) for x in range(0, nw * cw, cw)]


def test_pas_crops_formula():
    assert pas_crops(100, 32) == [(0, 0, 34, 32), (34, 0, 34, 32), (68, 0, 32, 32)]
    assert pas_crops(32, 75) == [(0, 0, 32, 38), (0, 38, 32, 37)]
    assert pas_crops(32, 32) == [] and pas_crops(38, 32) == []  # ratio 1.19: no crops


def pas_rows(mdir=None) -> list[dict]:
    return [{"id": f"s{i}", "image": noise_image(size, seed=10 + i), "text": t, "answer": a}
            for i, (size, t, a) in enumerate(PAS_SCENES)]


CASES = [
    conf.FamilyCase(id="gemma3", family="gemma3", run="gemma3", make_model=make_tiny_gemma3, rows=scene_rows,
                    load=load, reference=conformance_reference, image_token=IMAGE_ID, page_example=1),
    conf.FamilyCase(id="gemma3-pan-and-scan", family="gemma3", run="gemma3",
                    make_model=lambda out: make_tiny_gemma3(out, **PAS), rows=pas_rows, load=load,
                    reference=lambda s, ex: conformance_reference(s, ex, **PAS), image_token=IMAGE_ID,
                    extract=dict(batch_size=3, keep_attention="all", keep_hidden="all"),  # one batch: 3, 2, 0 crops
                    page_example=0, crops=("vision",)),  # a wide image cut into crops: the tower runs them
]


@pytest.fixture(scope="module")
def gemma3_pas(tmp_path_factory):
    """(model dir, lake root, reference model, processor, images, texts) with pan-and-scan on."""
    s = conf.subject(CASES[1], tmp_path_factory)
    assert s.proc.image_processor.do_pan_and_scan
    return s.mdir, s.lake, s.model, s.proc, s.images, s.texts


def crop_rect(im, tile: int) -> tuple[int, int, int, int]:
    """``(x0, y0, w, h)`` of tile ``tile``: 0 the whole image, ``k`` pan-and-scan crop ``k``."""
    W, H = im.size
    return (0, 0, W, H) if tile == 0 else pas_crops(W, H)[tile - 1]


def test_pas_token_table_matches_the_models_inputs(gemma3_pas, lake_df):
    mdir, lake, model, proc, images, texts = gemma3_pas
    assert [len(pas_crops(*im.size)) for im in images] == [3, 2, 0]
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen, _ = reference(model, proc, im, text, **PAS)
        n_crops = len(pas_crops(*im.size))
        assert enc["pixel_values"].shape[0] == 1 + n_crops  # the whole image, then its crops
        ids, P = dec.prompt(enc)
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        # 1 + n_crops image blocks, in order: the whole image (tile 0), then crop k (tile k)
        assert ids.count(BOI) == ids.count(EOI) == 1 + n_crops
        img = lm[lm.modality == "image"]
        assert list(img.seq_pos) == [p for p, i in enumerate(ids) if i == IMAGE_ID]
        assert len(img) == (1 + n_crops) * MM and set(img.role) == {"patch"}
        assert list(img.tile) == [k for k in range(1 + n_crops) for _ in range(MM)]
        assert list(zip(img.patch_row, img.patch_col)) == [(r, c) for _ in range(1 + n_crops)
                                                           for r in range(POOLED) for c in range(POOLED)]
        boi = [p for p, i in enumerate(ids) if i == BOI]
        eoi = [p for p, i in enumerate(ids) if i == EOI]
        assert set(lm.role.iloc[boi]) == {"vision_start"} and set(lm.role.iloc[eoi]) == {"vision_end"}
        for k, (a, b) in enumerate(zip(boi, eoi)):  # block k lies between its markers
            assert b == a + MM + 1 and set(img[img.tile == k].seq_pos) == set(range(a + 1, b))
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert txt.tile.isna().all()
        gl = lm[lm.role == "generated"]
        assert len(gen) >= 1 and len(gl) == len(gen)  # their pieces and places: the conformance suite
        # the tower: every crop's 8 x 8 patches one after another, whole image first
        assert len(vis) == (1 + n_crops) * GRID * GRID and list(vis.seq_pos) == list(range(len(vis)))
        assert list(vis.tile) == [k for k in range(1 + n_crops) for _ in range(GRID * GRID)]
        assert list(zip(vis.patch_row, vis.patch_col)) == [(r, c) for _ in range(1 + n_crops)
                                                           for r in range(GRID) for c in range(GRID)]


def test_pas_crops_are_the_processors_own(gemma3_pas):
    """The crops written out here are the ones the processor cut: each pixel_values crop is that
    rectangle of the original, resized alone."""
    mdir, lake, model, proc, images, texts = gemma3_pas
    for im, text in zip(images, texts):
        enc = proc(images=[im], text=[f"<start_of_image> {text}"], return_tensors="pt", **PAS)
        for k in range(enc["pixel_values"].shape[0]):
            x0, y0, w, h = crop_rect(im, k)
            alone = proc.image_processor(images=[im.crop((x0, y0, x0 + w, y0 + h))], do_pan_and_scan=False,
                                         return_tensors="pt")["pixel_values"][0]
            np.testing.assert_allclose(enc["pixel_values"][k].numpy(), alone.numpy(), atol=1e-5)


def test_pas_boxes_are_the_crops_regions(gemma3_pas, lake_df):
    mdir, lake, model, proc, images, texts = gemma3_pas
    for ex, im in enumerate(images):
        t = tokens(lake_df, lake, ex)
        lm, vis = t[(t.stream == "lm") & (t.modality == "image")], t[t.stream == "vision"]
        n_tiles = 1 + len(pas_crops(*im.size))
        assert sorted(set(lm.tile)) == sorted(set(vis.tile)) == list(range(n_tiles))
        for k in range(n_tiles):
            x0, y0, w, h = crop_rect(im, k)
            sx, sy = w / IMG, h / IMG  # the crop is stretched to IMG x IMG
            for part, side, grid in ((lm, K * PS, POOLED), (vis, PS, GRID)):
                got = part[part.tile == k][["x0", "y0", "x1", "y1"]].to_numpy(float)
                exp = [(x0 + c * side * sx, y0 + r * side * sy, x0 + (c + 1) * side * sx, y0 + (r + 1) * side * sy)
                       for r in range(grid) for c in range(grid)]
                np.testing.assert_allclose(got, exp, atol=1e-3)
                # together a tile's tokens cover exactly its crop's rectangle
                np.testing.assert_allclose([got[:, 0].min(), got[:, 1].min(), got[:, 2].max(), got[:, 3].max()],
                                           [x0, y0, x0 + w, y0 + h], atol=1e-3)


def test_pas_lm_hidden_state_0_is_each_crops_pooled_feature(gemma3_pas, lake_df):
    mdir, lake, model, proc, images, texts = gemma3_pas
    ex = 0
    enc = proc(images=[images[ex]], text=[f"<start_of_image> {texts[ex]}"], return_tensors="pt", **PAS)
    with torch.no_grad():
        feats = model.model.get_image_features(enc["pixel_values"]).pooler_output  # [crop, MM, dim]
    h = lake_df(lake, "SELECT t.modality, t.tile, t.patch_row, t.patch_col, h.vec FROM hidden_states h JOIN tokens t "
                "USING (run, example_id, token_idx) WHERE h.run = 'gemma3' AND h.example_id = ? AND h.stream = 'lm' "
                "AND h.layer = 0 ORDER BY h.token_idx", [ex])
    img = h[h.modality == "image"]
    assert len(img) == feats.shape[0] * MM == 4 * MM
    cell = (img.patch_row * POOLED + img.patch_col).astype(int).to_numpy()
    exp = feats.numpy()[img.tile.astype(int).to_numpy(), cell]
    np.testing.assert_allclose(np.stack(img.vec.to_list()).astype(np.float32), exp, atol=2e-2, rtol=2e-2)
