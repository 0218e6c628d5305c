"""Idefics2 (decoder LVLM whose image tokens are a perceiver resampler's learned latents): what is
particular to it. The conformance suite (tests/models/conformance.py, case ``idefics2``) checks its token table,
every stream's stored weights (the tower's of each image alone, though examples 0 and 1 run padded to one
48 x 48 batch; the perceiver's over the vision tokens then the latents), the t2i statistic, the answer and
every page; here: the streams, the refused image splitting, boundaries, roles and boxes, the perceiver's
key layout, one word's mass on the latents and the perceiver's Attention page.

A tiny random Idefics2ForConditionalGeneration (SigLIP-like tower: 8 px patches, 2 layers; perceiver of
4 latents, 2 layers, 2 heads; Mistral text model, 2 layers) with an Idefics2Processor of the PIL image
processor (shortest edge 24, longest edge 48, padding to the batch's largest image, no splitting) and a
word-level tokenizer, all built from files. Nothing is downloaded. Expected values come from transformers
alone, one example at a time (its own eager weights, and hooks on the perceiver's attention modules), and
from independent arithmetic on the image sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

PS, SHORT, LONG, Q = 8, 24, 48, 4
MARKS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{m: 4 + i for i, m in enumerate(MARKS)}}
VOCAB.update({w: len(VOCAB) + i for i, w in enumerate(WORDS)})
IMAGE_ID, FAKE = VOCAB["<image>"], VOCAB["<fake_token_around_image>"]
SCENES = [  # (original size (w, h), question, answer): batch 1 pads 48x28 and 24x48 to 48x48
    ((50, 30), "what color is the circle ?", "red"),
    ((40, 80), "is there a red square left of the circle ?", "yes"),
    ((20, 20), "how many ?", None),
]
RUN = "idefics2"


def processed(W, H):
    """The processed (w, h), computed here: longest edge down to 48, each side up to 24."""
    w, h = W, H
    if W >= H and W > LONG:
        w, h = LONG, int(LONG / (W / H))
    elif H > W and H > LONG:
        h, w = LONG, int(LONG * (W / H))
    return max(w, SHORT), max(h, SHORT)


def make_tiny(out, seed: int = 0, splitting: bool = False):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(VOCAB, MARKS, bos="<s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         padding_side="left")
    ip = tf.Idefics2ImageProcessorPil(size={"shortest_edge": SHORT, "longest_edge": LONG},
                                      do_image_splitting=splitting)
    vision = dec.tiny_tower(None, 32, PS)
    text = dec.tiny_lm("mistral", len(VOCAB), num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)
    perceiver = dict(resampler_n_latents=Q, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                     num_key_value_heads=1)
    cfg = tf.Idefics2Config(vision_config=vision, text_config=text, perceiver_config=perceiver,
                            image_token_id=IMAGE_ID, pad_token_id=3)
    model = dec.random_model(tf.Idefics2ForConditionalGeneration, cfg, seed)
    m = model.model
    dec.sharpen(list(m.vision_model.encoder.layers) + list(m.text_model.layers)
                + list(m.connector.perceiver_resampler.layers))
    with torch.no_grad():
        m.connector.perceiver_resampler.latents.normal_(0.0, 1.0)  # distinct latents (HF starts them at ones)
    return dec.save(model, out, tf.Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=Q))


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 25, 20])


load = dec.auto_loader("Idefics2ForConditionalGeneration")


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer, and each stream's attention by the model's own modules; the perceiver's
    keys are the vision tokens then the latents (``key_streams``), as transformers concatenates them."""
    enc, gen, o, v, perceiver = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    W, H = s.images[ex].size
    w, h = processed(W, H)
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen,
                          attentions={"lm": [x[0].numpy() for x in o.attentions],
                                      "vision": [x[0].numpy() for x in v.attentions],
                                      "perceiver": [x.numpy() for x in perceiver]},
                          patches={"lm": 0, "vision": (h // PS) * (w // PS), "perceiver": 0},
                          prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())


CASES = [conf.FamilyCase(id="idefics2", family="idefics2", run=RUN, make_model=make_tiny, rows=scene_rows,
                         load=load, reference=conformance_reference, image_token=IMAGE_ID,
                         streams=("lm", "vision", "perceiver"), hidden=("lm", "vision"), page_example=0,
                         key_streams={"perceiver": ("vision", "perceiver")})]


@pytest.fixture(scope="module")
def i2(tmp_path_factory):
    """(model dir, lake root, reference model, processor, images, texts): the conformance suite's lake."""
    return dec.parts(conf.subject(CASES[0], tmp_path_factory))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    """One example alone: its inputs, generated ids, the LM's own attentions, the tower's and the
    perceiver's (hooks on its attention modules: ``[head, Q, patches + Q]`` per layer)."""
    enc = proc(images=[[image]], text=[f"<image>{text}"], return_tensors="pt")
    gen = dec.greedy(model, enc, MAX_NEW_TOKENS, [IMAGE_ID])
    ids = torch.tensor([enc["input_ids"][0].tolist() + gen])
    perceiver = []
    hooks = [l.self_attn.register_forward_hook(lambda m, a, o: perceiver.append(o[1][0].clone()))
             for l in model.model.connector.perceiver_resampler.layers]
    try:
        with torch.no_grad():
            o = model(input_ids=ids, pixel_values=enc["pixel_values"], pixel_attention_mask=enc["pixel_attention_mask"],
                      attention_mask=torch.ones_like(ids), output_attentions=True)
            v = model.model.vision_model(pixel_values=enc["pixel_values"][0], output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return enc, gen, o, v, perceiver


def tokens(lake_df, lake, ex):
    return lake_df(lake, f"SELECT * FROM tokens WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])


def test_registered_and_streams(i2):
    from pipeline.models import FAMILIES

    assert FAMILIES["idefics2"][0] == "idefics2"
    a = load_adapter(str(i2[0]))
    assert type(a).__name__ == "Idefics2Adapter" and a.family == "idefics2"
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "perceiver": {"layers": 2, "heads": 2, "hidden_size": 32}}


def test_image_splitting_is_refused_with_one_line(tmp_path):
    from pipeline.models import ModelLoadError

    mdir = make_tiny(tmp_path / "split", splitting=True)
    with pytest.raises(ModelLoadError, match="do_image_splitting is not supported") as e:
        load_adapter(str(mdir))
    assert "\n" not in str(e.value)


def test_token_table_matches_the_models_inputs(i2, lake_df):
    mdir, lake, model, proc, images, texts = i2
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen, _, _, _ = reference(model, proc, im, text)
        ids, P = dec.prompt(enc)
        t = tokens(lake_df, lake, ex)
        lm, vis, per = (t[t.stream == s] for s in ("lm", "vision", "perceiver"))
        assert list(t.stream) == ["lm"] * len(lm) + ["vision"] * len(vis) + ["perceiver"] * Q
        assert len(lm) == P + len(gen)  # every input and its place: the conformance suite
        img = lm[lm.modality == "image"]
        assert len(img) == Q
        assert set(img.role) == {"query"} and img.patch_row.isna().all() and img.x0.isna().all()
        assert list(lm.seq_pos[lm.role == "image_boundary"]) == [p for p, i in enumerate(ids) if i == FAKE]
        assert (lm.role == "image_boundary").sum() == 2
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert txt.role.iloc[0] == "bos"
        gl = lm[lm.role == "generated"]
        assert len(gen) >= 1 and len(gl) == len(gen)  # their pieces and places: the conformance suite
        # the perceiver's latents: role query, no patch, no box
        assert list(per.role) == ["query"] * Q and list(per.seq_pos) == list(range(Q)) and per.x0.isna().all()
        # the tower's real patches, computed here from the processed size (a stretch, no crop)
        W, H = im.size
        w, h = processed(W, H)
        assert tuple(enc["pixel_values"].shape[-2:]) == (h, w)
        rows, cols = h // PS, w // PS
        assert len(vis) == rows * cols and set(vis.role) == {"patch"}
        assert list(zip(vis.patch_row, vis.patch_col)) == [(r, c) for r in range(rows) for c in range(cols)]
        assert list(vis.seq_pos) == list(range(rows * cols))
        sx, sy = W / w, H / h
        exp = [(c * PS * sx, r * PS * sy, min((c + 1) * PS * sx, W), min((r + 1) * PS * sy, H))
               for r in range(rows) for c in range(cols)]
        np.testing.assert_allclose(vis[["x0", "y0", "x1", "y1"]].to_numpy(float), exp, atol=1e-3)


def test_perceiver_attends_over_patches_then_latents(i2, lake_df):
    """Stream perceiver: rows the latents, keys the vision tokens then the latents (transformers'
    concat(context, latents)); the model's own weights (the suite's reference, checked there against every
    stored weight through ``key_streams``, rows summing to 1) put mass on both kinds of key."""
    s = conf.built(i2[1])
    for ex in range(len(SCENES)):
        own = s.ref(ex).attentions["perceiver"]
        t = tokens(lake_df, i2[1], ex)
        n_vis = int((t.stream == "vision").sum())
        assert len(own) == 2
        for A in own:
            assert A.shape == (2, Q, n_vis + Q)
            assert A[:, :, :n_vis].sum() > 0 and A[:, :, n_vis:].sum() > 0  # both key kinds


def test_t2i_of_a_word_by_hand(i2, lake_df):
    """The mass the word 'circle' puts on the image tokens (the latents), head 1 of the last layer, by
    hand, and the stored t2i of the perceiver (i2i: its queries and keys are all image tokens)."""
    mdir, lake, model, proc, images, texts = i2
    _, _, o, _, _ = reference(model, proc, images[0], texts[0])
    dec.word_t2i_by_hand(lake_df, lake, RUN, o.attentions[1][0, 1].numpy())


def test_perceiver_page(i2, monkeypatch):
    """The Attention page on the perceiver's stream (every page on every stream: the conformance suite)."""
    from tests.app.test_app import open_app

    lake = i2[1]
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=RUN, ex=0, stream="perceiver", layer=1)
    assert not at.exception
