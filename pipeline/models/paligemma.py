"""Decoder LVLMs: PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``), streams ``lm`` and ``vision``.

A SigLIP vision tower (stream ``vision``: no image ``[CLS]``, every layer captured) turns the
image into patch features; a linear projector maps them into the Gemma (PaliGemma 2: Gemma 2)
language model (stream ``lm``), where they replace the ``<image>`` placeholders that the processor
puts at the start of the prompt: ``<image> x num_image_tokens, <bos>, prompt, "\\n"``.

Attention in ``lm`` is *prefix-LM*: the prefix (image tokens and prompt, ``token_type_ids`` 0)
attends bidirectionally, the suffix (the generated answer, ``token_type_ids`` 1) causally. The
captured teacher-forced pass gives the model ``token_type_ids`` = the prompt's, then 1 for every
generated token (what ``generate`` itself does), so each row is the one the model used: a prefix
token sees every prefix token and no suffix token, a generated token every earlier token. Masked
keys carry weight 0 in the eager attention, so each row sums to 1 over the keys it may see and the
statistics count only those. The processor's ``labels`` (all -100 without a suffix) are dropped:
they are no model input the answer needs, and the loss they ask for is not captured.

Two passes per batch (``base.DecoderAdapter``): ``prepare()`` answers greedily under the
checkpoint's own generation config (``<image>`` added to its suppressed tokens), uncaptured; then
one captured teacher-forced pass over prompt + answer.

Token table of one example, one index space::

    lm:     <img 0> ... <img n-1> <bos> w1 ... wn  g1 ... gm           token_idx 0 .. T-1
    vision: p(0,0) p(0,1) ... p(gh-1,gw-1)                            token_idx T .. T+V-1

Image token ``k`` carries SigLIP patch ``k`` in raster order (no CLS: ``patch_row = k // gw``);
its box, like the tower patch's, is the patch's box in original pixels through the processor's
resize to ``size`` (height x width, aspect ratio not kept: each axis mapped back by its own ratio).
The number of image tokens is checked against the grid (never an assumed 256).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.base import (DecoderAdapter, Inputs, Probe, checked_architecture, greedy_generation_config,
                                  module_at)
from pipeline.models.geometry import crop_geometry
from pipeline.models.llava import MAX_NEW_TOKENS, LlavaAdapter

MODULES = {
    "vision": {"attention": "model.vision_tower.encoder.layers.{layer}.self_attn",
               "hidden_0": "model.vision_tower.embeddings",
               "hidden": "model.vision_tower.encoder.layers.{layer}",
               "value": "model.vision_tower.encoder.layers.{layer}.self_attn.v_proj",
               "out": "model.vision_tower.encoder.layers.{layer}.self_attn.out_proj",
               "layers": "model.vision_tower.encoder.layers"},
    "lm": {"attention": "model.language_model.layers.{layer}.self_attn",
           "hidden": "model.language_model.layers.{layer}",
           "value": "model.language_model.layers.{layer}.self_attn.v_proj",
           "out": "model.language_model.layers.{layer}.self_attn.o_proj",
           "layers": "model.language_model.layers"},
}
STREAMS = ("lm", "vision")


class PaliGemmaAdapter(LlavaAdapter):
    """PaliGemmaForConditionalGeneration (PaliGemma, PaliGemma 2): streams ``lm`` and ``vision``.

    Shares LLaVA's teacher-forced pass, generated ids, relevancy targets, lens and layout (image
    tokens then text in one sequence, tower patches after); its own are the prompt, the prefix
    mask (``token_type_ids``), the tower's paths and the resize-only geometry."""

    family = "paligemma"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        DecoderAdapter.__init__(self, model, processor, device)
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        cfg = model.config
        self.configs = {"lm": cfg.text_config, "vision": cfg.vision_config}
        self.image_token_id = int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None
                                  else cfg.image_token_index)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.strategy = "default"  # every SigLIP output is a patch (no CLS)
        self.tower_cls = False
        self.patch_size = int(cfg.vision_config.patch_size)
        self.paths = {s: MODULES[s] for s in STREAMS}
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, "model.language_model").register_forward_pre_hook(self._feed_probe, with_kwargs=True)

    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, "PaliGemmaForConditionalGeneration", "paligemma")

    # -- inputs ---------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """``"<image>" + question``: the processor adds the ``num_image_tokens`` placeholders, bos and
        the closing newline."""
        return f"{self.image_token}{text}"

    def encode(self, texts: list[str], images: list):
        enc = self.processor(images=images, text=[self.prompt(t) for t in texts], return_tensors="pt",
                             padding=True)
        enc.pop("labels", None)  # training labels (all -100 here): not needed for the answer or the mask
        if "token_type_ids" not in enc:  # prefix mask: the whole prompt is the bidirectional prefix
            enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
        return Inputs(dict(enc)), [[] for _ in texts]

    def extend_inputs(self, out: Inputs, model_inputs: dict, new: torch.Tensor) -> None:
        """Generated tokens are the causal suffix: ``token_type_ids`` 1 (as ``generate`` sets them)."""
        tt = model_inputs["token_type_ids"]
        out["token_type_ids"] = torch.cat([tt, torch.ones_like(new, dtype=tt.dtype)], dim=1)

    def generation_config(self, prompt_length: int | None = None):
        return greedy_generation_config(self.model, self.tokenizer, suppress=(self.image_token_id,),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    # -- layout ---------------------------------------------------------------------
    def _geometry(self, W: int, H: int):
        """SigLIP's resize to ``size`` (no crop, no pad): each axis by its own ratio."""
        return crop_geometry(self.processor.image_processor, W, H)
