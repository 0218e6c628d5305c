"""``vlatlas intervene`` against independent computations, on tiny models of every family class.

The families: ViLT (an encoder, VQA head), CLIP (a dual encoder), BLIP's matching head (a text
encoder with cross-attention to the image) and LLaVA (a decoder). Each gets a lake built by the real
pipeline over three scenes, and every expected number comes from transformers' own model run here
with hooks and weights of the test's making (a copy of the model with a head's columns of its
output projection zeroed; an attention mask built by hand; pixels painted by hand before the
processor; gradients by ``torch.autograd.grad``), never from ``pipeline.intervene``.

The random models' linear layers are redrawn at the scale ``1/sqrt(fan_in)`` (HF's init is 0.02):
with it a head or an image region moves the score by far more than the tolerance, so a wrong
head, edge or region would show.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lake.catalog import Catalog
from pipeline.extraction.run import extract
from pipeline.intervene.run import intervene
from pipeline.models.family import MAX_NEW_TOKENS
from tests.raycluster import ray_head
from tests.tiny import make_manifest, make_tiny_vilt

RTOL = ATOL = 1e-4
SPECIAL = ("cls", "sep", "bos", "eos", "image_cls")
LLAVA_IMAGE, LLAVA_EOS = 4, 2


def close(stored, expected, what: str = "") -> None:
    np.testing.assert_allclose(np.asarray(stored, float), np.asarray(expected, float), rtol=RTOL, atol=ATOL,
                               err_msg=what)


def rows_of(lake, key: str, where: str = "TRUE"):
    cat = Catalog(lake)
    try:
        return cat.df(f"SELECT * FROM interventions WHERE intervention = ? AND {where} "
                      "ORDER BY example_id, stream, layer, head, method, fraction, spec", [key])
    finally:
        cat.close()


def lake_tokens(lake, run: str, ex: int):
    cat = Catalog(lake)
    try:
        return cat.df("SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [run, ex])
    finally:
        cat.close()


def rescale(model) -> None:
    """Linear and patch-embedding weights at ``1/sqrt(fan_in)``, small random biases: heads and regions
    that matter (BLIP's vision config initialises at 1e-10, under which its tower ignores the pixels)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


# -- the families: the model alone, its inputs and its score ------------------------------------------
class Family:
    """How a family's transformers model is run and scored here (no pipeline code)."""

    name = run = ""
    out_paths: dict[str, str] = {}  # stream -> the attention output projection of layer {l}

    def __init__(self, mdir: Path, lake: Path, manifest: Path):
        self.mdir, self.lake, self.manifest = mdir, lake, manifest
        self.rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        self.model, self.proc = self.load()

    def image(self, ex: int) -> Image.Image:
        return Image.open(self.manifest.parent / self.rows[ex]["image"]).convert("RGB")

    def text(self, ex: int) -> str:
        return self.rows[ex]["text"]

    def out(self, model, stream: str, layer: int) -> torch.nn.Linear:
        return model.get_submodule(self.out_paths[stream].format(l=layer))

    # the scored pass: ``prep`` (inputs + what the score needs), ``score`` of a model on it
    def prep(self, ex: int, image=None) -> dict:
        raise NotImplementedError

    def score(self, model, p: dict) -> torch.Tensor:
        raise NotImplementedError

    def answer(self, model, p: dict):
        return None


class Vilt(Family):
    name = run = "vilt"
    out_paths = {"self": "vilt.encoder.layer.{l}.attention.output.dense"}

    def load(self):
        from transformers import ViltForQuestionAnswering, ViltProcessor

        return ViltForQuestionAnswering.from_pretrained(self.mdir).eval(), ViltProcessor.from_pretrained(self.mdir)

    def prep(self, ex, image=None):
        enc = self.proc(images=[image or self.image(ex)], text=[self.text(ex)], return_tensors="pt")
        with torch.no_grad():
            cls = int(self.model(**enc).logits.argmax(-1)[0])
        return {"enc": enc, "cls": cls, "T": enc["input_ids"].shape[1]}

    def score(self, model, p):
        return model(**p["enc"]).logits[0, p["cls"]]

    def answer(self, model, p):
        with torch.no_grad():
            return model.config.id2label[int(model(**p["enc"]).logits.argmax(-1)[0])]


class Clip(Family):
    name = run = "clip"
    out_paths = {"text": "text_model.encoder.layers.{l}.self_attn.out_proj",
                 "vision": "vision_model.encoder.layers.{l}.self_attn.out_proj"}

    def load(self):
        from transformers import CLIPModel, CLIPProcessor

        return (CLIPModel.from_pretrained(self.mdir, attn_implementation="eager").eval(),
                CLIPProcessor.from_pretrained(self.mdir))

    def prep(self, ex, image=None):
        return {"enc": self.proc(images=[image or self.image(ex)], text=[self.text(ex)], return_tensors="pt",
                                 padding=True)}

    def score(self, model, p):
        return model(**p["enc"]).logits_per_image[0, 0]


class Blip(Family):
    name = run = "blip"
    out_paths = {"text": "text_encoder.encoder.layer.{l}.attention.output.dense",
                 "cross": "text_encoder.encoder.layer.{l}.crossattention.output.dense",
                 "vision": "vision_model.encoder.layers.{l}.self_attn.projection"}

    def load(self):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        return (BlipForImageTextRetrieval.from_pretrained(self.mdir, attn_implementation="eager").eval(),
                BlipProcessor.from_pretrained(self.mdir))

    def prep(self, ex, image=None):
        return {"enc": self.proc(images=[image or self.image(ex)], text=[self.text(ex)], return_tensors="pt")}

    def score(self, model, p):
        return model(**p["enc"], use_itm_head=True).itm_score[0, 1]

    def answer(self, model, p):
        with torch.no_grad():
            return "match" if int(model(**p["enc"], use_itm_head=True).itm_score.argmax(-1)[0]) == 1 else "no match"


class Llava(Family):
    name = run = "llava"
    out_paths = {"lm": "model.language_model.layers.{l}.self_attn.o_proj",
                 "vision": "model.vision_tower.encoder.layers.{l}.self_attn.out_proj"}

    def load(self):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.answers: dict[int, list[int]] = {}
        return (LlavaForConditionalGeneration.from_pretrained(self.mdir, attn_implementation="eager").eval(),
                AutoProcessor.from_pretrained(self.mdir))

    def prompt(self, ex, image=None):
        return self.proc(images=[image or self.image(ex)], text=[f"<image> {self.text(ex)}"], return_tensors="pt")

    def generate(self, model, enc) -> list[int]:
        with torch.no_grad():
            seq = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 suppress_tokens=[LLAVA_IMAGE])[0, enc["input_ids"].shape[1]:].tolist()
        return seq[:seq.index(LLAVA_EOS) + 1] if LLAVA_EOS in seq else seq

    def prep(self, ex, image=None, answer=None):
        """The scored pass: the prompt (on ``image``) with the original answer (generated on the
        example's own image) appended."""
        if answer is None:  # the model's own greedy answer (once an example)
            if ex not in self.answers:
                self.answers[ex] = self.generate(self.model, self.prompt(ex))
            answer = self.answers[ex]
        enc = self.prompt(ex, image)
        P = enc["input_ids"].shape[1]
        ids = torch.cat([enc["input_ids"], torch.tensor([answer])], 1)
        return {"enc": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": enc["pixel_values"]},
                "prompt": enc, "answer": answer, "P": P}

    def score(self, model, p):
        logits = model(**p["enc"], use_cache=False).logits[0].float()
        n, T = len(p["answer"]), p["enc"]["input_ids"].shape[1]
        logp = logits[T - n - 1:T - 1].log_softmax(-1)
        return logp[torch.arange(n), torch.tensor(p["answer"])].sum()

    def answer(self, model, p):
        ids = self.generate(model, p["prompt"])
        return self.proc.tokenizer.decode(ids, skip_special_tokens=True).strip()


def build(cls, tmp: Path, make_model) -> Family:
    mdir = make_model(tmp / "model")
    manifest = make_manifest(tmp / "data", 3)
    extract(str(mdir), manifest, tmp / "lake", cls.run, batch_size=3, progress=False,
            explain="rollout,relevancy,value")
    return cls(mdir, tmp / "lake", manifest)


def _saved_rescaled(loader):
    def make(out):
        out = loader(out)
        import transformers as tf

        cfg = tf.AutoConfig.from_pretrained(out)
        model = getattr(tf, cfg.architectures[0]).from_pretrained(out)
        rescale(model)
        model.save_pretrained(out)
        return out
    return make


@pytest.fixture(scope="module")
def vilt(tmp_path_factory):
    return build(Vilt, tmp_path_factory.mktemp("iv_vilt"), _saved_rescaled(make_tiny_vilt))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from tests.models.test_dual import make_tiny_dual

    return build(Clip, tmp_path_factory.mktemp("iv_clip"), _saved_rescaled(lambda o: make_tiny_dual(o, "clip")))


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    from tests.models.test_blip import make_tiny_blip

    return build(Blip, tmp_path_factory.mktemp("iv_blip"),
                 _saved_rescaled(lambda o: make_tiny_blip(o, "retrieval")))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from tests.models.test_llava import make_tiny_llava

    return build(Llava, tmp_path_factory.mktemp("iv_llava"), make_tiny_llava)


FAMILIES = ["vilt", "clip", "blip", "llava"]


@pytest.fixture(params=FAMILIES)
def fam(request) -> Family:
    return request.getfixturevalue(request.param)


# -- independent pieces: a head's mean, an ablated copy --------------------------------------------------
def head_inputs(f: Family, model, stream: str, layer: int, p: dict, grad: bool = False):
    """The input of a layer's output projection on the scored pass ``p`` (and the score)."""
    seen = {}

    def hook(mod, args):
        seen["x"] = args[0]

    h = f.out(model, stream, layer).register_forward_pre_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            s = f.score(model, p)
    finally:
        h.remove()
    return seen["x"], s


def heads_of(f: Family, stream: str) -> int:
    m = f.model
    cfg = {"self": m.config, "text": getattr(m.config, "text_config", None),
           "cross": getattr(m.config, "text_config", None), "vision": getattr(m.config, "vision_config", None),
           "lm": getattr(m.config, "text_config", None)}[stream]
    return int(cfg.num_attention_heads)


def head_mean(f: Family, stream: str, layer: int) -> torch.Tensor:
    """Every position of every example's scored pass, pooled: ``[heads * d]``."""
    width = f.out(f.model, stream, layer).in_features
    xs = [head_inputs(f, f.model, stream, layer, f.prep(ex))[0].detach().reshape(-1, width)
          for ex in range(len(f.rows))]
    return torch.cat(xs).mean(0)


def ablated(f: Family, stream: str, layer: int, head: int, mean: torch.Tensor | None):
    """A copy of the model with head ``head``'s columns of the output projection zeroed (and, for the mean,
    their projection of the head's mean added to the bias)."""
    model = copy.deepcopy(f.model)
    lin = f.out(model, stream, layer)
    d = lin.in_features // heads_of(f, stream)
    sl = slice(head * d, (head + 1) * d)
    with torch.no_grad():
        add = None if mean is None else lin.weight[:, sl] @ mean[sl]
        lin.weight[:, sl] = 0
        if add is not None:
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
            lin.bias += add
    return model


# sites ablated per family (stream, layer, head): BLIP's cross and text streams, LLaVA's language model
SITES = {"vilt": [("self", 0, 1), ("self", 1, 0)], "clip": [("text", 1, 0), ("vision", 0, 1)],
         "blip": [("cross", 0, 1), ("text", 1, 0)], "llava": [("lm", 0, 1), ("lm", 1, 0)]}


def check_heads(f: Family, ablate: str) -> None:
    heads = ",".join(f"{l}.{h}" for _, l, h in SITES[f.name])
    streams = ",".join(sorted({s for s, _, _ in SITES[f.name]}))
    s = intervene(f.lake, f.run, "heads", ablate=ablate, heads=heads, streams=streams, progress=False)
    got = rows_of(f.lake, s.key)
    # --heads names (layer, head) pairs, ablated in each stream asked
    assert len(got) == len(f.rows) * len(SITES[f.name]) * len(streams.split(","))
    effects, clean = [], {}
    for stream, layer, head in SITES[f.name]:
        mean = head_mean(f, stream, layer) if ablate == "mean" else None
        model = ablated(f, stream, layer, head, mean)
        for ex in range(len(f.rows)):
            p = f.prep(ex)
            r = got[(got.example_id == ex) & (got.stream == stream) & (got.layer == layer) & (got["head"] == head)]
            assert len(r) == 1, (stream, layer, head, ex)
            r = r.iloc[0]
            with torch.no_grad():
                before, after = float(f.score(f.model, p)), float(f.score(model, p))
            close(r.metric_before, before, f"{f.name} before ex {ex}")
            close(r.metric_after, after, f"{f.name} {stream} {layer}.{head} {ablate} ex {ex}")
            effects.append(abs(after - before))
            ans = f.answer(model, p)
            if ans is not None:
                assert r.answer_after == ans, (stream, layer, head, ex)
                if ex not in clean:
                    clean[ex] = f.answer(f.model, p)
                assert bool(r.changed) == (ans != clean[ex])
            else:
                assert r.answer_after is None and pd.isna(r.changed)
    assert max(effects) > 100 * ATOL  # the ablations matter: a wrong head would show


# -- 1, 2: heads ------------------------------------------------------------------------------------------
def test_zero_ablation_equals_zeroed_columns(fam):
    check_heads(fam, "zero")


@pytest.mark.parametrize("name", ["vilt", "llava"])
def test_mean_ablation_equals_columns_zeroed_and_mean_in_bias(request, name):
    check_heads(request.getfixturevalue(name), "mean")


# -- 5: the estimate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vilt", "llava"])
def test_estimate_equals_gradient_formula(request, name):
    f = request.getfixturevalue(name)
    stream = {"vilt": "self", "llava": "lm"}[name]
    s = intervene(f.lake, f.run, "heads", estimate=True, streams=stream, progress=False)
    got = rows_of(f.lake, s.key)
    H = heads_of(f, stream)
    L = len(got.layer.unique())
    assert len(got) == len(f.rows) * L * H and got.estimated.all() and got.answer_after.isna().all()
    means = {layer: head_mean(f, stream, layer) for layer in range(L)}
    for ex in range(len(f.rows)):
        p = f.prep(ex)
        xs = {}
        hooks = [f.out(f.model, stream, layer).register_forward_pre_hook(
            lambda mod, args, layer=layer: xs.__setitem__(layer, args[0])) for layer in range(L)]
        try:
            score = f.score(f.model, p)
        finally:
            for h in hooks:
                h.remove()
        grads = torch.autograd.grad(score, [xs[layer] for layer in range(L)])
        for layer, g in enumerate(grads):
            x = xs[layer].detach()
            d = x.shape[-1] // H
            for head in range(H):
                sl = slice(head * d, (head + 1) * d)
                e = float((g[..., sl] * (means[layer][sl] - x[..., sl])).sum())
                r = got[(got.example_id == ex) & (got.layer == layer) & (got["head"] == head)].iloc[0]
                close(r.metric_after - r.metric_before, e, f"{name} estimate {layer}.{head} ex {ex}")
                close(r.metric_before, float(score))


# -- 3: knockout ---------------------------------------------------------------------------------------------
def mask_hooks(attn: torch.nn.Module, block, out: torch.nn.Module, positional: bool = False):
    """Hooks of the test's own: ``block`` ([S, S] bool over positions; or a function of the query and key
    counts giving the [q, k] block, for generation with a cache) added as -inf to the attention module's
    mask argument, and a row with every key blocked given no weight (its NaN context zeroed before the
    output projection)."""
    block_of = block if callable(block) else (lambda q, k: block[k - q:k, :k])

    def add(mask, q, k):
        neg = torch.zeros(q, k).masked_fill(block_of(q, k), float("-inf"))
        if mask is None:
            return neg[None, None]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        return mask.expand(mask.shape[0], mask.shape[1], q, k) + neg[None, None]

    def pre(mod, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        if positional:  # ViLT: (hidden_states, attention_mask, ...), no cache
            return (args[0], add(args[1], x.shape[1], x.shape[1])) + tuple(args[2:]), kwargs
        mask = kwargs.get("attention_mask")  # eager LLaVA: [1, 1, q, k] always (k grows with the cache)
        k = mask.shape[-1] if mask is not None else x.shape[1]
        return args, {**kwargs, "attention_mask": add(mask, x.shape[1], k)}

    def zero_nan(mod, args):
        return (torch.nan_to_num(args[0], nan=0.0),) + tuple(args[1:])

    return [attn.register_forward_pre_hook(pre, with_kwargs=True), out.register_forward_pre_hook(zero_nan)]


def knocked(f: Family, p: dict, hooks: list) -> float:
    try:
        with torch.no_grad():
            return float(f.score(f.model, p))
    finally:
        for h in hooks:
            h.remove()


def test_knockout_vilt_equals_hand_built_mask(vilt):
    f = vilt
    s = intervene(f.lake, f.run, "knockout", sets="text->image,last->image,image->text", progress=False)
    got = rows_of(f.lake, s.key)
    assert set(got.method) == {"text->image", "last->image", "image->text"} and set(got.stream) == {"self"}
    effects = []
    for ex in range(len(f.rows)):
        p = f.prep(ex)
        T = p["T"]  # ViLT: the text (its [CLS] and [SEP] too), then the image ([CLS] and patches)
        with torch.no_grad():
            S = f.model.vilt(**p["enc"]).last_hidden_state.shape[1]
        for layer in (0, 1):
            text, image = slice(0, T), slice(T, S)
            for method, rows, keys in (("text->image", text, image), ("last->image", slice(0, 1), image),
                                       ("image->text", image, text)):
                block = torch.zeros(S, S, dtype=torch.bool)
                block[rows, keys] = True
                blk = f.model.vilt.encoder.layer[layer].attention
                want = knocked(f, p, mask_hooks(blk.attention, block, blk.output.dense, positional=True))
                r = got[(got.example_id == ex) & (got.layer == layer) & (got.method == method)].iloc[0]
                assert json.loads(r.spec)["layers"] == [layer]
                close(r.metric_after, want, f"vilt {method} layer {layer} ex {ex}")
                effects.append(abs(want - r.metric_before))
    assert max(effects) > 100 * ATOL
    # a window of two layers: both blocked in one pass
    s = intervene(f.lake, f.run, "knockout", sets="text->image", window=2, progress=False)
    got = rows_of(f.lake, s.key)
    assert len(got) == len(f.rows) and set(got.layer) == {0}
    for ex in range(len(f.rows)):
        p = f.prep(ex)
        T = p["T"]
        with torch.no_grad():
            S = f.model.vilt(**p["enc"]).last_hidden_state.shape[1]
        block = torch.zeros(S, S, dtype=torch.bool)
        block[:T, T:] = True
        hooks = []
        for blk in (f.model.vilt.encoder.layer[0].attention, f.model.vilt.encoder.layer[1].attention):
            hooks += mask_hooks(blk.attention, block, blk.output.dense, positional=True)
        r = got[got.example_id == ex].iloc[0]
        assert json.loads(r.spec)["layers"] == [0, 1]
        close(r.metric_after, knocked(f, p, hooks), f"vilt window 2 ex {ex}")


def test_knockout_llava_equals_hand_built_mask(llava):
    f = llava
    s = intervene(f.lake, f.run, "knockout", sets="text->image,generated->image,last->image,image->text",
                  streams="lm", progress=False)
    got = rows_of(f.lake, s.key)
    assert set(got.method) == {"text->image", "generated->image", "last->image", "image->text"}
    assert set(got.stream) == {"lm"}
    effects = []
    for ex in range(len(f.rows)):
        p = f.prep(ex)
        ids = p["enc"]["input_ids"][0]
        P, T = p["P"], len(ids)
        image = (ids == LLAVA_IMAGE)
        text = ~image & (torch.arange(T) < P)
        gen = torch.arange(T) >= P
        for layer in (0, 1):
            attn = f.model.model.language_model.layers[layer].self_attn
            for method, q in (("text->image", text), ("generated->image", gen)):
                block = q[:, None] & image[None, :]
                want = knocked(f, p, mask_hooks(attn, block, attn.o_proj))
                r = got[(got.example_id == ex) & (got.layer == layer) & (got.method == method)].iloc[0]
                close(r.metric_after, want, f"llava {method} layer {layer} ex {ex}")
                effects.append(abs(want - r.metric_before))

                def growing(qn, kn, method=method):  # generation: its own tokens are the generated set
                    img = torch.nonzero(image[:P])[:, 0]
                    pos = torch.arange(kn - qn, kn)
                    src = (pos >= P) if method == "generated->image" else (pos < P) & ~torch.isin(pos, img)
                    return src[:, None] & torch.isin(torch.arange(kn), img)[None, :]

                hooks = mask_hooks(attn, growing, attn.o_proj)
                try:
                    ans = f.answer(f.model, p)
                finally:
                    for h in hooks:
                        h.remove()
                assert r.answer_after == ans, (method, layer, ex)
            last = torch.arange(T) == P - 1  # the last prompt token
            for method, block in (("last->image", last[:, None] & image[None, :]),
                                  ("image->text", image[:, None] & text[None, :])):
                want = knocked(f, p, mask_hooks(attn, block, attn.o_proj))
                r = got[(got.example_id == ex) & (got.layer == layer) & (got.method == method)].iloc[0]
                close(r.metric_after, want, f"llava {method} layer {layer} ex {ex}")
    assert max(effects) > 100 * ATOL


def test_knockout_blip_cross_text_rows_get_nothing(blip):
    f = blip
    s = intervene(f.lake, f.run, "knockout", sets="text->image", streams="cross", progress=False)
    got = rows_of(f.lake, s.key)
    assert set(got.stream) == {"cross"} and len(got) == 2 * len(f.rows)
    effects = []
    for ex in range(len(f.rows)):
        p = f.prep(ex)
        for layer in (0, 1):
            # every key of every text row blocked: the cross-attention's output is zero there
            h = f.model.text_encoder.encoder.layer[layer].crossattention.self.register_forward_hook(
                lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:]))
            want = knocked(f, p, [h])
            r = got[(got.example_id == ex) & (got.layer == layer)].iloc[0]
            close(r.metric_after, want, f"blip cross layer {layer} ex {ex}")
            effects.append(abs(want - r.metric_before))
    assert max(effects) > 100 * ATOL


def test_knockout_clip_last_row_of_the_vision_tower(clip):
    f = clip
    s = intervene(f.lake, f.run, "knockout", sets="last->image", streams="vision", progress=False)
    got = rows_of(f.lake, s.key)
    assert set(got.stream) == {"vision"} and len(got) == 2 * len(f.rows)
    for ex in range(len(f.rows)):
        p = f.prep(ex)
        S = 1 + (f.model.config.vision_config.image_size // f.model.config.vision_config.patch_size) ** 2
        block = torch.zeros(S, S, dtype=torch.bool)
        block[0, :] = True  # the [CLS] row: every image token, itself included
        for layer in (0, 1):
            attn = f.model.vision_model.encoder.layers[layer].self_attn
            want = knocked(f, p, mask_hooks(attn, block, attn.out_proj))
            r = got[(got.example_id == ex) & (got.layer == layer)].iloc[0]
            close(r.metric_after, want, f"clip last->image layer {layer} ex {ex}")


# -- 4: regions ---------------------------------------------------------------------------------------------
def painted(image: Image.Image, boxes) -> Image.Image:
    arr = np.asarray(image).copy()
    colour = np.round(arr.reshape(-1, 3).mean(0)).astype(np.uint8)
    for x0, y0, x1, y1 in boxes:
        arr[int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = colour
    return Image.fromarray(arr)


def region_score(f: Family, ex: int, image) -> float:
    if isinstance(f, Llava):
        p = f.prep(ex, image, answer=f.prep(ex)["answer"])  # the ORIGINAL answer, on the new image
    else:
        p = f.prep(ex, image)
        if isinstance(f, Vilt):
            p["cls"] = f.prep(ex)["cls"]  # the originally predicted class
    with torch.no_grad():
        return float(f.score(f.model, p))


@pytest.mark.parametrize("name", FAMILIES)
def test_region_ablation_equals_pixels_painted_by_hand(request, name):
    f = request.getfixturevalue(name)
    s = intervene(f.lake, f.run, "regions", regions="boxes", progress=False)
    got = rows_of(f.lake, s.key)
    assert len(got) == len(f.rows) and set(got.method) == {"box"}
    effects = []
    for _, r in got.iterrows():
        spec = json.loads(r.spec)
        t = lake_tokens(f.lake, f.run, int(r.example_id))
        boxes = t.set_index("token_idx").loc[spec["tokens"], ["x0", "y0", "x1", "y1"]].to_numpy(float)
        assert len(boxes) > 0
        want = region_score(f, int(r.example_id), painted(f.image(int(r.example_id)), boxes))
        close(r.metric_after, want, f"{name} box ex {r.example_id}")
        effects.append(abs(want - r.metric_before))
    # ranked: deleting every image token (and inserting none) paints every patch of the unit stream
    s = intervene(f.lake, f.run, "regions", methods="random,relevancy", fractions="0,0.5,1", progress=False)
    got = rows_of(f.lake, s.key)
    for ex in range(len(f.rows)):
        g = got[(got.example_id == ex) & (got.method == "random")]
        spec = [json.loads(x) for x in g.spec]
        stream = spec[0]["stream"]
        t = lake_tokens(f.lake, f.run, ex)
        units = t[(t.stream == stream) & (t.modality == "image") & ~t.role.isin(SPECIAL) & t.x0.notna()]
        want = region_score(f, ex, painted(f.image(ex), units[["x0", "y0", "x1", "y1"]].to_numpy(float)))
        for (curve, frac) in (("deletion", 1.0), ("insertion", 0.0)):
            r = g[[x["curve"] == curve and x["fraction"] == frac for x in spec]].iloc[0]
            assert json.loads(r.spec)["removed"] == len(units)
            close(r.metric_after, want, f"{name} all removed ex {ex}")
        # random at 0.5: the permutation seeded by the example, over the units in token order
        order = np.random.default_rng(ex).permutation(len(units))
        k = int(round(0.5 * len(units)))
        half = units.iloc[np.sort(order[:k])][["x0", "y0", "x1", "y1"]].to_numpy(float)
        r = g[[x["curve"] == "deletion" and x["fraction"] == 0.5 for x in spec]].iloc[0]
        close(r.metric_after, region_score(f, ex, painted(f.image(ex), half)), f"{name} random half ex {ex}")
        effects.append(abs(want - r.metric_before))
        # relevancy at 0.5: the half of the units with the largest stored relevancy (summed over what it
        # explains and the streams; ties and unscored units by token order)
        cat = Catalog(f.lake)
        try:
            rel = cat.df("SELECT token_idx, sum(value) AS score FROM relevancy WHERE run = ? AND example_id = ? "
                         "AND method = 'relevancy' GROUP BY token_idx", [f.run, ex])
        finally:
            cat.close()
        u = units.merge(rel, on="token_idx", how="left")
        u["scored"] = u.score.notna()
        u = u.sort_values(["scored", "score", "token_idx"], ascending=[False, False, True])
        top = u.iloc[:k][["x0", "y0", "x1", "y1"]].to_numpy(float)
        g = got[(got.example_id == ex) & (got.method == "relevancy")]
        r = g[[json.loads(x)["curve"] == "deletion" and json.loads(x)["fraction"] == 0.5 for x in g.spec]].iloc[0]
        close(r.metric_after, region_score(f, ex, painted(f.image(ex), top)), f"{name} relevancy half ex {ex}")
    assert max(effects) > 100 * ATOL


# -- 6: every kind on every family class ----------------------------------------------------------------------
STREAMS = {"vilt": {"self"}, "clip": {"text", "vision"}, "blip": {"vision", "text", "cross"},
           "llava": {"lm", "vision"}}
KNOCK = {"vilt": {"text->image", "last->image", "image->text"}, "clip": {"last->image"},
         "blip": {"text->image"}, "llava": {"text->image", "generated->image", "last->image", "image->text"}}


def test_every_kind_on_every_family_class(fam):
    f, n = fam, 2  # two examples (--limit 2) are enough here
    s = intervene(f.lake, f.run, "heads", ablate="zero", layers="0", limit=2, progress=False)
    got = rows_of(f.lake, s.key)
    assert set(got.stream) == STREAMS[f.name] and set(got.layer) == {0} and set(got.kind) == {"heads"}
    assert len(got) == n * sum(heads_of(f, st) for st in STREAMS[f.name])
    s = intervene(f.lake, f.run, "knockout", sets=",".join(["text->image", "generated->image", "image->text",
                                                             "last->image"]), limit=2, progress=False)
    got = rows_of(f.lake, s.key)
    assert set(got.method) == KNOCK[f.name] and set(got.kind) == {"knockout"} and set(got.example_id) == {0, 1}
    ranked = {"fractions": "0,1", "methods": "random,relevancy"}
    for kw in ({"regions": "boxes"}, ranked, {**ranked, "replace": "embedding"}):
        s = intervene(f.lake, f.run, "regions", limit=2, progress=False, **kw)
        got = rows_of(f.lake, s.key)
        assert len(got) and set(got.kind) == {"regions"} and got.metric_after.notna().all()
        if "fractions" in kw:
            assert set(got.method) == {"random", "relevancy"}
            spec = [json.loads(x) for x in got.spec]
            for curve, frac in (("deletion", 0.0), ("insertion", 1.0)):  # nothing removed: the clean score
                r = got[[x["curve"] == curve and x["fraction"] == frac for x in spec]]
                assert len(r) == n * len(set(got.method))
                close(r.metric_after, r.metric_before, f"{f.name} {kw} {curve} {frac}")
                assert not r.changed.fillna(False).any()


# -- 7: resume after kill -9 ------------------------------------------------------------------------------------
BIN = Path(sys.executable).parent


def cli_args(lake, run, *more) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "intervene", "--lake", str(lake), "--run", run, "--quiet", *more]


def all_rows(lake, run: str):
    cat = Catalog(lake)
    try:
        df = cat.df("SELECT * EXCLUDE (run) FROM interventions WHERE run = ? ORDER BY ALL", [run])
    finally:
        cat.close()
    return df


def iv_files(lake, run: str) -> list[Path]:
    return sorted((Path(lake) / "interventions" / f"run={run}").glob("iv-*.parquet"))


@pytest.fixture(scope="module")
def chunked(vilt, tmp_path_factory):
    """ViLT's run again with one example a chunk (three chunks), in a fresh lake."""
    tmp = tmp_path_factory.mktemp("iv_chunked")
    extract(str(vilt.mdir), vilt.manifest, tmp / "lake", "one", batch_size=1, chunk_size=1, progress=False,
            explain="rollout,relevancy")
    return tmp / "lake"


@pytest.mark.slow
def test_resume_after_kill_gives_the_rows_of_an_uninterrupted_run(chunked, tmp_path, capsys):
    from pipeline.cli import main

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    shutil.copytree(chunked, killed)
    shutil.copytree(chunked, whole)
    # a variant a forward pass: slow enough to stop between chunks
    args = ["--kind", "regions", "--methods", "random,relevancy", "--fractions", "0,0.3,0.7,1", "--batch-size", "1"]
    proc = subprocess.Popen(cli_args(killed, "one", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not iv_files(killed, "one") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = iv_files(killed, "one")
    assert 1 <= len(done) < 3, done  # killed between chunks: some written, not all
    stamps = [p.stat().st_mtime_ns for p in done]
    capsys.readouterr()
    assert main(cli_args(killed, "one", *args)[3:]) == 0  # the same command again (here: no second torch start)
    assert f"resumed after {len(done)} finished chunks" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in done] == stamps  # finished chunks are not redone
    capsys.readouterr()
    assert main([a for a in cli_args(whole, "one", *args)[3:] if a != "--quiet"]) == 0
    assert re.search(r"intervene regions: 100%.*3/3", capsys.readouterr().err)  # the progress bar
    a, b = all_rows(killed, "one"), all_rows(whole, "one")
    assert len(a) == len(b) > 0 and len(iv_files(killed, "one")) == 3
    pd.testing.assert_frame_equal(a, b, check_exact=True)


# -- 8: bad specs -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_lakes(vilt, tmp_path_factory):
    """ViLT runs in a lake of their own: ``noboxes`` (a manifest without boxes) and ``gone`` (its model
    folder removed after extraction)."""
    tmp = tmp_path_factory.mktemp("iv_bad")
    rows = [{k: v for k, v in json.loads(line).items() if k != "boxes"}
            for line in vilt.manifest.read_text().splitlines()]
    for r in rows:
        r["image"] = str(vilt.manifest.parent / r["image"])
    (tmp / "noboxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extract(str(vilt.mdir), tmp / "noboxes.jsonl", tmp / "lake", "noboxes", batch_size=3, progress=False)
    shutil.copytree(vilt.mdir, tmp / "model")
    extract(str(tmp / "model"), vilt.manifest, tmp / "lake", "gone", batch_size=3, progress=False)
    shutil.rmtree(tmp / "model")
    return tmp / "lake"


@pytest.mark.parametrize("run, args, says", [
    ("noboxes", ["--kind", "bogus"], "--kind 'bogus'"),
    ("noboxes", ["--kind", "heads", "--layers", "2"], "--layers 2"),
    ("noboxes", ["--kind", "heads", "--heads", "0.5"], "--heads 0.5"),
    ("noboxes", ["--kind", "regions", "--regions", "boxes"], "no boxes"),
    ("gone", ["--kind", "heads"], "model"),
    ("nope", ["--kind", "heads"], "no run 'nope'"),
])
def test_bad_spec_is_refused_in_one_line_and_nothing_written(bad_lakes, run, args, says, capfd):
    if run == "gone":  # one through a process of its own, as a user runs it
        r = subprocess.run(cli_args(bad_lakes, run, *args), capture_output=True, text=True, timeout=300)
        code, stderr = r.returncode, r.stderr
    else:  # the rest through the same entry point, in this process (no second start of torch)
        from pipeline.cli import main

        capfd.readouterr()
        code = main(cli_args(bad_lakes, run, *args)[3:])
        stderr = capfd.readouterr().err
    err = [line for line in stderr.splitlines() if line.strip() and not line.startswith(
        ("Loading weights", "[transformers]"))]
    assert code != 0
    assert len(err) == 1 and err[0].startswith("vlatlas: error:") and says in err[0], stderr
    assert "Traceback" not in stderr
    assert not list((bad_lakes / "interventions").rglob("*.parquet"))
    assert not list((bad_lakes / "_state").rglob("intervene-*"))


# -- 9: Ray ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head`` on 127.0.0.1 with one CPU (as tests/pipeline/test_distributed.py starts one)."""
    with ray_head(1) as address:
        yield address


@pytest.mark.slow
def test_ray_gives_the_rows_of_a_local_run(chunked, ray_cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    shutil.copytree(chunked, local)
    shutil.copytree(chunked, remote)
    from pipeline.cli import main

    args = ["--kind", "heads", "--layers", "0"]  # mean ablation: the means are taken on the actor too
    assert main(cli_args(local, "one", *args)[3:]) == 0
    r = subprocess.run(cli_args(remote, "one", *args, "--ray", ray_cluster, "--ray-actors", "1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = all_rows(local, "one"), all_rows(remote, "one")
    assert len(a) == 3 * 2 and len(b) == len(a)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)


@pytest.mark.parametrize("name", ["vilt", "llava"])
def test_embedding_replacement_equals_a_hook_of_the_tests_own(request, name):
    """``--replace embedding``, every image token removed: the first block's input at each image patch
    replaced by the mean of the example's image patches (any patch order gives the same)."""
    f = request.getfixturevalue(name)
    s = intervene(f.lake, f.run, "regions", methods="random", fractions="1", replace="embedding", progress=False)
    got = rows_of(f.lake, s.key, "spec LIKE '%deletion%'")
    assert len(got) == len(f.rows)
    effects = []
    for ex in range(len(f.rows)):
        p = f.prep(ex)
        if name == "vilt":
            block, T = f.model.vilt.encoder.layer[0], p["T"]
            patches = lambda x: torch.arange(T + 1, x.shape[1])  # after the text and the image's [CLS]
        else:
            block = f.model.model.language_model.layers[0]
            ids = p["enc"]["input_ids"][0]
            patches = lambda x: torch.nonzero(ids == LLAVA_IMAGE)[:, 0]

        def pre(mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            pos = patches(x)
            x[:, pos] = x[:, pos].mean(1, keepdim=True)
            return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        want = knocked(f, p, [block.register_forward_pre_hook(pre, with_kwargs=True)])
        close(got[got.example_id == ex].metric_after, [want], f"{name} embedding ex {ex}")
        effects.append(abs(want - got[got.example_id == ex].metric_before.iloc[0]))
    assert max(effects) > 100 * ATOL


def test_exact_and_estimated_ablation_share_the_heads_means(chunked, tmp_path):
    """The means are taken once per set of heads and examples: an estimate after an exact ablation of the same
    heads reads them back (the file is not rewritten), and a resumed or repeated run does too."""
    lake = tmp_path / "lake"
    shutil.copytree(chunked, lake)
    intervene(lake, "one", "heads", layers="0", progress=False)
    files = sorted((lake / "_state" / "one").glob("intervene-means-*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    intervene(lake, "one", "heads", layers="0", estimate=True, progress=False)
    assert sorted((lake / "_state" / "one").glob("intervene-means-*.npz")) == files
    assert files[0].stat().st_mtime_ns == stamp
    intervene(lake, "one", "heads", layers="1", progress=False)  # other heads: their own means
    assert len(list((lake / "_state" / "one").glob("intervene-means-*.npz"))) == 2
