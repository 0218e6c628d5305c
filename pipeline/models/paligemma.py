"""Decoder LVLMs: PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``), streams ``lm`` and ``vision``.

A SigLIP vision tower (stream ``vision``: no image ``[CLS]``, every layer captured) turns the
image into patch features; a linear projector maps them into the Gemma (PaliGemma 2: Gemma 2)
language model (stream ``lm``), where they replace the ``<image>`` placeholders that the processor
puts at the start of the prompt: ``<image> x num_image_tokens, <bos>, prompt, "\\n"``.

Attention in ``lm`` is *prefix-LM*: the prefix (image tokens and prompt, ``token_type_ids`` 0)
attends bidirectionally, the suffix (the generated answer, ``token_type_ids`` 1) causally. The
captured teacher-forced pass gives the model ``token_type_ids`` = the prompt's, then 1 for every
generated token (what ``generate`` itself does), so each row is the one the model used: a prefix
token sees every prefix token and no suffix token, a generated token every earlier token. Masked
keys carry weight 0 in the eager attention, so each row sums to 1 over the keys it may see and the
statistics count only those. The processor's ``labels`` (all -100 without a suffix) are dropped:
they are no model input the answer needs, and the loss they ask for is not captured.

Two passes per batch (``decoder.DecoderAdapter``): ``prepare()`` answers greedily under the
checkpoint's own generation config (``<image>`` added to its suppressed tokens), uncaptured; then
one captured teacher-forced pass over prompt + answer.

Token table of one example, one index space::

    lm:     <img 0> ... <img n-1> <bos> w1 ... wn  g1 ... gm           token_idx 0 .. T-1
    vision: p(0,0) p(0,1) ... p(gh-1,gw-1)                            token_idx T .. T+V-1

Image token ``k`` carries SigLIP patch ``k`` in raster order (no CLS: ``patch_row = k // gw``);
its box, like the tower patch's, is the patch's box in original pixels through the processor's
resize to ``size`` (height x width, aspect ratio not kept: each axis mapped back by its own ratio).
The number of image tokens is checked against the grid (never an assumed 256).
"""

from __future__ import annotations

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec, encoder_paths
from pipeline.models.geometry import crop_geometry, patch_grid
from pipeline.models.tokens import image_columns, plain_rows

PALIGEMMA = FamilySpec(
    name="paligemma",
    classes={"paligemma": "PaliGemmaForConditionalGeneration"},
    streams={"lm": LM_PATHS, "vision": encoder_paths("model.vision_tower")},
    tower="plain",
    # "<image>" + question: the processor adds the num_image_tokens placeholders, bos and the closing newline
    prompt="{image}{text}", chat_template=False,
    answer_inputs={"token_type_ids": 1},  # generated tokens are the causal suffix (as generate sets them)
    drop_inputs=("labels",),  # training labels (all -100 here): not needed for the answer or the mask
)


class PaliGemmaAdapter(ExplainedDecoder):
    """PaliGemmaForConditionalGeneration (PaliGemma, PaliGemma 2): streams ``lm`` and ``vision``."""

    spec = PALIGEMMA

    def fill_inputs(self, enc) -> None:
        if "token_type_ids" not in enc:  # prefix mask: the whole prompt is the bidirectional prefix
            enc["token_type_ids"] = enc["input_ids"].new_zeros(enc["input_ids"].shape)

    def batch_context(self, inputs, images):
        return inputs["pixel_values"].shape[-2:]

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Image token ``k`` is SigLIP patch ``k`` in raster order (no CLS), boxed through SigLIP's resize to
        ``size`` (no crop, no pad: each axis by its own ratio)."""
        ph, pw = ctx
        W, H = ex.image.size
        grid = patch_grid(crop_geometry(self.processor.image_processor, W, H), W, H, (pw, ph), self.patch_size)
        return ImageTokens(plain_rows(grid, False), image_columns(grid, "vision", False), (grid.rows, grid.cols),
                           f"a {grid.rows}x{grid.cols} grid and vision_feature_select_strategy='default' make "
                           f"{len(grid.cells)}")
