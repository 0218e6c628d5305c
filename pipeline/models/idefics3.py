"""Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM (``SmolVLMForConditionalGeneration``):
streams ``lm`` and ``vision``.

**Crops.** With ``do_image_splitting`` the image processor resizes the image (longest edge to
``size["longest_edge"]``, then each side up to a multiple of ``m = max_image_size["longest_edge"]``:
``rows m x cols m``), cuts it row by row into ``rows x cols`` crops of ``m x m`` and appends the
*global image* (the whole, stretched to ``m x m``). An image that fits one crop is only the global
image (``rows = cols = 0``). ``tile`` in the token table: the global image 0, crop ``(r, c)``
``1 + r cols + c``.

**Pixel shuffle.** The connector folds each ``s x s`` block of tower patches (``s = scale_factor``)
into one token: lm image token ``k`` of a crop is pooled cell ``(i, j) = divmod(k, side / s)``
covering tower patches ``i s .. i s + s - 1`` x ``j s .. j s + s - 1``; its box is that block's
region of the crop, mapped to original pixels (crop ``(r, c)`` is resized pixels
``[c m, (c + 1) m) x [r m, (r + 1) m)`` of the ``cols m x rows m`` resized image, a stretch of the
original; the global image is the original stretched to ``m x m``).

**Markers.** The processor writes, per crop, ``<fake_token_around_image><row_R_col_C>`` then the
crop's image tokens (a ``\\n`` after each row), then ``\\n<fake_token_around_image><global-img>``,
the global image's tokens and a closing ``<fake_token_around_image>``. Roles:
``<fake_token_around_image>`` ``image_boundary``, ``<row_R_col_C>`` ``tile_marker``,
``<global-img>`` ``global_marker``; ``<end_of_utterance>`` ``im_end``.

**``vision``**: as LLaVA-NeXT's (``towers.CropTower``), every crop of the example one
after another in the processor's order (crops row by row, then the global image), one block each
of a block-diagonal attention; ``seq_pos`` ``crop * n + patch``.

Token table of one example::

    lm:     [bos] ... <fake> <row_1_col_1> <img (0,0)> ... <fake> <row_1_col_2> ... \\n \\n <fake> <global-img> <img> ... <fake> ... g1 ... gm
    vision: crop 1: p(0,0) ... crop 2: ... global image: p(0,0) ...

The answer: ``decoder.DecoderAdapter`` (greedy under the checkpoint's own generation config, the image
token suppressed; then one teacher-forced captured pass). One image per example.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.models.decoder import MAX_NEW_TOKENS, Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import FamilySpec, encoder_paths
from pipeline.models.processors import SmolVLMImageTextProcessor, processor_or
from pipeline.models.tokens import crop_columns

__all__ = ["IDEFICS3", "MAX_NEW_TOKENS", "Idefics3Adapter", "SmolVLMImageTextProcessor"]

CELLS = [(r, c) for r in range(1, 7) for c in range(1, 7)]  # the processor's <row_R_col_C> markers
IDEFICS3 = FamilySpec(
    name="",  # config.model_type: idefics3 or smolvlm
    classes={"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"},
    streams={"lm": {"attention": "model.text_model.layers.{layer}.self_attn",
                    "hidden": "model.text_model.layers.{layer}",
                    "value": "model.text_model.layers.{layer}.self_attn.v_proj",
                    "out": "model.text_model.layers.{layer}.self_attn.o_proj",
                    "layers": "model.text_model.layers"},
             "vision": {k: v for k, v in encoder_paths("model.vision_model").items() if k not in ("value", "out")}},
    tower="pixel_shuffle",
    lm="model.text_model", lm_norm="model.text_model.norm",
    markers={"<fake_token_around_image>": "image_boundary", "<global-img>": "global_marker",
             "<end_of_utterance>": "im_end", **{f"<row_{r}_col_{c}>": "tile_marker" for r, c in CELLS}},
    prompt="<image>{text}",
    drop_inputs=("rows", "cols"),
    nested_images=True,
)


class Idefics3Adapter(ExplainedDecoder):
    """Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration: streams ``lm`` and ``vision``
    (the tower's batch is the crops: regrouped per example, one block each)."""

    spec = IDEFICS3

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        super().__init__(model, processor, device, max_new_tokens)
        cfg = model.config
        self.scale = int(cfg.scale_factor)
        if self.side % self.scale:
            raise NotImplementedError(f"scale_factor={self.scale} does not divide a {self.side}x{self.side} patch grid")
        self.pooled = self.side // self.scale
        vocab = self.tokenizer.get_vocab()  # <row_R_col_C> id -> (R, C)
        self.cell_of = {vocab[f"<row_{r}_col_{c}>"]: (r, c) for r, c in CELLS if f"<row_{r}_col_{c}>" in vocab}

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        """``AutoProcessor``; SmolVLM's needs a video processor (torchvision) and ``num2words``, so
        without them ``processors.SmolVLMImageTextProcessor`` (images only)."""
        return processor_or(model_id, revision, SmolVLMImageTextProcessor)

    # -- the model --------------------------------------------------------------------
    @staticmethod
    def crops_of(pixel_values: torch.Tensor) -> list[int]:
        """Real crops per example: the model drops all-zero (padding) crops before the tower."""
        pv = pixel_values.reshape(*pixel_values.shape[:2], -1)
        return (pv != 0).any(-1).sum(1).tolist()

    def tower_batch(self, inputs, model_inputs) -> list[int]:
        return self.crops_of(model_inputs["pixel_values"].cpu())

    # -- layout ---------------------------------------------------------------------
    def crop_boxes(self, W: int, H: int, n_crops: int, token_ids: list[int] | None = None
                   ) -> tuple[list[int], list[list[tuple]], list[list[tuple]]]:
        """Per crop in the processor's order: its tile, its pooled tokens' boxes and its tower
        patches' boxes (original pixels). The crop grid is read from the prompt's ``<row_R_col_C>``
        markers (``token_ids``), else from the processor run on a blank image of the same size."""
        m, ps, s = self.crop_px, self.patch_size, self.scale
        if n_crops == 1:
            grid, rows, cols = [(None, None)], 1, 1
        else:
            cells = [self.cell_of[i] for i in token_ids or () if i in self.cell_of]
            if len(cells) == n_crops - 1:
                rows, cols = max(r for r, _ in cells), max(c for _, c in cells)
                if cells != [(r + 1, c + 1) for r in range(rows) for c in range(cols)]:
                    raise RuntimeError(f"the prompt's crop markers {cells} are not a grid in row order")
            else:
                rows, cols = self.split_grid(W, H, n_crops - 1)
            grid = [divmod(k, cols) for k in range(n_crops - 1)] + [(None, None)]
        tiles, pooled, tower = [], [], []
        for r, c in grid:
            if r is None:  # global image: the original stretched to m x m
                fx, fy, ox, oy, tiles_t = W / m, H / m, 0.0, 0.0, 0
            else:
                fx, fy, ox, oy, tiles_t = W / (cols * m), H / (rows * m), c * m, r * m, 1 + r * cols + c

            def box(x0, y0, x1, y1, fx=fx, fy=fy, ox=ox, oy=oy):
                return ((ox + x0) * fx, (oy + y0) * fy, (ox + x1) * fx, (oy + y1) * fy)

            tiles.append(tiles_t)
            q = ps * s
            pooled.append([box(j * q, i * q, (j + 1) * q, (i + 1) * q)
                           for i in range(self.pooled) for j in range(self.pooled)])
            tower.append([box(j * ps, i * ps, (j + 1) * ps, (i + 1) * ps)
                          for i in range(self.side) for j in range(self.side)])
        return tiles, pooled, tower

    def split_grid(self, W: int, H: int, n: int) -> tuple[int, int]:
        """``(rows, cols)`` of the crops of a ``W x H`` image, by the processor's own resizing."""
        ip = self.processor.image_processor
        from PIL import Image

        out = ip(images=[[Image.fromarray(np.zeros((H, W, 3), np.uint8))]], return_tensors="np",
                 return_row_col_info=True)
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        if rows * cols != n:
            raise RuntimeError(f"{n} crops where the processor cuts {rows} x {cols}")
        return rows, cols

    def batch_context(self, inputs, images):
        return self.crops_of(inputs["pixel_values"].cpu())

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Crop by crop in the processor's order, each crop's pooled cells in raster order."""
        W, H = ex.image.size
        n, per = ctx[ex.b], self.pooled * self.pooled
        tiles, pooled, tower = self.crop_boxes(W, H, n, ex.prompt_ids)
        rows = [("patch", tiles[crop], *divmod(cell, self.pooled), pooled[crop][cell])
                for crop in range(n) for cell in range(per)]
        vision = crop_columns([(tiles[t], tower[t], None) for t in range(n)], self.side, False)
        return ImageTokens(rows, vision, (self.side, self.side), f"{n} crops make {per * n}")
