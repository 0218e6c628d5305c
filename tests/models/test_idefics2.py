"""Idefics2 (decoder LVLM whose image tokens are a perceiver resampler's learned latents): token table,
boxes, the perceiver's cross stream over patches and latents, the answer, and attention, checked against
the model's own inputs and outputs.

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

from pipeline.extraction.run import extract
from pipeline.models import load_adapter
from pipeline.models.idefics2 import MAX_NEW_TOKENS
from tests.tiny import WORDS, noise_image, word_tokenizer, write_manifest

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
    vision = dict(image_size=32, patch_size=PS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    text = dict(model_type="mistral", vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=3, sliding_window=None)
    perceiver = dict(resampler_n_latents=Q, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                     num_key_value_heads=1)
    cfg = tf.Idefics2Config(vision_config=vision, text_config=text, perceiver_config=perceiver,
                            image_token_id=IMAGE_ID, pad_token_id=3)
    cfg.vlatlas_random_weights = True
    torch.manual_seed(seed)
    model = tf.Idefics2ForConditionalGeneration(cfg).eval()
    m = model.model
    with torch.no_grad():  # peaked attention, so that a wrong permutation shows
        attn = [l.self_attn for l in list(m.vision_model.encoder.layers) + list(m.text_model.layers)
                + list(m.connector.perceiver_resampler.layers)]
        for a in attn:
            a.q_proj.weight.normal_(0.0, 0.4)
            a.k_proj.weight.normal_(0.0, 0.4)
        m.connector.perceiver_resampler.latents.normal_(0.0, 1.0)  # distinct latents (HF starts them at ones)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 3
    model.save_pretrained(out)
    tf.Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=Q).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def i2(tmp_path_factory):
    import transformers as tf
    from PIL import Image

    tmp = tmp_path_factory.mktemp("idefics2")
    mdir = make_tiny(tmp / "model")
    rows = [{"id": f"s{i}", "image": noise_image(size, seed=i), "text": t, "answer": a}
            for i, (size, t, a) in enumerate(SCENES)]
    rows[0]["boxes"] = [{"label": "circle", "box": [0, 0, 25, 20]}]
    manifest = write_manifest(tmp / "data", rows)
    lake = tmp / "lake"
    extract(str(mdir), manifest, lake, RUN, batch_size=2, keep_attention="all", keep_hidden="all", progress=False)
    model = tf.Idefics2ForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = tf.AutoProcessor.from_pretrained(mdir)
    images = [Image.open(tmp / "data" / "images" / f"s{i}.png").convert("RGB") for i in range(len(SCENES))]
    return mdir, lake, model, proc, images, [t for _, t, _ in SCENES]


def reference(model, proc, image, text):
    """One example alone: its inputs, generated ids, the LM's own attentions, the tower's and the
    perceiver's (hooks on its attention modules: ``[head, Q, patches + Q]`` per layer)."""
    enc = proc(images=[[image]], text=[f"<image>{text}"], return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, suppress_tokens=[IMAGE_ID])
    P = enc["input_ids"].shape[1]
    gen = seq[0, P:].tolist()
    gen = gen[:gen.index(2) + 1] if 2 in gen else gen
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


def lake_attention(lake_df, lake, ex, stream, layer, shape, q_off=0, k_off=0):
    a = lake_df(lake, f"SELECT head, query_idx, key_idx, weight FROM attention WHERE run = '{RUN}' AND "
                "example_id = ? AND stream = ? AND layer = ?", [ex, stream, layer])
    A = np.zeros(shape, np.float32)
    A[a["head"].to_numpy(), a.query_idx.to_numpy() - q_off, a.key_idx.to_numpy() - k_off] = a.weight.to_numpy()
    return A


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
        ids = enc["input_ids"][0].tolist()
        P = len(ids)
        t = tokens(lake_df, lake, ex)
        lm, vis, per = (t[t.stream == s] for s in ("lm", "vision", "perceiver"))
        assert list(t.stream) == ["lm"] * len(lm) + ["vision"] * len(vis) + ["perceiver"] * Q
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        assert list(img.seq_pos) == [p for p, i in enumerate(ids) if i == IMAGE_ID] and len(img) == Q
        assert set(img.role) == {"query"} and img.patch_row.isna().all() and img.x0.isna().all()
        assert list(lm.seq_pos[lm.role == "image_boundary"]) == [p for p, i in enumerate(ids) if i == FAKE]
        assert (lm.role == "image_boundary").sum() == 2
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert list(txt.token) == proc.tokenizer.convert_ids_to_tokens([i for i in ids if i != IMAGE_ID])
        assert txt.role.iloc[0] == "bos"
        gl = lm[lm.role == "generated"]
        assert len(gen) >= 1 and list(gl.token) == proc.tokenizer.convert_ids_to_tokens(gen)
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


def test_answer_is_generates_own(i2, lake_df):
    mdir, lake, model, proc, images, texts = i2
    ex = lake_df(lake, f"SELECT prediction FROM examples WHERE run = '{RUN}' ORDER BY example_id")
    assert len(ex) == len(SCENES)
    for (im, text), pred in zip(zip(images, texts), ex.prediction):
        _, gen, _, _, _ = reference(model, proc, im, text)
        assert pred == proc.tokenizer.decode(gen, skip_special_tokens=True).strip()


def test_lm_attention_is_the_models_own_and_rows_sum_to_one(i2, lake_df):
    mdir, lake, model, proc, images, texts = i2
    for ex in range(len(SCENES)):
        _, gen, o, _, _ = reference(model, proc, images[ex], texts[ex])
        n = o.attentions[0].shape[-1]
        for layer in range(2):
            A = lake_attention(lake_df, lake, ex, "lm", layer, (2, n, n))
            np.testing.assert_allclose(A, o.attentions[layer][0].numpy(), atol=2e-3)
            np.testing.assert_allclose(A.sum(-1), 1.0, atol=2e-3)


def test_vision_attention_is_the_towers_own_without_the_batch_padding(i2, lake_df):
    """Examples 0 and 1 ran padded to one 48 x 48 image; their stored weights are those of each image
    alone (the padded patches masked out), rows summing to 1 over the real patches."""
    mdir, lake, model, proc, images, texts = i2
    for ex in range(len(SCENES)):
        _, _, _, v, _ = reference(model, proc, images[ex], texts[ex])
        t = tokens(lake_df, lake, ex)
        off, n = int((t.stream == "lm").sum()), int((t.stream == "vision").sum())
        for layer in range(2):
            own = v.attentions[layer][0].numpy()  # [head, patch, patch]
            assert own.shape[-1] == n
            A = lake_attention(lake_df, lake, ex, "vision", layer, (2, n, n), off, off)
            np.testing.assert_allclose(A, own, atol=2e-3)
            np.testing.assert_allclose(A.sum(-1), 1.0, atol=2e-3)


def test_perceiver_attention_over_patches_then_latents(i2, lake_df):
    """Stream perceiver: rows the latents, keys the vision tokens then the latents (transformers'
    concat(context, latents)); the model's own weights, rows summing to 1."""
    mdir, lake, model, proc, images, texts = i2
    for ex in range(len(SCENES)):
        _, _, _, _, own = reference(model, proc, images[ex], texts[ex])
        t = tokens(lake_df, lake, ex)
        v_off = int((t.stream == "lm").sum())
        q_off = int(t.token_idx[t.stream == "perceiver"].iloc[0])
        n_keys = len(t) - v_off
        for layer in range(2):
            assert own[layer].shape == (2, Q, n_keys)
            A = lake_attention(lake_df, lake, ex, "perceiver", layer, (2, Q, n_keys), q_off, v_off)
            np.testing.assert_allclose(A, own[layer].numpy(), atol=2e-3)
            np.testing.assert_allclose(A.sum(-1), 1.0, atol=2e-3)
            assert A[:, :, :q_off - v_off].sum() > 0 and A[:, :, q_off - v_off:].sum() > 0  # both key kinds


def test_t2i_of_a_word_by_hand(i2, lake_df):
    """The mass the word 'circle' puts on the image tokens (the latents), head 1 of the last layer, by
    hand, and the stored t2i of the perceiver (i2i: its queries and keys are all image tokens)."""
    mdir, lake, model, proc, images, texts = i2
    _, _, o, _, _ = reference(model, proc, images[0], texts[0])
    A = o.attentions[1][0, 1].numpy()
    t = tokens(lake_df, lake, 0)
    lm = t[t.stream == "lm"]
    w = int(lm.token_idx[lm.token == "circle"].iloc[0])
    image = lm.token_idx[lm.modality == "image"].to_numpy()
    a = lake_df(lake, f"SELECT key_idx, weight FROM attention WHERE run = '{RUN}' AND example_id = 0 AND "
                "stream = 'lm' AND layer = 1 AND head = 1 AND query_idx = ?", [w])
    mass = a[a.key_idx.isin(image)].weight.sum()
    assert mass == pytest.approx(A[w][image].sum(), abs=2e-3) and mass > 0


def test_app_pages(i2, monkeypatch, raw_df):
    from tests.app.test_app import check_every_page, open_app

    lake = i2[1]
    att = sorted(raw_df(lake, "SELECT DISTINCT stream FROM {attention} WHERE run = ?", [RUN]).stream)
    hid = sorted(raw_df(lake, "SELECT DISTINCT stream FROM {hidden_states} WHERE run = ?", [RUN]).stream)
    assert att == ["lm", "perceiver", "vision"] and hid == ["lm", "vision"]
    examples = raw_df(lake, "SELECT example_id, text, prediction FROM {examples} WHERE run = ? ORDER BY example_id",
                      [RUN])
    check_every_page(lake, monkeypatch, RUN, 0, att, hid, examples, column="prediction")
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=RUN, ex=0, stream="perceiver", layer=1)
    assert not at.exception
