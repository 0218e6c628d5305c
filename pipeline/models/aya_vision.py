"""Aya Vision (``AyaVisionForConditionalGeneration``): streams ``lm`` and ``vision``.

A SigLIP tower, a pixel-shuffle projector and a Cohere2 decoder (sliding-window and global layers;
rows sum to 1 over the keys each query may see).

**Tiles.** The image processor (``GotOcr2ImageProcessor`` with ``crop_to_patches``) picks the tile
grid ``rows x cols`` (``get_optimal_tiled_canvas``: the aspect ratio with ``min_patches <= rows cols
<= max_patches`` closest to the image's), resizes the original to ``cols S x rows S`` (``S`` the
tower's input size, each axis by its own ratio), cuts it row by row into ``S x S`` tiles and, when
there is more than one, appends a *thumbnail* (the whole original resized to ``S x S``). The tower
sees the crops in that order: tiles, then the thumbnail. ``tile`` in the token table, as InternVL's:
0 the thumbnail (the base image, the whole original), ``1 + tr cols + tc`` tile ``(tr, tc)``; a
single-tile image is one crop, the whole image, tile 0.

**Pixel shuffle.** The projector folds each ``s x s`` block of a crop's tower patches (``s =
downsample_factor``) into one image token: a crop's ``(n / s)^2`` tokens in raster order over the
shuffled grid. The adapter does not re-derive the fold: it runs the model's own ``pixel_shuffle`` on
features holding each patch's coordinates and reads back each token's block (``token_blocks``). An
image token's ``patch_row``/``patch_col`` are its place on its crop's shuffled grid, its box the union
of its block's patch boxes in original pixels, through its crop's place in the resized image (or the
thumbnail's resize); ``grid_h``/``grid_w`` are one crop's shuffled grid.

**Markers.** The processor writes ``<|START_OF_IMG|>``, then per tile ``TILE_k`` and its tokens, then
``TILE_GLOBAL`` and the thumbnail's tokens, then ``<|END_OF_IMG|>``. Roles: ``<|START_OF_IMG|>``
``vision_start``, ``<|END_OF_IMG|>`` ``vision_end``, ``TILE_k`` ``tile_marker``, ``TILE_GLOBAL``
``global_marker``, ``<|IMG_LINE_BREAK|>`` ``image_newline``; Cohere's turn markers
``<|START_OF_TURN_TOKEN|>``/``<|END_OF_TURN_TOKEN|>`` ``im_start``/``im_end``.

**``vision``**: every crop of the example in the tower's order (tiles, then the thumbnail), one block
each of a block-diagonal attention (tower kind ``pixel_shuffle``: ``towers.CropTower``; SigLIP has no
``[CLS]``); ``seq_pos`` ``crop * n^2 + patch``.

Token table of one example::

    lm:     <BOS> ... <|START_OF_IMG|> TILE_1 <img (0,0)> ... TILE_2 ... TILE_GLOBAL <img> ... <|END_OF_IMG|> ... g1 ... gm
    vision: tile 1: p(0,0) ... tile 2: ... thumbnail: p(0,0) ...

The answer: ``DecoderAdapter`` (greedy under the checkpoint's own generation config, the image token
suppressed; then one teacher-forced captured pass). One image per example. Only
``vision_feature_select_strategy="full"`` and ``vision_feature_layer=-1`` (the checkpoints' own).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec, encoder_paths
from pipeline.models.geometry import tile_grid, tiled_crops
from pipeline.models.hooks import module_at
from pipeline.models.tokens import crop_columns, shuffled_rows
from pipeline.models.towers import crops_by_image_tokens, shuffled_blocks

__all__ = ["AYA_VISION", "AyaVisionAdapter"]

MAX_TILES = 12  # TILE_1 .. TILE_12: the released checkpoints' max_patches
AYA_VISION = FamilySpec(
    name="aya_vision",
    classes={"aya_vision": "AyaVisionForConditionalGeneration"},
    streams={"lm": LM_PATHS,
             "vision": {k: v for k, v in encoder_paths("model.vision_tower").items() if k not in ("value", "out")}},
    tower="pixel_shuffle",  # tiles + thumbnail, s x s patch blocks folded into one token
    markers={"<|START_OF_IMG|>": "vision_start", "<|END_OF_IMG|>": "vision_end",
             "processor.tile_global_token": "global_marker", "TILE_GLOBAL": "global_marker",
             "<|IMG_LINE_BREAK|>": "image_newline", "<|START_OF_TURN_TOKEN|>": "im_start",
             "<|END_OF_TURN_TOKEN|>": "im_end", **{f"TILE_{k}": "tile_marker" for k in range(1, MAX_TILES + 1)}},
    prompt="<image>{text}",  # the processor expands <image> into the tiles' markers and tokens
    drop_inputs=("num_patches",),
)


class AyaVisionAdapter(ExplainedDecoder):
    """AyaVisionForConditionalGeneration: streams ``lm`` and ``vision`` (the tower's batch is the crops:
    regrouped per example, one block each)."""

    spec = AYA_VISION

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        cfg = model.config
        if cfg.vision_feature_select_strategy != "full" or cfg.vision_feature_layer != -1:
            raise NotImplementedError("VL-Atlas's Aya Vision adapter knows vision_feature_select_strategy='full' "
                                      "with vision_feature_layer=-1 (the released checkpoints')")
        super().__init__(model, processor, device, max_new_tokens)
        self.scale = int(cfg.downsample_factor)
        if self.side % self.scale:
            raise NotImplementedError(f"downsample_factor={self.scale} does not divide a {self.side}x{self.side} "
                                      "patch grid")
        self.merged = self.side // self.scale  # image tokens a side of one crop

    def tower_batch(self, inputs, model_inputs) -> list[int]:
        return crops_by_image_tokens(inputs, self.image_token_id, self.merged * self.merged)

    # -- the family's mapping from image tokens to the processor's grid -------------------
    def grid_of(self, W: int, H: int) -> tuple[int, int]:
        """``(rows, cols)`` of the tile grid the image processor picks for a ``W x H`` image (1 x 1 when it
        does not tile)."""
        ip = self.processor.image_processor
        return tile_grid(ip, W, H) if getattr(ip, "crop_to_patches", True) else (1, 1)

    def token_blocks(self) -> list[list[tuple[int, int]]]:
        """Per image token of one crop (in the model's order): the tower patches ``(row, col)`` its channels
        hold, by the projector's own ``pixel_shuffle`` (which takes ``[1, patch, 2]``)."""
        projector = module_at(self.model, "model.multi_modal_projector")
        return shuffled_blocks(self.side, lambda f: projector.pixel_shuffle(f.reshape(1, -1, f.shape[-1])))

    def batch_context(self, inputs, images):
        return self.token_blocks()

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Per crop in the tower's order (tiles row by row, then the thumbnail), its shuffled tokens in
        raster order, each boxed as the union of the patches it folds."""
        W, H = ex.image.size
        crops = tiled_crops(W, H, self.grid_of(W, H), self.crop_px, self.patch_size)
        rows = shuffled_rows(crops, ctx, self.side, self.merged)
        return ImageTokens(rows, crop_columns(crops, self.side, False), (self.merged, self.merged),
                           f"the model makes {len(rows)} for a {W}x{H} image ({len(crops)} crops)")
