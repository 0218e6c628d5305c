"""Mistral 3 / Pixtral (``Mistral3ForConditionalGeneration``: a Pixtral vision tower, a patch merger and a
Mistral language model), streams ``lm`` and ``vision``.

A decoder LVLM like LLaVA (``pipeline/models/llava.py``: the answer is generated greedily first, uncaptured,
then one teacher-forced pass over prompt + answer runs with the capture hooks), with:

- **Native resolution.** The image processor resizes each image (aspect ratio kept) to fit
  ``size["longest_edge"]``, each side rounded up to a multiple of ``patch_size * spatial_merge_size``,
  and pads the batch to its largest image (``image_sizes`` holds each image's resized ``(h, w)``;
  the tower crops each image's patches back to its own ``gh x gw = h / p x w / p`` grid). Boxes map
  back to original pixels by the resize ratio of each axis: tower patch ``(r, c)`` is
  ``x in [c W / gw, (c + 1) W / gw)``, ``y in [r H / gh, (r + 1) H / gh)`` for an original ``W x H`` image.
- **Spatial merging.** The multimodal projector's ``Mistral3PatchMerger`` unfolds each ``m x m`` block of
  tower patches (``m = spatial_merge_size``) into one language-model token, blocks row-major over the
  ``(gh / m) x (gw / m)`` block grid. LM image token ``k`` of a row is block ``(R, C)``; its
  ``patch_row``/``patch_col`` are the block's and its box the block's box (``m`` patches a side).
- **Row markers.** The processor expands the prompt's one ``[IMG]`` to ``gh / m`` rows of ``gw / m``
  ``[IMG]`` tokens, each row closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]`` instead. These two
  are vocabulary tokens (the language model's own embeddings, no image region): ``text`` modality with
  roles ``img_break`` and ``img_end``. The layout checks the pattern (counts and order) against
  ``image_sizes``.

The Pixtral tower runs all images of a batch as ONE sequence (``[1, patches of all images, dim]``, each
image's patches in raster order) with a block-diagonal attention mask (``generate_block_attention_mask``:
an image's patches see only its own). Its eager attention modules return their weights,
``[1, head, N, N]`` over the whole packed sequence; a forward hook cuts each image's diagonal block out
(``[image, head, n, n]``, padded to the batch's largest ``n``; the off-diagonal blocks are exactly 0 after
the mask's softmax, so nothing is lost), and the layers' hidden states (``[1, N, dim]``) are split the
same way. Hidden state 0 is the patch embeddings after ``ln_pre`` (the first layer's input). What is not
captured: the tower's ``--explain value`` (it is not offered), and the merger's own computation (its
output is the ``lm`` stream's hidden state 0 of the image tokens).

Token table of one example::

    lm:     [<s>] [INST] <img 0,0> ... <img 0,bw-1> [IMG_BREAK] ... <img bh-1,bw-1> [IMG_END] q1 ... [/INST] g1 ... gm
    vision: p(0,0) p(0,1) ... p(gh-1,gw-1)          (raster order = the tower's order)

Generation is greedy under the checkpoint's own generation config (``base.greedy_generation_config``, as
LLaVA's), with ``[IMG]``, ``[IMG_BREAK]`` and ``[IMG_END]`` added to its suppressed tokens.

Processor: ``AutoProcessor`` (``PixtralProcessor``) when it loads; it needs torchvision, and without it
the adapter assembles :class:`ImageTextProcessor` from the checkpoint's tokenizer, image processor
(transformers picks its PIL backend, ``PixtralImageProcessorPil``), ``patch_size`` /
``spatial_merge_size`` (``processor_config.json``, else the model's config) and chat template: the same
expansion as ``PixtralProcessor.replace_image_token``.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from pipeline.capture import HookPoint
from pipeline.models.base import (GEN_START, IMAGE_HOLD, AssembledProcessor, AttnProbe, BatchLayout, DecoderAdapter,
                                  Inputs, LanguageModelExplained, Probe, checked_architecture,
                                  greedy_generation_config, module_at, probed_points, processor_or, require_eager,
                                  split_stream_layouts, stream_hook_points)
from pipeline.models.qwen2vl import QwenVLAdapter, _chat_template

ARCHITECTURE = "Mistral3ForConditionalGeneration"
MODULES = {
    "lm": {"attention": "model.language_model.layers.{layer}.self_attn",
           "hidden": "model.language_model.layers.{layer}",
           "value": "model.language_model.layers.{layer}.self_attn.v_proj",
           "out": "model.language_model.layers.{layer}.self_attn.o_proj",
           "layers": "model.language_model.layers"},
    "vision": {"attention": "model.vision_tower.transformer.layers.{layer}.attention",
               "hidden": "model.vision_tower.transformer.layers.{layer}",
               "layers": "model.vision_tower.transformer.layers"},
}
STREAMS = ("lm", "vision")
MAX_NEW_TOKENS = 16  # new tokens when the checkpoint's generation config sets no length
IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
MARKERS = {IMG_BREAK: "img_break", IMG_END: "img_end", "[INST]": "inst", "[/INST]": "inst_end"}


class ImageTextProcessor(AssembledProcessor):
    """What ``PixtralProcessor`` does for images and text, from a tokenizer and an image processor: the
    image processor run with ``patch_size = patch_size * spatial_merge_size``, the ``i``-th ``[IMG]`` of the
    prompts expanded to ``h / P`` rows of ``w / P`` ``[IMG]`` closed by ``[IMG_BREAK]`` (the last by
    ``[IMG_END]``), ``(h, w) = image_sizes[i]``, ``P = patch_size * spatial_merge_size``."""

    def __init__(self, image_processor, tokenizer, patch_size: int, spatial_merge_size: int,
                 chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, chat_template)
        self.patch_size = int(patch_size)
        self.spatial_merge_size = int(spatial_merge_size)
        self.image_token, self.image_break_token, self.image_end_token = IMG, IMG_BREAK, IMG_END

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> "ImageTextProcessor":
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
        from transformers.utils import cached_file

        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = AutoImageProcessor.from_pretrained(model_id, revision=revision)
        path = cached_file(model_id, "processor_config.json", revision=revision,
                           _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        cfg = json.loads(open(path, encoding="utf-8").read()) if path else {}
        mc = AutoConfig.from_pretrained(model_id, revision=revision)
        ps = cfg.get("patch_size") or mc.vision_config.patch_size
        m = cfg.get("spatial_merge_size") or getattr(mc, "spatial_merge_size", 1)
        return cls(ip, tok, ps, m, _chat_template(model_id, revision))

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if images is not None:
            P = self.patch_size * self.spatial_merge_size
            out.update(self.image_processor(images=images, patch_size={"height": P, "width": P},
                                            return_tensors=return_tensors))
            sizes = out["image_sizes"]

            def rows_of(i: int) -> str:  # rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END]
                h, w = (int(x) for x in sizes[i])
                rows = [IMAGE_HOLD * (w // P) + self.image_break_token] * (h // P)
                return "".join(rows)[:-len(self.image_break_token)] + self.image_end_token

            texts = self.expand(texts, len(sizes), rows_of)
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kw)
        return {**enc, **out}


def load_processor(model_id: str, revision: str | None = None):
    return processor_or(model_id, revision, ImageTextProcessor)


class Mistral3Adapter(LanguageModelExplained, DecoderAdapter):
    """Mistral3ForConditionalGeneration (Pixtral tower): streams ``lm`` and ``vision``."""

    family = "mistral3"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        cfg = model.config
        require_eager(model, getattr(cfg, "_name_or_path", "") or cfg.model_type, type(model).__name__,
                      self.EAGER_PARTS)
        super().__init__(model, processor, device)
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        vc = cfg.vision_config
        self.merge = int(cfg.spatial_merge_size)
        self.patch_size = int(vc.patch_size)
        self.configs = {"lm": cfg.text_config, "vision": vc}
        self.paths = {s: MODULES[s] for s in STREAMS}
        self.image_token_id = int(cfg.image_token_id)
        vocab = self.tokenizer.get_vocab()
        self.marker_roles = {vocab[t]: r for t, r in MARKERS.items() if t in vocab}
        self.break_id, self.end_id = vocab.get(IMG_BREAK), vocab.get(IMG_END)
        if self.break_id is None or self.end_id is None:
            raise NotImplementedError(f"the tokenizer has no {IMG_BREAK} / {IMG_END}: not a Pixtral tokenizer")
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)

        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, "model.language_model").register_forward_pre_hook(self._feed_probe, with_kwargs=True)
        self._lengths: list[int] | None = None  # patches per image of the pass being captured
        L = int(vc.num_hidden_layers)
        self.vis_attn = [AttnProbe() for _ in range(L)]
        self.vis_hidden = [Probe() for _ in range(L + 1)]
        layers = module_at(model, MODULES["vision"]["layers"])
        for i, layer in enumerate(layers):
            module_at(model, MODULES["vision"]["attention"].format(layer=i)).register_forward_hook(self._attn_hook(i))
            layer.register_forward_hook(self._hidden_hook(i + 1))
        layers[0].register_forward_pre_hook(self._hidden_0)

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, ARCHITECTURE, "mistral3")

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        return load_processor(model_id, revision)

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        """``lm`` as LLaVA's; ``vision`` from the probes the tower's hooks feed (per image)."""
        pts = stream_hook_points(self.model, {"lm": self.configs["lm"]}, {"lm": MODULES["lm"]}, keep_hidden,
                                 first_hidden={"lm": self.probe}, explain=explain)
        return pts + probed_points("vision", self.vis_attn, self.vis_hidden, keep_hidden, explain)

    # -- hooks ----------------------------------------------------------------------
    # Shared with Qwen-VL, whose tower also packs a batch's images into one sequence: the hidden-state
    # hooks (through this class's own _split) and the image check.
    _hidden_hook = QwenVLAdapter._hidden_hook
    _hidden_0 = QwenVLAdapter._hidden_0
    check_image = QwenVLAdapter.check_image
    _merged_table = QwenVLAdapter._merged_table  # the token table of merged blocks and tower patches

    def _attn_hook(self, layer: int):
        probe = self.vis_attn[layer]

        def fn(module, args, output):
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if w is not None and self._lengths is not None and self._watched(probe):
                probe(self._per_image_attention(w))
            return None

        return fn

    def _per_image_attention(self, w: torch.Tensor) -> torch.Tensor:
        """``[1, head, N, N]`` over the packed sequence -> ``[image, head, n, n]``: each image's diagonal block."""
        lengths = self._lengths
        if w.shape[-1] != sum(lengths):
            raise RuntimeError(f"tower attention over {w.shape[-1]} patches where image_sizes make {sum(lengths)}")
        N = max(lengths)
        out = w.new_zeros(len(lengths), w.shape[1], N, N)
        o = 0
        for b, n in enumerate(lengths):
            out[b, :, :n, :n] = w[0, :, o:o + n, o:o + n]
            o += n
        return out

    def _split(self, h: torch.Tensor) -> torch.Tensor:
        parts = torch.split(h[0], self._lengths, dim=0)
        return torch.nn.utils.rnn.pad_sequence(list(parts), batch_first=True)

    def prompt(self, text: str) -> str:
        """The processor's chat template with one image and the question, when it has one; else ``[IMG]question``."""
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{self.image_token}{text}"

    def encode(self, texts: list[str], images: list):
        prompts = [self.prompt(t) for t in texts]
        enc = Inputs(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))
        return enc, [[] for _ in texts]

    def generation_config(self, prompt_length: int | None = None):
        """The checkpoint's own generation config, greedy, with the image tokens and row markers suppressed."""
        return greedy_generation_config(self.model, self.tokenizer,
                                        suppress=(self.image_token_id, self.break_id, self.end_id),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    def _grids(self, image_sizes) -> list[tuple[int, int]]:
        p = self.patch_size
        return [(int(h) // p, int(w) // p) for h, w in image_sizes.tolist()]

    def run(self, inputs, model_inputs, example_ids):
        self._lengths = [gh * gw for gh, gw in self._grids(model_inputs["image_sizes"])]
        try:
            return self.model(**model_inputs, use_cache=False, return_dict=True)
        finally:
            self._lengths = None

    # -- layout ---------------------------------------------------------------------
    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        grid_list = self._grids(inputs["image_sizes"].cpu())
        if len(grid_list) != ids.shape[0]:
            raise RuntimeError(f"{len(grid_list)} images for {ids.shape[0]} examples; VL-Atlas takes one image each")
        m = self.merge
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            gh, gw = grid_list[b]
            bh, bw = gh // m, gw // m
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            prompt = [p < start[b] for p in pos]
            kinds = [("img" if i == self.image_token_id else "brk" if i == self.break_id else
                      "end" if i == self.end_id else None) if pr else None for i, pr in zip(tid, prompt)]
            pattern = [k for k in kinds if k]
            want = (["img"] * bw + ["brk"]) * bh
            want = want[:-1] + ["end"] if want else want
            if pattern != want:
                raise RuntimeError(f"example's image tokens are {pattern.count('img')} [IMG], {pattern.count('brk')} "
                                   f"[IMG_BREAK], {pattern.count('end')} [IMG_END] (or out of order) where "
                                   f"image_sizes and spatial_merge_size {m} make rows of {bw} x {bh}")
            vis_seq = list(range(gh * gw))  # the tower's raster order
            tables.append(self._merged_table(images[b], tid, pos, [k == "img" for k in kinds], start[b], gh, gw,
                                             vis_seq))
            lm_orders.append(pos)
            vis_orders.append(vis_seq)
            offsets.append(len(pos))
            grids.append((gh, gw))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)
