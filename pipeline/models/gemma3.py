"""Gemma 3 (``Gemma3ForConditionalGeneration``): streams ``lm`` and ``vision``.

The image goes through a SigLIP vision tower (stream ``vision``: ``gh x gw`` patches, no CLS,
every tower layer captured); the multimodal projector average-pools the tower's last hidden
state over ``k x k`` blocks of patches (``k = (image_size / patch_size) / sqrt(mm_tokens_per_image)``)
to ``mm_tokens_per_image`` soft tokens, which replace the ``<image_soft_token>`` placeholders the
processor wrote between ``<start_of_image>`` and ``<end_of_image>``. The language model (stream
``lm``) mixes sliding-window layers (a query sees the keys less than ``sliding_window``
positions behind it) and global layers; with ``token_type_ids`` (which the processor returns, and
the adapter extends with zeros over the generated answer) the image soft tokens of one image see
each other bidirectionally, in every layer (a sliding layer still cuts at its window). Eager
attention returns each layer's weights after that mask, so every row sums to 1 over the keys it
sees.

Token table of one example, one index space::

    lm:     [bos] ... <start_of_image> <img (0,0)> ... <img (t-1,t-1)> <end_of_image> ... g1 ... gm
    vision: p(0,0) p(0,1) ... p(gh-1,gw-1)

- ``lm`` image token ``(r, c)`` (role ``patch``, raster order as ``AvgPool2d`` then ``flatten``
  make it) stands for tower patches ``r k .. r k + k - 1`` x ``c k .. c k + k - 1``: its box is
  that block's box in original pixels (the processor resizes to its ``height x width`` without
  keeping the aspect ratio, no crop). ``<start_of_image>``/``<end_of_image>`` have roles
  ``vision_start``/``vision_end`` (special tokens); ``<start_of_turn>``/``<end_of_turn>`` of the
  chat template ``im_start``/``im_end``.
- Pads (batches pad on the left) are left out; ``seq_pos`` counts from the example's first real
  token.

Pan-and-scan (``do_pan_and_scan``: extra crops of one image, each its own ``<start_of_image>``
block) is refused: the adapter handles one image of one crop per example.

The answer: ``DecoderAdapter`` (greedy under the checkpoint's own generation config, the image
placeholder suppressed; then one teacher-forced captured pass).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.models.base import (GEN_START, BatchLayout, DecoderAdapter, Inputs, Probe, greedy_generation_config,
                                  image_columns, module_at, split_stream_layouts, stack_columns)
from pipeline.models.geometry import crop_geometry, patch_grid
from pipeline.models.llava import LlavaAdapter

TOWER = "model.vision_tower"
MODULES = {
    "lm": {"attention": "model.language_model.layers.{layer}.self_attn",
           "hidden": "model.language_model.layers.{layer}",
           "value": "model.language_model.layers.{layer}.self_attn.v_proj",
           "out": "model.language_model.layers.{layer}.self_attn.o_proj",
           "layers": "model.language_model.layers"},
    "vision": {"attention": TOWER + ".encoder.layers.{layer}.self_attn",
               "hidden_0": TOWER + ".embeddings",
               "hidden": TOWER + ".encoder.layers.{layer}",
               "value": TOWER + ".encoder.layers.{layer}.self_attn.v_proj",
               "out": TOWER + ".encoder.layers.{layer}.self_attn.out_proj",
               "layers": TOWER + ".encoder.layers"},
}
MAX_NEW_TOKENS = 16  # new tokens when the checkpoint's generation config sets no length


class Gemma3Adapter(DecoderAdapter):
    """Gemma3ForConditionalGeneration: streams ``lm`` and ``vision``."""

    family = "gemma3"
    # shared with LLaVA: the lm's hidden state 0 (inputs_embeds, through a pre-hook), relevancy
    # targets of the generated tokens, the logit lens, the generated ids
    relevancy_targets = LlavaAdapter.relevancy_targets
    _feed_probe = LlavaAdapter._feed_probe
    generated = LlavaAdapter.generated
    run = LlavaAdapter.run

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        super().__init__(model, processor, device)
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        cfg = model.config
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise NotImplementedError("Gemma 3 with do_pan_and_scan=True (several crops per image) is not supported "
                                      "by VL-Atlas; load the processor with do_pan_and_scan=False")
        self.configs = {"lm": cfg.text_config, "vision": cfg.vision_config}
        self.image_token_id = int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None
                                  else cfg.image_token_index)
        self.markers = {int(cfg.boi_token_index): "vision_start", int(cfg.eoi_token_index): "vision_end"}
        unk = self.tokenizer.unk_token_id
        for piece, role in (("<start_of_turn>", "im_start"), ("<end_of_turn>", "im_end")):
            i = self.tokenizer.convert_tokens_to_ids(piece)
            if isinstance(i, int) and i != unk:
                self.markers.setdefault(i, role)
        self.boi_token = self.tokenizer.convert_ids_to_tokens(int(cfg.boi_token_index))
        vc = cfg.vision_config
        self.patch_size = int(vc.patch_size)
        side = int(vc.image_size) // self.patch_size
        per_side = int(math.isqrt(int(cfg.mm_tokens_per_image)))
        if per_side * per_side != int(cfg.mm_tokens_per_image) or side % per_side:
            raise NotImplementedError(f"mm_tokens_per_image={cfg.mm_tokens_per_image} does not pool a {side}x{side} "
                                      "patch grid into square blocks")
        self.kernel = side // per_side  # one lm image token = a kernel x kernel block of tower patches
        self.paths = MODULES
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, "model.language_model").register_forward_pre_hook(self._feed_probe, with_kwargs=True)

    def lens(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The language model's final norm and unembedding, for ``--explain lens``."""
        return module_at(self.model, "model.language_model.norm"), self.model.lm_head

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        arch = getattr(config, "architectures", None) or ["Gemma3ForConditionalGeneration"]
        if "Gemma3ForConditionalGeneration" not in arch:
            raise NotImplementedError(f"{model_id!r} is a {arch}; VL-Atlas's gemma3 adapter handles "
                                      "Gemma3ForConditionalGeneration (an image-text checkpoint)")
        return "Gemma3ForConditionalGeneration"

    # -- inputs ---------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """The processor's chat template when it has one, else ``"<start_of_image> question"``."""
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{self.boi_token} {text}"

    def encode(self, texts: list[str], images: list):
        prompts = [self.prompt(t) for t in texts]
        bos = self.tokenizer.bos_token
        # Gemma's chat template writes <bos> itself: the tokenizer must not add a second one
        kw = {"add_special_tokens": False} if bos and all(p.startswith(bos) for p in prompts) else {}
        enc = self.processor(images=[[im] for im in images], text=prompts,  # one image each
                             return_tensors="pt", padding=True, **kw)
        enc = dict(enc)
        if enc["pixel_values"].shape[0] != len(texts):
            raise NotImplementedError("the processor made several crops per image (pan-and-scan); VL-Atlas's gemma3 "
                                      "adapter handles one crop per image")
        if "token_type_ids" not in enc:  # the image block's bidirectional mask reads them
            enc["token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return Inputs(enc), [[] for _ in texts]

    def generation_config(self, prompt_length: int | None = None):
        return greedy_generation_config(self.model, self.tokenizer, suppress=(self.image_token_id,),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    def extend_inputs(self, out: Inputs, model_inputs: dict, new: torch.Tensor) -> None:
        """The answer's tokens are text: ``token_type_ids`` 0."""
        tt = model_inputs.get("token_type_ids")
        if tt is not None:
            out["token_type_ids"] = torch.cat([tt, torch.zeros_like(new, dtype=tt.dtype)], dim=1)

    # -- layout ---------------------------------------------------------------------
    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        ph, pw = inputs["pixel_values"].shape[-2:]
        ip = self.processor.image_processor
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            pos = torch.nonzero(seen[b]).flatten().tolist()
            p0 = pos[0]
            tid = ids[b, pos].tolist()
            is_img = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            W, H = images[b].size
            geom = crop_geometry(ip, W, H)
            tower = patch_grid(geom, W, H, (pw, ph), self.patch_size)
            pooled = patch_grid(geom, W, H, (pw, ph), self.patch_size * self.kernel)
            if sum(is_img) != len(pooled.cells):
                raise RuntimeError(f"example has {sum(is_img)} image tokens where a {pooled.rows}x{pooled.cols} "
                                   f"pooled grid makes {len(pooled.cells)}")
            pieces = self.tokenizer.convert_ids_to_tokens(tid)
            lm = {k: [] for k in ("stream", "modality", "role", "token", "seq_pos", "patch_row", "patch_col", "box")}
            k = 0
            for i, p, img, piece in zip(tid, pos, is_img, pieces):
                lm["stream"].append("lm")
                lm["modality"].append("image" if img else "text")
                lm["role"].append("patch" if img else "generated" if p >= start[b] else
                                  self.markers.get(i) or self._text_role(i))
                lm["token"].append(None if img else piece)
                lm["seq_pos"].append(p - p0)
                lm["patch_row"].append(pooled.cells[k][0] if img else None)
                lm["patch_col"].append(pooled.cells[k][1] if img else None)
                lm["box"].append(pooled.boxes[k] if img else None)
                k += img
            vision = image_columns(tower, "vision", False)
            tables.append(stack_columns(lm, vision))
            lm_orders.append(pos)
            vis_orders.append(vision["seq_pos"])
            offsets.append(len(pos))
            grids.append((tower.rows, tower.cols))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)
