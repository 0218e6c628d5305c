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
   model would attend with next. ``tests/models/test_llava.py`` checks this against
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
under the checkpoint's own generation config (``decoder.greedy_generation_config``: its suppressed
and bad words, its eos list, its ``max_new_tokens`` or ``max_length``; :data:`pipeline.models.family.MAX_NEW_TOKENS` new
tokens when it sets no length; ``max_new_tokens`` given to the adapter caps it). The image
placeholder is added to the suppressed tokens (a generated ``<image>`` would make the
teacher-forced pass ask for a second image).
"""

from __future__ import annotations

import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec, encoder_paths
from pipeline.models.geometry import pad_square_geometry, patch_grid
from pipeline.models.hooks import module_at
from pipeline.models.tokens import image_columns, plain_rows

__all__ = ["LLAVA", "LlavaAdapter"]

# ``hidden_0`` of ``lm`` is the language model's ``inputs_embeds`` (text embeddings with the projected
# image features scattered in), handed to a probe by a pre-hook; of ``vision`` the CLIP tower's
# ``pre_layrnorm`` (a SigLIP tower has none: its embeddings, see ``module_paths``).
LLAVA = FamilySpec(
    name="llava",
    classes={"llava": "LlavaForConditionalGeneration"},
    streams={"lm": LM_PATHS, "vision": encoder_paths("model.vision_tower", hidden_0="pre_layrnorm")},
    tower="plain",
)


class LlavaAdapter(ExplainedDecoder):
    """LlavaForConditionalGeneration: streams ``lm`` and ``vision``."""

    spec = LLAVA

    def __init__(self, model: torch.nn.Module, processor, device: str = "cpu", max_new_tokens: int | None = None):
        super().__init__(model, processor, device, max_new_tokens)
        self.strategy = select_strategy(model.config)
        tower = module_at(model, "model.vision_tower")
        self.tower_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding")

    def module_paths(self, model):
        if hasattr(module_at(model, "model.vision_tower"), "pre_layrnorm"):
            return dict(self.spec.streams)
        return {**self.spec.streams, "vision": encoder_paths("model.vision_tower")}  # e.g. a SigLIP tower

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Image token ``k`` is tower patch ``k`` in raster order, or with ``"full"`` token 0 the tower's
        CLS and token ``k`` patch ``k - 1``; boxed through the processor's pad-to-square."""
        ph, pw = ctx
        full = self.strategy == "full"
        if full and not self.tower_cls:
            raise NotImplementedError("vision_feature_select_strategy='full' on a tower without a CLS token")
        W, H = ex.image.size
        grid = patch_grid(pad_square_geometry(self.processor.image_processor, W, H), W, H, (pw, ph), self.patch_size)
        rows = plain_rows(grid, full)
        return ImageTokens(rows, image_columns(grid, "vision", self.tower_cls), (grid.rows, grid.cols),
                           f"a {grid.rows}x{grid.cols} grid and vision_feature_select_strategy={self.strategy!r} "
                           f"make {len(rows)}")

    def batch_context(self, inputs, images):
        return inputs["pixel_values"].shape[-2:]


def select_strategy(cfg) -> str:
    """The projector's ``vision_feature_select_strategy``: ``default`` (the tower's CLS dropped) or ``full``."""
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise NotImplementedError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: "
                                  "VL-Atlas knows 'default' (CLS dropped) and 'full'")
    return cfg.vision_feature_select_strategy
