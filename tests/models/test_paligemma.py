"""PaliGemma (decoder LVLM with a prefix-LM mask): token table, prefix/suffix attention, answer and pages.

A tiny random PaliGemmaForConditionalGeneration (SigLIP tower: 32 px images, 8 px patches -> a 4 x 4
grid, 2 layers; Gemma language model: 2 layers, 2 heads) with a PaliGemmaProcessor made of a
SiglipImageProcessorPil and a word-level tokenizer with ``<image>``, all built from files; nothing is
downloaded. Expected values come from the model's own ``generate`` and outputs run without hooks, one
example at a time, never from pipeline code.
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

IMG, PS, G = 32, 8, 4
IMAGE_ID = 4
SCENES = [  # (original size (w, h), question, answer)
    ((32, 32), "what color is the circle ?", "red"),
    ((96, 64), "is there a red square left of the circle ?", "yes"),  # x by 1/3, y by 1/2
    ((40, 80), "how many ?", None),
]


def paligemma_tokenizer():
    """A word-level fast tokenizer with ``<image>`` at IMAGE_ID (no bos added: the processor writes it)."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": IMAGE_ID,
             **{w: i + 5 for i, w in enumerate(WORDS)}}
    tok = word_tokenizer(vocab, ("<image>", "<bos>"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                         padding_side="left")
    return tok, vocab


def make_tiny_paligemma(out, lm: str = "gemma", seed: int = 0):
    """PaliGemma (``lm="gemma"``) or PaliGemma 2 (``"gemma2"``: sliding-window and global layers
    alternate, attention logits soft-capped)."""
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok, vocab = paligemma_tokenizer()
    ip = tf.SiglipImageProcessorPil(size={"height": IMG, "width": IMG})
    ip.image_seq_length = G * G
    proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    vision = dec.tiny_tower("siglip_vision_model", IMG, PS)
    text = dec.tiny_lm("gemma", len(vocab), num_key_value_heads=2, head_dim=16, pad_token_id=0)
    if lm == "gemma2":  # a window shorter than the prompt: the sliding layers' prefix mask is windowed too
        text.update(model_type="gemma2", sliding_window=8, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    text["model_type"] = lm
    cfg = tf.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, projection_dim=32)
    model = dec.random_model(tf.PaliGemmaForConditionalGeneration, cfg, seed)
    dec.sharpen_with_positions(model)
    return dec.save(model, out, proc, pad=0)


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 16, 16])


load = dec.auto_loader("PaliGemmaForConditionalGeneration")


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """The model alone: its prompt ids, greedy answer, teacher-forced attention and tower attention."""
    enc, gen = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    o = teacher_forced(s.model, enc, gen)
    with torch.no_grad():
        v = s.model.model.vision_tower(enc["pixel_values"], output_attentions=True)
    h, w = enc["pixel_values"].shape[-2:]
    n = (h // PS) * (w // PS)
    return conf.Reference(
        ids=enc["input_ids"][0].tolist(), generated=gen, patches={"lm": n, "vision": n},
        attentions=dec.attentions(o, v),
        prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())


CASES = [conf.FamilyCase(id=f"paligemma-{lm}", family="paligemma", run="pg",
                         make_model=lambda out, lm=lm: make_tiny_paligemma(out, lm), rows=scene_rows, load=load,
                         reference=conformance_reference, image_token=IMAGE_ID, statistic=("lm", 1, 1, "t2i"),
                         page_example=1)
         for lm in ("gemma", "gemma2")]


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def pg(request, tmp_path_factory):
    """(model dir, lake root, reference model, processor, images, texts) of PaliGemma / PaliGemma 2; the
    lake is the conformance suite's."""
    return dec.parts(conf.subject(CASES[["gemma", "gemma2"].index(request.param)], tmp_path_factory))


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    """The model alone on one example: its inputs and its own greedy answer (checkpoint's config)."""
    enc = proc(images=[image], text=[f"<image>{text}"], return_tensors="pt")
    enc.pop("labels")
    return enc, dec.greedy(model, enc, MAX_NEW_TOKENS, [IMAGE_ID])


@conf.memo  # shared with the conformance suite: the model runs once per example
def teacher_forced(model, enc, gen):
    """The teacher-forced pass by transformers alone: prefix token_type_ids 0, answer 1."""
    ids = torch.cat([enc["input_ids"], torch.tensor([gen])], 1)
    tt = torch.cat([enc["token_type_ids"], torch.ones(1, len(gen), dtype=torch.long)], 1)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=enc["pixel_values"], token_type_ids=tt,
                     attention_mask=torch.ones_like(ids), output_attentions=True)


def tokens(lake_df, lake, ex):
    return lake_df(lake, "SELECT * FROM tokens WHERE run = 'pg' AND example_id = ? ORDER BY token_idx", [ex])


def lm_attention(lake_df, lake, ex, layer, n):
    a = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = 'pg' AND "
                "example_id = ? AND stream = 'lm' AND layer = ?", [ex, layer])
    return dec.square(a, n)


def test_registered_and_streams(pg):
    from pipeline.models import FAMILIES

    mdir = pg[0]
    assert FAMILIES["paligemma"][0] == "paligemma"
    a = load_adapter(str(mdir))
    assert a.family == "paligemma"
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}
    assert a.model.config.text_config._attn_implementation == "eager"


def test_token_table_matches_the_models_inputs(pg, lake_df):
    mdir, lake, model, proc, images, texts = pg
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen = reference(model, proc, im, text)
        ids, P = dec.prompt(enc)
        assert ids[:G * G] == [IMAGE_ID] * (G * G) and ids[G * G] == 1  # image tokens first, then bos
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        img = lm[lm.modality == "image"]
        assert list(img.seq_pos) == list(range(G * G)) and set(img.role) == {"patch"}
        assert list(zip(img.patch_row, img.patch_col)) == [(r, c) for r in range(G) for c in range(G)]
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert txt.role.iloc[0] == "bos" and set(txt.role.iloc[1:]) == {"word"}
        gl = lm[lm.role == "generated"]
        assert len(gen) >= 1 and len(gl) == len(gen)  # their pieces and places: the conformance suite
        assert list(vis.role) == ["patch"] * (G * G)  # SigLIP: no CLS
        assert list(vis.seq_pos) == list(range(G * G))
        # boxes, computed here: SigLIP resizes each axis to 32 px, so patch (r, c) covers
        # x c*8/sx .. (c+1)*8/sx with sx = 32 / W (likewise y)
        W, H = im.size
        exp = np.array([[c * PS * W / IMG, r * PS * H / IMG, (c + 1) * PS * W / IMG, (r + 1) * PS * H / IMG]
                        for r in range(G) for c in range(G)])
        for part in (img, vis):
            np.testing.assert_allclose(part[["x0", "y0", "x1", "y1"]].to_numpy(float), exp, atol=1e-4)


def test_prefix_bidirectional_suffix_causal_and_equal_to_the_models_own(pg, lake_df):
    """The lake's lm attention = the model's own on the same teacher-forced inputs (token_type_ids:
    prefix 0, answer 1); prefix rows see the whole prefix and no answer token, answer rows every earlier
    token; each row sums to 1 over its visible keys, masked keys are 0."""
    mdir, lake, model, proc, images, texts = pg
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen = reference(model, proc, im, text)
        P = enc["input_ids"].shape[1]
        n = P + len(gen)
        o = teacher_forced(model, enc, gen)
        tc = model.config.text_config
        for layer in range(2):
            # PaliGemma 2's sliding layers: the answer sees the last `sliding_window` tokens, the
            # prefix still the whole prefix (its block overrides the window)
            window = tc.sliding_window if (getattr(tc, "layer_types", None) or [""] * 2)[layer] == \
                "sliding_attention" else n
            visible = np.zeros((n, n), bool)
            visible[:P, :P] = True
            for q in range(P, n):
                visible[q, max(0, q - window + 1):q + 1] = True
            A = lm_attention(lake_df, lake, ex, layer, n)
            np.testing.assert_allclose(A, o.attentions[layer][0].numpy(), atol=2e-3)
            np.testing.assert_allclose((A * visible).sum(-1), 1.0, atol=1e-3)
            assert np.abs(A[:, ~visible]).max() < 1e-6
            assert (o.attentions[layer][0].numpy()[:, visible] > 0).all()  # the model's visible keys: all > 0
            assert A[:, :G * G, G * G:P].sum(-1).min() > 0  # every image token sees the later prompt tokens


def test_t2i_of_a_word_by_hand(pg, lake_df):
    """One head's t2i from the model's own attention: text queries (prompt words see the image
    bidirectionally, answer tokens causally) summed over image keys."""
    mdir, lake, model, proc, images, texts = pg
    ex, layer, head = 1, 1, 1
    enc, gen = reference(model, proc, images[ex], texts[ex])
    o = teacher_forced(model, enc, gen)
    A = o.attentions[layer][0, head].numpy().astype(np.float64)
    lm = tokens(lake_df, lake, ex)
    lm = lm[lm.stream == "lm"]
    text = (lm.modality == "text").to_numpy()
    image = (lm.modality == "image").to_numpy()
    word = int(lm[lm.token == "red"].seq_pos.iloc[0])
    # the word's mass on the image, by hand from its row
    assert A[word, :G * G].sum() == pytest.approx(A[word][image].sum())
    st = lake_df(lake, "SELECT stat, value FROM head_stats WHERE run = 'pg' AND example_id = ? AND "
                 "stream = 'lm' AND layer = ? AND head = ?", [ex, layer, head])
    got = dict(zip(st.stat, st.value))
    assert got["i2t"] == pytest.approx(A[image][:, text].sum(1).mean(), abs=2e-4)
    assert A[image][:, text].sum(1).min() > 0  # image tokens see the prompt (bidirectional prefix)
