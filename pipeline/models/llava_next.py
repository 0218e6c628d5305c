"""Any-resolution LLaVA: LLaVA-NeXT (``LlavaNextForConditionalGeneration``) and LLaVA-OneVision
(``LlavaOnevisionForConditionalGeneration``), streams ``lm`` and ``vision``.

A decoder LVLM like LLaVA (``pipeline/models/llava.py``; ``decoder.DecoderAdapter``: the answer
is generated greedily first under the checkpoint's own generation config, uncaptured, then one
teacher-forced pass over prompt + answer runs with the capture hooks), with tiles.

**Crops.** The image processor cuts each image into crops of the tower's input size
(``crop_size``, e.g. 336 px): crop 0 is the *base image* (the whole original, stretched to the
processor's ``size``); crops ``1..`` are the *tiles*: the original resized, keeping its aspect
ratio, into the best of ``image_grid_pinpoints`` (``select_best_resolution``), centred on a
zero-padded canvas of that resolution, cut row by row into ``crop_size`` tiles
(``divide_to_patches``: tile ``1 + tr * npw + tc`` is canvas tile row ``tr``, column ``tc``).
The vision tower runs once per crop (``pixel_values`` ``[image, crop, 3, s, s]``; padded crops of
a batch are dropped before the tower). ``tile`` in the token table is the crop's index: 0 the base
image, ``1..`` the tiles in this order.

**Image tokens of ``lm``.** The model packs each image's features with its own
``pack_image_features``: the base image's ``h x w`` features (raster order; ``h = w =
image_size / patch_size``), then the tiles' features laid out as one ``(nph h) x (npw w)`` feature
map over the canvas (``get_anyres_image_grid_shape``), *unpadded* (``unpad_image``: the rows or
columns that lie on the canvas padding are cut, symmetrically), each row followed by one
``image_newline`` token (a learned vector; role ``image_newline``). LLaVA-OneVision then pools: when
the unpadded map holds more than 1.1^2 ``anyres_max_N`` crops' worth of features, it is resized
bilinearly to ``int(H / r) x int(W / r)`` before the newlines are added. The adapter does not
re-derive this order: it runs the model's own ``pack_image_features`` on features that carry their
own coordinates (tile, canvas row, canvas column) and reads back where every token came from
(``image_token_sources``). The count is checked against the image tokens in ``input_ids``.

- base image token ``k``: ``tile`` 0, ``patch_row, patch_col = divmod(k, w)``, box the base-image
  patch's region of the original.
- tile token at canvas feature ``(R, C)``: ``tile = 1 + (R // h) * npw + C // w``,
  ``patch_row, patch_col = R % h, C % w`` (inside its tile), box that tile patch's region of the
  original image (clipped to it: a patch partly over the canvas padding covers only the image's
  part).
- pooled token (OneVision) ``(i, j)`` of an ``nh x nw`` pooled grid over the ``uh x uw``
  unpadded map: the region rows ``[i uh / nh, (i + 1) uh / nh)``, columns likewise; its box is the
  union of the boxes of the unpadded features that region touches, its tile the tile of the
  region's centre, ``patch_row, patch_col = i, j`` (its place in the pooled grid).
- ``image_newline`` token closing row ``i``: no patch position; box the union of its row's boxes,
  tile the tile of the row's last token.

Boxes are in original pixels, through the processor's own geometry: the base image is the
original stretched to ``size``; a tile is its canvas square (canvas pixel ``x`` = original pixel
``x W / new_w`` + the centring offset, ``get_patch_output_size``); each crop is then resized to
``size`` and centre-cropped to ``crop_size`` (``geometry.crop_geometry``; identity when they are
the tower's size, as in the released checkpoints).

**The ``vision`` stream: every crop of the example, one block each.** The tower's batch is the
crops of all images, not the examples, so the adapter's own hooks on the tower regroup it: an
example's tower tokens are its crops' sequences one after the other (crop 0's ``[CLS]`` when the
tower has one, then its patches in raster order, then crop 1's …), ``seq_pos`` the position in that
concatenation (``crop * n + position in the crop``). Its attention is block diagonal: each crop's
``n x n`` attention on its own block (each query row sums to 1 over its own crop, 0 elsewhere:
crops never attend to each other); its hidden states are the crops' rows, concatenated. Examples
with fewer crops than the batch's largest are zero padded (their padding lies outside the token
table). A crop's tokens carry its ``tile``; ``image_cls`` is boxed with the crop's whole region.

Token table of one example::

    lm:     [bos] w1 ... <base 0> ... <base hw-1> <t r0 c0> ... <newline> ... <newline> ... wn  g1 ... gm
    vision: crop 0: ([CLS]) p(0,0) ... p(h-1,w-1)   crop 1: ([CLS]) p(0,0) ...   ...

Processor: ``AutoProcessor`` when it builds (LLaVA-NeXT's has no video processor); LLaVA-OneVision's
holds a video processor that needs torchvision, so without it the adapter assembles
``processors.OnevisionImageTextProcessor`` from the checkpoint's tokenizer, image processor (transformers' PIL
backend) and ``processor_config.json`` settings (images only; the same inputs as
``LlavaOnevisionProcessor``, ``tests/models/test_llava_next.py`` checks it).

``examples.grid_h``/``grid_w`` are one crop's feature grid (``h x w``). Not captured: the tower's
``--explain value`` (its batch is the crops); videos and several images per example (OneVision's
multi-image path, which does not tile).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec, encoder_paths
from pipeline.models.geometry import _size, crop_geometry
from pipeline.models.hooks import module_at
from pipeline.models.llava import select_strategy
from pipeline.models.processors import OnevisionImageTextProcessor, processor_or
from pipeline.models.tokens import crop_columns, union

__all__ = ["LLAVA_NEXT", "LLAVA_ONEVISION", "LlavaNextAdapter", "LlavaOnevisionAdapter", "OnevisionImageTextProcessor"]

LLAVA_NEXT = FamilySpec(
    name="",  # config.model_type
    classes={"llava_next": "LlavaNextForConditionalGeneration"},
    streams={"lm": LM_PATHS, "vision": encoder_paths("model.vision_tower", hidden_0="pre_layrnorm")},
    tower="crops",
)
LLAVA_ONEVISION = replace(LLAVA_NEXT,
                          classes={"llava_onevision": "LlavaOnevisionForConditionalGeneration"})
NEWLINE = -1.0  # the image_newline's coordinates in image_token_sources


class LlavaNextAdapter(ExplainedDecoder):
    """LlavaNextForConditionalGeneration: streams ``lm`` and ``vision`` (crops as blocks)."""

    spec = LLAVA_NEXT

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        super().__init__(model, processor, device, max_new_tokens)
        cfg = model.config
        self.strategy = select_strategy(cfg)
        self.tower_cls = hasattr(getattr(module_at(model, "model.vision_tower"), "embeddings", None), "class_embedding")
        self.pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
        if self.strategy == "full" and self.tower_cls:
            raise NotImplementedError("vision_feature_select_strategy='full' with a tower that has a [CLS] token: "
                                      f"{type(model).__name__} cannot lay such features out on its tile grid")

    def module_paths(self, model):
        if hasattr(module_at(model, "model.vision_tower"), "pre_layrnorm"):
            return dict(self.spec.streams)
        return {**self.spec.streams, "vision": encoder_paths("model.vision_tower")}  # e.g. a SigLIP tower

    # -- the tower's crops -------------------------------------------------------------
    def crops_of(self, image_sizes) -> list[int]:
        """Crops per image (base image + tiles), by the model's own ``image_size_to_num_patches``."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [int(image_size_to_num_patches(image_size=[int(s) for s in hw], grid_pinpoints=self.pinpoints,
                                              patch_size=self.crop_px)) for hw in image_sizes.tolist()]

    def tower_batch(self, inputs, model_inputs) -> list[int]:
        return self.crops_of(model_inputs["image_sizes"].cpu())

    # -- where each image token comes from -----------------------------------------------
    def _pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor):
        return self.model.model.pack_image_features(features, image_sizes, self.strategy, image_newline=newline)

    def grid_shape(self, H: int, W: int) -> tuple[int, int]:
        """``(tile rows, tile columns)`` of the canvas for an ``H x W`` image (the model's own helper)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        nph, npw = get_anyres_image_grid_shape([H, W], self.pinpoints, self.crop_px)
        return int(nph), int(npw)

    def image_token_sources(self, H: int, W: int) -> list[tuple]:
        """Where each image token of an ``H x W`` image comes from, in the model's order:
        ``("base", r, c)``, ``("tile", R, C)`` (canvas feature row and column), ``("pool", i, j, rows,
        cols)`` (pooled grid cell ``(i, j)`` and the unpadded canvas rows/columns its region touches)
        or ``("newline", i)`` (the newline closing row ``i``).

        Runs the model's own ``pack_image_features`` on features holding ``(kind, row, column)``.
        """
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        h = w = self.side
        nph, npw = self.grid_shape(H, W)
        r, c = np.divmod(np.arange(h * w), w)
        crops = [np.stack([np.zeros(h * w), r, c], -1)]
        for t in range(nph * npw):
            tr, tc = divmod(t, npw)
            crops.append(np.stack([np.ones(h * w), tr * h + r, tc * w + c], -1))
        feats = torch.tensor(np.stack(crops), dtype=torch.float64)  # [crop, h w, 3]
        newline = torch.full((3,), NEWLINE, dtype=torch.float64)
        sizes = torch.tensor([[H, W]])
        packed = self._pack([feats], sizes, newline)[0][0].numpy()  # [tokens, 3]
        # the unpadded canvas map, by the model's own unpad_image on the canvas coordinates
        RR, CC = np.meshgrid(np.arange(nph * h), np.arange(npw * w), indexing="ij")
        un = unpad_image(torch.tensor(np.stack([RR, CC]), dtype=torch.float64), [H, W]).numpy()  # [2, uh, uw]
        uh, uw = un.shape[1:]
        r0, c0 = int(un[0, 0, 0]), int(un[1, 0, 0])
        out: list[tuple] = [("base", int(a), int(b)) for _, a, b in packed[:h * w]]
        rest = packed[h * w:]
        is_nl = rest[:, 0] == NEWLINE
        nh = int(is_nl.sum())
        if nh == 0 or len(rest) % nh or not is_nl[len(rest) // nh - 1::len(rest) // nh].all():
            raise RuntimeError("the packed image features are not rows closed by image_newline tokens")
        nw = len(rest) // nh - 1
        pooled = (nh, nw) != (uh, uw)
        for i in range(nh):
            for j in range(nw):
                if not pooled:
                    k, R, C = rest[i * (nw + 1) + j]
                    if k != 1 or R != r0 + i or C != c0 + j:
                        raise RuntimeError("the packed tile features are not the unpadded canvas in raster order")
                    out.append(("tile", int(R), int(C)))
                else:
                    rows = range(r0 + math.floor(i * uh / nh), r0 + math.ceil((i + 1) * uh / nh))
                    cols = range(c0 + math.floor(j * uw / nw), c0 + math.ceil((j + 1) * uw / nw))
                    out.append(("pool", i, j, rows, cols))
            out.append(("newline", i))
        return out

    # -- boxes ------------------------------------------------------------------------
    def _crop_boxes(self, H: int, W: int) -> list[tuple[list, tuple]]:
        """Per crop (base image, then the tiles in order): the boxes of its ``h x w`` tower patches
        (raster order) and of the whole crop, in original pixels clipped to the image."""
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

        ip = self.processor.image_processor
        size = ip.size
        sh, sw = _size(size, "height"), _size(size, "width")
        if not (sh and sw):
            sh = sw = _size(size, "shortest_edge")
        cs = getattr(ip, "crop_size", None)
        tile_px = _size(cs, "height") or _size(size, "height") or _size(size, "shortest_edge")
        best_h, best_w = select_best_resolution([H, W], self.pinpoints)
        new_h, new_w = get_patch_output_size(np.zeros((3, H, W)), (best_h, best_w), "channels_first")
        pad_x, pad_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        nph, npw = best_h // tile_px, best_w // tile_px
        if (nph, npw) != self.grid_shape(H, W):
            raise RuntimeError(f"the image processor's tiles ({nph} x {npw} of {tile_px} px) are not the "
                               f"model's grid {self.grid_shape(H, W)}")
        ps = self.patch_size

        def grid(pre_w, pre_h, to_orig):
            sx, sy, left, top, ow, oh = crop_geometry(ip, pre_w, pre_h)
            if (ow, oh) != (self.crop_px, self.crop_px):
                raise RuntimeError(f"the image processor makes {ow}x{oh} crops where the tower takes "
                                   f"{self.crop_px}x{self.crop_px}; VL-Atlas cannot place patches")

            def px(u, v):
                x, y = to_orig((u + left) / sx, (v + top) / sy)
                return min(max(x, 0.0), float(W)), min(max(y, 0.0), float(H))

            s = self.side
            boxes = [px(c * ps, r * ps) + px((c + 1) * ps, (r + 1) * ps) for r in range(s) for c in range(s)]
            return boxes, px(0, 0) + px(self.crop_px, self.crop_px)

        out = [grid(sw, sh, lambda x, y: (x * W / sw, y * H / sh))]  # base: the original stretched to size
        for t in range(nph * npw):
            tr, tc = divmod(t, npw)
            out.append(grid(tile_px, tile_px, lambda x, y, tr=tr, tc=tc: ((x + tc * tile_px - pad_x) * W / new_w,
                                                                          (y + tr * tile_px - pad_y) * H / new_h)))
        return out

    # -- layout ---------------------------------------------------------------------
    def batch_context(self, inputs, images):
        ids = inputs["input_ids"]
        sizes = inputs["image_sizes"].cpu().tolist()
        if len(sizes) != ids.shape[0]:
            raise RuntimeError(f"{len(sizes)} images for {ids.shape[0]} examples; VL-Atlas takes one image each")
        return sizes

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """The image tokens as the model's own ``pack_image_features`` orders them
        (:meth:`image_token_sources`): base image patches, tile patches or pooled cells of the canvas, and
        a newline closing each row."""
        h = w = self.side
        H, W = (int(x) for x in ctx[ex.b])
        nph, npw = self.grid_shape(H, W)
        crop_boxes = self._crop_boxes(H, W)

        def cell(R, C):  # canvas feature (R, C) -> tile, row and column in it, box
            t = 1 + (R // h) * npw + C // w
            return t, R % h, C % w, crop_boxes[t][0][(R % h) * w + C % w]

        rows: list[tuple] = []  # (role, tile, patch_row, patch_col, box) per image token
        row_start = 0
        for src in self.image_token_sources(H, W):
            if src[0] == "base":
                _, r, c = src
                rows.append(("patch", 0, r, c, crop_boxes[0][0][r * w + c]))
            elif src[0] == "tile":
                rows.append(("patch", *cell(src[1], src[2])))
            elif src[0] == "pool":
                _, i, j, rr, cc = src
                t = cell(rr[len(rr) // 2], cc[len(cc) // 2])[0]
                rows.append(("patch", t, i, j, union([cell(R, C)[3] for R in rr for C in cc])))
            else:  # the newline closing the row that started at row_start
                row = rows[row_start:]
                rows.append(("image_newline", row[-1][1], None, None, union([x[4] for x in row])))
            if src[0] in ("base", "newline"):  # the next row starts after the base image or a newline
                row_start = len(rows)
        vision = crop_columns([(t, pboxes, whole) for t, (pboxes, whole) in enumerate(crop_boxes)], w, self.tower_cls)
        return ImageTokens(rows, vision, (h, w),
                           f"the model packs {len(rows)} features for a {W}x{H} image ({nph} x {npw} tiles)")


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LlavaOnevisionForConditionalGeneration: as LLaVA-NeXT, with ``anyres_max`` pooling."""

    spec = LLAVA_ONEVISION

    def _pack(self, features, image_sizes, newline):
        return self.model.model.pack_image_features(features, image_sizes, image_newline=newline,
                                                    vision_aspect_ratio=self.model.config.vision_aspect_ratio)

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        """``AutoProcessor``; without torchvision (the video processor cannot be built)
        ``processors.OnevisionImageTextProcessor`` from the checkpoint's files, images only."""
        return processor_or(model_id, revision, OnevisionImageTextProcessor)
