"""The Qwen-VL family: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``), streams ``lm`` and
``vision``.

A decoder LVLM like LLaVA (``pipeline/models/llava.py``: the answer is generated greedily first,
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
computed: each tower attention module dispatches to ``vlatlas_eager``, an attention function that
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
(``base.greedy_generation_config``, as LLaVA's): ``do_sample=False``, ``num_beams=1``, the image and
video placeholders added to the config's ``suppress_tokens`` (a generated ``<|image_pad|>`` would
make the teacher-forced pass ask for another image); its ``eos_token_id`` list,
``repetition_penalty``, ``bad_words_ids`` … apply as they are; its ``max_new_tokens`` or
``max_length``, :data:`MAX_NEW_TOKENS` new tokens when it sets no length (``max_new_tokens`` given
to the adapter caps it). Where the answer starts is the batch's own state (``Inputs.state``).

Processor: ``AutoProcessor`` (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``)
when it loads; it also holds a video processor, which needs torchvision. Without torchvision it
fails to build, and the adapter assembles :class:`ImageTextProcessor` from the checkpoint's own
tokenizer, image processor (transformers picks its PIL backend, ``Qwen2VLImageProcessorPil``) and
chat template: the same inputs for images and text (``tests/test_qwen2vl.py`` checks it against
``Qwen2VLProcessor``), no videos.
"""

from __future__ import annotations

import copy
import json
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.capture import HookPoint
from pipeline.models.base import (GEN_START, IMAGE_HOLD, AssembledProcessor, AttnProbe, BatchLayout, DecoderAdapter,
                                  Inputs, LanguageModelExplained, Probe, checked_architecture, first_line,
                                  greedy_generation_config, module_at, probed_points, processor_or, require_eager,
                                  split_stream_layouts, stream_hook_points, token_rows)

# config.model_type -> the class VL-Atlas loads
ARCHITECTURES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
# Native module paths (the same in the three models). Language-model attention modules return
# (attn_output, attn_weights); the tower's return attn_output only (see the module docstring).
MODULES = {
    "lm": {"attention": "model.language_model.layers.{layer}.self_attn",
           "hidden": "model.language_model.layers.{layer}",
           "value": "model.language_model.layers.{layer}.self_attn.v_proj",
           "out": "model.language_model.layers.{layer}.self_attn.o_proj",
           "layers": "model.language_model.layers"},
    "vision": {"attention": "model.visual.blocks.{layer}.attn",
               "hidden": "model.visual.blocks.{layer}",
               "layers": "model.visual.blocks"},
}
STREAMS = ("lm", "vision")  # token-table order
MAX_NEW_TOKENS = 16  # new tokens when the checkpoint's generation config sets no length
# key in the batch's Inputs.state (set by prepare(); not a model input)
ATTN_FUNCTION = "vlatlas_eager"
# chat-template markers -> role (the image markers' ids come from the model's config)
MARKERS = {"<|im_start|>": "im_start", "<|im_end|>": "im_end"}




# -- the tower's attention weights -------------------------------------------------------------
def _recording_eager(module, query, key, value, attention_mask, **kwargs):
    """``vlatlas_eager``: the modeling module's own eager attention, its weights handed on to each
    adapter capturing the pass (``module._vlatlas_segments``: adapter id -> its list of segments)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward as eager
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    for segments in getattr(module, "_vlatlas_segments", {}).values():
        segments.append(weights)
    return out, weights


def _register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_FUNCTION, _recording_eager)  # global, by name; registering again is harmless



# -- the processor without torchvision -----------------------------------------------------------
class ImageTextProcessor(AssembledProcessor):
    """What ``Qwen2VLProcessor`` does for images and text, from a tokenizer and an image processor.

    ``__call__(images=, text=)`` runs the image processor on the images (``pixel_values``: every
    image's patches, concatenated; ``image_grid_thw``), expands the ``i``-th ``<|image_pad|>`` of
    the prompts to ``prod(image_grid_thw[i]) / merge_size^2`` copies, tokenizes, and adds
    ``mm_token_type_ids`` (1 on image tokens, 2 on video tokens, 0 elsewhere).
    """

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, chat_template)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> "ImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = AutoImageProcessor.from_pretrained(model_id, revision=revision)
        return cls(ip, tok, _chat_template(model_id, revision))

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if images is not None:
            out.update(self.image_processor(images=images, return_tensors=return_tensors))
            grid = out["image_grid_thw"]
            merge = int(self.image_processor.merge_size)
            texts = self.expand(texts, len(grid), lambda i: IMAGE_HOLD * int(grid[i].prod() // merge ** 2))
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kw)
        ids = enc["input_ids"]
        mm = torch.zeros_like(ids)
        mm[ids == self.image_token_id] = 1
        mm[ids == self.video_token_id] = 2
        return {**enc, "mm_token_type_ids": mm, **out}


def _chat_template(model_id: str, revision: str | None) -> str | None:
    """The processor's chat template (``chat_template.jinja``, or ``chat_template.json``), if any."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(model_id, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path:
            text = open(path, encoding="utf-8").read()
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def load_processor(model_id: str, revision: str | None = None):
    """``AutoProcessor`` when it builds a processor with an image processor; else (no torchvision:
    the video processor cannot be built) :class:`ImageTextProcessor` from the checkpoint's files."""
    return processor_or(model_id, revision, ImageTextProcessor)


# -- the adapter ---------------------------------------------------------------------------------
class QwenVLAdapter(LanguageModelExplained, DecoderAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: streams ``lm`` and ``vision``."""

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        """``max_new_tokens``: a cap on the answer's length (default: the checkpoint's own)."""
        cfg = model.config
        if cfg.model_type not in ARCHITECTURES:
            raise NotImplementedError(f"model type {cfg.model_type!r} is not one of {', '.join(ARCHITECTURES)}")
        require_eager(model, getattr(cfg, "_name_or_path", "") or cfg.model_type, type(model).__name__,
                      self.EAGER_PARTS)
        super().__init__(model, processor, device)
        self.family = cfg.model_type
        self.tokenizer.padding_side = "left"  # generation pads on the left
        self.max_new_tokens = max_new_tokens
        vc = cfg.vision_config
        self.vision_config = vc
        self.merge = int(vc.spatial_merge_size)
        self.patch_size = int(vc.patch_size)
        self.windowed = getattr(vc, "window_size", None) is not None and hasattr(vc, "fullatt_block_indexes")
        width = getattr(vc, "embed_dim", None) or vc.hidden_size  # Qwen2-VL: hidden_size is the merger's output
        tower = SimpleNamespace(num_hidden_layers=int(vc.depth), num_attention_heads=int(vc.num_heads),
                                hidden_size=int(width))
        self.configs = {"lm": cfg.text_config, "vision": tower}
        self.paths = {s: MODULES[s] for s in STREAMS}  # the tower's hooks are the adapter's own (hook_points)
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        ids = {int(cfg.vision_start_token_id): "vision_start", int(cfg.vision_end_token_id): "vision_end"}
        vocab = self.tokenizer.get_vocab()
        ids.update({vocab[t]: r for t, r in MARKERS.items() if t in vocab})
        self.marker_roles = ids
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.vision_start = self.tokenizer.convert_ids_to_tokens(int(cfg.vision_start_token_id))
        self.vision_end = self.tokenizer.convert_ids_to_tokens(int(cfg.vision_end_token_id))

        # language model: hidden state 0 is its inputs_embeds (image features scattered in)
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, "model.language_model").register_forward_pre_hook(self._feed_probe, with_kwargs=True)
        # vision tower: weights through vlatlas_eager, hidden states split per image
        _register_attention_function()
        vcopy = copy.copy(vc)
        vcopy._attn_implementation = ATTN_FUNCTION
        self._lengths: list[int] | None = None  # patches per image of the pass being captured
        L = self.configs["vision"].num_hidden_layers
        self.vis_attn = [AttnProbe() for _ in range(L)]
        self.vis_hidden = [Probe() for _ in range(L + 1)]
        blocks = module_at(model, MODULES["vision"]["layers"])
        for i, block in enumerate(blocks):
            attn = module_at(model, MODULES["vision"]["attention"].format(layer=i))
            attn.config = vcopy
            if not hasattr(attn, "_vlatlas_segments"):
                attn._vlatlas_segments = {}
            attn.register_forward_pre_hook(self._open_segments(i))
            attn.register_forward_hook(self._attn_hook(i))
            block.register_forward_hook(self._hidden_hook(i + 1))
        blocks[0].register_forward_pre_hook(self._hidden_0)

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str):
        import transformers

        arch = ARCHITECTURES.get(config.model_type)
        if arch is None:
            raise NotImplementedError(f"model type {config.model_type!r} is not one of {', '.join(ARCHITECTURES)}")
        checked_architecture(config, model_id, arch, config.model_type)
        klass = getattr(transformers, arch, None)
        if klass is None:
            raise NotImplementedError(f"transformers {transformers.__version__} has no {arch}; upgrade transformers")
        return klass

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        """The family's processor, or :class:`ImageTextProcessor` without torchvision (:func:`load_processor`)."""
        return load_processor(model_id, revision)


    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        """``lm`` as LLaVA's; ``vision`` from the probes the tower's hooks feed (no ``--explain value``:
        the tower's value projection is part of a fused qkv over the packed sequence of all images)."""
        pts = stream_hook_points(self.model, {"lm": self.configs["lm"]}, {"lm": MODULES["lm"]}, keep_hidden,
                                 first_hidden={"lm": self.probe}, explain=explain)
        return pts + probed_points("vision", self.vis_attn, self.vis_hidden, keep_hidden, explain)

    # -- the tower's hooks ------------------------------------------------------------
    def _open_segments(self, layer: int):
        probe = self.vis_attn[layer]

        def fn(module, args):
            module._vlatlas_segments.pop(id(self), None)
            if self._lengths is not None and self._watched(probe):
                module._vlatlas_segments[id(self)] = []

        return fn

    def _attn_hook(self, layer: int):
        probe = self.vis_attn[layer]

        def fn(module, args, output):
            segments = module._vlatlas_segments.pop(id(self), None)
            if segments:
                probe(self._per_image_attention(segments))
            return None

        return fn

    def _per_image_attention(self, segments: list[torch.Tensor]) -> torch.Tensor:
        """``[image, head, n, n]`` from the weights of each attention segment (``[1, head, s, s]``,
        in sequence order): each image's segments on its block diagonal, zero elsewhere."""
        lengths = self._lengths
        H = segments[0].shape[1]
        N = max(lengths)
        out = segments[0].new_zeros(len(lengths), H, N, N)
        b, off = 0, 0  # the image, the position in its part of the packed sequence
        for w in segments:
            s = w.shape[-1]
            while b < len(lengths) and off >= lengths[b]:
                b, off = b + 1, 0
            if b >= len(lengths) or off + s > lengths[b]:
                raise RuntimeError("a vision attention segment spans two images; VL-Atlas cannot split it")
            out[b, :, off:off + s, off:off + s] = w[0]
            off += s
        if b != len(lengths) - 1 or off != lengths[-1]:
            raise RuntimeError("the vision attention segments do not cover the batch's images")
        return out

    def _split(self, h: torch.Tensor) -> torch.Tensor:
        """``[patches of all images, dim]`` -> ``[image, max patches, dim]`` (zero padded)."""
        parts = torch.split(h, self._lengths, dim=0)
        return torch.nn.utils.rnn.pad_sequence(list(parts), batch_first=True)

    def _hidden_hook(self, layer: int):
        probe = self.vis_hidden[layer]

        def fn(module, args, output):
            if self._lengths is not None and self._watched(probe):
                probe(self._split(output[0] if isinstance(output, tuple) else output))
            return None

        return fn

    def _hidden_0(self, module, args):
        probe = self.vis_hidden[0]
        if self._lengths is not None and self._watched(probe):
            probe(self._split(args[0]))

    # -- inputs ---------------------------------------------------------------------
    def check_image(self, image) -> None:
        """The image processor refuses some images (an aspect ratio over 200)."""
        from pipeline.data import BadInput

        try:
            self.processor.image_processor(images=[image], return_tensors="pt")
        except ValueError as e:
            raise BadInput("image", f"the {type(self.model).__name__} image processor cannot take this image: "
                                    f"{first_line(e)}") from None

    def prompt(self, text: str) -> str:
        """The processor's chat template with one image and the question, when it has one; else
        ``<|vision_start|><|image_pad|><|vision_end|>question``."""
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{self.vision_start}{self.image_token}{self.vision_end}{text}"

    def encode(self, texts: list[str], images: list):
        prompts = [self.prompt(t) for t in texts]
        enc = Inputs(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))
        if "mm_token_type_ids" not in enc:
            ids = enc["input_ids"]
            enc["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return enc, [[] for _ in texts]  # on the host

    def generation_config(self, prompt_length: int | None = None):
        """The checkpoint's own generation config, greedy, with the image and video placeholders added
        to its suppressed tokens (``base.greedy_generation_config``)."""
        return greedy_generation_config(self.model, self.tokenizer, suppress=(self.image_token_id, self.video_token_id),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    def extend_inputs(self, out: Inputs, model_inputs: dict, new: torch.Tensor) -> None:
        """The answer's tokens are text for M-RoPE: ``mm_token_type_ids`` 0."""
        mm = model_inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(new, dtype=mm.dtype)], dim=1)

    def run(self, inputs, model_inputs, example_ids):
        self._lengths = [int(x) for x in model_inputs["image_grid_thw"].prod(-1).tolist()]  # the tower's hooks
        try:
            return self.model(**model_inputs, use_cache=False, return_dict=True)
        finally:
            self._lengths = None

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

        vc = self.vision_config
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

    def _merged_table(self, image, tid: list[int], pos: list[int], is_img: list[bool], start: int, gh: int, gw: int,
                      vis_seq: list[int]) -> pa.Table:
        """One example's token table: its ``lm`` tokens (ids ``tid`` at sequence positions ``pos``; image
        token ``k`` is merged block ``k`` of the ``(gh / m) x (gw / m)`` grid, row-major, boxed in pixels of
        the original ``image``; text tokens by role, ``generated`` from ``start`` on), then the tower's
        ``gh x gw`` patches in raster order at ``vis_seq``, their positions in the tower's sequence."""
        m, bw = self.merge, gw // self.merge
        W, H = image.size
        fx, fy = W / gw, H / gh  # original pixels per tower patch (the resize ratio's inverse)
        pieces = self.tokenizer.convert_ids_to_tokens(tid)
        cols = {k: [] for k in ("modality", "role", "token", "text_pos", "row", "col", "x0", "y0", "x1", "y1")}
        k = nt = 0
        for i, p, img, piece in zip(tid, pos, is_img, pieces):
            if img:
                R, C = divmod(k, bw)  # merged block k, row-major
                vals = ("image", "patch", None, None, R, C, C * m * fx, R * m * fy, (C + 1) * m * fx, (R + 1) * m * fy)
                k += 1
            else:
                vals = ("text", "generated" if p >= start else self._text_role(i), piece, nt) + (None,) * 6
                nt += 1
            for key, v in zip(cols, vals):
                cols[key].append(v)
        n_lm, nv = len(pos), gh * gw
        r, c = np.divmod(np.arange(nv), gw)
        none_v = [None] * nv
        return token_rows(
            token_idx=list(range(n_lm + nv)),
            stream=["lm"] * n_lm + ["vision"] * nv,
            modality=cols["modality"] + ["image"] * nv,
            role=cols["role"] + ["patch"] * nv,
            token=cols["token"] + none_v,
            seq_pos=[p - pos[0] for p in pos] + vis_seq,
            text_pos=cols["text_pos"] + none_v,
            patch_row=cols["row"] + r.tolist(),
            patch_col=cols["col"] + c.tolist(),
            x0=cols["x0"] + (c * fx).tolist(), y0=cols["y0"] + (r * fy).tolist(),
            x1=cols["x1"] + ((c + 1) * fx).tolist(), y1=cols["y1"] + ((r + 1) * fy).tolist(),
        )

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        grid = inputs["image_grid_thw"].cpu()
        if grid.shape[0] != ids.shape[0]:
            raise RuntimeError(f"{grid.shape[0]} images for {ids.shape[0]} examples; VL-Atlas takes one image each")
        m = self.merge
        orders = self.tower_order(grid)
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            t, gh, gw = (int(x) for x in grid[b].tolist())
            if t != 1:
                raise RuntimeError(f"image_grid_thw {grid[b].tolist()}: VL-Atlas takes still images (t = 1)")
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            is_img = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            n_img, bh, bw = sum(is_img), gh // m, gw // m
            if n_img != bh * bw:
                raise RuntimeError(f"example has {n_img} image tokens where image_grid_thw {grid[b].tolist()} and "
                                   f"spatial_merge_size {m} make {bh * bw}")
            vis_seq = orders[b].tolist()
            tables.append(self._merged_table(images[b], tid, pos, is_img, start[b], gh, gw, vis_seq))
            lm_orders.append(pos)
            vis_orders.append(vis_seq)
            offsets.append(len(pos))
            grids.append((gh, gw))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)

    # -- predictions: DecoderAdapter.predict (the generated text) -------------------------------
