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
own ``token_idx``. The declaration names that key set ``perceiver_keys``, spanning the ``vision``
and ``perceiver`` tokens (``key_sets``; ``cross = {"perceiver": "perceiver_keys"}``: vision patch ``(r, c)`` at key position ``r * W + c``, ``W`` the
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

from types import SimpleNamespace
from typing import Any

import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import FamilySpec, decoder_paths, encoder_paths
from pipeline.models.geometry import patch_grid
from pipeline.models.tokens import image_columns, query_columns

__all__ = ["IDEFICS2", "Idefics2Adapter"]

KEYS = "perceiver_keys"  # the perceiver's keys: the vision tokens, then the latents
IDEFICS2 = FamilySpec(
    name="idefics2",
    classes={"idefics2": "Idefics2ForConditionalGeneration"},
    # token-table order: vision right before perceiver (together the perceiver's key set)
    streams={"lm": decoder_paths("model.text_model"),
             "vision": {k: v for k, v in encoder_paths("model.vision_model").items() if k not in ("value", "out")},
             "perceiver": {"attention": "model.connector.perceiver_resampler.layers.{layer}.self_attn"}},
    tower="query_tokens",  # the perceiver's latents are the LM's image tokens
    lm="model.text_model", lm_norm="model.text_model.norm",
    markers={"<fake_token_around_image>": "image_boundary", "<end_of_utterance>": "im_end"},
    prompt="<image>{text}",
    nested_images=True,
    cross={"perceiver": KEYS},
    key_sets={KEYS: ("vision", "perceiver")},
    eager_parts=("text_config", "vision_config", "perceiver_config"),
)


class Idefics2Adapter(ExplainedDecoder):
    """Idefics2ForConditionalGeneration, one image per example, without image splitting."""

    spec = IDEFICS2

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        if getattr(processor.image_processor, "do_image_splitting", False):
            raise NotImplementedError("Idefics2 with do_image_splitting is not supported: VL-Atlas takes one image "
                                      "per example; set do_image_splitting false in preprocessor_config.json")
        self.num_latents = int(model.config.perceiver_config.resampler_n_latents)
        if getattr(processor, "image_seq_len", self.num_latents) != self.num_latents:
            raise NotImplementedError(f"the processor expands {processor.image_seq_len} image tokens, the model has "
                                      f"{self.num_latents} perceiver latents")
        super().__init__(model, processor, device, max_new_tokens)

    def stream_configs(self, cfg) -> dict[str, Any]:
        pc = cfg.perceiver_config
        perceiver = SimpleNamespace(num_hidden_layers=int(pc.resampler_depth),
                                    num_attention_heads=int(pc.resampler_n_heads), hidden_size=int(pc.hidden_size))
        return {**super().stream_configs(cfg), "perceiver": perceiver}

    # -- the family's mapping from image tokens to the processor's grid -------------------
    def batch_context(self, inputs, images):
        """Each example's real pixels (``[batch, height, width]``) and the tower's padded patch grid."""
        pv = inputs["pixel_values"]  # [batch, image, channel, height, width]
        pixel_mask = (inputs["pixel_attention_mask"].cpu()[:, 0] if "pixel_attention_mask" in inputs
                      else torch.ones(pv.shape[0], *pv.shape[-2:], dtype=torch.bool))
        return pixel_mask, tuple(d // self.patch_size for d in pv.shape[-2:])

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """``lm`` image token ``k`` is latent ``k`` (role ``query``, no patch); ``vision`` the real patches of
        the processed ``w x h`` area (a stretch of the original, read from the pixel mask), at their places
        in the tower's padded raster; then the latents, which the perceiver's keys follow the patches with."""
        pixel_mask, (Hp, Wp) = ctx
        mask = pixel_mask[ex.b]  # [height, width]
        h, w = int(mask[:, 0].sum()), int(mask[0, :].sum())
        W, H = ex.image.size
        grid = patch_grid((w / W, h / H, 0.0, 0.0, w, h), W, H, (w, h), self.patch_size)
        Q = self.num_latents
        patches = [r * Wp + c for r, c in grid.cells]  # the tower's padded raster
        return ImageTokens([("query", 0, None, None, None)] * Q, image_columns(grid, "vision", image_cls=False),
                           (grid.rows, grid.cols), f"the model has {Q} latents",
                           more={"perceiver": query_columns("perceiver", Q)},
                           orders={"vision": patches, KEYS: patches + [Hp * Wp + q for q in range(Q)]})
