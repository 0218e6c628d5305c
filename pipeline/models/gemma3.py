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

**Pan-and-scan** (the image processor's ``do_pan_and_scan``; the adapter passes it and the
processor's ``pan_and_scan_*`` settings on to the processor, which otherwise ignores them). The
image processor cuts crops from the *original* image, by its own ``pan_and_scan``: a landscape
image ``n`` crops side by side (``n`` near ``W / H``, within ``[2, pan_and_scan_max_num_crops]``),
each ``ceil(W / n)`` px wide (the last one cut at the image's edge) and the full height; a portrait
one ``n`` crops in rows likewise; none when the aspect ratio is below
``pan_and_scan_min_ratio_to_activate`` or a crop would be smaller than
``pan_and_scan_min_crop_size``. ``pixel_values`` holds, per image, the whole image then its crops,
each stretched to the processor's ``height x width``; the prompt becomes ``Here is the original
image <image block> and here are some crops to help you see better <image block> <image block> ...``
(``<start_of_image>``, ``mm_tokens_per_image`` soft tokens, ``<end_of_image>`` per block). ``tile``
in the token table: 0 the whole image, ``k`` crop ``k`` (in the processor's order); lm image block
``k`` is tile ``k``. The vision tower's batch is then the crops of all examples: as LLaVA-NeXT's
(``towers.CropTower``), the adapter's hooks regroup it per example, the ``vision``
stream of an example holds its crops one after another (whole image first; ``seq_pos`` ``crop * n +
patch``, ``n = gh gw``), its attention block diagonal (a crop sees only its own patches), examples
with fewer crops zero padded outside their token table. Not captured then: the tower's
``--explain value``.

Token table of one example, one index space (without crops: one image block, one tower crop)::

    lm:     [bos] ... <start_of_image> <img (0,0)> ... <img (t-1,t-1)> <end_of_image> ... (crops' blocks) ... g1 ... gm
    vision: crop 0: p(0,0) p(0,1) ... p(gh-1,gw-1)   crop 1: p(0,0) ...   ...

- ``lm`` image token ``(r, c)`` of image block ``j`` (role ``patch``, raster order as ``AvgPool2d``
  then ``flatten`` make it) stands for tower patches ``r k .. r k + k - 1`` x ``c k .. c k + k - 1``
  of crop ``j``: its box is that block's box in original pixels (the processor resizes each crop to
  its ``height x width`` without keeping the aspect ratio: crop ``j``'s pixels are the original's
  from the crop's corner, scaled by the crop's own size over the resized size; the whole image is
  crop 0, corner ``(0, 0)``). Tower patches are boxed likewise. ``<start_of_image>``/
  ``<end_of_image>`` have roles ``vision_start``/``vision_end`` (special tokens);
  ``<start_of_turn>``/``<end_of_turn>`` of the chat template ``im_start``/``im_end``.
- Pads (batches pad on the left) are left out; ``seq_pos`` counts from the example's first real
  token.

The answer: ``decoder.DecoderAdapter`` (greedy under the checkpoint's own generation config, the image
placeholder suppressed; then one teacher-forced captured pass).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec, encoder_paths
from pipeline.models.geometry import PatchGrid, crop_geometry, patch_grid
from pipeline.models.tokens import crop_columns
from pipeline.models.towers import CropTower, crops_by_image_tokens

__all__ = ["GEMMA3", "Gemma3Adapter", "pan_and_scan_settings"]

GEMMA3 = FamilySpec(
    name="gemma3",
    classes={"gemma3": "Gemma3ForConditionalGeneration"},
    streams={"lm": LM_PATHS, "vision": encoder_paths("model.vision_tower")},
    tower="pooled",
    markers={"config.boi_token_index": "vision_start", "config.eoi_token_index": "vision_end",
             "<start_of_turn>": "im_start", "<end_of_turn>": "im_end"},
    prompt="{vision_start} {text}",
    answer_inputs={"token_type_ids": 0},  # the answer's tokens are text
    drop_inputs=("num_crops",),
    nested_images=True,
)
PAN_AND_SCAN = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")


def pan_and_scan_settings(processor: Any) -> dict[str, Any] | None:
    """The processor keywords that turn pan-and-scan on when its image processor has
    ``do_pan_and_scan`` (``Gemma3Processor`` passes its own defaults, pan-and-scan off, over the image
    processor's settings): ``do_pan_and_scan`` and each ``pan_and_scan_*`` setting, the image
    processor's where it sets one, else the processor's default. None when pan-and-scan is off."""
    ip = processor.image_processor
    if not getattr(ip, "do_pan_and_scan", False):
        return None
    defaults = getattr(processor, "images_kwargs", None) or {}
    out: dict[str, Any] = {"do_pan_and_scan": True}
    for key in PAN_AND_SCAN:
        v = getattr(ip, key, None)
        out[key] = defaults.get(key) if v is None else v
        if out[key] is None:
            raise ValueError(f"do_pan_and_scan is on but neither the image processor nor the processor sets {key}")
    return out



class Gemma3Adapter(ExplainedDecoder):
    """Gemma3ForConditionalGeneration: streams ``lm`` and ``vision`` (with pan-and-scan the tower's batch
    is the crops, regrouped per example, one block each)."""

    spec = GEMMA3

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        self.pan_and_scan = pan_and_scan_settings(processor)  # processor keywords, None when off
        super().__init__(model, processor, device, max_new_tokens)
        cfg = model.config
        vc = cfg.vision_config
        side = int(vc.image_size) // self.patch_size
        per_side = int(math.isqrt(int(cfg.mm_tokens_per_image)))
        if per_side * per_side != int(cfg.mm_tokens_per_image) or side % per_side:
            raise NotImplementedError(f"mm_tokens_per_image={cfg.mm_tokens_per_image} does not pool a {side}x{side} "
                                      "patch grid into square blocks")
        self.kernel = side // per_side  # one lm image token = a kernel x kernel block of tower patches
        self.mm_tokens = int(cfg.mm_tokens_per_image)

    def make_tower(self):
        """With pan-and-scan the tower's batch is the crops (``CropTower``); else its own modules."""
        if self.pan_and_scan is None:
            return super().make_tower()
        return CropTower(self.model, self.paths["vision"], int(self.configs["vision"].num_hidden_layers))

    # -- inputs ---------------------------------------------------------------------
    def processor_kwargs(self, prompts: list[str]) -> dict[str, Any]:
        bos = self.tokenizer.bos_token
        # Gemma's chat template writes <bos> itself: the tokenizer must not add a second one
        kw = {"add_special_tokens": False} if bos and all(p.startswith(bos) for p in prompts) else {}
        kw.update(self.pan_and_scan or {})
        return kw

    def fill_inputs(self, enc) -> None:
        if "token_type_ids" not in enc:  # the image block's bidirectional mask reads them
            enc["token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()

    # -- the model --------------------------------------------------------------------
    def tower_batch(self, inputs, model_inputs) -> list[int] | None:
        """Image blocks per example (the whole image + its crops) with pan-and-scan; None without (the
        tower's batch is then the examples)."""
        if self.pan_and_scan is None:
            return None
        return crops_by_image_tokens(inputs, self.image_token_id, self.mm_tokens)

    # -- layout ---------------------------------------------------------------------
    def crop_rects(self, W: int, H: int) -> list[tuple[int, int, int, int]]:
        """``(x0, y0, w, h)`` in original pixels of each pan-and-scan crop of a ``W x H`` image, in
        the processor's order (not the whole image), by the image processor's own ``pan_and_scan``
        run on views holding each pixel's column and row."""
        if self.pan_and_scan is None:
            return []
        ip = self.processor.image_processor
        cut = getattr(ip, "pan_and_scan", None) or getattr(ip, "pan_and_scan_batched", None)
        if cut is None:
            raise NotImplementedError(f"{type(ip).__name__} has no pan_and_scan; VL-Atlas cannot place its crops")
        kw = {k: self.pan_and_scan[k] for k in PAN_AND_SCAN}
        xs = cut(np.broadcast_to(np.arange(W)[None, None, :], (1, H, W)), **kw)
        ys = cut(np.broadcast_to(np.arange(H)[None, :, None], (1, H, W)), **kw)
        return [(int(x[0, 0, 0]), int(y[0, 0, 0]), x.shape[-1], x.shape[-2]) for x, y in zip(xs, ys)]

    def crop_grids(self, W: int, H: int, processed: tuple[int, int]) -> list[tuple[PatchGrid, PatchGrid]]:
        """Per crop (the whole image, then the pan-and-scan crops): its tower patches and its pooled
        blocks (lm image tokens), boxed in original pixels."""
        ip = self.processor.image_processor
        out = []
        for x0, y0, w, h in [(0, 0, W, H)] + self.crop_rects(W, H):
            geom = crop_geometry(ip, w, h)
            grids = []
            for size in (self.patch_size, self.patch_size * self.kernel):
                g = patch_grid(geom, w, h, processed, size)
                if x0 or y0:
                    g = PatchGrid(g.rows, g.cols, g.cells, [(a + x0, b + y0, c + x0, d + y0) for a, b, c, d in g.boxes],
                                  (g.whole[0] + x0, g.whole[1] + y0, g.whole[2] + x0, g.whole[3] + y0))
                grids.append(g)
            out.append(tuple(grids))
        return out

    def batch_context(self, inputs, images):
        ph, pw = inputs["pixel_values"].shape[-2:]
        return pw, ph

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Image block ``j`` is crop ``j`` (0 the whole image); its token ``(r, c)`` the pooled block of tower
        patches ``r k .. r k + k - 1`` x ``c k .. c k + k - 1``, boxed in original pixels."""
        W, H = ex.image.size
        crops = self.crop_grids(W, H, ctx)
        per = len(crops[0][1].cells)
        rows = [("patch", t, *pooled.cells[j], pooled.boxes[j]) for t, (_, pooled) in enumerate(crops)
                for j in range(per)]
        vision = crop_columns([(t, tower.boxes, None) for t, (tower, _) in enumerate(crops)], crops[0][0].cols, False)
        return ImageTokens(rows, vision, (crops[0][0].rows, crops[0][0].cols),
                           f"{len(crops)} crop(s) of a {crops[0][1].rows}x{crops[0][1].cols} pooled grid make "
                           f"{per * len(crops)}")

