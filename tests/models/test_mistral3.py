"""Mistral 3 / Pixtral (``Mistral3ForConditionalGeneration``): token tables, generated answers, attention and
statistics checked against the model itself.

A tiny random model (Pixtral tower: 2 layers, 2 heads, width 32, 4 px patches; Mistral language model:
2 layers, 2 heads, width 32; ``spatial_merge_size`` 2), saved with a word-level tokenizer holding Pixtral's
``[IMG]``/``[IMG_BREAK]``/``[IMG_END]``, a ``PixtralImageProcessorPil`` (longest edge 48 px) and a chat
template. Nothing is downloaded. ``PixtralProcessor`` needs torchvision; without it the adapter assembles
its processor (``test_processor`` checks the expansion). Three images of different sizes (native
resolution: tower grids 10 x 12, 12 x 6 and 4 x 6 patches). Expected values come from the model's own
``generate`` and outputs on one example at a time and from arithmetic on the image sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.models.conformance import extract
from tests.tiny import WORDS, noise_image, noise_scene_rows, word_tokenizer, write_manifest

SPECIAL = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
VOCAB = {"<unk>": 0, **{s: i + 1 for i, s in enumerate(SPECIAL)}}
VOCAB.update({w: len(VOCAB) + i for i, w in enumerate(WORDS)})
PAD, BOS, EOS, INST, INST_END, IMG, BRK, END = (VOCAB[s] for s in SPECIAL)
SUPPRESSED = VOCAB["the"]
PS, M, EDGE = 4, 2, 48
TEMPLATE = ("<s>{% for m in messages %}[INST]{% for c in m['content'] %}{% if c['type'] == 'image' %}[IMG]"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]{% endfor %}")
PROMPT = "<s>[INST]{}{}[/INST]"
SCENES = [((50, 37), "what color is the circle ?", "red"),
          ((30, 70), "is there a red square left of the circle ?", "yes"),
          ((20, 12), "what shape is the blue triangle ?", "triangle")]
GRIDS = [(10, 12), (12, 6), (4, 6)]  # tower grids (rows, cols): each side fit to 48 px, rounded up to 8 px
CIRCLE = [10, 5, 30, 25]


def tokenizer():
    return word_tokenizer(VOCAB, SPECIAL, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left")


def image_processor():
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    return PixtralImageProcessorPil(size={"longest_edge": EDGE}, patch_size=PS * M)


def make_tiny(out, seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    cfg = tf.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, head_dim=16, image_size=EDGE, patch_size=PS),
        text_config=dict(model_type="mistral", vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS),
        image_token_index=IMG, spatial_merge_size=M, vision_feature_layer=-1)
    model = dec.random_model(tf.Mistral3ForConditionalGeneration, cfg, seed)
    dec.sharpen(model.model.language_model.layers)
    dec.sharpen(model.model.vision_tower.transformer.layers, "attention")
    dec.save(model, out, tokenizer(), image_processor(), eos=[EOS, PAD], pad=PAD, suppress=[SUPPRESSED])
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = "PixtralProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor", "patch_size": PS,
                                                           "spatial_merge_size": M}))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


def image_tokens(gh: int, gw: int) -> str:
    """[IMG] x (gw / 2), [IMG_BREAK] after each of the gh / 2 rows, the last [IMG_END] instead."""
    rows = ["[IMG]" * (gw // M) + "[IMG_BREAK]"] * (gh // M)
    return "".join(rows)[:-len("[IMG_BREAK]")] + "[IMG_END]"


class Ref:
    def __init__(self, mdir, lake, model, images):
        self.mdir, self.lake, self.model, self.images = mdir, lake, model, images
        self.tok = tokenizer()
        self.ip = image_processor()
        self._gen: dict[int, tuple] = {}

    def inputs(self, ex: int, extra=()) -> dict:
        px = self.ip(images=[self.images[ex]], return_tensors="pt")
        prompt = PROMPT.format(image_tokens(*GRIDS[ex]), SCENES[ex][1])
        ids = self.tok([prompt], return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, torch.tensor([list(extra)], dtype=ids.dtype)], 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **px}

    def generate(self, ex: int):
        if ex not in self._gen:
            enc = self.inputs(ex)
            with torch.no_grad():
                g = self.model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                        suppress_tokens=sorted({SUPPRESSED, IMG, BRK, END}))
            gen = g[0, enc["input_ids"].shape[1]:].tolist()
            stop = next((i for i, t in enumerate(gen) if t in (EOS, PAD)), None)
            self._gen[ex] = (enc, gen if stop is None else gen[:stop + 1])
        return self._gen[ex]

    @conf.memo  # shared with the conformance suite: the model runs once per example
    def full(self, ex: int, **kw):
        enc, gen = self.generate(ex)
        with torch.no_grad():
            return self.model(**self.inputs(ex, gen), **kw)


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, CIRCLE)


def load(mdir):
    import types

    import transformers as tf

    model = dec.load_eager(tf.Mistral3ForConditionalGeneration, mdir)
    return model, types.SimpleNamespace(tokenizer=tokenizer())


def ref_of(s: conf.Subject) -> Ref:
    if "ref" not in s._refs:
        s._refs["ref"] = Ref(s.mdir, s.lake, s.model, s.images)
    return s._refs["ref"]


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer, teacher-forced attention, and the tower run on the image alone."""
    r = ref_of(s)
    enc, gen = r.generate(ex)
    o = r.full(ex, output_attentions=True)
    with torch.no_grad():
        v = s.model.model.vision_tower(enc["pixel_values"], image_sizes=enc["image_sizes"], output_attentions=True)
    h, w = (x // PS for x in enc["image_sizes"][0].tolist())
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen,
                          patches={"lm": (h // M) * (w // M), "vision": h * w},
                          attentions=dec.attentions(o, v),
                          prediction=r.tok.decode(gen, skip_special_tokens=True).strip())


def _available() -> bool:
    import transformers as tf

    return hasattr(tf, "Mistral3ForConditionalGeneration")


CASES = [conf.FamilyCase(id="mistral3", family="mistral3", run="m3", make_model=make_tiny, rows=scene_rows, load=load,
                         reference=conformance_reference, image_token=IMG, row_atol=5e-3, page_example=1,
                         page_column="text", statistic=("lm", 1, 1, "t2i"),
                         extract=dict(batch_size=2, keep_attention="all", keep_hidden="all", workers=0),
                         crops=("vision",))  # Pixtral packs every image of a batch in one sequence
         ] if _available() else []  # the family fixture says so when it skips


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    import transformers as tf

    if not _available():
        pytest.skip(f"transformers {tf.__version__} has no Mistral3ForConditionalGeneration")
    return ref_of(conf.subject(CASES[0], tmp_path_factory))


def tokens(lake_df, lake, ex):
    return lake_df(lake, "SELECT * FROM tokens WHERE run = 'm3' AND example_id = ? ORDER BY token_idx", [ex])


def attention(lake_df, lake, ex, stream, layer):
    return dec.stored_attention(lake_df, lake, "m3", ex, stream, layer)


def test_registered_and_streams(m3, lake_df):
    from pipeline.models import FAMILIES as REGISTRY
    from pipeline.models.mistral3 import Mistral3Adapter

    assert REGISTRY["mistral3"][2] == "Mistral3Adapter"
    a = load_adapter(str(m3.mdir))
    assert isinstance(a, Mistral3Adapter)
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}
    assert a.model.config.vision_config._attn_implementation == "eager"
    import importlib.util

    from pipeline.models.mistral3 import ImageTextProcessor

    if importlib.util.find_spec("torchvision") is None:  # PixtralProcessor needs it: assembled
        assert isinstance(a.processor, ImageTextProcessor) and a.processor.chat_template == TEMPLATE
    r = lake_df(m3.lake, "SELECT status FROM runs WHERE run = 'm3'")  # family and streams: the conformance suite
    assert r.status.iloc[0] == "complete"


def test_processor(m3):
    """The adapter's processor expands [IMG] as PixtralProcessor does: the model's inputs built here."""
    a = load_adapter(str(m3.mdir))
    texts = [t for _, t, _ in SCENES]
    assert a.prompt(texts[0]) == PROMPT.format("[IMG]", texts[0])
    for ex in range(len(SCENES)):
        enc, _ = a.encode([texts[ex]], [m3.images[ex]])
        want = m3.inputs(ex)
        assert enc["input_ids"].tolist() == want["input_ids"].tolist()
        assert enc["image_sizes"].tolist() == want["image_sizes"].tolist()
        h, w = want["image_sizes"][0].tolist()
        assert (h // PS, w // PS) == GRIDS[ex]
        torch.testing.assert_close(enc["pixel_values"], want["pixel_values"])


def test_token_table(m3, lake_df):
    """lm: the model's own sequence (prompt + answer), image tokens in rows of gw / 2 closed by [IMG_BREAK]
    ([IMG_END] for the last), each image token the box of its 2 x 2 block; vision: every patch, raster order."""
    for ex, ((W, H), _, _) in enumerate(SCENES):
        enc, gen = m3.generate(ex)
        ids = enc["input_ids"][0].tolist() + gen
        t = tokens(lake_df, m3.lake, ex)
        lm, vis = t[t.stream == "lm"], t[t.stream == "vision"]
        gh, gw = GRIDS[ex]
        bh, bw = gh // M, gw // M
        assert len(lm) == len(ids) and list(lm.seq_pos) == list(range(len(ids)))
        img = lm[lm.modality == "image"]
        assert len(img) == bh * bw and set(img.role) == {"patch"}
        assert (lm.role == "img_break").sum() == bh - 1 and (lm.role == "img_end").sum() == 1
        pattern = [r for r in lm.role if r in ("patch", "img_break", "img_end")]
        assert pattern == ((["patch"] * bw + ["img_break"]) * bh)[:-1] + ["img_end"]
        P = enc["input_ids"].shape[1]
        sx, sy = W / gw, H / gh  # original px per tower patch
        assert list(zip(img.patch_row, img.patch_col)) == [(R, C) for R in range(bh) for C in range(bw)]
        want = np.array([[C * M * sx, R * M * sy, (C + 1) * M * sx, (R + 1) * M * sy]
                         for R in range(bh) for C in range(bw)])
        np.testing.assert_allclose(img[["x0", "y0", "x1", "y1"]].to_numpy(float), want, rtol=1e-5)
        assert img.x1.max() == pytest.approx(W) and img.y1.max() == pytest.approx(H)
        assert len(vis) == gh * gw and set(vis.role) == {"patch"}
        assert list(zip(vis.patch_row, vis.patch_col)) == [(r, c) for r in range(gh) for c in range(gw)]
        assert list(vis.seq_pos) == list(range(gh * gw))
        want = np.array([[c * sx, r * sy, (c + 1) * sx, (r + 1) * sy] for r in range(gh) for c in range(gw)])
        np.testing.assert_allclose(vis[["x0", "y0", "x1", "y1"]].to_numpy(float), want, rtol=1e-5)
        assert P == len(enc["input_ids"][0])


def test_answer_is_the_models_greedy_generation(m3, lake_df):
    some = False
    for ex in range(len(SCENES)):
        enc, gen = m3.generate(ex)
        e = lake_df(m3.lake, "SELECT prediction, meta FROM examples WHERE run = 'm3' AND example_id = ?", [ex])
        assert json.loads(e.meta.iloc[0])["generated_tokens"] == len(gen)
        assert SUPPRESSED not in gen and IMG not in gen
        some |= len(gen) >= 2
    assert some


def test_vision_hidden_states_are_the_towers_own(m3, lake_df):
    """The tower run on each image alone: its hidden states = the lake's, cut from the batch's packed
    sequence (its attention likewise: the conformance suite)."""
    for ex in range(len(SCENES)):
        enc = m3.inputs(ex)
        with torch.no_grad():
            o = m3.model.model.vision_tower(enc["pixel_values"], image_sizes=enc["image_sizes"],
                                            output_hidden_states=True)
        h = lake_df(m3.lake, "SELECT h.layer, h.vec FROM hidden_states h JOIN tokens t USING (run, example_id, "
                    "token_idx) WHERE h.run = 'm3' AND h.example_id = ? AND h.stream = 'vision' ORDER BY h.layer, "
                    "h.token_idx", [ex])
        for layer in range(3):
            got = np.stack(h[h.layer == layer].vec.to_list()).astype(np.float32)
            np.testing.assert_allclose(got, o.hidden_states[layer][0].numpy(), atol=3e-2, rtol=2e-2)


def test_t2i_of_a_word_by_hand(m3, lake_df):
    """One head: the mass of the word "circle" on the image tokens, by hand (t2i: the conformance suite)."""
    ex, layer, head = 0, 1, 1
    t = tokens(lake_df, m3.lake, ex)
    lm = t[t.stream == "lm"]
    o = m3.full(ex, output_attentions=True)
    A = o.attentions[layer][0, head].numpy().astype(np.float64)
    image = (lm.modality == "image").to_numpy()
    w = int(lm[lm.token == "circle"].token_idx.iloc[0])
    _, L = attention(lake_df, m3.lake, ex, "lm", layer)
    L = L[:, :len(lm), :len(lm)]  # lm tokens first, in sequence order
    assert L[head, w, image].sum() == pytest.approx(A[w, image].sum(), abs=2e-3)
    assert A[w, image].sum() > 0.01


def test_merged_image_token_is_its_blocks_patches(m3, lake_df):
    """hidden 0 of an LM image token (the model's inputs_embeds) = the projector applied by hand to the last
    tower hidden states of the 2 x 2 patches of its block, read from the lake (unfold's channel order:
    dim-major, then the block's patches in raster order); and = the model's own image features."""
    ex = 1
    lm, last, img = dec.merger_inputs(lake_df, m3.lake, "m3", ex)
    proj = m3.model.model.multi_modal_projector
    with torch.no_grad():
        normed = {k: proj.norm(torch.from_numpy(v)) for k, v in last.items()}
        blocks = torch.stack([torch.stack([normed[(R * M + i, C * M + j)] for i in range(M) for j in range(M)], 1)
                              .reshape(-1) for R, C in zip(img.patch_row.astype(int), img.patch_col.astype(int))])
        want = proj.linear_2(proj.act(proj.linear_1(proj.patch_merger.merging_layer(blocks)))).numpy()
    got = np.stack(img.vec.to_list()).astype(np.float32)
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)
    enc = m3.inputs(ex)
    with torch.no_grad():
        feats = m3.model.model.get_image_features(enc["pixel_values"], enc["image_sizes"],
                                                  vision_feature_layer=-1).pooler_output[0]
    np.testing.assert_allclose(got, feats.numpy(), atol=2e-2, rtol=2e-2)


def test_sdpa_is_refused(m3):
    import transformers as tf

    from pipeline.models.mistral3 import Mistral3Adapter, load_processor

    model = tf.Mistral3ForConditionalGeneration.from_pretrained(m3.mdir, attn_implementation="sdpa")
    with pytest.raises(NotImplementedError, match="eager"):
        Mistral3Adapter(model, load_processor(str(m3.mdir)))


def test_generation_config_is_the_checkpoints_own(m3):
    a = load_adapter(str(m3.mdir))
    gc = a.generation_config()
    assert set(gc.suppress_tokens) == {SUPPRESSED, IMG, BRK, END} and gc.eos_token_id == [EOS, PAD]
    assert gc.max_new_tokens == MAX_NEW_TOKENS and gc.do_sample is False and gc.num_beams == 1


@pytest.mark.parametrize("explain", ["lens", "relevancy", "sinks"])
def test_explain_runs(m3, tmp_path, explain, lake_df):
    """``--explain`` lens (the language model's norm and unembedding), relevancy (each generated token) and
    sinks run on the family and complete."""
    rows = [{"id": "s0", "image": noise_image(SCENES[0][0], seed=0), "text": SCENES[0][1], "answer": SCENES[0][2]}]
    manifest = write_manifest(tmp_path / "data", rows)
    extract(str(m3.mdir), manifest, tmp_path / "lake", "x", batch_size=1, progress=False, workers=0, explain=explain)
    r = lake_df(tmp_path / "lake", "SELECT status FROM runs WHERE run = 'x'")
    assert r.status.iloc[0] == "complete"
