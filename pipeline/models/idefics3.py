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

**``vision``**: as LLaVA-NeXT's (``pipeline/models/crop_tower.py``), every crop of the example one
after another in the processor's order (crops row by row, then the global image), one block each
of a block-diagonal attention; ``seq_pos`` ``crop * n + patch``.

Token table of one example::

    lm:     [bos] ... <fake> <row_1_col_1> <img (0,0)> ... <fake> <row_1_col_2> ... \\n \\n <fake> <global-img> <img> ... <fake> ... g1 ... gm
    vision: crop 1: p(0,0) ... crop 2: ... global image: p(0,0) ...

The answer: ``DecoderAdapter`` (greedy under the checkpoint's own generation config, the image
token suppressed; then one teacher-forced captured pass). One image per example.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.base import (GEN_START, BatchLayout, DecoderAdapter, Inputs, LanguageModelExplained, Probe,
                                  checked_architecture, greedy_generation_config, module_at, processor_or,
                                  split_stream_layouts, stack_columns)
from pipeline.models.crop_tower import CropTower, crop_columns
from pipeline.models.llava_next import _read_json

ARCHITECTURES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
TOWER = "model.vision_model"
MODULES = {
    "lm": {"attention": "model.text_model.layers.{layer}.self_attn",
           "hidden": "model.text_model.layers.{layer}",
           "value": "model.text_model.layers.{layer}.self_attn.v_proj",
           "out": "model.text_model.layers.{layer}.self_attn.o_proj",
           "layers": "model.text_model.layers"},
    "vision": {"attention": TOWER + ".encoder.layers.{layer}.self_attn",
               "hidden_0": TOWER + ".embeddings",
               "hidden": TOWER + ".encoder.layers.{layer}",
               "layers": TOWER + ".encoder.layers"},
}
MAX_NEW_TOKENS = 16


class Idefics3Adapter(CropTower, LanguageModelExplained, DecoderAdapter):
    """Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration: streams ``lm`` and ``vision``
    (the tower's batch is the crops: regrouped per example, one block each)."""

    family = "idefics3"
    LM_NORM = "model.text_model.norm"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        super().__init__(model, processor, device)
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        cfg = model.config
        self.family = cfg.model_type
        self.configs = {"lm": cfg.text_config, "vision": cfg.vision_config}
        self.paths = MODULES
        self.image_token_id = int(cfg.image_token_id)
        vc = cfg.vision_config
        self.patch_size = int(vc.patch_size)
        self.crop_px = int(vc.image_size)
        self.side = self.crop_px // self.patch_size
        self.scale = int(cfg.scale_factor)
        if self.side % self.scale:
            raise NotImplementedError(f"scale_factor={self.scale} does not divide a {self.side}x{self.side} patch grid")
        self.pooled = self.side // self.scale
        tok = self.tokenizer
        unk = tok.unk_token_id
        self.marker_roles: dict[int, str] = {}

        self.cell_of: dict[int, tuple[int, int]] = {}  # <row_R_col_C> id -> (R, C)

        def mark(piece, role):
            i = tok.convert_tokens_to_ids(piece)
            if isinstance(i, int) and i != unk and i is not None:
                self.marker_roles.setdefault(i, role)
                return i

        mark("<fake_token_around_image>", "image_boundary")
        mark("<global-img>", "global_marker")
        mark("<end_of_utterance>", "im_end")
        for r in range(1, 7):
            for c in range(1, 7):
                i = mark(f"<row_{r}_col_{c}>", "tile_marker")
                if i is not None:
                    self.cell_of[i] = (r, c)
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, "model.text_model").register_forward_pre_hook(self._feed_probe, with_kwargs=True)
        self._hook_crop_tower(model, int(vc.num_hidden_layers))

    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, ARCHITECTURES.get(config.model_type), config.model_type)

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        """``AutoProcessor``; SmolVLM's needs a video processor (torchvision) and ``num2words``, so
        without them :class:`SmolVLMImageTextProcessor` (images only)."""
        return processor_or(model_id, revision, SmolVLMImageTextProcessor)

    # -- inputs ---------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"<image>{text}"

    def encode(self, texts: list[str], images: list):
        enc = self.processor(images=[[im] for im in images], text=[self.prompt(t) for t in texts],
                             return_tensors="pt", padding=True)
        enc = {k: v for k, v in dict(enc).items() if k not in ("rows", "cols")}
        return Inputs(enc), [[] for _ in texts]

    def generation_config(self, prompt_length: int | None = None):
        return greedy_generation_config(self.model, self.tokenizer, suppress=(self.image_token_id,),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    # -- the model --------------------------------------------------------------------
    @staticmethod
    def crops_of(pixel_values: torch.Tensor) -> list[int]:
        """Real crops per example: the model drops all-zero (padding) crops before the tower."""
        pv = pixel_values.reshape(*pixel_values.shape[:2], -1)
        return (pv != 0).any(-1).sum(1).tolist()

    def batch_crops(self, inputs, model_inputs) -> list[int]:
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

        import numpy as np
        out = ip(images=[[Image.fromarray(np.zeros((H, W, 3), np.uint8))]], return_tensors="np",
                 return_row_col_info=True)
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        if rows * cols != n:
            raise RuntimeError(f"{n} crops where the processor cuts {rows} x {cols}")
        return rows, cols

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        crops = self.crops_of(inputs["pixel_values"].cpu())
        per = self.pooled * self.pooled
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            W, H = images[b].size
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            tiles, pooled, tower = self.crop_boxes(W, H, crops[b], [i for i, p in zip(tid, pos) if p < start[b]])
            is_img = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            if sum(is_img) != per * crops[b]:
                raise RuntimeError(f"example has {sum(is_img)} image tokens where {crops[b]} crops make "
                                   f"{per * crops[b]}")
            img_rows = [("patch", tiles[crop], *divmod(cell, self.pooled), pooled[crop][cell])
                        for crop in range(crops[b]) for cell in range(per)]
            lm = self._lm_columns(tid, pos, is_img, start[b], img_rows)
            vis = crop_columns([(tiles[t], tower[t], None) for t in range(crops[b])], self.side, False)
            tables.append(stack_columns(lm, vis))
            lm_orders.append(pos)
            vis_orders.append(vis["seq_pos"])
            offsets.append(len(pos))
            grids.append((self.side, self.side))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)


class SmolVLMImageTextProcessor:
    """What ``SmolVLMProcessor`` does for images, from the checkpoint's tokenizer, (PIL) image processor and
    ``processor_config.json`` (``image_seq_len``, chat template): transformers' ``Idefics3Processor``, whose
    image prompt (``<fake_token_around_image><row_R_col_C><image>...``, ``<global-img>``) is SmolVLM's
    (``processing_smolvlm.get_image_prompt_string``; ``tests/test_idefics3.py`` checks it)."""

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None):
        import json

        from transformers import AutoImageProcessor, AutoTokenizer, Idefics3Processor

        settings = json.loads(_read_json(model_id, "processor_config.json", revision) or "{}")
        template = settings.get("chat_template")
        if template is None:
            text = _read_json(model_id, "chat_template.jinja", revision)
            js = _read_json(model_id, "chat_template.json", revision)
            template = text if text is not None else json.loads(js).get("chat_template") if js else None
        if settings.get("image_seq_len") is None:
            raise ValueError("processor_config.json gives no image_seq_len")
        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = AutoImageProcessor.from_pretrained(model_id, revision=revision)
        for name, default in (("fake_image_token", "<fake_token_around_image>"), ("image_token", "<image>"),
                              ("global_image_token", "<global-img>")):
            if getattr(tok, name, default) != default:
                raise ValueError(f"the tokenizer's {name} is {getattr(tok, name)!r}, not {default!r}")
        return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=int(settings["image_seq_len"]),
                                 chat_template=template)
