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
each of a block-diagonal attention (``pipeline/models/crop_tower.py``; SigLIP has no ``[CLS]``);
``seq_pos`` ``crop * n^2 + patch``.

Token table of one example::

    lm:     <BOS> ... <|START_OF_IMG|> TILE_1 <img (0,0)> ... TILE_2 ... TILE_GLOBAL <img> ... <|END_OF_IMG|> ... g1 ... gm
    vision: tile 1: p(0,0) ... tile 2: ... thumbnail: p(0,0) ...

The answer: ``DecoderAdapter`` (greedy under the checkpoint's own generation config, the image token
suppressed; then one teacher-forced captured pass). One image per example. Only
``vision_feature_select_strategy="full"`` and ``vision_feature_layer=-1`` (the checkpoints' own).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.models.base import (GEN_START, BatchLayout, DecoderAdapter, Inputs, LanguageModelExplained, Probe,
                                  checked_architecture, greedy_generation_config, module_at, split_stream_layouts,
                                  stack_columns)
from pipeline.models.crop_tower import CropTower, crop_columns
from pipeline.models.geometry import _size

# -- the family's declaration ------------------------------------------------------------
ARCHITECTURE = "AyaVisionForConditionalGeneration"
TOWER_KIND = "crops, pixel-shuffled"  # tiles + thumbnail, s x s patch blocks folded into one token
TOWER = "model.vision_tower"
MODULES = {
    "lm": {"attention": "model.language_model.layers.{layer}.self_attn",
           "hidden": "model.language_model.layers.{layer}",
           "value": "model.language_model.layers.{layer}.self_attn.v_proj",
           "out": "model.language_model.layers.{layer}.self_attn.o_proj"},
    "vision": {"attention": TOWER + ".encoder.layers.{layer}.self_attn",
               "hidden_0": TOWER + ".embeddings",
               "hidden": TOWER + ".encoder.layers.{layer}"},
}
LM = "model.language_model"  # the language model: its pre-hook feeds the lm's hidden state 0
SHUFFLE = "model.multi_modal_projector"  # its pixel_shuffle maps a crop's patches to its image tokens
MARKERS = {"<|START_OF_IMG|>": "vision_start", "<|END_OF_IMG|>": "vision_end", "TILE_GLOBAL": "global_marker",
           "<|IMG_LINE_BREAK|>": "image_newline", "<|START_OF_TURN_TOKEN|>": "im_start",
           "<|END_OF_TURN_TOKEN|>": "im_end"}
TILE_MARKER = "TILE_{k}"  # the processor's tile_token + "_" + k: role tile_marker
MAX_NEW_TOKENS = 16  # when the checkpoint sets no length


class AyaVisionAdapter(CropTower, LanguageModelExplained, DecoderAdapter):
    """AyaVisionForConditionalGeneration: streams ``lm`` and ``vision`` (the tower's batch is the crops:
    regrouped per example, one block each)."""

    family = "aya_vision"
    LM_NORM = LM + ".norm"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        super().__init__(model, processor, device)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "full" or cfg.vision_feature_layer != -1:
            raise NotImplementedError("VL-Atlas's Aya Vision adapter knows vision_feature_select_strategy='full' "
                                      "with vision_feature_layer=-1 (the released checkpoints')")
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        vc = cfg.vision_config
        self.configs = {"lm": cfg.text_config, "vision": vc}
        self.paths = MODULES
        self.image_token_id = int(cfg.image_token_id)
        self.patch_size, self.crop_px = int(vc.patch_size), int(vc.image_size)
        self.side = self.crop_px // self.patch_size  # tower patches a side of one crop
        self.scale = int(cfg.downsample_factor)
        if self.side % self.scale:
            raise NotImplementedError(f"downsample_factor={self.scale} does not divide a {self.side}x{self.side} "
                                      "patch grid")
        self.merged = self.side // self.scale  # image tokens a side of one crop
        tok = self.tokenizer
        tile = getattr(processor, "tile_token", "TILE")
        pieces = {**MARKERS, getattr(processor, "tile_global_token", "TILE_GLOBAL"): "global_marker",
                  **{f"{tile}_{k}": "tile_marker" for k in range(1, int(self._max_tiles()) + 1)}}
        ids = {p: tok.convert_tokens_to_ids(p) for p in pieces}
        self.marker_roles = {i: pieces[p] for p, i in ids.items() if isinstance(i, int) and i != tok.unk_token_id}
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, LM).register_forward_pre_hook(self._feed_probe, with_kwargs=True)
        self._hook_crop_tower(model, int(vc.num_hidden_layers))

    def _max_tiles(self) -> int:
        return int(getattr(self.processor.image_processor, "max_patches", 1) or 1)

    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, ARCHITECTURE, "aya_vision")

    # -- inputs ---------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{self.processor.image_token}{text}"

    def encode(self, texts: list[str], images: list):
        enc = self.processor(images=list(images), text=[self.prompt(t) for t in texts], return_tensors="pt",
                             padding=True)
        return Inputs({k: v for k, v in dict(enc).items() if k != "num_patches"}), [[] for _ in texts]

    def generation_config(self, prompt_length: int | None = None):
        return greedy_generation_config(self.model, self.tokenizer, suppress=(self.image_token_id,),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    def batch_crops(self, inputs, model_inputs) -> list[int]:
        return self.crops_by_image_tokens(inputs, self.image_token_id, self.merged * self.merged)

    # -- the family's mapping from image tokens to the processor's grid -------------------
    def grid_of(self, W: int, H: int) -> tuple[int, int]:
        """``(rows, cols)`` of the tile grid the image processor picks for a ``W x H`` image (1 x 1 when
        it does not tile), by its own ``get_optimal_tiled_canvas``."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = self.processor.image_processor
        if self._max_tiles() <= 1 or not getattr(ip, "crop_to_patches", True):
            return 1, 1
        sh, sw = _size(ip.size, "height"), _size(ip.size, "width")
        cols, rows = get_optimal_tiled_canvas((H, W), (sh, sw), int(ip.min_patches), self._max_tiles())
        return int(rows), int(cols)

    def token_blocks(self) -> list[list[tuple[int, int]]]:
        """Per image token of one crop (in the model's order): the tower patches ``(row, col)`` its
        channels hold, by the model's own ``pixel_shuffle`` on coordinate features."""
        n = self.side
        r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        feats = torch.tensor(np.stack([r, c], -1), dtype=torch.float64).reshape(1, n * n, 2)  # [1, patch, 2]
        out = module_at(self.model, SHUFFLE).pixel_shuffle(feats)  # [1, n / s, n / s, 2 s^2]
        out = out.reshape(-1, out.shape[-1]).numpy()  # [token, 2 s^2]
        return [sorted({(int(t[2 * i]), int(t[2 * i + 1])) for i in range(len(t) // 2)}) for t in out]

    def crops(self, W: int, H: int) -> list[tuple[int, list[tuple], tuple]]:
        """Per crop in the tower's order (tiles row by row, then the thumbnail): ``(tile, its patches'
        boxes in raster order, its whole box)``, in original pixels."""
        rows, cols = self.grid_of(W, H)
        S, p, n = self.crop_px, self.patch_size, self.side

        def crop(x0, y0, sx, sy):  # crop pixel (u, v) -> original (x0 + u sx, y0 + v sy)
            def px(u, v):
                return min(max(x0 + u * sx, 0.0), float(W)), min(max(y0 + v * sy, 0.0), float(H))
            return [px(c * p, r * p) + px((c + 1) * p, (r + 1) * p) for r in range(n) for c in range(n)], \
                px(0, 0) + px(S, S)

        thumb = (0, *crop(0.0, 0.0, W / S, H / S))
        if rows * cols == 1:
            return [thumb]
        sx, sy = W / (cols * S), H / (rows * S)
        tiles = [(1 + t, *crop((t % cols) * S * sx, (t // cols) * S * sy, sx, sy)) for t in range(rows * cols)]
        return tiles + [thumb]

    # -- layout ---------------------------------------------------------------------
    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        blocks = self.token_blocks()
        m = self.merged
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            W, H = images[b].size
            crops = self.crops(W, H)
            img_rows = [("patch", tile, k // m, k % m, _union([pb[r * self.side + c] for r, c in blk]))
                        for tile, pb, _ in crops for k, blk in enumerate(blocks)]
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            is_img = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            if sum(is_img) != len(img_rows):
                raise RuntimeError(f"example has {sum(is_img)} image tokens where the model makes {len(img_rows)} "
                                   f"for a {W}x{H} image ({len(crops)} crops)")
            lm = self._lm_columns(tid, pos, is_img, start[b], img_rows)
            vis = crop_columns(crops, self.side, False)
            tables.append(stack_columns(lm, vis))
            lm_orders.append(pos)
            vis_orders.append(vis["seq_pos"])
            offsets.append(len(pos))
            grids.append((m, m))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)


def _union(boxes: list[tuple]) -> tuple:
    """The smallest box holding ``boxes``."""
    return (min(x[0] for x in boxes), min(x[1] for x in boxes), max(x[2] for x in boxes), max(x[3] for x in boxes))
