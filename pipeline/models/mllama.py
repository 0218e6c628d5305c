"""Llama 3.2 Vision (``MllamaForConditionalGeneration``): streams ``lm``, ``lm_cross`` and ``vision``.

Unlike the other decoders, no image token carries image features: the prompt holds one ``<|image|>``
marker, and cross-attention layers placed between the language model's self-attention layers
(``text_config.cross_attention_layers``) let the text tokens attend to the vision tower's output.

Streams (layers are counted within each stream):

- ``lm``: the decoder's self-attention layers only, in decoder order; ``lm`` layer ``k`` is decoder
  layer ``self_layers[k]``, the ``k``-th layer not in ``cross_attention_layers``. Its tokens are the
  prompt's text tokens (the ``<|image|>`` marker included, role ``vision_start``) and the generated
  answer. Hidden state 0 is the token embeddings; hidden state ``k + 1`` the output of decoder layer
  ``self_layers[k]`` (so it includes the cross layers before it).
- ``lm_cross``: the decoder's cross-attention, ``lm`` tokens (queries) over ``vision`` tokens (keys)
  (``BatchLayout.keys = {"lm_cross": "vision"}``); ``lm_cross`` layer ``k`` is decoder layer
  ``cross_layers[k]`` (released checkpoints: 3, 8, 13, ... 38). No hidden states (the residual stream
  after a cross layer is the next ``lm`` layer's input).
- ``vision``: the tower's local transformer (``vision_config.num_hidden_layers`` layers) then its global
  transformer (``num_global_layers``): ``vision`` layer ``i`` < L is local layer ``i``, layer ``L + j``
  global layer ``j``. Hidden state 0 is the local transformer's input, ``i + 1`` the output of
  ``vision`` layer ``i`` (the global transformer's input, the local output after ``layernorm_post`` and a
  tile embedding, is not a layer output and is not stored).

Tiles: the image processor resizes the image (keeping its aspect ratio, each axis rounded down) to fit
the best canvas of ``rows x cols`` tiles (at most ``max_image_tiles``), pads it on the right and bottom,
and cuts the canvas into tiles, row by row; ``aspect_ratio_ids`` says which grid
(``supported_aspect_ratios[id - 1]`` = (rows, cols)). The tower always sees ``max_num_tiles`` tiles, the
unused ones zeros (``aspect_ratio_mask`` 0). Each tile is ``[image CLS]`` then its ``g x g`` patches, padded
with zero tokens to a multiple of 8 (``num_padding_patches``), and both transformers attend over the
concatenated tiles of the image (tiles attend to each other).

Token table of one example::

    lm:     [bos] <start_header> user <end_header> <|image|> w1 ... wn <eot> ... g1 ... gm
    vision: tile 1: [CLS] p(0,0) ... p(g-1,g-1) pad ... pad | tile 2: ... | ... tile max_num_tiles

- ``vision`` tokens are in the tower's order: ``seq_pos = (tile - 1) * (n + pad) + position in the tile``;
  ``tile`` 1.. in the processor's row-by-row order (Mllama has no base image: no tile 0); a patch's
  ``patch_row``/``patch_col`` are its place in its tile, its box in original pixels through the tile's
  place on the canvas and the resize (each axis by its own ratio; clipped to the image, so a patch of
  the padding beyond it is a sliver on the image's edge). The tile's ``[CLS]`` (``image_cls``) is boxed
  with the whole tile.
- Padding tokens are kept, role ``pad`` (modality image, no box): the tower's mask only stops a padding
  token from attending to another padding token, so every real token attends to the padding patches
  and to the unused tiles' tokens, and its row sums to 1 only with them (as SigLIP's text pads). A
  padding token's row sums to 1 over the real tokens.
- ``lm_cross`` keys are the tower's output tokens (the padding patches are dropped before the language
  model; they weigh 0 in the stored rows). A text token from the ``<|image|>`` marker on sees the
  image's real tiles (``cross_attention_mask``; the unused tiles weigh 0). A text token before the marker
  (bos, the user header) may see no tile: transformers lifts the mask of such a fully masked row
  (``full_text_row_masked_out_mask``), so the model computes a softmax over every key, unused tiles
  included, and adds its output, gated, to the residual stream (only the MLP after it is zeroed). The
  lake stores those rows as the model computed them; they sum to 1 over the ``vision`` tokens and count
  in the statistics like any row (no NaN: every row has keys).

Generation and capture as every decoder (:class:`~pipeline.models.decoder.DecoderAdapter`): the greedy
answer under the checkpoint's own generation config first, then one teacher-forced pass; the
``cross_attention_mask`` gains, for each answer token, the prompt's last row (``answer_inputs``
``LAST``, as ``generate`` extends it). ``<|image|>`` is suppressed (a no-op where the language model's
head cannot produce it: the released checkpoints give it the id just past the head's vocabulary).
Batches are padded on the left.

The declaration (:data:`MLLAMA`) says all this but the layers: ``lm`` and ``lm_cross`` are some of the
decoder's layers, ``vision`` two module lists (``hooks.StreamShape`` slots, from the config); the tiles
are the tower strategy's (``towers.TiledTower``), the cross stream's masks ``base.cross_layout``'s.
What is the family's own: the tile grid of an example and its patches' boxes (:func:`tile_patch_boxes`).

``--explain lens`` reads the ``lm`` hidden states through the final norm and ``lm_head``. Not captured:
``--explain value`` and ``relevancy`` (a rule over the self-attention layers alone would leave out the
cross layers, the only way the image reaches the text); several images per example.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.base import BatchLayout, Inputs, cross_layout
from pipeline.models.decoder import Example, ExplainedDecoder, ImageTokens
from pipeline.models.family import LAST, FamilySpec
from pipeline.models.geometry import _size
from pipeline.models.hooks import StreamShape
from pipeline.models.processors import processor_or
from pipeline.models.tokens import crop_columns, padded_crops
from pipeline.models.towers import TiledTower, Tiles

LAYER = "model.language_model.layers.{layer}"  # self_attn in self layers, cross_attn in cross layers
MLLAMA = FamilySpec(
    name="mllama",
    classes={"mllama": "MllamaForConditionalGeneration"},
    streams={"lm": {"attention": LAYER + ".self_attn", "hidden": LAYER,
                    "hidden_0": "model.language_model.embed_tokens"},  # the language model is fed input_ids
             "lm_cross": {"attention": LAYER + ".cross_attn"},
             # {layer}: "transformer.layers.i" (local), then "global_transformer.layers.j"
             "vision": {"attention": "model.vision_model.{layer}.self_attn", "hidden": "model.vision_model.{layer}",
                        "input_0": "model.vision_model.transformer"}},
    tower="tiles",
    cross={"lm_cross": "vision"},
    image_in_lm=False,  # <|image|> is a marker: cross-attention reads the image
    markers={"<|image|>": "vision_start", "<|start_header_id|>": "im_start", "<|end_header_id|>": "im_start",
             "<|eot_id|>": "im_end"},
    prompt="{image}{text}",  # without a chat template (the processor puts bos after the image token)
    nested_images=True,
    answer_inputs={"cross_attention_mask": LAST},  # [batch, seq, image, tile]
)


def tile_patch_boxes(tile_size: int, width: int, height: int, tiles: tuple[int, int],
                     patch_size: int) -> list[tuple[list[tuple], tuple]]:
    """The family's mapping from tower tokens to the original image: for each tile of the
    ``tiles = (rows, cols)`` grid, row by row, its patches' boxes in raster order and its whole box,
    in original pixels (clipped to the image); ``tile_size`` the image processor's (square) tile.

    The processor resizes the ``width x height`` image to fit the ``rows x cols`` canvas of tiles
    (transformers' ``get_image_size_fit_to_canvas``), puts it at the canvas's top left and pads the
    rest; canvas pixel ``(u, v)`` comes from original pixel ``(u * width / new_w, v * height / new_h)``.
    """
    from transformers.models.mllama.image_processing_pil_mllama import get_image_size_fit_to_canvas

    S = tile_size
    rows, cols = tiles
    new_h, new_w = get_image_size_fit_to_canvas(height, width, rows * S, cols * S, S)
    sx, sy = new_w / width, new_h / height

    def px(u, v):
        return min(u / sx, float(width)), min(v / sy, float(height))

    g = S // patch_size
    out = []
    for r in range(rows):
        for c in range(cols):
            x, y = c * S, r * S
            boxes = [px(x + j * patch_size, y + i * patch_size) + px(x + (j + 1) * patch_size, y + (i + 1) * patch_size)
                     for i in range(g) for j in range(g)]
            out.append((boxes, px(x, y) + px(x + S, y + S)))
    return out


class MllamaAdapter(ExplainedDecoder):
    """MllamaForConditionalGeneration: streams ``lm``, ``lm_cross`` and ``vision``."""

    spec = MLLAMA
    relevancy_unavailable = ("--explain relevancy is not available for mllama: a rule over the self-attention "
                             "layers would leave out the cross layers, the only way the image reaches the text")

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

        tc, vc = model.config.text_config, model.config.vision_config
        ip = processor.image_processor
        if int(ip.max_image_tiles) != int(vc.max_num_tiles) or _size(ip.size, "height") != vc.image_size:
            raise NotImplementedError(f"the image processor makes up to {ip.max_image_tiles} tiles of "
                                      f"{_size(ip.size, 'height')} px, the vision tower takes {vc.max_num_tiles} of "
                                      f"{vc.image_size} px")
        self.cross_layers = sorted(int(i) for i in tc.cross_attention_layers)
        self.self_layers = [i for i in range(tc.num_hidden_layers) if i not in self.cross_layers]
        n = (vc.image_size // vc.patch_size) ** 2 + 1  # CLS + patches
        self.tiles = Tiles(int(vc.max_num_tiles), n, n + (8 - n % 8) % 8)  # padded to a multiple of 8
        super().__init__(model, processor, device, max_new_tokens)
        self.supported = list(get_all_supported_aspect_ratios(self.tiles.tiles))  # aspect ratio id - 1

    def stream_configs(self, cfg) -> dict[str, Any]:
        """``lm`` the decoder's self-attention layers, ``lm_cross`` its cross layers, ``vision`` the local
        then the global transformer's layers."""
        tc, vc = cfg.text_config, cfg.vision_config
        vision = ([f"transformer.layers.{i}" for i in range(vc.num_hidden_layers)]
                  + [f"global_transformer.layers.{j}" for j in range(vc.num_global_layers)])
        return {"lm": StreamShape(tuple(self.self_layers), tc.num_attention_heads, tc.hidden_size),
                "lm_cross": StreamShape(tuple(self.cross_layers), tc.num_attention_heads, tc.hidden_size),
                "vision": StreamShape(tuple(vision), vc.attention_heads, vc.hidden_size)}

    def make_tower(self):
        return TiledTower(self.model, self.configs["vision"], self.paths["vision"], self.tiles)

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        return processor_or(model_id, revision, _PilProcessor)

    def processor_kwargs(self, prompts):
        return {"add_special_tokens": False}  # the prompt holds bos (the template's, or the processor's)

    # -- the tiles ------------------------------------------------------------------------
    def batch_context(self, inputs, images):
        if tuple(inputs["pixel_values"].shape[-2:]) != (self.crop_px, self.crop_px):
            raise RuntimeError(f"the image processor made {tuple(inputs['pixel_values'].shape[-2:])} tiles where "
                               f"its settings say {self.crop_px} px")
        return inputs["aspect_ratio_ids"].cpu(), inputs["aspect_ratio_mask"].cpu()

    def tile_grid(self, ctx, b: int) -> tuple[int, int]:
        """(rows, cols) of example ``b``'s tiles, from its ``aspect_ratio_ids``, checked against its
        ``aspect_ratio_mask``."""
        ids, mask = ctx
        aid = int(ids[b, 0])
        rows, cols = self.supported[aid - 1]
        used = int(mask[b, 0].sum())
        if used != rows * cols:
            raise RuntimeError(f"aspect ratio id {aid} is a {rows}x{cols} grid, but the mask marks {used} tiles")
        return rows, cols

    def image_tokens(self, ex: Example, ctx) -> ImageTokens:
        """No ``lm`` image token; the ``vision`` tokens: every tile slot in the tower's order, each real
        tile's CLS and patches (boxed) then its padding, the unused tiles' tokens all padding."""
        W, H = ex.image.size
        tiles = tile_patch_boxes(self.crop_px, W, H, self.tile_grid(ctx, ex.b), self.patch_size)
        part = crop_columns([(t + 1, boxes, whole) for t, (boxes, whole) in enumerate(tiles)], self.side, True)
        vision = padded_crops(part, self.tiles.n, self.tiles.padded, list(range(1, self.tiles.tiles + 1)))
        return ImageTokens([], vision, (self.side, self.side), "the image reaches the text by cross-attention")

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        """The decoder's ``lm`` and ``vision`` layouts, and ``lm_cross``: the ``lm`` tokens over the
        ``vision`` tokens."""
        out = super().layout(inputs, images, boxes)
        out.streams["lm_cross"] = cross_layout(out, "lm", "vision", boxes, self._pieces)
        out.keys = dict(self.spec.cross)
        return out


class _PilProcessor:
    """``MllamaProcessor`` from the checkpoint's tokenizer and ``MllamaImageProcessorPil`` (where
    ``AutoProcessor`` cannot build the image processor)."""

    @staticmethod
    def from_pretrained(model_id: str, revision: str | None = None):
        from transformers import AutoTokenizer, MllamaImageProcessorPil, MllamaProcessor

        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = MllamaImageProcessorPil.from_pretrained(model_id, revision=revision)
        return MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=getattr(tok, "chat_template", None))
