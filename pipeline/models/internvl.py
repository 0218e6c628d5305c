"""InternVL (``InternVLForConditionalGeneration``): streams ``lm`` and ``vision``.

A decoder LVLM (the answer is generated greedily first under the checkpoint's own generation config,
uncaptured, then one teacher-forced pass over prompt + answer runs with the capture hooks; see
``base.DecoderAdapter``), with dynamic tiling and pixel shuffle. It reuses the crop machinery of
``pipeline/models/llava_next.py`` (the tower's batch is the crops; its hooks regroup it per example).

**Crops.** The image processor (``GotOcr2ImageProcessor``, ``crop_to_patches``) picks the tile grid
``rows x cols`` (``get_optimal_tiled_canvas``: the aspect ratio with ``min_patches <= rows cols <=
max_patches`` closest to the image's), resizes the original to ``cols S x rows S`` (``S`` the tower's
input size, each axis by its own ratio) and cuts it row by row into ``S x S`` tiles; when there is more
than one tile it appends a *thumbnail* (the whole original resized to ``S x S``). The crops go to the
tower in this order: tiles, then the thumbnail. ``tile`` in the token table numbers them as LLaVA-NeXT
does: **0 the thumbnail (the base image: the whole original), ``1..`` the tiles in the processor's
row-by-row order** (tile ``1 + tr * cols + tc``). A single-tile image (grid 1 x 1, no thumbnail) has
one crop, the whole image: tile 0.

**Image tokens of ``lm``.** Each crop's tower patches (``[CLS]`` dropped with
``vision_feature_select_strategy="default"``) form an ``n x n`` map, which the model's own
``pixel_shuffle`` (``downsample_ratio``, e.g. 0.5) folds into ``n r x n r`` tokens, each holding an
``1/r x 1/r`` block of patches. The adapter does not re-derive the shuffle: it runs the model's own
``pixel_shuffle`` on features holding each patch's coordinates and reads back each token's block
(``token_blocks``). An image's ``lm`` tokens are ``<img>``, the crops' tokens in the processor's order
(tiles, then the thumbnail), ``</img>``: an image token's ``tile`` is its crop's, ``patch_row,
patch_col`` its place in its crop's shuffled grid, its box the union of its block's patch boxes in
original pixels (through the crop's place in the resized image, or the thumbnail's resize).
``<img>``/``</img>`` are text tokens with roles ``vision_start``/``vision_end``. The count is checked
against the ``<IMG_CONTEXT>`` tokens of ``input_ids``.

**The ``vision`` stream**: every crop of the example in the tower's order (tiles, then thumbnail), one
attention block each (each crop's ``[CLS]`` then its ``n x n`` patches; crops never attend to each
other), as LLaVA-NeXT's. ``examples.grid_h``/``grid_w`` are one crop's shuffled grid.

Processor: ``AutoProcessor`` when it builds; without torchvision (InternVL's processor holds a video
processor) ``InternVLProcessor`` is assembled from the checkpoint's tokenizer, image processor (the PIL
backend) and ``processor_config.json``'s ``image_seq_length``, with no video processor (images only).
Not captured: the tower's ``--explain value``; videos; several images per example.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from pipeline.models.base import (GEN_START, IMAGE_HOLD, AssembledProcessor, BatchLayout, DecoderAdapter, Inputs,
                                  Probe, checked_architecture, module_at, processor_or, split_stream_layouts,
                                  stack_columns)
from pipeline.models.crop_tower import crop_columns
from pipeline.models.geometry import _size
from pipeline.models.llava_next import LlavaNextAdapter, _read_json

PATHS = {
    "vision": {"attention": "model.vision_tower.encoder.layer.{layer}.attention",
               "hidden_0": "model.vision_tower.embeddings",
               "hidden": "model.vision_tower.encoder.layer.{layer}",
               "value": "model.vision_tower.encoder.layer.{layer}.attention.v_proj",
               "out": "model.vision_tower.encoder.layer.{layer}.attention.projection_layer",
               "layers": "model.vision_tower.encoder.layer"},
    "lm": {"attention": "model.language_model.layers.{layer}.self_attn",
           "hidden": "model.language_model.layers.{layer}",
           "value": "model.language_model.layers.{layer}.self_attn.v_proj",
           "out": "model.language_model.layers.{layer}.self_attn.o_proj",
           "layers": "model.language_model.layers"},
}


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class InternVLAdapter(LlavaNextAdapter):
    """InternVLForConditionalGeneration: streams ``lm`` and ``vision`` (crops as blocks)."""

    family = "internvl"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        DecoderAdapter.__init__(self, model, processor, device)
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        cfg = model.config
        vc = cfg.vision_config
        self.configs = {"lm": cfg.text_config, "vision": vc}
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.strategy = cfg.vision_feature_select_strategy
        if self.strategy != "default":
            raise NotImplementedError(f"vision_feature_select_strategy={self.strategy!r}: VL-Atlas's InternVL "
                                      "adapter knows 'default' (the tower's [CLS] dropped)")
        if int(cfg.vision_feature_layer) != -1:
            raise NotImplementedError("vision_feature_layer other than -1 is not supported for InternVL")
        ph, pw = _pair(vc.patch_size)
        sh, sw = _pair(vc.image_size)
        if ph != pw or sh != sw:
            raise NotImplementedError("InternVL with non-square patches or crops is not supported")
        self.patch_size, self.crop_px = ph, sh
        self.side = sh // ph  # tower patches a side of one crop
        self.ratio = float(cfg.downsample_ratio)
        self.merged = int(round(self.side * self.ratio))  # shuffled tokens a side of one crop
        self.tower_cls = True
        self.paths = {s: PATHS[s] for s in ("lm", "vision")}
        tok = self.tokenizer
        self.marker_roles = {}
        for attr, role in (("start_image_token", "vision_start"), ("end_image_token", "vision_end")):
            t = getattr(processor, attr, None) or getattr(tok, attr, None)
            if t is not None:
                self.marker_roles[int(tok.convert_tokens_to_ids(t))] = role
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, "model.language_model").register_forward_pre_hook(self._feed_probe, with_kwargs=True)
        self._hook_crop_tower(model, int(vc.num_hidden_layers))

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, "InternVLForConditionalGeneration", "internvl")

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        return processor_or(model_id, revision, InternVLImageTextProcessor)

    # -- crops ------------------------------------------------------------------------
    @property
    def tokens_per_crop(self) -> int:
        return self.merged * self.merged

    def batch_crops(self, inputs, model_inputs) -> list[int]:
        return self.crops_by_image_tokens(inputs, self.image_token_id, self.tokens_per_crop)

    def grid_of(self, H: int, W: int) -> tuple[int, int]:
        """``(rows, cols)`` of the tile grid the image processor picks for an ``H x W`` image (1 x 1 when it
        does not tile)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = self.processor.image_processor
        if int(ip.max_patches) <= 1:  # InternVLProcessor always asks for crop_to_patches
            return 1, 1
        sh, sw = _size(ip.size, "height"), _size(ip.size, "width")
        cols, rows = get_optimal_tiled_canvas((H, W), (sh, sw), int(ip.min_patches), int(ip.max_patches))
        return int(rows), int(cols)

    def token_blocks(self) -> list[list[tuple[int, int]]]:
        """Per shuffled token of one crop (in the model's order): the tower patches ``(row, col)`` its
        channels hold, by the model's own ``pixel_shuffle`` on coordinate features."""
        n = self.side
        r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        feats = torch.tensor(np.stack([r, c], -1), dtype=torch.float64).reshape(1, n, n, 2)
        out = self.model.model.pixel_shuffle(feats, scale_factor=self.ratio)
        out = out.reshape(-1, out.shape[-1]).numpy()  # [tokens, 2 k]
        return [sorted({(int(t[2 * i]), int(t[2 * i + 1])) for i in range(len(t) // 2)}) for t in out]

    def _crop_boxes(self, H: int, W: int) -> list[tuple[list, tuple]]:
        """Per crop in tile order (0 the thumbnail / whole image, then the tiles row by row): its tower
        patches' boxes (raster) and its whole box, in original pixels."""
        rows, cols = self.grid_of(H, W)
        S, p, n = self.crop_px, self.patch_size, self.side

        def grid(x0, y0, sx, sy):  # crop pixel (u, v) -> original (x0 + u sx, y0 + v sy)
            def px(u, v):
                return min(max(x0 + u * sx, 0.0), float(W)), min(max(y0 + v * sy, 0.0), float(H))
            boxes = [px(cc * p, rr * p) + px((cc + 1) * p, (rr + 1) * p) for rr in range(n) for cc in range(n)]
            return boxes, px(0, 0) + px(S, S)

        out = [grid(0.0, 0.0, W / S, H / S)]
        if rows * cols > 1:
            sx, sy = W / (cols * S), H / (rows * S)
            for t in range(rows * cols):
                tr, tc = divmod(t, cols)
                out.append(grid(tc * S * sx, tr * S * sy, sx, sy))
        return out

    def crop_order(self, H: int, W: int) -> list[int]:
        """The tiles of the crops in the processor's (and the tower's) order: tiles, then the thumbnail."""
        rows, cols = self.grid_of(H, W)
        return [0] if rows * cols == 1 else list(range(1, rows * cols + 1)) + [0]

    # -- layout ---------------------------------------------------------------------
    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        if len(images) != ids.shape[0]:
            raise RuntimeError(f"{len(images)} images for {ids.shape[0]} examples; VL-Atlas takes one image each")
        blocks = self.token_blocks()
        m = self.merged
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            W, H = images[b].size
            crop_boxes = self._crop_boxes(H, W)
            order = self.crop_order(H, W)

            def union(bs):
                return (min(x[0] for x in bs), min(x[1] for x in bs), max(x[2] for x in bs), max(x[3] for x in bs))

            img_rows = []
            for t in order:
                pb = crop_boxes[t][0]
                for k, blk in enumerate(blocks):
                    img_rows.append(("patch", t, k // m, k % m, union([pb[r * self.side + c] for r, c in blk])))
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            is_img = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            if sum(is_img) != len(img_rows):
                raise RuntimeError(f"example has {sum(is_img)} image tokens where the model makes {len(img_rows)} "
                                   f"for a {W}x{H} image ({len(order)} crops)")
            lm = self._lm_columns(tid, pos, is_img, start[b], img_rows)
            vis = crop_columns([(t, *crop_boxes[t]) for t in order], self.side, True)
            tables.append(stack_columns(lm, vis))
            lm_orders.append(pos)
            vis_orders.append(vis["seq_pos"])
            offsets.append(len(pos))
            grids.append((m, m))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)


class InternVLImageTextProcessor(AssembledProcessor):
    """What ``InternVLProcessor`` does for images and text, from a tokenizer and an image processor (no video
    processor: transformers builds InternVL's only with torchvision).

    ``__call__(images=, text=)`` runs the image processor with ``crop_to_patches=True`` (``pixel_values``: every
    image's crops, concatenated; ``num_patches`` per image), replaces the ``i``-th ``<IMG_CONTEXT>`` of the
    prompts by ``<img>`` + ``image_seq_length * num_patches[i]`` ``<IMG_CONTEXT>`` + ``</img>`` and tokenizes.
    """

    def __init__(self, image_processor, tokenizer, image_seq_length: int = 256, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, chat_template)
        self.image_seq_length = int(image_seq_length)
        self.start_image_token = getattr(tokenizer, "start_image_token", None) or "<img>"
        self.end_image_token = getattr(tokenizer, "end_image_token", None) or "</img>"
        self.image_token = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> "InternVLImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        settings = json.loads(_read_json(model_id, "processor_config.json", revision) or "{}")
        template = settings.get("chat_template") or _read_json(model_id, "chat_template.jinja", revision)
        kw = {"image_seq_length": settings["image_seq_length"]} if "image_seq_length" in settings else {}
        return cls(AutoImageProcessor.from_pretrained(model_id, revision=revision),
                   AutoTokenizer.from_pretrained(model_id, revision=revision), chat_template=template, **kw)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if images is not None:
            got = self.image_processor(images=images, crop_to_patches=True, return_tensors=return_tensors)
            counts = [int(n) for n in np.asarray(got["num_patches"]).reshape(-1)]
            out["pixel_values"] = got["pixel_values"]
            texts = self.expand(texts, len(counts), lambda i: self.start_image_token
                                + IMAGE_HOLD * (self.image_seq_length * counts[i]) + self.end_image_token)
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kw)
        return {**enc, **out}
