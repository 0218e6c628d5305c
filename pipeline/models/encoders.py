"""Encoders with a text stream and a vision tower stream (CLIP, SigLIP, BLIP), shared: their token table.

Token table of one example, one index space::

    text:    [CLS]/[bos] w1 ... wn [SEP]/[eos]        token_idx 0 .. T-1   (what the model attends to)
    vision:  ([image CLS]) p(0,0) ... p(g-1,g-1)      token_idx T .. T+V-1

Patch ``(r, c)`` is vision sequence position ``[1 +] r * grid + c``; boxes are mapped back through the
image processor's own geometry (``geometry.crop_geometry``: a resize, and a centre crop where it crops).
A family says which text tokens the model attends to (:meth:`TextVisionEncoder.seen`), their roles
(:meth:`TextVisionEncoder.text_roles`) and whether its tower has an image ``[CLS]`` (``image_cls``).
"""

from __future__ import annotations

import torch

from pipeline.models.base import Adapter, BatchLayout, Inputs, split_stream_layouts
from pipeline.models.geometry import crop_geometry, patch_grid
from pipeline.models.tokens import image_columns, stack_columns, text_columns


class TextVisionEncoder(Adapter):
    """An encoder whose streams are ``text`` and ``vision``, laid out as the module docstring says."""

    image_cls: bool = True

    def seen(self, inputs: Inputs) -> torch.Tensor:
        """``[batch, T]`` bool: the text tokens the model attends to (its attention mask)."""
        return inputs["attention_mask"].cpu().bool()

    def text_roles(self, inputs: Inputs, b: int, tid: list[int], pieces: list[str], text_pos: list[int]) -> list[str]:
        """The roles of example ``b``'s text tokens."""
        return [self._text_role(i, p) for i, p in zip(tid, pieces)]

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()  # [batch, T]
        seen = self.seen(inputs)
        ph, pw = inputs["pixel_values"].shape[-2:]  # [batch, channel, height, width]
        tables, text_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            text_pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, text_pos].tolist()
            pieces = self.tokenizer.convert_ids_to_tokens(tid)
            roles = self.text_roles(inputs, b, tid, pieces, text_pos)
            W, H = images[b].size
            grid = patch_grid(crop_geometry(self.processor.image_processor, W, H), W, H, (pw, ph), self.patch_size)
            vision = image_columns(grid, "vision", self.image_cls)
            tables.append(stack_columns(text_columns("text", pieces, roles, text_pos), vision))
            text_orders.append(text_pos)
            vis_orders.append(vision["seq_pos"])
            offsets.append(len(text_pos))
            grids.append((grid.rows, grid.cols))
        text_sl, vis_sl = split_stream_layouts(tables, offsets, text_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"text": text_sl, "vision": vis_sl}, grids)
