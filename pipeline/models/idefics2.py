"""Idefics2 (``Idefics2ForConditionalGeneration``): streams ``lm``, ``vision`` and ``perceiver``.

The image goes through a SigLIP-like tower (stream ``vision``: its patches, every layer captured),
an MLP projects the patches into the language model's width, and a *perceiver resampler* of
``resampler_depth`` layers reads them with ``resampler_n_latents`` learned latents; its output, one
vector per latent, replaces the ``<image>`` placeholders of the prompt (stream ``lm``, a Mistral
decoder). The latents play BLIP-2's learned query tokens (``pipeline/models/blip2.py``): the LM's
image tokens are modality ``image``, role ``query``, with no patch and no box (a latent reads the
whole image); ``lm`` image token ``k`` carries latent ``k``.

**``perceiver``** is a cross stream of its own. In transformers each perceiver layer's latents
attend over ``concat(patches, latents)``: the projected tower patches (the batch's padded patch grid,
padding masked out) and then the latents themselves, one softmax over both. Its rows are the
latents (the ``perceiver`` stream's tokens, ``[batch, head, Q, N + Q]``); its columns are the
example's ``vision`` tokens followed by its ``perceiver`` tokens — in the token table the ``vision``
tokens sit right before the ``perceiver`` tokens, so ``key_idx`` is a vision patch's or a latent's
own ``token_idx``. The layout names that key set ``perceiver_keys`` (``BatchLayout.keys =
{"perceiver": "perceiver_keys"}``: vision patch ``(r, c)`` at key position ``r * W + c``, ``W`` the
batch's padded patch columns, latent ``k`` at ``N + k``), so the stored weights are the model's and
every row sums to 1 over the keys it may see (the padded patches it may not see are left out).
Statistics: a cross stream with image queries and image keys (``i2i``); no grounding (latents
have no words). Not kept: the perceiver's hidden states.

**The image.** Idefics2's image processor stretches the image (``shortest_edge``/``longest_edge``,
no crop) and pads every image of the batch to the batch's largest on the bottom and right
(``pixel_attention_mask``). The tower sees the padded grid and masks the padded patches (a patch
counts when all its pixels are real); the ``vision`` stream's tokens are the real patches, read from
the model's own ``pixel_attention_mask``, ``seq_pos`` ``r * cols + c`` over the real grid, boxed in
original pixels through the stretch. ``do_image_splitting`` (four crops and the whole) is refused.

**Markers.** ``<fake_token_around_image>`` around each image's ``<image>`` run: ``image_boundary``;
``<end_of_utterance>``: ``im_end``.

Token table of one example, one index space::

    lm:        <s> <fake> <q 0> ... <q Q-1> <fake> w1 ... wn g1 ... gm      (pads left out)
    vision:    p(0,0) ... p(rows-1,cols-1)
    perceiver: q 0 ... q Q-1

The answer: ``DecoderAdapter`` (greedy under the checkpoint's own generation config, ``<image>``
suppressed; then one teacher-forced captured pass). One image per example.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.capture import HookPoint
from pipeline.models.base import (GEN_START, BatchLayout, DecoderAdapter, Inputs, LanguageModelExplained, Probe,
                                  checked_architecture, greedy_generation_config, image_columns, module_at,
                                  stack_columns, stream_hook_points, stream_layout)
from pipeline.models.geometry import patch_grid

# -- the family's declaration ------------------------------------------------------------
ARCHITECTURE = "Idefics2ForConditionalGeneration"
TOWER_KIND = "learned query tokens"  # the perceiver's latents are the LM's image tokens
MODULES = {
    "lm": {"attention": "model.text_model.layers.{layer}.self_attn",
           "hidden": "model.text_model.layers.{layer}",
           "value": "model.text_model.layers.{layer}.self_attn.v_proj",
           "out": "model.text_model.layers.{layer}.self_attn.o_proj"},
    "vision": {"attention": "model.vision_model.encoder.layers.{layer}.self_attn",
               "hidden_0": "model.vision_model.embeddings",
               "hidden": "model.vision_model.encoder.layers.{layer}"},
    "perceiver": {"attention": "model.connector.perceiver_resampler.layers.{layer}.self_attn"},
}
LM = "model.text_model"  # the language model: its pre-hook feeds the lm's hidden state 0
IMAGE_TOKEN = "<image>"
MARKERS = {"<fake_token_around_image>": "image_boundary", "<end_of_utterance>": "im_end"}
MAX_NEW_TOKENS = 16  # when the checkpoint sets no length
STREAMS = ("lm", "vision", "perceiver")  # token-table order: vision right before perceiver (the key set)
KEYS = "perceiver_keys"  # the layout of the perceiver's keys: vision tokens, then the latents


class Idefics2Adapter(LanguageModelExplained, DecoderAdapter):
    """Idefics2ForConditionalGeneration, one image per example, without image splitting."""

    family = "idefics2"
    LM_NORM = LM + ".norm"
    EAGER_PARTS = ("text_config", "vision_config", "perceiver_config")

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        super().__init__(model, processor, device)
        if getattr(processor.image_processor, "do_image_splitting", False):
            raise NotImplementedError("Idefics2 with do_image_splitting is not supported: VL-Atlas takes one image "
                                      "per example; set do_image_splitting false in preprocessor_config.json")
        cfg = model.config
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        pc = cfg.perceiver_config
        self.num_latents = int(pc.resampler_n_latents)
        if getattr(processor, "image_seq_len", self.num_latents) != self.num_latents:
            raise NotImplementedError(f"the processor expands {processor.image_seq_len} image tokens, the model has "
                                      f"{self.num_latents} perceiver latents")
        perceiver = SimpleNamespace(num_hidden_layers=int(pc.resampler_depth),
                                    num_attention_heads=int(pc.resampler_n_heads), hidden_size=int(pc.hidden_size))
        self.configs = {"lm": cfg.text_config, "vision": cfg.vision_config, "perceiver": perceiver}
        self.paths = MODULES
        self.image_token_id = int(cfg.image_token_id)
        self.patch_size = int(cfg.vision_config.patch_size)
        tok = self.tokenizer
        ids = {piece: tok.convert_tokens_to_ids(piece) for piece in MARKERS}
        self.marker_roles = {i: MARKERS[p] for p, i in ids.items() if isinstance(i, int) and i != tok.unk_token_id}
        self.probe = Probe()
        self.first_hidden = {"lm": self.probe}
        module_at(model, LM).register_forward_pre_hook(self._feed_probe, with_kwargs=True)

    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, ARCHITECTURE, "idefics2")

    def hook_points(self, keep_hidden, explain=()):
        """``lm`` and ``vision`` from their modules; ``perceiver``: each layer's attention only."""
        own = ("lm", "vision")
        pts = stream_hook_points(self.model, {s: self.configs[s] for s in own}, {s: self.paths[s] for s in own},
                                 keep_hidden, first_hidden=self.first_hidden, explain=explain)
        path = self.paths["perceiver"]["attention"]
        return pts + [HookPoint("perceiver", i, "attention", module_at(self.model, path.format(layer=i)), index=1)
                      for i in range(self.configs["perceiver"].num_hidden_layers)]

    # -- inputs ---------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{IMAGE_TOKEN}{text}"

    def encode(self, texts: list[str], images: list):
        enc = self.processor(images=[[im] for im in images], text=[self.prompt(t) for t in texts],
                             return_tensors="pt", padding=True)
        return Inputs(dict(enc)), [[] for _ in texts]

    def generation_config(self, prompt_length: int | None = None):
        return greedy_generation_config(self.model, self.tokenizer, suppress=(self.image_token_id,),
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    # -- layout ---------------------------------------------------------------------
    def patch_grid_of(self, pixel_mask: torch.Tensor, W: int, H: int):
        """The family's mapping to the processor's grid: the real patches of one image (the processed
        ``w x h`` area that ``pixel_mask`` [height, width] marks, a stretch of the ``W x H``
        original), boxed in original pixels."""
        h, w = int(pixel_mask[:, 0].sum()), int(pixel_mask[0, :].sum())
        return patch_grid((w / W, h / H, 0.0, 0.0, w, h), W, H, (w, h), self.patch_size)

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        pv = inputs["pixel_values"]  # [batch, image, channel, height, width]
        pixel_mask = (inputs["pixel_attention_mask"].cpu()[:, 0] if "pixel_attention_mask" in inputs
                      else torch.ones(pv.shape[0], *pv.shape[-2:], dtype=torch.bool))  # [batch, height, width]
        Hp, Wp = (d // self.patch_size for d in pv.shape[-2:])  # the tower's padded grid
        Q = self.num_latents
        tables, orders, sizes, grids = [], {s: [] for s in STREAMS}, [], []
        for b in range(ids.shape[0]):
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            is_q = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            if sum(is_q) != Q:
                raise RuntimeError(f"example has {sum(is_q)} image tokens where the model has {Q} latents")
            lm = self._lm_columns(tid, pos, is_q, start[b], [("query", 0, None, None, None)] * Q)
            W, H = images[b].size
            grid = self.patch_grid_of(pixel_mask[b], W, H)
            vision = {**image_columns(grid, "vision", image_cls=False), "tile": [0] * len(grid.cells)}
            latents = {"stream": ["perceiver"] * Q, "modality": ["image"] * Q, "role": ["query"] * Q,
                       "token": [None] * Q, "seq_pos": list(range(Q)), "patch_row": [None] * Q,
                       "patch_col": [None] * Q, "box": [None] * Q, "tile": [0] * Q}
            tables.append(stack_columns(lm, vision, latents))
            orders["lm"].append(pos)
            orders["vision"].append([r * Wp + c for r, c in grid.cells])  # the tower's padded raster
            orders["perceiver"].append(list(range(Q)))
            sizes.append((len(pos), len(grid.cells), Q))
            grids.append((grid.rows, grid.cols))
        layouts = {}
        for k, s in enumerate(STREAMS):
            offs = [sum(sz[:k]) for sz in sizes]
            sl = stream_layout([t.slice(o, sz[k]) for t, o, sz in zip(tables, offs, sizes)], orders[s], boxes,
                               self._pieces)
            sl.token_offset = offs
            layouts[s] = sl
        # the perceiver's keys: concat(patches, latents), the vision tokens then the perceiver tokens
        keys = stream_layout([t.slice(sz[0], sz[1] + sz[2]) for t, sz in zip(tables, sizes)],
                             [v + [Hp * Wp + q for q in p] for v, p in zip(orders["vision"], orders["perceiver"])],
                             boxes, self._pieces)
        keys.token_offset = layouts["vision"].token_offset
        layouts[KEYS] = keys
        q = layouts["perceiver"]
        B, nq, nk = len(tables), q.valid.shape[1], keys.valid.shape[1]
        layouts["perceiver"] = replace(q, masks=replace(q.masks, in_box=torch.zeros(B, nq, nk, dtype=torch.bool),
                                                        boxed=torch.zeros(B, nq, dtype=torch.bool)))
        return BatchLayout(tables, layouts, grids, keys={"perceiver": KEYS})
