"""InternVL (``InternVLForConditionalGeneration``): streams ``lm`` and ``vision``.

A decoder LVLM (the answer is generated greedily first under the checkpoint's own generation config,
uncaptured, then one teacher-forced pass over prompt + answer runs with the capture hooks; see
``decoder.DecoderAdapter``), with dynamic tiling and pixel shuffle. Its tower is a ``towers.CropTower``
(the tower's batch is the crops; its hooks regroup it per example).

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

from typing import Any

import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec, encoder_paths
from pipeline.models.geometry import tile_grid, tiled_crops
from pipeline.models.processors import InternVLImageTextProcessor, processor_or
from pipeline.models.tokens import crop_columns, shuffled_rows
from pipeline.models.towers import crops_by_image_tokens, shuffled_blocks

__all__ = ["INTERNVL", "InternVLAdapter", "InternVLImageTextProcessor"]

INTERNVL = FamilySpec(
    name="internvl",
    classes={"internvl": "InternVLForConditionalGeneration"},
    streams={"lm": LM_PATHS, "vision": encoder_paths("model.vision_tower", layers="encoder.layer",
                                                     attention="attention", out="projection_layer")},
    tower="pixel_shuffle",
    markers={"processor.start_image_token": "vision_start", "processor.end_image_token": "vision_end"},
)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class InternVLAdapter(ExplainedDecoder):
    """InternVLForConditionalGeneration: streams ``lm`` and ``vision`` (crops as blocks)."""

    spec = INTERNVL

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        cfg = model.config
        vc = cfg.vision_config
        if cfg.vision_feature_select_strategy != "default":
            raise NotImplementedError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: "
                                      "VL-Atlas's InternVL adapter knows 'default' (the tower's [CLS] dropped)")
        if int(cfg.vision_feature_layer) != -1:
            raise NotImplementedError("vision_feature_layer other than -1 is not supported for InternVL")
        (ph, pw), (sh, sw) = _pair(vc.patch_size), _pair(vc.image_size)
        if ph != pw or sh != sw:
            raise NotImplementedError("InternVL with non-square patches or crops is not supported")
        super().__init__(model, processor, device, max_new_tokens)
        self.patch_size, self.crop_px = ph, sh
        self.side = sh // ph  # tower patches a side of one crop
        self.ratio = float(cfg.downsample_ratio)
        self.merged = int(round(self.side * self.ratio))  # shuffled tokens a side of one crop

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        return processor_or(model_id, revision, InternVLImageTextProcessor)

    # -- crops ------------------------------------------------------------------------
    def tower_batch(self, inputs, model_inputs) -> list[int]:
        return crops_by_image_tokens(inputs, self.image_token_id, self.merged * self.merged)

    def token_blocks(self) -> list[list[tuple[int, int]]]:
        """Per shuffled token of one crop (in the model's order): the tower patches ``(row, col)`` its
        channels hold, by the model's own ``pixel_shuffle`` (``towers.shuffled_blocks``)."""
        return shuffled_blocks(self.side, lambda f: self.model.model.pixel_shuffle(f, scale_factor=self.ratio))

    # -- layout ---------------------------------------------------------------------
    def batch_context(self, inputs, images):
        if len(images) != inputs["input_ids"].shape[0]:
            raise RuntimeError(f"{len(images)} images for {inputs['input_ids'].shape[0]} examples; VL-Atlas takes "
                               "one image each")
        return self.token_blocks()

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Per crop in the processor's order (tiles, then the thumbnail; ``geometry.tiled_crops``), its
        shuffled tokens: token ``k`` at ``divmod(k, m)`` of the crop's shuffled grid, boxed as the union of
        the tower patches its channels hold (InternVLProcessor always asks for ``crop_to_patches``)."""
        W, H = ex.image.size
        crops = tiled_crops(W, H, tile_grid(self.processor.image_processor, W, H), self.crop_px, self.patch_size)
        rows = shuffled_rows(crops, ctx, self.side, self.merged)
        return ImageTokens(rows, crop_columns(crops, self.side, True), (self.merged, self.merged),
                           f"the model makes {len(rows)} for a {W}x{H} image ({len(crops)} crops)")
