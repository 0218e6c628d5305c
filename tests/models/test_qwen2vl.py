"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (decoder LVLMs with dynamic resolution): token tables, generated
answers, attention, hidden states and statistics checked against the models themselves.

Tiny random models of each family (language model: 2 layers, 2 heads, width 32; vision tower: depth 2,
2 heads, width 32, 4 px patches merged 2 x 2; Qwen2.5-VL: 16 px windows, so layer 0 attends within
windows of 4 x 4 patches and layer 1, its ``fullatt_block_indexes``, over the whole image; Qwen3-VL:
DeepStack at tower layer 0), saved the way released checkpoints are (``preprocessor_config.json``
naming the family's processor, a chat template), with a word-level tokenizer holding Qwen's special
tokens. Nothing is downloaded. transformers cannot build the family's processor without torchvision
(its video processor needs it), so the adapter assembles one from the tokenizer and the PIL image
processor; ``test_processor_is_transformers_own`` checks it against ``Qwen2VLProcessor`` itself.

Images of four sizes (dynamic resolution: grids 10 x 12, 18 x 8, 14 x 16 and 4 x 4 patches, each
image stretched to its own size). Expected values come from the model's own modules, ``generate``
and outputs on one example at a time (no batch padding; the lake is built with batches of 2, padded
on the left), and from independent arithmetic on ``image_grid_thw`` and the image sizes.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from pipeline.models.family import MAX_NEW_TOKENS
from tests.models.test_llava import assert_rows_as_generated
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
VOCAB = {"<unk>": 0, **{s: i + 1 for i, s in enumerate(SPECIAL)}}
VOCAB.update({w: len(VOCAB) + i for i, w in enumerate(WORDS + ["user", "assistant"])})
PAD, IM_START, IM_END, V_START, V_END, IMAGE_ID, VIDEO_ID = (VOCAB[s] for s in SPECIAL)
SUPPRESSED = VOCAB["the"]  # the checkpoint's own generation config suppresses it
PS, M = 4, 2  # patch size, spatial merge size
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
            "{% endif %}{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant "
            "{% endif %}")
PROMPT = "<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>{}<|im_end|> <|im_start|>assistant "
SCENES = [  # (original size (w, h), question, answer)
    ((50, 37), "what color is the circle ?", "red"),
    ((30, 70), "is there a red square left of the circle ?", "yes"),
    ((96, 80), "how many ?", None),  # over max_pixels: scaled down
    ((20, 12), "what shape is the blue triangle ?", "triangle"),  # under min_pixels: scaled up
]
GRIDS = [(10, 12), (18, 8), (14, 16), (4, 4)]  # what smart_resize makes of them (checked below)
CIRCLE = [10, 5, 30, 25]
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def qwen_tokenizer():
    """A word-level fast tokenizer with Qwen's special tokens; ``<|im_end|>`` is its eos, padding on the left."""
    return word_tokenizer(VOCAB, SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left")


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=PS, merge_size=M, temporal_patch_size=2,
                                    size={"shortest_edge": 64, "longest_edge": 64 * 64})


def make_tiny_qwen(out, family: str, seed: int = 0):
    """Save a random-weight model of ``family`` with its tokenizer, image processor and chat template."""
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    text = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=IM_END,
                pad_token_id=PAD, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                   "rope_theta": 10000.0})
    vision = dict(depth=2, num_heads=2, patch_size=PS, spatial_merge_size=M, temporal_patch_size=2)
    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=V_START,
               vision_end_token_id=V_END)
    if family == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(vision_config=dict(vision, embed_dim=32, hidden_size=32, mlp_ratio=2),
                               text_config=text, **ids)
    elif family == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(vision_config=dict(vision, hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                                     window_size=16, fullatt_block_indexes=[1]),
                                  text_config=text, **ids)
    else:
        text = dict(text, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                        "mrope_interleaved": True, "rope_theta": 10000.0})
        cfg = tf.Qwen3VLConfig(vision_config=dict(vision, hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                                  num_position_embeddings=16, deepstack_visual_indexes=[0]),
                               text_config=text, **ids)
    model = dec.random_model(getattr(tf, CLASSES[family]), cfg, seed)
    dec.sharpen(model.model.language_model.layers)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[:64].normal_(0.0, 0.4)  # query and key rows of the fused projection
    dec.save(model, out, qwen_tokenizer(), image_processor(), eos=[IM_END, PAD], pad=PAD, suppress=[SUPPRESSED])
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = "Qwen2VLProcessor" if family == "qwen2_vl" else \
        {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[family]
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


def _available(family: str) -> bool:
    import transformers as tf

    return hasattr(tf, CLASSES[family])


class Ref:
    """The model alone on one example at a time, cached."""

    def __init__(self, family, mdir, lake, model, images):
        self.family, self.mdir, self.lake, self.model, self.images = family, mdir, lake, model, images
        self.tok = qwen_tokenizer()
        self.ip = image_processor()
        self._gen: dict[int, tuple] = {}

    def inputs(self, ex: int, extra: list[int] = ()) -> dict:
        """The model's inputs for example ``ex`` built here: the prompt written out, its one image pad
        expanded to prod(image_grid_thw) / 4 copies, tokens ``extra`` appended (text)."""
        px = self.ip(images=[self.images[ex]], return_tensors="pt")
        n = int(px["image_grid_thw"][0].prod()) // (M * M)
        prompt = PROMPT.format(SCENES[ex][1]).replace("<|image_pad|>", "<|image_pad|>" * n)
        ids = self.tok([prompt], return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, torch.tensor([list(extra)], dtype=ids.dtype)], 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == IMAGE_ID).long(), **px}

    def generate(self, ex: int):
        """(prompt inputs, generated ids up to and including the first eos, generate's output)."""
        if ex not in self._gen:
            enc = self.inputs(ex)
            with torch.no_grad():
                g = self.model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                        suppress_tokens=sorted({SUPPRESSED, IMAGE_ID, VIDEO_ID}),
                                        output_attentions=True, return_dict_in_generate=True)
            gen = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
            stop = next((i for i, t in enumerate(gen) if t in (IM_END, PAD)), None)
            self._gen[ex] = (enc, gen if stop is None else gen[:stop + 1], g)
        return self._gen[ex]

    @conf.memo  # shared with the conformance suite: the model runs once per example
    def full(self, ex: int, **kw):
        """The teacher-forced pass over prompt + answer, by transformers alone."""
        enc, gen, _ = self.generate(ex)
        with torch.no_grad():
            return self.model(**self.inputs(ex, gen), **kw)


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, CIRCLE)


def loader(family: str):
    def load(mdir):
        import types

        import transformers as tf

        model = dec.load_eager(getattr(tf, CLASSES[family]), mdir)
        return model, types.SimpleNamespace(tokenizer=qwen_tokenizer(), image_processor=image_processor())
    return load


def ref_of(s: conf.Subject) -> Ref:
    """The subject's :class:`Ref` (one per case, holding its generations)."""
    if "ref" not in s._refs:
        s._refs["ref"] = Ref(s.case.id, s.mdir, s.lake, s.model, s.images)
    return s._refs["ref"]


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer, teacher-forced attention, and the tower's segments on the diagonal."""
    r = ref_of(s)
    enc, gen, _ = r.generate(ex)
    o = r.full(ex, output_attentions=True)
    vision = []
    for segs in _tower_weights(r, ex):
        n = sum(x.shape[-1] for x in segs)
        full = np.zeros((segs[0].shape[0], n, n), np.float32)  # [head, query, key], zero across windows
        o_ = 0
        for x in segs:
            full[:, o_:o_ + x.shape[-1], o_:o_ + x.shape[-1]] = x.numpy()
            o_ += x.shape[-1]
        vision.append(full)
    n = int(enc["image_grid_thw"][0].prod())
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen, patches={"lm": n // (M * M), "vision": n},
                          attentions={"lm": [x[0].numpy() for x in o.attentions], "vision": vision},
                          prediction=r.tok.decode(gen, skip_special_tokens=True).strip())


# transformers without a class has no case here (the family fixture says so when it skips)
CASES = [conf.FamilyCase(id=family, family=family, run="qwen",
                         make_model=lambda out, family=family: make_tiny_qwen(out, family), rows=scene_rows,
                         load=loader(family), reference=conformance_reference, image_token=IMAGE_ID,
                         extract=dict(batch_size=2, keep_attention="all", keep_hidden="all", workers=0),
                         row_atol=5e-3, page_example=1, crops=("vision",))  # a packed tower: [patches, dim]
         for family in FAMILIES if _available(family)]


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request, tmp_path_factory):
    import transformers as tf

    family = request.param
    if not _available(family):
        pytest.skip(f"transformers {tf.__version__} has no {CLASSES[family]}")
    return ref_of(conf.subject(next(c for c in CASES if c.id == family), tmp_path_factory))


def tokens(lake_df, lake, ex):
    return lake_df(lake, "SELECT * FROM tokens WHERE run = 'qwen' AND example_id = ? ORDER BY token_idx", [ex])


def attention(lake_df, lake, ex, stream, layer):
    """``[head, token, token]`` of one example's stored weights (0 where none is stored)."""
    return dec.stored_attention(lake_df, lake, "qwen", ex, stream, layer)


def tower_positions(ref, grid_thw) -> np.ndarray:
    """``[patches, 2]`` (row, col) of each position of the tower's sequence as its blocks see it, from the
    model's own functions: the rotary position ids, reordered window by window for Qwen2.5-VL."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    pos = get_vision_position_ids(grid_thw, M).numpy()
    vc = ref.model.config.vision_config
    if ref.family == "qwen2_5_vl":
        win, _ = get_vision_window_index(grid_thw, spatial_merge_size=M, window_size=vc.window_size, patch_size=PS)
        pos = pos.reshape(-1, M * M, 2)[win.numpy()].reshape(-1, 2)
    return pos


# -- loading ------------------------------------------------------------------------------------
def test_registered_and_streams(qwen):
    from pipeline.models import FAMILIES as REGISTRY
    from pipeline.models.qwen2vl import ImageTextProcessor, QwenVLAdapter

    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"} <= set(REGISTRY)
    a = load_adapter(str(qwen.mdir))
    assert isinstance(a, QwenVLAdapter) and a.family == qwen.family
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 2, "heads": 2, "hidden_size": 32}}
    assert a.model.config._attn_implementation == "eager"
    assert a.model.config.vision_config._attn_implementation == "eager"
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # transformers cannot build the processor: assembled
        assert isinstance(a.processor, ImageTextProcessor)
        assert a.processor.chat_template == TEMPLATE


def test_run_row(qwen, lake_df):
    """(The family and the streams: the conformance suite.)"""
    r = lake_df(qwen.lake, "SELECT attn_implementation, status FROM runs WHERE run = 'qwen'")
    assert r.attn_implementation.iloc[0] == "eager"
    assert r.status.iloc[0] == "complete"


def test_sdpa_is_refused(qwen):
    import transformers as tf

    from pipeline.models.qwen2vl import QwenVLAdapter, load_processor

    model = getattr(tf, CLASSES[qwen.family]).from_pretrained(qwen.mdir, attn_implementation="sdpa")
    with pytest.raises(NotImplementedError, match="eager"):
        QwenVLAdapter(model, load_processor(str(qwen.mdir)))


@pytest.mark.parametrize("qwen", ["qwen2_vl"], indirect=True)
def test_a_packed_tower_mlp_is_its_own_output(qwen, tmp_path):
    """A tower MLP ([patches, dim] over every image of the batch, packed) captured with batches of 2: at
    every example, each vision token's row is the MLP's own output on that image alone, at its
    ``seq_pos`` (the second image of a batch cut after the first's patches)."""
    from lake.catalog import Catalog

    name = "model.visual.blocks.0.mlp"
    s = conf.built(qwen.lake)
    out = conf.build_lake(s.mdir, s.data / "manifest.jsonl", tmp_path / "lake", s.case, capture_modules=name,
                          keep_attention="none", keep_hidden="all", explain=None)
    got = Catalog(out).df("SELECT a.layer, a.example_id, a.norm, a.vec, t.seq_pos, t.stream FROM activations a "
                          "JOIN tokens t USING (run, example_id, token_idx) WHERE a.run = 'qwen' AND a.module = ?",
                          [name])
    assert set(got.stream) == {"vision"} and set(got.layer) == {0}
    visual = qwen.model.model.visual
    for ex in range(len(qwen.images)):
        enc = qwen.inputs(ex)
        own = []
        h = visual.blocks[0].mlp.register_forward_hook(lambda mod, a, o: own.append(o))
        try:
            with torch.no_grad():
                visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        finally:
            h.remove()
        rows = got[got.example_id == ex].sort_values("seq_pos")
        n = int(enc["image_grid_thw"][0].prod())
        assert own[0].shape[0] == n and list(rows.seq_pos) == list(range(n)), ex  # every patch, once
        want = own[0].numpy()[rows.seq_pos.to_numpy()]
        np.testing.assert_allclose(rows.norm.to_numpy(np.float64), np.linalg.norm(want, axis=1), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(np.stack(rows.vec.to_list()).astype(np.float32), want, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("qwen", ["qwen2_vl"], indirect=True)
def test_a_tower_module_of_fewer_tokens_is_refused(qwen, tmp_path):
    """The merger folds each 2 x 2 block of patches into one row (``[patches / 4, dim]`` over the batch):
    it is not the packed tower's sequence, so it is not regrouped per image but refused with one line
    (the tower's blocks are captured: the conformance suite)."""
    s = conf.built(qwen.lake)
    rows = sum(int(qwen.ip(images=[qwen.images[ex]], return_tensors="pt")["image_grid_thw"][0].prod()) // (M * M)
               for ex in (0, 1))  # the first batch: examples 0 and 1
    with pytest.raises(ValueError) as e:
        conf.build_lake(s.mdir, s.data / "manifest.jsonl", tmp_path / "lake", s.case,
                        capture_modules="model.visual.merger", limit=2, keep_attention="none", keep_hidden="none", explain=None)
    msg = str(e.value)
    assert "\n" not in msg and f"module model.visual.merger outputs shape [{rows}, " in msg, msg
    assert "not one vector per token" in msg


@pytest.mark.parametrize("qwen", ["qwen2_vl"], indirect=True)
def test_processor_is_transformers_own(qwen, monkeypatch):
    """The assembled processor gives exactly what ``Qwen2VLProcessor`` gives for the same prompts and
    images (built here without its video processor, which needs torchvision), and the adapter takes
    either."""
    import transformers as tf
    from transformers.processing_utils import ProcessorMixin

    from pipeline.models.qwen2vl import ImageTextProcessor, QwenVLAdapter

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if arg is None else check(self, name, arg))
    tok = tf.AutoTokenizer.from_pretrained(qwen.mdir)
    ip = tf.AutoImageProcessor.from_pretrained(qwen.mdir)
    theirs = tf.Qwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=TEMPLATE)
    ours = ImageTextProcessor(ip, tok, TEMPLATE)
    texts = [t for _, t, _ in SCENES]
    a_theirs, a_ours = QwenVLAdapter(qwen.model, theirs), QwenVLAdapter(qwen.model, ours)
    assert a_theirs.prompt(texts[0]) == a_ours.prompt(texts[0]) == PROMPT.format(texts[0])
    e1, _ = a_theirs.encode(texts, qwen.images)
    e2, _ = a_ours.encode(texts, qwen.images)
    assert set(e1) == set(e2) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    for k in e1:
        assert torch.equal(torch.as_tensor(e1[k]), torch.as_tensor(e2[k])), k
    # both adapters hook the same model; each captures its own passes, whole
    from pipeline.capture import capture

    caught = []
    for a, enc in ((a_theirs, e1), (a_ours, e2)):
        got = {}
        with capture(a.hook_points(None), lambda p, t: got.__setitem__((p.stream, p.layer, p.kind), t.clone())):
            a.forward(a.prepare(dict(enc)))
        assert len(got) == 2 * (2 + 3)  # per stream: 2 attention layers, 3 hidden states
        caught.append(got)
    for k in caught[0]:
        torch.testing.assert_close(caught[0][k], caught[1][k])


def test_check_image_refuses_what_the_processor_cannot_take(qwen):
    from PIL import Image

    from pipeline.data import BadInput

    a = load_adapter(str(qwen.mdir))
    a.check_image(qwen.images[0])
    with pytest.raises(BadInput, match="aspect ratio"):
        a.check_image(Image.new("RGB", (2010, 10)))


# -- the token table ----------------------------------------------------------------------------
def test_token_table_matches_the_models_inputs(qwen, lake_df):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for ex, ((W, H), _, _) in enumerate(SCENES):
        enc, gen, _ = qwen.generate(ex)
        t = tokens(lake_df, qwen.lake, ex)
        lm, vis = dec.lm_then_vision(t)  # lm first
        # the grid: the image processor's resize to multiples of patch * merge, as image_grid_thw says
        grid = enc["image_grid_thw"][0].tolist()
        rh, rw = smart_resize(H, W, factor=PS * M, min_pixels=64, max_pixels=64 * 64)
        assert grid == [1, rh // PS, rw // PS] and tuple(grid[1:]) == GRIDS[ex]
        gh, gw = grid[1:]
        ids, P = dec.prompt(enc)
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))  # no left pads
        img = lm[lm.modality == "image"]
        pads = [p for p, i in enumerate(ids) if i == IMAGE_ID]
        assert list(img.seq_pos) == pads and len(pads) == gh * gw // (M * M)  # every <|image_pad|>, in order
        assert set(img.role) == {"patch"} and img.token.isna().all() and img.text_pos.isna().all()
        # merged blocks, row-major: the rows and columns of the model's own M-RoPE positions
        mm = enc["mm_token_type_ids"]
        pos, _ = qwen.model.model.get_rope_index(input_ids=enc["input_ids"], mm_token_type_ids=mm,
                                                 image_grid_thw=enc["image_grid_thw"],
                                                 attention_mask=enc["attention_mask"])
        ph, pw = pos[1, 0, pads].numpy(), pos[2, 0, pads].numpy()
        assert list(img.patch_row) == list(ph - ph.min()) and list(img.patch_col) == list(pw - pw.min())
        assert list(zip(img.patch_row, img.patch_col)) == [(r, c) for r in range(gh // M) for c in range(gw // M)]
        # a merged block's box: 2 x 2 patches of the resized image, mapped back by the resize ratio
        sx, sy = rw / W, rh / H
        want = np.array([[c * M * PS / sx, r * M * PS / sy, (c + 1) * M * PS / sx, (r + 1) * M * PS / sy]
                         for r in range(gh // M) for c in range(gw // M)])
        np.testing.assert_allclose(img[["x0", "y0", "x1", "y1"]].to_numpy(float), want, rtol=1e-5)
        assert img.x1.max() == pytest.approx(W) and img.y1.max() == pytest.approx(H)
        # text: the prompt's tokens with their roles, then the generated answer
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        roles = {IM_START: "im_start", IM_END: "im_end", V_START: "vision_start", V_END: "vision_end"}
        assert list(txt.role) == [roles.get(i, "word") for i in ids if i != IMAGE_ID]
        assert lm.seq_pos[lm.role == "vision_start"].tolist() == [pads[0] - 1]
        assert lm.seq_pos[lm.role == "vision_end"].tolist() == [pads[-1] + 1]
        assert list(lm.text_pos.dropna().astype(int)) == list(range(len(lm) - len(img)))
        # the tower: every patch in raster order, at the position its blocks see it
        assert len(vis) == gh * gw and set(vis.role) == {"patch"} and set(vis.modality) == {"image"}
        assert list(zip(vis.patch_row, vis.patch_col)) == [(r, c) for r in range(gh) for c in range(gw)]
        seen = tower_positions(qwen, enc["image_grid_thw"])
        np.testing.assert_array_equal(seen[vis.seq_pos.to_numpy()], vis[["patch_row", "patch_col"]].to_numpy())
        want = np.array([[c * PS / sx, r * PS / sy, (c + 1) * PS / sx, (r + 1) * PS / sy]
                         for r in range(gh) for c in range(gw)])
        np.testing.assert_allclose(vis[["x0", "y0", "x1", "y1"]].to_numpy(float), want, rtol=1e-5)
        # the examples row: the tower's grid
        e = lake_df(qwen.lake, "SELECT grid_h, grid_w, n_tokens, prediction FROM examples WHERE run = 'qwen' AND "
                    "example_id = ?", [ex])
        assert (e.grid_h.iloc[0], e.grid_w.iloc[0], e.n_tokens.iloc[0]) == (gh, gw, len(t))


def test_answer_is_the_models_greedy_generation(qwen, lake_df):
    """The checkpoint's generation config, merged: its suppressed word never appears, its eos list stops."""
    some = False
    for ex in range(len(SCENES)):
        enc, gen, _ = qwen.generate(ex)
        e = lake_df(qwen.lake, "SELECT prediction, meta FROM examples WHERE run = 'qwen' AND example_id = ?", [ex])
        assert json.loads(e.meta.iloc[0])["generated_tokens"] == len(gen)
        assert SUPPRESSED not in gen and IMAGE_ID not in gen and VIDEO_ID not in gen
        some |= len(gen) >= 2
    assert some



def test_generation_config_is_the_checkpoints_own(qwen):
    """``base.greedy_generation_config``: the checkpoint's suppress list united with the placeholders, its
    eos list kept, its own length (MAX_NEW_TOKENS only where it sets none), a given ``max_new_tokens`` a cap."""
    from pipeline.models.qwen2vl import QwenVLAdapter

    a = load_adapter(str(qwen.mdir))  # a model of its own: its generation config may be changed here
    gc = a.generation_config()
    assert set(gc.suppress_tokens) == {SUPPRESSED, IMAGE_ID, VIDEO_ID} and gc.eos_token_id == [IM_END, PAD]
    assert gc.max_new_tokens == MAX_NEW_TOKENS and gc.do_sample is False and gc.num_beams == 1
    a.model.generation_config.max_new_tokens = 5
    assert a.generation_config().max_new_tokens == 5
    assert QwenVLAdapter(a.model, a.processor, max_new_tokens=3).generation_config().max_new_tokens == 3
    assert QwenVLAdapter(a.model, a.processor, max_new_tokens=50).generation_config().max_new_tokens == 5

# -- attention ------------------------------------------------------------------------------------
def test_lm_attention_is_generates_own(qwen, lake_df):
    """Every layer and head of the language model: the lake's weights (token order) = ``generate``'s for
    the prompt and each step; causal. (= the teacher-forced pass's, rows summing to 1: the conformance
    suite.)"""
    for ex in (0, 3):
        enc, gen, g = qwen.generate(ex)
        P = enc["input_ids"].shape[1]
        for layer in range(2):
            t, A = attention(lake_df, qwen.lake, ex, "lm", layer)
            n = int((t.stream == "lm").sum())
            A = A[:, :n, :n]  # lm tokens are in sequence order here
            assert np.abs(np.triu(A, 1)).max() < 1e-6
            assert_rows_as_generated(A, g, layer, P)


def _tower_weights(ref, ex) -> list[list[torch.Tensor]]:
    """The tower's attention weights for one image, per layer and segment, caught inside transformers'
    own eager attention function (the tower returns none)."""
    visual = ref.model.model.visual
    mod = sys.modules[type(visual.blocks[0].attn).__module__]
    eager = mod.eager_attention_forward
    caught: list[list[torch.Tensor]] = [[] for _ in visual.blocks]
    which = {id(b.attn): i for i, b in enumerate(visual.blocks)}

    def spy(module, *a, **kw):
        out, w = eager(module, *a, **kw)
        if id(module) in which:
            caught[which[id(module)]].append(w[0])
        return out, w

    enc = ref.inputs(ex)
    mod.eager_attention_forward = spy
    try:
        with torch.no_grad():
            visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
    finally:
        mod.eager_attention_forward = eager
    return caught


def test_vision_attention_is_the_towers_own(qwen, lake_df):
    """Each tower layer: the weights eager attention computed come segment by segment on the diagonal
    (the lake's weights = those, rows summing to 1: the conformance suite). Qwen2.5-VL's layer 0
    attends within windows (several segments, zero across them), its layer 1 over the whole image."""
    for ex in (0, 2):
        caught = _tower_weights(qwen, ex)
        for layer, segs in enumerate(caught):
            n = sum(s.shape[-1] for s in segs)
            windowed = qwen.family == "qwen2_5_vl" and layer == 0
            assert (len(segs) > 1) == windowed
            t, A = attention(lake_df, qwen.lake, ex, "vision", layer)
            vis = t[t.stream == "vision"]
            assert len(vis) == n
            idx = vis.token_idx.to_numpy()
            got = A[:, idx][:, :, idx]  # [head, token, token], raster order
            if windowed:  # a patch sees only the patches of its own 4 x 4-patch window
                r, c = vis.patch_row.to_numpy(), vis.patch_col.to_numpy()
                same = ((r[:, None] // 4) == (r[None] // 4)) & ((c[:, None] // 4) == (c[None] // 4))
                assert np.abs(got[:, ~same]).max() == 0 and (got[:, same] > 0).mean() > 0.9


# -- hidden states ----------------------------------------------------------------------------------
def test_merged_image_token_is_its_blocks_patches(qwen, lake_df):
    """hidden 0 of an LM image token (the model's inputs_embeds) = the tower's merger applied to the last
    tower hidden states of the 2 x 2 patches of its block, read from the lake: the block <-> patches
    mapping, by the model's own merger. Text tokens carry their word embeddings."""
    ex = 1
    lm, last, img = dec.merger_inputs(lake_df, qwen.lake, "qwen", ex)
    blocks = np.stack([np.stack([last[(R * M + i, C * M + j)] for i in range(M) for j in range(M)])
                       for R, C in zip(img.patch_row.astype(int), img.patch_col.astype(int))])  # [token, 4, dim]
    with torch.no_grad():
        merged = qwen.model.model.visual.merger(torch.from_numpy(blocks).reshape(-1, blocks.shape[-1])).numpy()
    np.testing.assert_allclose(np.stack(img.vec.to_list()).astype(np.float32), merged, atol=3e-2, rtol=3e-2)
    # and the same features the model computes itself
    enc = qwen.inputs(ex)
    with torch.no_grad():
        feats = qwen.model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output[0]
    np.testing.assert_allclose(np.stack(img.vec.to_list()).astype(np.float32), feats.numpy(), atol=2e-2, rtol=2e-2)
    txt = lm[lm.modality == "text"]
    emb = qwen.model.model.language_model.embed_tokens.weight.detach()
    ids = qwen.tok.convert_tokens_to_ids(list(txt.token))
    np.testing.assert_allclose(np.stack(txt.vec.to_list()).astype(np.float32), emb[ids].numpy(), atol=2e-2)


def test_lm_hidden_states_are_the_models_own(qwen, lake_df):
    ex = 0
    o = qwen.full(ex, output_hidden_states=True)
    h = lake_df(qwen.lake, "SELECT h.layer, h.token_idx, h.vec FROM hidden_states h WHERE h.run = 'qwen' AND "
                "h.example_id = ? AND h.stream = 'lm' ORDER BY h.layer, h.token_idx", [ex])
    n = len(h[h.layer == 0])
    for layer in range(3):
        got = torch.from_numpy(np.stack(h[h.layer == layer].vec.to_list()).astype(np.float32))
        if layer == 2:  # transformers' last hidden state is after the final norm; the lake's is block 1's output
            with torch.no_grad():
                got = qwen.model.model.language_model.norm(got)
        np.testing.assert_allclose(got.numpy(), o.hidden_states[layer][0, :n].numpy(), atol=3e-2, rtol=2e-2)


# -- statistics -------------------------------------------------------------------------------------
def test_head_stats_by_hand(qwen, lake_df):
    """Every head of the language model: t2i, i2t, the t2i of one word ("circle") and its grounding in its
    box (over the merged blocks whose centre lies in it; a mean over the word's occurrences, the generated
    ones too, that put at least 1% on the image; null where none does)."""
    ex, layer, head = 0, 1, 1
    t = tokens(lake_df, qwen.lake, ex)
    lm = t[t.stream == "lm"]
    o = qwen.full(ex, output_attentions=True)
    text = (lm.modality == "text").to_numpy()
    image = (lm.modality == "image").to_numpy()
    words = lm[lm.token == "circle"].token_idx.to_numpy()
    w = int(words[0])
    cx, cy = ((lm.x0 + lm.x1) / 2).to_numpy(), ((lm.y0 + lm.y1) / 2).to_numpy()
    box = image & (cx >= CIRCLE[0]) & (cx <= CIRCLE[2]) & (cy >= CIRCLE[1]) & (cy <= CIRCLE[3])
    assert box.sum() >= 2
    st = lake_df(qwen.lake, "SELECT stream, layer, head, stat, value FROM head_stats WHERE run = 'qwen' AND "
                 "example_id = ?", [ex])
    got = {(s, lay, h, k): v for s, lay, h, k, v in zip(st.stream, st.layer, st["head"], st.stat, st.value)}
    grounded = 0
    ws = list(words)
    for lay in range(2):
        _, L = attention(lake_df, qwen.lake, ex, "lm", lay)
        for h in range(2):
            A = o.attentions[lay][0, h].numpy().astype(np.float64)  # [query, key], sequence = token order here
            assert got["lm", lay, h, "t2i"] == pytest.approx(A[text][:, image].sum(1).mean(), abs=2e-4)
            assert got["lm", lay, h, "i2t"] == pytest.approx(A[image][:, text].sum(1).mean(), abs=2e-4)
            mass = A[w, image].sum()  # t2i of the word
            assert L[h, w, lm.token_idx[image]].sum() == pytest.approx(mass, abs=2e-3)
            g = got["lm", lay, h, "grounding"]
            looks = [q for q in ws if A[q, image].sum() >= 0.01]
            if looks:
                assert g == pytest.approx(np.mean([A[q, box].sum() / A[q, image].sum() for q in looks]), abs=2e-3)
                grounded += 1
            else:
                assert g is None or math.isnan(g)
    assert grounded
    # the tower: entropy over its patches (windowed layers: the row's support is its window)
    got = {(s, k): v for (s, lay, h, k), v in got.items() if lay == layer and h == head}
    caught = _tower_weights(qwen, ex)
    segs = caught[layer]
    n = sum(s.shape[-1] for s in segs)
    V = torch.zeros(n, n, dtype=torch.float64)
    o_ = 0
    for s in segs:
        V[o_:o_ + s.shape[-1], o_:o_ + s.shape[-1]] = s[head].double()
        o_ += s.shape[-1]
    ent = -(V * torch.log(V.clamp(min=1e-30))).sum(1) / math.log(n)
    assert got["vision", "entropy"] == pytest.approx(float(ent.mean()), abs=2e-4)
    assert got["vision", "i2i"] == pytest.approx(1.0, abs=1e-4)
    assert got.get(("vision", "t2i")) is None or math.isnan(got["vision", "t2i"])  # no text queries in the tower


# -- the app ----------------------------------------------------------------------------------------
def test_attention_page_shows_the_merged_tokens_and_the_towers_patches(qwen, monkeypatch, raw_df):
    """The Attention page shows the merged image tokens of ``lm`` on the image and the tower's patches
    (every page on the lake: the conformance suite)."""
    from tests.app.test_app import chart_data, open_app

    lake = qwen.lake
    tok = raw_df(lake, "SELECT * FROM {tokens} WHERE run = 'qwen' AND example_id = 1 ORDER BY token_idx")
    for stream, n in (("lm", GRIDS[1][0] * GRIDS[1][1] // (M * M)), ("vision", GRIDS[1][0] * GRIDS[1][1])):
        at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="qwen", ex=1, stream=stream, layer=1,
                      head=0, patches="r1c2")
        assert at.selectbox(key="w_stream").value == stream
        ii = chart_data(at, "image-image", "weight")
        patches = tok[(tok.stream == stream) & (tok.role == "patch")]
        assert len(patches) == n and sorted(ii.token_idx) == sorted(patches.token_idx)
