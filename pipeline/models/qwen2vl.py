"""The Qwen-VL family: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``), streams ``lm`` and
``vision``.

A decoder LVLM like LLaVA (``decoder.DecoderAdapter``: the answer is generated greedily first,
uncaptured, then one teacher-forced pass over prompt + answer runs with the capture hooks), with
three things of its own:

- **Dynamic resolution.** The processor resizes each image (no crop, no pad) to
  ``(h * patch_size, w * patch_size)`` with ``h`` and ``w`` multiples of ``spatial_merge_size``
  (``smart_resize``: the aspect ratio kept as well as it can, the pixel count within
  ``min_pixels .. max_pixels``), so every image has its own tower grid
  ``image_grid_thw = (1, h, w)``. Boxes map back to original pixels by the resize ratio of each
  axis: tower patch ``(r, c)`` is ``x in [c W / w, (c + 1) W / w)``, ``y in [r H / h, (r + 1) H / h)``
  for an original ``W x H`` image.
- **2x2 merging.** The merger concatenates each ``m x m`` block of tower patches (``m =
  spatial_merge_size``, 2) into one language-model token. The prompt's one ``<|image_pad|>`` is
  expanded by the processor to ``N = t h w / m^2`` of them (``<|vision_start|><|image_pad|> * N
  <|vision_end|>``), one per merged block, row-major over the ``(h / m) x (w / m)`` block grid:
  the tower's sequence is block-major (each block's ``m^2`` patches consecutive, the processor's
  ``patchify`` order) and the merger reads it ``m^2`` rows at a time. LM image token ``k`` is
  block ``(k // (w / m), k % (w / m))``; its ``patch_row``/``patch_col`` are the block's and its
  box the block's box (``m`` patches a side). The count is checked against ``image_grid_thw``.
- **M-RoPE.** Positions (temporal, height, width) are the model's own: the adapter passes
  ``mm_token_type_ids`` (image tokens 1; generated tokens 0) and lets ``get_rope_index`` compute
  them in every pass. ``seq_pos`` is the 1-D position in the example's sequence (as LLaVA's).

The vision tower runs all images of a batch as one packed sequence, split into independent
attention segments by ``cu_seqlens``: one per image (Qwen2-VL, Qwen3-VL, and Qwen2.5-VL's
``fullatt_block_indexes`` layers) or one per *window* (Qwen2.5-VL's other layers: windows of
``window_size`` pixels, 112 = 8 x 8 patches at the released checkpoints; the tower reorders its
sequence window by window before the first block and back after the merger). Its attention modules
run eager attention segment by segment and return no weights. The adapter sees them where they are
computed (``towers.SegmentedTower``): each tower attention module dispatches to ``vlatlas_eager``, an attention
function that
calls the modeling module's own ``eager_attention_forward`` unchanged and hands the weights of each
segment to the adapter (registered in transformers' ``AttentionInterface``; only the tower's
attention modules are pointed at it, through a copy of the vision config with that name, and only
after the model was checked to have loaded with eager attention). A forward hook on each tower
attention module assembles the segments of each image into one ``[batch, head, n, n]`` matrix
(``n`` the image's patch count, padded to the batch's largest): a windowed layer's matrix is block
diagonal, each query row summing to 1 over its own window and 0 elsewhere. Its hidden states
(``[patches of all images, dim]``) are split per image the same way. Tower ``seq_pos`` is the
position in the sequence the blocks see: the processor's block-major order, window by window for
Qwen2.5-VL.

Token table of one example::

    lm:     <|im_start|> system ... <|vision_start|> <img 0> ... <img N-1> <|vision_end|> q1 ... g1 ... gm
    vision: p(0,0) p(0,1) ... p(h-1,w-1)          (raster order over the tower's patch grid)

Roles of ``lm`` text tokens: ``vision_start``, ``vision_end`` (the markers around the image
tokens), ``im_start``, ``im_end`` (the chat template's turn markers), ``bos``/``eos``/``pad``
for the tokenizer's own special tokens, ``word`` otherwise and ``generated`` for the answer.
Image tokens of ``lm`` are ``patch`` (one per merged block); tower tokens ``patch``.

Generation is greedy under the checkpoint's own generation config, merged rather than replaced
(``decoder.greedy_generation_config``, as LLaVA's): ``do_sample=False``, ``num_beams=1``, the image and
video placeholders added to the config's ``suppress_tokens`` (a generated ``<|image_pad|>`` would
make the teacher-forced pass ask for another image); its ``eos_token_id`` list,
``repetition_penalty``, ``bad_words_ids`` … apply as they are; its ``max_new_tokens`` or
``max_length``, :data:`pipeline.models.family.MAX_NEW_TOKENS` new tokens when it sets no length (``max_new_tokens`` given
to the adapter caps it). Where the answer starts is the batch's own state (``Inputs.state``).

Processor: ``AutoProcessor`` (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``)
when it loads; it also holds a video processor, which needs torchvision. Without torchvision it
fails to build, and the adapter assembles ``processors.QwenImageTextProcessor`` from the checkpoint's own
tokenizer, image processor (transformers picks its PIL backend, ``Qwen2VLImageProcessorPil``) and
chat template: the same inputs for images and text (``tests/models/test_qwen2vl.py`` checks it against
``Qwen2VLProcessor``), no videos.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec
from pipeline.models.processors import QwenImageTextProcessor, processor_or
from pipeline.models.tokens import merged_columns
from pipeline.models.towers import SegmentedTower

__all__ = ["QWEN_VL", "ImageTextProcessor", "QwenVLAdapter", "load_processor"]

ImageTextProcessor = QwenImageTextProcessor  # the name tests and older code import

QWEN_VL = FamilySpec(
    name="",  # config.model_type: qwen2_vl, qwen2_5_vl or qwen3_vl
    classes={"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
             "qwen3_vl": "Qwen3VLForConditionalGeneration"},
    # the tower's attention modules return no weights: towers.SegmentedTower collects them
    streams={"lm": LM_PATHS, "vision": {"attention": "model.visual.blocks.{layer}.attn",
                                        "hidden": "model.visual.blocks.{layer}", "layers": "model.visual.blocks"}},
    tower="packed",
    markers={"config.vision_start_token_id": "vision_start", "config.vision_end_token_id": "vision_end",
             "<|im_start|>": "im_start", "<|im_end|>": "im_end"},
    prompt="{vision_start}{image}{vision_end}{text}",
    suppress=("config.video_token_id",),
    answer_inputs={"mm_token_type_ids": 0},  # the answer's tokens are text for M-RoPE
    image_check=True,  # the image processor refuses some images (an aspect ratio over 200)
)


def load_processor(model_id: str, revision: str | None = None):
    """``AutoProcessor`` when it builds a processor with an image processor; else (no torchvision:
    the video processor cannot be built) ``processors.QwenImageTextProcessor`` from the checkpoint's files."""
    return processor_or(model_id, revision, QwenImageTextProcessor)


class QwenVLAdapter(ExplainedDecoder):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: streams ``lm`` and ``vision``."""

    spec = QWEN_VL

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        """``max_new_tokens``: a cap on the answer's length (default: the checkpoint's own)."""
        cfg = model.config
        if cfg.model_type not in self.spec.classes:
            raise NotImplementedError(f"model type {cfg.model_type!r} is not one of {', '.join(self.spec.classes)}")
        vc = cfg.vision_config
        self.merge = int(vc.spatial_merge_size)
        self.windowed = getattr(vc, "window_size", None) is not None and hasattr(vc, "fullatt_block_indexes")
        super().__init__(model, processor, device, max_new_tokens)
        self.video_token_id = int(cfg.video_token_id)

    def stream_configs(self, cfg) -> dict[str, Any]:
        vc = cfg.vision_config
        width = getattr(vc, "embed_dim", None) or vc.hidden_size  # Qwen2-VL: hidden_size is the merger's output
        tower = SimpleNamespace(num_hidden_layers=int(vc.depth), num_attention_heads=int(vc.num_heads),
                                hidden_size=int(width))
        return {"lm": cfg.text_config, "vision": tower}

    def make_tower(self):
        return SegmentedTower(self.model, self.paths["vision"], self.configs["vision"].num_hidden_layers,
                              self.model.config.vision_config)

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str):
        import transformers

        arch = cls.spec.architecture(config.model_type)
        if arch is None:
            raise NotImplementedError(f"model type {config.model_type!r} is not one of {', '.join(cls.spec.classes)}")
        super().model_class(config, model_id)
        klass = getattr(transformers, arch, None)
        if klass is None:
            raise NotImplementedError(f"transformers {transformers.__version__} has no {arch}; upgrade transformers")
        return klass

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        """The family's processor, or ``processors.QwenImageTextProcessor`` without torchvision."""
        return load_processor(model_id, revision)

    # -- inputs ---------------------------------------------------------------------
    def fill_inputs(self, enc) -> None:
        if "mm_token_type_ids" not in enc:
            ids = enc["input_ids"]
            enc["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()

    def tower_batch(self, inputs, model_inputs) -> list[int]:
        """Patches per image (the tower's packed sequence)."""
        return [int(x) for x in model_inputs["image_grid_thw"].prod(-1).tolist()]

    # -- layout ---------------------------------------------------------------------
    def tower_order(self, grid_thw: torch.Tensor) -> list[np.ndarray]:
        """Per image, the tower sequence position of each patch in raster order (``[h * w]``).

        The processor lays each image's patches out block-major (``m x m`` blocks in raster order,
        the block's patches in raster order inside); Qwen2.5-VL's tower then reorders the blocks
        window by window (``get_vision_window_index``, the tower's own function), the order every
        block sees.
        """
        m = self.merge
        orders = []
        for t, h, w in grid_thw.tolist():
            r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # raster order
            block = (r // m) * (w // m) + c // m
            orders.append((block * m * m + (r % m) * m + c % m).ravel())
        if not self.windowed:
            return orders
        from transformers.vision_utils import get_vision_window_index

        vc = self.model.config.vision_config
        window_index, _ = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=m, window_size=vc.window_size,
                                                  patch_size=self.patch_size)
        unit = m * m
        perm = (window_index.cpu().numpy()[:, None] * unit + np.arange(unit)).ravel()  # permuted pos -> original
        where = np.empty_like(perm)
        where[perm] = np.arange(len(perm))  # original -> permuted
        out, start = [], 0
        for o in orders:  # windows never span two images: each image keeps its range
            out.append(where[start + o] - start)
            start += len(o)
        return out

    def batch_context(self, inputs, images):
        grid = inputs["image_grid_thw"].cpu()
        if grid.shape[0] != inputs["input_ids"].shape[0]:
            raise RuntimeError(f"{grid.shape[0]} images for {inputs['input_ids'].shape[0]} examples; VL-Atlas takes "
                               "one image each")
        return grid, self.tower_order(grid)

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Image token ``k`` is merged block ``k`` (row-major); the tower's patches at their positions in
        the sequence the blocks see (:meth:`tower_order`)."""
        grid, orders = ctx
        t, gh, gw = (int(x) for x in grid[ex.b].tolist())
        if t != 1:
            raise RuntimeError(f"image_grid_thw {grid[ex.b].tolist()}: VL-Atlas takes still images (t = 1)")
        m = self.merge
        rows, vision = merged_columns(ex.image, gh, gw, m, orders[ex.b].tolist())
        return ImageTokens(rows, vision, (gh, gw),
                           f"image_grid_thw {grid[ex.b].tolist()} and spatial_merge_size {m} make {len(rows)}")
