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

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor

from pipeline.capture import HookPoint
from pipeline.models.base import (BatchLayout, Prediction, encoder_relevancy_targets, require_eager, stream_hook_points,
                                  split_stream_layouts, stream_shapes, token_rows)

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
REAL_MASK = "vlatlas_text_real"  # key of the tokenizer's own padding mask in encode()'s inputs


def _size(sd, key):
    """A key of an image processor's size dict (``SizeDict`` or plain dict)."""
    if sd is None:
        return None
    return sd.get(key) if isinstance(sd, dict) else getattr(sd, key, None)


def crop_geometry(image_processor, width: int, height: int) -> tuple[float, float, int, int, int, int]:
    """Where the processed image lies in the original one.

    Returns ``(sx, sy, left, top, out_w, out_h)``: processed pixel ``(u, v)`` comes from original
    pixel ``((u + left) / sx, (v + top) / sy)``, with ``sx``/``sy`` the resize scale and
    ``left``/``top`` the centre crop's offset in the resized image (negative where the crop pads);
    ``out_w``/``out_h`` the processed size. Uses transformers' own size helpers.
    """
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio

    ip = image_processor
    rw, rh = width, height
    if getattr(ip, "do_resize", True):
        size = ip.size
        short, long_, h, w = (_size(size, k) for k in ("shortest_edge", "longest_edge", "height", "width"))
        if short and long_:
            rh, rw = get_size_with_aspect_ratio((height, width), short, long_)
        elif short:
            rh, rw = get_resize_output_image_size(np.zeros((1, height, width)), size=short,
                                                  default_to_square=False, input_data_format="channels_first")
        elif h and w:
            rh, rw = h, w
        else:
            raise NotImplementedError(f"VL-Atlas cannot map boxes through {type(ip).__name__}'s resize "
                                      f"to {size}; supported: shortest_edge, height/width")
    sx, sy = rw / width, rh / height
    left = top = 0
    ow, oh = rw, rh
    if getattr(ip, "do_center_crop", False):
        ch, cw = int(_size(ip.crop_size, "height")), int(_size(ip.crop_size, "width"))
        pil = type(ip).__name__.endswith("Pil")  # numpy backend pads ceil(d/2) on the left, torchvision floor

        def offset(full, crop):
            if crop <= full:
                return (full - crop) // 2
            d = crop - full
            return -((d + 1) // 2 if pil else d // 2)

        left, top, ow, oh = offset(rw, cw), offset(rh, ch), cw, ch
    return sx, sy, left, top, ow, oh


class DualEncoderAdapter:
    """CLIPModel / SiglipModel: streams ``text`` and ``vision``."""

    family = "dual"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu"):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.kind = "siglip" if model.config.model_type == "siglip" else "clip"
        self.family = self.kind
        tc, vc = model.config.text_config, model.config.vision_config
        self.max_text = int(tc.max_position_embeddings)
        self.patch_size = int(vc.patch_size)
        self.configs = {"text": tc, "vision": vc}

    # -- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32, revision: str | None = None):
        import transformers

        config = AutoConfig.from_pretrained(model_id, revision=revision)
        kind = "siglip" if config.model_type == "siglip" else "clip"
        model = getattr(transformers, MODEL_CLASS[kind]).from_pretrained(
            model_id, revision=revision, attn_implementation="eager", dtype=dtype)
        require_eager(model, model_id, MODEL_CLASS[kind])
        processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        return cls(model.to(device).eval(), processor, device)

    def streams(self) -> dict[str, dict[str, int]]:
        return stream_shapes(self.configs)

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        return stream_hook_points(self.model, self.configs, {s: MODULES[self.kind][s] for s in STREAMS}, keep_hidden,
                                  explain=explain)

    # -- inputs ---------------------------------------------------------------------
    def check_image(self, image) -> None:
        """Every image the loader accepts can be resized (and cropped) to the tower's size."""

    def encode(self, texts: list[str], images: list):
        notes: list[list[tuple[str, str]]] = []
        for t in texts:
            n = len(self.tokenizer(t, add_special_tokens=True)["input_ids"])
            notes.append([("text", f"text truncated from {n} to {self.max_text} tokens (the model's limit)")]
                         if n > self.max_text else [])
        # SigLIP was trained on text padded to max_length; CLIP pads to the batch's longest text.
        padding = "max_length" if self.kind == "siglip" else True
        kw = dict(padding=padding, truncation=True, max_length=self.max_text)
        enc = dict(self.processor(images=images, text=texts, return_tensors="pt", **kw))
        real = self.tokenizer(texts, return_tensors="pt", return_attention_mask=True, **kw)["attention_mask"]
        enc[REAL_MASK] = real  # [batch, T] 1 = not padding (bookkeeping only; not a model input)
        return dict(enc), notes  # on the host: the pipeline moves them to the device

    def forward(self, inputs: dict[str, torch.Tensor], example_ids=None, grad: bool = False):
        """``grad``: build the autograd graph (``--explain relevancy``'s second pass)."""
        model_inputs = {k: v for k, v in inputs.items() if k != REAL_MASK}
        with torch.set_grad_enabled(grad):
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
    def _text_role(self, i: int, real: bool) -> str:
        tok = self.tokenizer
        if not real:
            return "pad"
        for role in ("bos", "eos", "cls", "sep"):
            if getattr(tok, f"{role}_token_id", None) == i:
                return role
        return "word"

    def layout(self, inputs: dict[str, torch.Tensor], images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()  # [batch, T]
        real = inputs[REAL_MASK].cpu().bool()  # [batch, T]
        # tokens the model attends to: those of its attention mask, or all when it gets none
        seen = inputs["attention_mask"].cpu().bool() if "attention_mask" in inputs else torch.ones_like(real)
        ph, pw = inputs["pixel_values"].shape[-2:]  # [batch, channel, height, width]
        ps = self.patch_size
        gh, gw = ph // ps, pw // ps
        first = 1 if HAS_IMAGE_CLS[self.kind] else 0
        tables, text_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            text_pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, text_pos].tolist()
            pieces = self.tokenizer.convert_ids_to_tokens(tid)
            roles = [self._text_role(i, bool(real[b, p])) for i, p in zip(tid, text_pos)]
            W, H = images[b].size
            sx, sy, left, top, ow, oh = crop_geometry(self.processor.image_processor, W, H)
            if (ow, oh) != (pw, ph):
                raise RuntimeError(f"the image processor made a {pw}x{ph} image where its settings say "
                                   f"{ow}x{oh}; VL-Atlas cannot place patches on the original image")

            def px(u, v):  # processed pixel -> original pixel, clipped to the image
                return min(max((u + left) / sx, 0.0), float(W)), min(max((v + top) / sy, 0.0), float(H))

            rc = [(r, c) for r in range(gh) for c in range(gw)]  # raster order
            bx = [px(c * ps, r * ps) + px((c + 1) * ps, (r + 1) * ps) for r, c in rc]
            nt, nv = len(text_pos), first + len(rc)
            cls_box = [px(0, 0) + px(pw, ph)] if first else []  # the image [CLS] sees the processed image
            bx = cls_box + bx
            none_t, none_v = [None] * nt, [None] * nv
            vis_seq = list(range(first)) + [first + r * gw + c for r, c in rc]
            tables.append(token_rows(
                token_idx=list(range(nt + nv)),
                stream=["text"] * nt + ["vision"] * nv,
                modality=["text"] * nt + ["image"] * nv,
                role=roles + ["image_cls"] * first + ["patch"] * len(rc),
                token=pieces + none_v,
                seq_pos=text_pos + vis_seq,
                text_pos=list(range(nt)) + none_v,
                patch_row=none_t + [None] * first + [r for r, _ in rc],
                patch_col=none_t + [None] * first + [c for _, c in rc],
                x0=none_t + [q[0] for q in bx], y0=none_t + [q[1] for q in bx],
                x1=none_t + [q[2] for q in bx], y1=none_t + [q[3] for q in bx],
            ))
            text_orders.append(text_pos)
            vis_orders.append(vis_seq)
            offsets.append(nt)
            grids.append((gh, gw))
        text_sl, vis_sl = split_stream_layouts(tables, offsets, text_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"text": text_sl, "vision": vis_sl}, grids)

    def _pieces(self, label: str) -> list[str]:
        return self.tokenizer.tokenize(label)

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
