"""Mistral 3 / Pixtral (``Mistral3ForConditionalGeneration``: a Pixtral vision tower, a patch merger and a
Mistral language model), streams ``lm`` and ``vision``.

A decoder LVLM like LLaVA (``decoder.DecoderAdapter``: the answer is generated greedily first, uncaptured,
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
``[1, head, N, N]`` over the whole packed sequence; a forward hook (``towers.PackedTower``) cuts each image's
diagonal block out
(``[image, head, n, n]``, padded to the batch's largest ``n``; the off-diagonal blocks are exactly 0 after
the mask's softmax, so nothing is lost), and the layers' hidden states (``[1, N, dim]``) are split the
same way. Hidden state 0 is the patch embeddings after ``ln_pre`` (the first layer's input). What is not
captured: the tower's ``--explain value`` (it is not offered), and the merger's own computation (its
output is the ``lm`` stream's hidden state 0 of the image tokens).

Token table of one example::

    lm:     [<s>] [INST] <img 0,0> ... <img 0,bw-1> [IMG_BREAK] ... <img bh-1,bw-1> [IMG_END] q1 ... [/INST] g1 ... gm
    vision: p(0,0) p(0,1) ... p(gh-1,gw-1)          (raster order = the tower's order)

Generation is greedy under the checkpoint's own generation config (``decoder.greedy_generation_config``, as
LLaVA's), with ``[IMG]``, ``[IMG_BREAK]`` and ``[IMG_END]`` added to its suppressed tokens.

Processor: ``AutoProcessor`` (``PixtralProcessor``) when it loads; it needs torchvision, and without it
the adapter assembles ``processors.PixtralImageTextProcessor`` from the checkpoint's tokenizer, image processor
(transformers picks its PIL backend, ``PixtralImageProcessorPil``), ``patch_size`` /
``spatial_merge_size`` (``processor_config.json``, else the model's config) and chat template: the same
expansion as ``PixtralProcessor.replace_image_token``.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LM_PATHS, FamilySpec
from pipeline.models.processors import IMG_BREAK, IMG_END, PixtralImageTextProcessor, processor_or
from pipeline.models.tokens import merged_columns

__all__ = ["MISTRAL3", "ImageTextProcessor", "Mistral3Adapter", "load_processor"]

ImageTextProcessor = PixtralImageTextProcessor  # the name tests and older code import

MISTRAL3 = FamilySpec(
    name="mistral3",
    classes={"mistral3": "Mistral3ForConditionalGeneration"},
    streams={"lm": LM_PATHS, "vision": {"attention": "model.vision_tower.transformer.layers.{layer}.attention",
                                        "hidden": "model.vision_tower.transformer.layers.{layer}",
                                        "layers": "model.vision_tower.transformer.layers"}},
    tower="packed",
    markers={IMG_BREAK: "img_break", IMG_END: "img_end", "[INST]": "inst", "[/INST]": "inst_end"},
    prompt="{image}{text}",
    suppress=(IMG_BREAK, IMG_END),  # the row markers, besides [IMG]
    image_check=True,  # the image processor refuses some images (an aspect ratio over 200)
)


def load_processor(model_id: str, revision: str | None = None):
    return processor_or(model_id, revision, PixtralImageTextProcessor)


class Mistral3Adapter(ExplainedDecoder):
    """Mistral3ForConditionalGeneration (Pixtral tower): streams ``lm`` and ``vision``."""

    spec = MISTRAL3

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        vocab = processor.tokenizer.get_vocab()
        self.break_id, self.end_id = vocab.get(IMG_BREAK), vocab.get(IMG_END)
        if self.break_id is None or self.end_id is None:
            raise NotImplementedError(f"the tokenizer has no {IMG_BREAK} / {IMG_END}: not a Pixtral tokenizer")
        super().__init__(model, processor, device, max_new_tokens)
        self.merge = int(model.config.spatial_merge_size)

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        return load_processor(model_id, revision)

    def _grids(self, image_sizes) -> list[tuple[int, int]]:
        p = self.patch_size
        return [(int(h) // p, int(w) // p) for h, w in image_sizes.tolist()]

    def tower_batch(self, inputs, model_inputs) -> list[int]:
        """Patches per image (the tower's packed sequence)."""
        return [gh * gw for gh, gw in self._grids(model_inputs["image_sizes"])]

    # -- layout ---------------------------------------------------------------------
    def batch_context(self, inputs, images):
        grids = self._grids(inputs["image_sizes"].cpu())
        if len(grids) != inputs["input_ids"].shape[0]:
            raise RuntimeError(f"{len(grids)} images for {inputs['input_ids'].shape[0]} examples; VL-Atlas takes one "
                               "image each")
        return grids

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """Rows of ``[IMG]`` closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``; image token ``k`` is merged
        block ``k`` (row-major); the tower's patches in raster order (the tower's own)."""
        gh, gw = ctx[ex.b]
        m = self.merge
        bh, bw = gh // m, gw // m
        kinds = {self.image_token_id: "img", self.break_id: "brk", self.end_id: "end"}
        pattern = [kinds[i] for i in ex.prompt_ids if i in kinds]
        want = (["img"] * bw + ["brk"]) * bh
        want = want[:-1] + ["end"] if want else want
        if pattern != want:
            raise RuntimeError(f"example's image tokens are {pattern.count('img')} [IMG], {pattern.count('brk')} "
                               f"[IMG_BREAK], {pattern.count('end')} [IMG_END] (or out of order) where "
                               f"image_sizes and spatial_merge_size {m} make rows of {bw} x {bh}")
        rows, vision = merged_columns(ex.image, gh, gw, m, list(range(gh * gw)))
        return ImageTokens(rows, vision, (gh, gw), f"image_sizes and spatial_merge_size {m} make {len(rows)}")
