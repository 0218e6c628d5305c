"""BLIP with a cross-attention text encoder: ``BlipForQuestionAnswering``, ``BlipForImageTextRetrieval``.

Three streams (docs/DESIGN.md): ``vision`` (the ViT's self-attention), ``text`` (the self-attention of
the text encoder that reads the image: for VQA the question encoder ``text_encoder``, for
retrieval its ITM text encoder) and ``cross`` (that encoder's cross-attention: text queries over
image keys). Layers are counted within each stream; ``cross`` layer ``l`` sits in text layer ``l``.

Token table of one example, one index space::

    text encoder:  [CLS] w1 ... wn [SEP]                token_idx 0 .. T-1   (pads left out)
    vision tower:  [image CLS] p(0,0) ... p(g-1,g-1)    token_idx T .. T+V-1

- The text is the text encoder's own ``input_ids`` (BLIP's HF processor starts it with
  ``[CLS]``; an ``[ENC]`` or ``[DEC]`` first token, as in the original BLIP, is role ``cls`` too).
  Padding gets no weight from the encoder's attention mask and is left out of the table.
- Patch ``(r, c)`` is vision sequence position ``1 + r * grid + c``; boxes are mapped back
  through the image processor's resize to a square (no crop), x and y scales differ.
- ``cross`` rows are text queries over the vision tokens as keys: its attention is
  ``[batch, head, n_text, n_vision]`` (``BatchLayout.keys = {"cross": "vision"}``); stored rows
  have ``query_idx`` = the text token's ``token_idx`` and ``key_idx`` = the vision token's.
  Its statistics are ``head_stats`` with query masks from the text tokens and key masks from the
  vision tokens: ``t2i`` is 1, ``t2t`` 0, the image-query statistics (``i2t``, ``i2i``,
  ``i2i_noself``) NaN; ``entropy`` is normalised by log(number of vision tokens); ``grounding``
  and ``pointing`` use the boxes of the text words over the patches.

Attention weights: ``BlipAttention`` (vision) and ``BlipTextSelfAttention`` (text self- and
cross-attention, the ``.self`` submodule of ``attention`` / ``crossattention``) return
``(context, attention_probs)``; the hooks read index 1.

Prediction: VQA generates the answer greedily (``model.generate``, at most
:data:`MAX_NEW_TOKENS` tokens) from each example's own unpadded inputs, so it does not depend on
the batch (BLIP's answer decoder attends to every question position, pads included);
``correct`` compares it with the manifest's answer. Retrieval stores the ITM head's probability
of "match" (``softmax(itm_score)[1]``) as the prediction and in ``meta``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from pipeline.models.base import BatchLayout, Inputs, Prediction, normalise_answer
from pipeline.models.hooks import module_at
from pipeline.models.encoders import TextVisionEncoder
from pipeline.models.family import FamilySpec
from pipeline.models.tokens import boxed_masks

BLIP = FamilySpec(
    name="blip",
    classes={"blip": "BlipForQuestionAnswering"},  # or BlipForImageTextRetrieval: HEADS
    streams={
        "vision": {"attention": "vision_model.encoder.layers.{layer}.self_attn",
                   "hidden_0": "vision_model.embeddings",
                   "hidden": "vision_model.encoder.layers.{layer}",
                   # the vision tower's q, k and v come from one fused projection: v is its last third
                   "value": "vision_model.encoder.layers.{layer}.self_attn.qkv#2/3",
                   "out": "vision_model.encoder.layers.{layer}.self_attn.projection"},
        "text": {"attention": "text_encoder.encoder.layer.{layer}.attention.self",
                 "hidden_0": "text_encoder.embeddings",
                 "hidden": "text_encoder.encoder.layer.{layer}",
                 "value": "text_encoder.encoder.layer.{layer}.attention.self.value",
                 "out": "text_encoder.encoder.layer.{layer}.attention.output.dense"},
        "cross": {"attention": "text_encoder.encoder.layer.{layer}.crossattention.self",
                  "value": "text_encoder.encoder.layer.{layer}.crossattention.self.value",
                  "out": "text_encoder.encoder.layer.{layer}.crossattention.output.dense"},
    },
    cross={"cross": "vision"},
    max_new_tokens=10,
)
HEADS = {"BlipForQuestionAnswering": "vqa", "BlipForImageTextRetrieval": "retrieval"}
MAX_NEW_TOKENS = BLIP.max_new_tokens  # the VQA answer's length


class BlipAdapter(TextVisionEncoder):
    """BLIP VQA / ITM: streams ``vision``, ``text`` and ``cross``."""

    family = "blip"
    TEXT_ROLES = ("cls", "sep", "pad")  # and [ENC] / [DEC] are cls (``_text_role``)

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu"):
        super().__init__(model, processor, device)
        self.head = HEADS.get(type(model).__name__)
        if self.head is None:
            raise NotImplementedError(f"VL-Atlas supports BLIP as {', '.join(HEADS)}, not {type(model).__name__}")
        tc, vc = model.config.text_config, model.config.vision_config
        if not hasattr(module_at(model, "text_encoder.encoder.layer.0"), "crossattention"):
            raise NotImplementedError("this BLIP text encoder has no cross-attention (text_config.is_decoder "
                                      "is False); VL-Atlas needs the image-grounded text encoder")
        self.max_text = int(tc.max_position_embeddings)
        self.patch_size = int(vc.patch_size)
        self.configs = {"vision": vc, "text": tc, "cross": tc}
        self.paths = dict(BLIP.streams)

    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        arch = next((a for a in (config.architectures or []) if a in HEADS), None)
        if arch is None:
            raise NotImplementedError(
                f"BLIP model {model_id!r} is a {', '.join(config.architectures or ['(no architecture)'])}; "
                f"VL-Atlas supports {', '.join(HEADS)} (their text encoder attends to the image)")
        return arch

    # -- inputs ---------------------------------------------------------------------
    def encode(self, texts: list[str], images: list):
        notes = self.truncation_notes(texts)
        enc = Inputs(self.processor(images=images, text=texts, return_tensors="pt", padding=True,
                                    truncation=True, max_length=self.max_text))
        if "attention_mask" not in enc:
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        return enc, notes  # on the host: the pipeline moves them to the device

    def _model_inputs(self, inputs):
        return {k: inputs[k] for k in ("input_ids", "pixel_values", "attention_mask")}

    def run(self, inputs, model_inputs, example_ids):
        """One pass of the vision tower and the image-grounded text encoder (the hooked modules)."""
        kw = model_inputs
        if self.head == "vqa":  # forward needs decoder input: one start token (the decoder is not hooked)
            start = torch.full((kw["input_ids"].shape[0], 1), self.model.decoder_start_token_id,
                               dtype=torch.long, device=kw["input_ids"].device)
            return self.model(**kw, decoder_input_ids=start, return_dict=True)
        return self.model(**kw, use_itm_head=True, return_dict=True)

    # -- relevancy (--explain relevancy) -----------------------------------------------
    @property
    def relevancy_unavailable(self) -> str | None:
        if self.head != "retrieval":
            return ("--explain relevancy for BLIP explains the image-text matching head (BlipForImageTextRetrieval): "
                    "the VQA head answers with a decoder that is not captured")
        return None

    def relevancy_targets(self, inputs, outputs) -> list[dict]:
        """The image-text matching head's "match" logit, read at the text encoder's first token (what
        the head reads), under the cross-attention rule (``pipeline.explain.relevancy_cross``). The VQA
        head answers with a decoder that is not captured: no relevancy for it yet."""
        if self.head != "retrieval":
            raise ValueError("--explain relevancy for BLIP explains the image-text matching head "
                             "(BlipForImageTextRetrieval); BLIP's VQA answer decoder is not captured")
        score = outputs.itm_score[:, 1]
        row = torch.zeros_like(score, dtype=torch.long)
        return [{"stream": "text", "rule": "cross", "row": row, "score": score,
                 "active": torch.ones_like(score, dtype=torch.bool), "target": None}]

    # -- layout ---------------------------------------------------------------------
    def _text_role(self, i: int, piece: str | None = None, real: bool = True) -> str:
        if real and piece in ("[ENC]", "[DEC]"):  # the original BLIP's first tokens
            return "cls"
        return super()._text_role(i, piece, real)

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        """``text`` and ``vision`` (``encoders.TextVisionEncoder``), and ``cross``: the text layout for
        the queries, with word boxes over the vision tokens (keys)."""
        out = super().layout(inputs, images, boxes)
        tables, text_sl, vis_sl = out.tokens, out.streams["text"], out.streams["vision"]
        offsets = vis_sl.token_offset
        nq, nk = text_sl.valid.shape[1], vis_sl.valid.shape[1]
        in_box = torch.zeros(len(tables), nq, nk, dtype=torch.bool)
        boxed = torch.zeros(len(tables), nq, dtype=torch.bool)
        for b, (t, nt) in enumerate(zip(tables, offsets)):
            bx, ib = boxed_masks(t, boxes[b], self._pieces)  # over the whole table: text then vision
            boxed[b, :nt] = torch.from_numpy(bx[:nt])
            in_box[b, :nt, :t.num_rows - nt] = torch.from_numpy(ib[:nt, nt:])
        # cross: the text layout for the queries, with word boxes over the vision tokens (keys)
        cross_sl = replace(text_sl, masks=replace(text_sl.masks, in_box=in_box, boxed=boxed))
        return BatchLayout(tables, {"text": text_sl, "vision": vis_sl, "cross": cross_sl}, out.grid,
                           keys=dict(BLIP.cross))

    # -- predictions ----------------------------------------------------------------
    def predict(self, outputs: Any, answers: list[str | None]) -> list[Prediction]:
        out, kw = outputs.outputs, outputs.model_inputs
        if self.head == "retrieval":
            p = torch.softmax(out.itm_score.float(), dim=-1)[:, 1].tolist()
            return [Prediction(f"{x:.4f}", None, {"itm_match_probability": x}) for x in p]
        preds = []
        for b, ans in enumerate(answers):
            real = kw["attention_mask"][b].bool()
            with torch.no_grad():
                gen = self.model.generate(input_ids=kw["input_ids"][b:b + 1, real],
                                          pixel_values=kw["pixel_values"][b:b + 1],
                                          max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
            text = self.tokenizer.decode(gen[0], skip_special_tokens=True).strip()
            correct = None if ans is None else normalise_answer(text) == normalise_answer(ans)
            preds.append(Prediction(text, correct, {}))
        return preds
