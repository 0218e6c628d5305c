"""Dual encoders (CLIP, SigLIP): a text tower and a vision tower that never attend to each other.

Each tower is its own stream (docs/DESIGN.md): ``text`` and ``vision``, layers counted within the
tower. The towers meet only in the similarity of their pooled outputs, which is the model's
"prediction" here (``logits_per_image[i, i]`` of the manifest's own image-text pair).

Token table of one example, one index space::

    text tower:   [bos] w1 ... wn [eos] ([pad] ...)      token_idx 0 .. T-1
    vision tower: ([image CLS]) p(0,0) p(0,1) ... p(g-1,g-1)   token_idx T .. T+V-1

- CLIP's text tower is causal and gets the tokenizer's attention mask: padding receives no
  weight, so pads are left out of the table (an example's rows do not depend on its batch).
- SigLIP's text tower was trained on text padded to ``max_length`` *without* an attention mask
  (its tokenizer returns none), so every query attends to the pads and they carry real mass.
  The pads stay in the table with role ``pad`` (rows still sum to 1 over the table's keys).
  Which tokens are pads comes from the tokenizer's own attention mask, asked for separately
  and never passed to the model unless the processor itself returns one.
- CLIP's vision tower has an image ``[CLS]`` (sequence position 0, role ``image_cls``) before
  the patches; SigLIP's has none. Patch ``(r, c)`` sits at sequence position
  ``[1 +] r * grid_w + c`` (``patch_embedding(...).flatten(2)`` is row-major), the grid being
  the processed image's size over ``patch_size``.

Pixel boxes are mapped back through the image processor's own geometry: CLIP resizes the
shortest side and centre-crops (the crop's offset is added back before scaling), SigLIP
resizes to a square (x and y scale differ).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.models.base import (Adapter, BatchLayout, Inputs, Prediction, encoder_relevancy_targets,
                                  image_columns, split_stream_layouts, stack_columns, text_columns)
from pipeline.models.geometry import crop_geometry, patch_grid

# Native module paths -> (stream, layer): one dict per family (docs/DESIGN.md, Model adapters). Attention modules
# (CLIPAttention / SiglipAttention) return (attn_output, attn_weights); encoder layers return
# their hidden state. Hidden state 0 is the input of block 0, as in the model's own
# ``hidden_states[0]``: for CLIP's vision tower that is *after* ``pre_layrnorm``.
MODULES = {
    "clip": {
        "text": {"attention": "text_model.encoder.layers.{layer}.self_attn",
                 "hidden_0": "text_model.embeddings",
                 "hidden": "text_model.encoder.layers.{layer}",
                 "value": "text_model.encoder.layers.{layer}.self_attn.v_proj",
                 "out": "text_model.encoder.layers.{layer}.self_attn.out_proj"},
        "vision": {"attention": "vision_model.encoder.layers.{layer}.self_attn",
                   "hidden_0": "vision_model.pre_layrnorm",
                   "hidden": "vision_model.encoder.layers.{layer}",
                   "value": "vision_model.encoder.layers.{layer}.self_attn.v_proj",
                   "out": "vision_model.encoder.layers.{layer}.self_attn.out_proj"},
    },
    "siglip": {
        "text": {"attention": "text_model.encoder.layers.{layer}.self_attn",
                 "hidden_0": "text_model.embeddings",
                 "hidden": "text_model.encoder.layers.{layer}",
                 "value": "text_model.encoder.layers.{layer}.self_attn.v_proj",
                 "out": "text_model.encoder.layers.{layer}.self_attn.out_proj"},
        "vision": {"attention": "vision_model.encoder.layers.{layer}.self_attn",
                   "hidden_0": "vision_model.embeddings",
                   "hidden": "vision_model.encoder.layers.{layer}",
                   "value": "vision_model.encoder.layers.{layer}.self_attn.v_proj",
                   "out": "vision_model.encoder.layers.{layer}.self_attn.out_proj"},
    },
}
MODEL_CLASS = {"clip": "CLIPModel", "siglip": "SiglipModel"}
STREAMS = ("text", "vision")  # token-table order: text tokens first
HAS_IMAGE_CLS = {"clip": True, "siglip": False}
REAL_MASK = "text_real"  # key of the tokenizer's own padding mask in the batch's Inputs.state


class DualEncoderAdapter(Adapter):
    """CLIPModel / SiglipModel: streams ``text`` and ``vision``."""

    family = "dual"
    TEXT_ROLES = ("bos", "eos", "cls", "sep")  # padding: by the tokenizer's own mask

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu"):
        super().__init__(model, processor, device)
        self.kind = "siglip" if model.config.model_type == "siglip" else "clip"
        self.family = self.kind
        tc, vc = model.config.text_config, model.config.vision_config
        self.max_text = int(tc.max_position_embeddings)
        self.patch_size = int(vc.patch_size)
        self.configs = {"text": tc, "vision": vc}
        self.paths = {s: MODULES[self.kind][s] for s in STREAMS}

    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return MODEL_CLASS["siglip" if config.model_type == "siglip" else "clip"]

    # -- inputs ---------------------------------------------------------------------
    def encode(self, texts: list[str], images: list):
        notes = self.truncation_notes(texts)
        # SigLIP was trained on text padded to max_length; CLIP pads to the batch's longest text.
        padding = "max_length" if self.kind == "siglip" else True
        kw = dict(padding=padding, truncation=True, max_length=self.max_text)
        enc = self.processor(images=images, text=texts, return_tensors="pt", **kw)
        real = self.tokenizer(texts, return_tensors="pt", return_attention_mask=True, **kw)["attention_mask"]
        # [batch, T] 1 = not padding: bookkeeping only, not a model input
        return Inputs(enc, {REAL_MASK: real}), notes  # on the host: the pipeline moves them to the device

    def run(self, inputs, model_inputs, example_ids):
        return self.model(**model_inputs, output_attentions=True, return_dict=True)

    # -- relevancy (--explain relevancy) -----------------------------------------------
    def relevancy_targets(self, inputs, outputs) -> list[dict]:
        return encoder_relevancy_targets(self, inputs, outputs)

    def relevancy_target(self, outputs) -> torch.Tensor:
        """``[batch]`` the score explained: each example's image-text similarity logit."""
        return torch.diagonal(outputs.logits_per_image)

    def relevancy_rows(self, inputs) -> dict[str, torch.Tensor]:
        """``{stream: [batch] sequence position}`` of each tower's pooled token, as the model pools:
        CLIP's text at its end-of-text token, its vision at the class token; SigLIP's text at the last
        position. SigLIP's vision tower pools with an attention head of its own, which is not a
        token: it has no row here."""
        ids = inputs["input_ids"]
        if self.kind == "siglip":
            return {"text": torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)}
        eos = self.model.config.text_config.eos_token_id
        text = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)  # as CLIPTextTransformer pools
        return {"text": text, "vision": torch.zeros_like(text)}

    # -- layout ---------------------------------------------------------------------
    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()  # [batch, T]
        real = inputs.state[REAL_MASK].cpu().bool()  # [batch, T]
        # tokens the model attends to: those of its attention mask, or all when it gets none
        seen = inputs["attention_mask"].cpu().bool() if "attention_mask" in inputs else torch.ones_like(real)
        ph, pw = inputs["pixel_values"].shape[-2:]  # [batch, channel, height, width]
        tables, text_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            text_pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, text_pos].tolist()
            pieces = self.tokenizer.convert_ids_to_tokens(tid)
            roles = [self._text_role(i, real=bool(real[b, p])) for i, p in zip(tid, text_pos)]
            W, H = images[b].size
            grid = patch_grid(crop_geometry(self.processor.image_processor, W, H), W, H, (pw, ph), self.patch_size)
            vision = image_columns(grid, "vision", HAS_IMAGE_CLS[self.kind])
            tables.append(stack_columns(text_columns("text", pieces, roles, text_pos), vision))
            text_orders.append(text_pos)
            vis_orders.append(vision["seq_pos"])
            offsets.append(len(text_pos))
            grids.append((grid.rows, grid.cols))
        text_sl, vis_sl = split_stream_layouts(tables, offsets, text_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"text": text_sl, "vision": vis_sl}, grids)

    # -- predictions ----------------------------------------------------------------
    def predict(self, outputs: Any, answers: list[str | None]) -> list[Prediction]:
        """The similarity of each example's own image and text (``logits_per_image[i, i]``)."""
        sim = torch.diagonal(outputs.logits_per_image.float()).tolist()
        preds = []
        for s in sim:
            meta = {"similarity": s}
            if self.kind == "siglip":  # SigLIP is trained with a pairwise sigmoid: a match probability
                meta["match_probability"] = 1.0 / (1.0 + math.exp(-s))
            preds.append(Prediction(f"{s:.4f}", None, meta))
        return preds
