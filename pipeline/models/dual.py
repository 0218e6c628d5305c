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

from pipeline.models.base import Inputs, Prediction, encoder_relevancy_targets
from pipeline.models.encoders import TextVisionEncoder
from pipeline.models.family import FamilySpec, encoder_paths

# Native module paths -> (stream, layer): one declaration per family (docs/DESIGN.md, Model adapters).
# Attention modules (CLIPAttention / SiglipAttention) return (attn_output, attn_weights); encoder layers
# return their hidden state. Hidden state 0 is the input of block 0, as in the model's own
# ``hidden_states[0]``: for CLIP's vision tower that is *after* ``pre_layrnorm``.
TEXT = encoder_paths("text_model")
CLIP = FamilySpec(name="clip", classes={"clip": "CLIPModel"},
                  streams={"text": TEXT, "vision": encoder_paths("vision_model", hidden_0="pre_layrnorm")})
SIGLIP = FamilySpec(name="siglip", classes={"siglip": "SiglipModel"},
                    streams={"text": TEXT, "vision": encoder_paths("vision_model")})
SPECS = {"clip": CLIP, "siglip": SIGLIP}
HAS_IMAGE_CLS = {"clip": True, "siglip": False}
REAL_MASK = "text_real"  # key of the tokenizer's own padding mask in the batch's Inputs.state


class DualEncoderAdapter(TextVisionEncoder):
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
        self.paths = dict(SPECS[self.kind].streams)
        self.image_cls = HAS_IMAGE_CLS[self.kind]

    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        kind = "siglip" if config.model_type == "siglip" else "clip"
        return SPECS[kind].classes[kind]

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
    def seen(self, inputs: Inputs) -> torch.Tensor:
        """The tokens the model attends to: those of its attention mask, or all when it gets none."""
        real = inputs.state[REAL_MASK].cpu().bool()  # [batch, T]
        return inputs["attention_mask"].cpu().bool() if "attention_mask" in inputs else torch.ones_like(real)

    def text_roles(self, inputs: Inputs, b: int, tid: list[int], pieces: list[str], text_pos: list[int]) -> list[str]:
        """Pads by the tokenizer's own mask (SigLIP's pads are attended to: role ``pad``)."""
        real = inputs.state[REAL_MASK][b].cpu().bool()
        return [self._text_role(i, real=bool(real[p])) for i, p in zip(tid, text_pos)]

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
