"""Decoder LVLMs: LLaVA (``LlavaForConditionalGeneration``), streams ``lm`` and ``vision``.

The image goes through a vision tower (a CLIP vision encoder: stream ``vision``, every tower
layer captured even though the projector reads ``vision_feature_layer``, by default -2, a middle
one); the projected patch features replace the expanded ``<image>`` placeholder tokens of the
prompt, and a causal language model (stream ``lm``) reads prompt and image tokens in one sequence
and generates the answer.

Two passes per batch (``extract._extract_chunk``):

1. ``prepare()``, *without* capture hooks: ``model.generate(do_sample=False)`` answers greedily;
   the generated ids are appended to ``input_ids`` / ``attention_mask`` (tokens after a
   sequence's first eos are the batch's padding: mask 0).
2. ``forward()``, *with* the hooks: one teacher-forced pass over prompt + generated tokens.
   Attention is causal, so the row of every token is exactly what it was when the model ran
   it during generation: the prompt's rows are generate's prefill step, and the row of the
   ``s``-th generated token (0-based) is generate's step ``s + 1`` (the step that fed it back
   in). The last generated token was never fed back during generation; its row is what the
   model would attend with next. ``tests/test_llava.py`` checks this against
   ``generate(output_attentions=True)``.

Token table of one example, one index space::

    lm:     [bos] w1 ... <img 0> ... <img n-1> ... wn  g1 ... gm      token_idx 0 .. T-1
    vision: ([image CLS]) p(0,0) p(0,1) ... p(gh-1,gw-1)               token_idx T .. T+V-1

- ``lm`` keeps every token the model attends to, in sequence order: the prompt's text tokens
  (roles ``bos``/``word``/...), the image placeholder tokens (modality ``image``), then the
  generated tokens (role ``generated``). The processor pads batches on the left; pads are left
  out, and ``seq_pos`` counts from the example's first real token (its position in its own
  sequence, the same whatever its batch).
- Image token ``k`` carries the vision tower's output at tower position ``k`` after the
  projector's selection: with ``vision_feature_select_strategy="default"`` the tower's CLS is
  dropped, so token ``k`` is patch ``k`` in raster order (``patch_row = k // gw``); with
  ``"full"`` token 0 is the tower's CLS (role ``image_cls``) and token ``k`` patch ``k - 1``.
  The grid is the processed image's size over the tower's ``patch_size``; the number of image
  tokens is checked against it (never an assumed 576 = 24 x 24).
- Image tokens of ``lm`` and the tower's patches have the same boxes, in original pixels
  (through the processor's pad-to-square, resize and centre crop).

``prediction`` is the generated text (special tokens skipped, stripped); ``correct`` compares it
with the manifest's answer after ``normalise_answer``. The answer is the model's own greedy answer
under the checkpoint's own generation config (``base.greedy_generation_config``: its suppressed
and bad words, its eos list, its ``max_new_tokens`` or ``max_length``; :data:`MAX_NEW_TOKENS` new
tokens when it sets no length; ``max_new_tokens`` given to the adapter caps it). The image
placeholder is added to the suppressed tokens (a generated ``<image>`` would make the
teacher-forced pass ask for a second image).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.base import (GEN_START, BatchLayout, DecoderAdapter, Inputs, LanguageModelExplained, Probe,
                                  checked_architecture, greedy_generation_config, image_columns, module_at,
                                  split_stream_layouts, stack_columns)
from pipeline.models.geometry import pad_square_geometry, patch_grid

# Native module paths -> (stream, layer). Attention modules return (attn_output, attn_weights).
# ``hidden_0`` of ``lm`` is the language model's ``inputs_embeds`` (text embeddings with the
# projected image features scattered in), handed to ``Probe`` by a pre-hook.
MODULES = {
    "llava": {
        "vision": {"attention": "model.vision_tower.encoder.layers.{layer}.self_attn",
                   "hidden_0": "model.vision_tower.pre_layrnorm",
                   "hidden": "model.vision_tower.encoder.layers.{layer}",
                   "value": "model.vision_tower.encoder.layers.{layer}.self_attn.v_proj",
                   "out": "model.vision_tower.encoder.layers.{layer}.self_attn.out_proj",
                   "layers": "model.vision_tower.encoder.layers"},
        "lm": {"attention": "model.language_model.layers.{layer}.self_attn",
               "hidden": "model.language_model.layers.{layer}",
               "value": "model.language_model.layers.{layer}.self_attn.v_proj",
               "out": "model.language_model.layers.{layer}.self_attn.o_proj",
               "layers": "model.language_model.layers"},
    },
}
STREAMS = ("lm", "vision")  # token-table order: the language model's sequence first
MAX_NEW_TOKENS = 16  # new tokens when the checkpoint's generation config sets no length
# key in the batch's Inputs.state (set by prepare(); not a model input)


class LlavaAdapter(LanguageModelExplained, DecoderAdapter):
    """LlavaForConditionalGeneration: streams ``lm`` and ``vision``."""

    family = "llava"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        """``max_new_tokens``: a cap on the answer's length (default: the checkpoint's own)."""
        super().__init__(model, processor, device)
        self.tokenizer.padding_side = "left"  # generation pads on the left
        self.max_new_tokens = max_new_tokens
        cfg = model.config
        self.configs = {"lm": cfg.text_config, "vision": cfg.vision_config}
        self.image_token_id = int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None
                                  else cfg.image_token_index)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.strategy = cfg.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise NotImplementedError(f"vision_feature_select_strategy={self.strategy!r}: VL-Atlas knows "
                                      "'default' (CLS dropped) and 'full'")
        self.patch_size = int(cfg.vision_config.patch_size)
        self.paths = MODULES["llava"]
        tower = module_at(model, "model.vision_tower")
        self.tower_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding")
        if not hasattr(tower, "pre_layrnorm"):  # e.g. a SigLIP tower: hidden 0 is the embeddings' output
            self.paths = {**self.paths, "vision": {**self.paths["vision"],
                                                   "hidden_0": "model.vision_tower.embeddings"}}
        self.paths = {s: self.paths[s] for s in STREAMS}
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        lm = module_at(model, "model.language_model")
        lm.register_forward_pre_hook(self._feed_probe, with_kwargs=True)

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, "LlavaForConditionalGeneration", "llava")

    # -- inputs ---------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """The prompt for one question: the processor's chat template when it has one, else
        ``"<image> question"``."""
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{self.image_token} {text}"

    def encode(self, texts: list[str], images: list):
        prompts = [self.prompt(t) for t in texts]
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        return Inputs(enc), [[] for _ in texts]  # on the host

    def generation_config(self, prompt_length: int | None = None):
        """The checkpoint's own generation config, greedy, with ``<image>`` added to its suppressed
        tokens (``base.greedy_generation_config``)."""
        return greedy_generation_config(self.model, self.tokenizer, suppress=(self.image_token_id,),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    # -- layout ---------------------------------------------------------------------
    def _geometry(self, W: int, H: int):
        """``(sx, sy, left, top, out_w, out_h)`` as ``crop_geometry``, with a pad-to-square first
        (LlavaImageProcessor's ``do_pad``)."""
        return pad_square_geometry(self.processor.image_processor, W, H)

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        ph, pw = inputs["pixel_values"].shape[-2:]
        full = self.strategy == "full"
        if full and not self.tower_cls:
            raise NotImplementedError("vision_feature_select_strategy='full' on a tower without a CLS token")
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            pos = torch.nonzero(seen[b]).flatten().tolist()
            p0 = pos[0]
            tid = ids[b, pos].tolist()
            is_img = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            n_img = sum(is_img)
            W, H = images[b].size
            grid = patch_grid(self._geometry(W, H), W, H, (pw, ph), self.patch_size)
            gh, gw = grid.rows, grid.cols
            if n_img != gh * gw + (1 if full else 0):
                raise RuntimeError(f"example has {n_img} image tokens where a {gh}x{gw} grid and "
                                   f"vision_feature_select_strategy={self.strategy!r} make "
                                   f"{gh * gw + (1 if full else 0)}")
            pieces = self.tokenizer.convert_ids_to_tokens(tid)
            lm = {k: [] for k in ("stream", "modality", "role", "token", "seq_pos", "patch_row", "patch_col", "box")}
            k = 0
            for i, p, img, piece in zip(tid, pos, is_img, pieces):
                j = (k - 1 if full else k) if img else None  # patch index of image token k (-1: the tower's CLS)
                lm["stream"].append("lm")
                lm["modality"].append("image" if img else "text")
                lm["role"].append(("image_cls" if j < 0 else "patch") if img else
                                  "generated" if p >= start[b] else self._text_role(i))
                lm["token"].append(None if img else piece)
                lm["seq_pos"].append(p - p0)
                lm["patch_row"].append(grid.cells[j][0] if img and j >= 0 else None)
                lm["patch_col"].append(grid.cells[j][1] if img and j >= 0 else None)
                lm["box"].append((grid.whole if j < 0 else grid.boxes[j]) if img else None)
                k += img
            vision = image_columns(grid, "vision", self.tower_cls)
            tables.append(stack_columns(lm, vision))
            lm_orders.append(pos)
            vis_orders.append(vision["seq_pos"])
            offsets.append(len(pos))
            grids.append((gh, gw))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)

    # -- predictions: DecoderAdapter.predict (the generated text) -------------------------------
