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

Generation and capture as every decoder (:class:`~pipeline.models.base.DecoderAdapter`): the greedy
answer under the checkpoint's own generation config first, then one teacher-forced pass; the
``cross_attention_mask`` gains, for each answer token, the prompt's last row (as ``generate`` extends
it). ``<|image|>`` is suppressed only when the language model's head can produce it (the released
checkpoints give it the id just past the head's vocabulary). Batches are padded on the left.

``--explain lens`` reads the ``lm`` hidden states through the final norm and ``lm_head``. Not captured:
``--explain value`` and ``relevancy`` (a rule over the self-attention layers alone would leave out the
cross layers, the only way the image reaches the text); several images per example.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from pipeline.models.base import (GEN_START, AttnProbe, BatchLayout, DecoderAdapter, Inputs, Probe, boxed_masks,
                                  checked_architecture, greedy_generation_config, module_at, probed_points,
                                  processor_or, split_stream_layouts, stack_columns)
from pipeline.models.crop_tower import crop_columns
from pipeline.models.geometry import _size

# -- the family's declaration -------------------------------------------------------------
MODEL_CLASS = "MllamaForConditionalGeneration"
IMAGE_TOKEN = "<|image|>"
MARKERS = {"<|image|>": "vision_start", "<|start_header_id|>": "im_start", "<|end_header_id|>": "im_start",
           "<|eot_id|>": "im_end"}  # marker token -> role
TOWER = "tiles"  # max_num_tiles tiles of CLS + patches (+ padding), no base image
LM_LAYER = "model.language_model.layers.{layer}"  # self_attn in self layers, cross_attn in cross layers
MODULES = {
    "lm": {"attention": LM_LAYER + ".self_attn", "hidden": LM_LAYER, "hidden_0": "model.language_model.embed_tokens"},
    "lm_cross": {"attention": LM_LAYER + ".cross_attn"},
    "vision": {"local": "model.vision_model.transformer.layers.{layer}",
               "global": "model.vision_model.global_transformer.layers.{layer}",
               "hidden_0": "model.vision_model.transformer"},  # a pre-hook hands its input to a probe
}
LM_NORM = "model.language_model.norm"  # with the model's lm_head: --explain lens
STREAMS = ("lm", "vision")  # token-table order; lm_cross has the lm tokens as queries
MAX_NEW_TOKENS = 16  # new tokens when the checkpoint's generation config sets no length


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


class MllamaAdapter(DecoderAdapter):
    """MllamaForConditionalGeneration: streams ``lm``, ``lm_cross`` and ``vision``."""

    family = "mllama"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        """``max_new_tokens``: a cap on the answer's length (default: the checkpoint's own)."""
        from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

        super().__init__(model, processor, device)
        self.tokenizer.padding_side = "left"  # generation pads on the left
        self.max_new_tokens = max_new_tokens
        cfg = model.config
        tc, vc = cfg.text_config, cfg.vision_config
        self.cross_layers = sorted(int(i) for i in tc.cross_attention_layers)
        self.self_layers = [i for i in range(tc.num_hidden_layers) if i not in self.cross_layers]
        self.n_local, self.n_global = int(vc.num_hidden_layers), int(vc.num_global_layers)
        self.image_token_id = int(cfg.image_token_id)
        self.marker_roles = {i: r for t, r in MARKERS.items()
                             if (i := self.tokenizer.convert_tokens_to_ids(t)) is not None
                             and i != self.tokenizer.unk_token_id}
        self.patch_size = int(vc.patch_size)
        ip = processor.image_processor
        self.max_tiles = int(vc.max_num_tiles)
        if int(ip.max_image_tiles) != self.max_tiles or _size(ip.size, "height") != vc.image_size:
            raise NotImplementedError(f"the image processor makes up to {ip.max_image_tiles} tiles of "
                                      f"{_size(ip.size, 'height')} px, the vision tower takes {self.max_tiles} of "
                                      f"{vc.image_size} px")
        self.tile_size = int(vc.image_size)
        self.supported = list(get_all_supported_aspect_ratios(self.max_tiles))  # the processor's ids - 1
        self.n_tile = (self.tile_size // self.patch_size) ** 2 + 1  # CLS + patches
        self.tile_len = self.n_tile + (8 - self.n_tile % 8) % 8  # with the padding patches
        self._shapes = {
            "lm": {"layers": len(self.self_layers), "heads": tc.num_attention_heads, "hidden_size": tc.hidden_size},
            "lm_cross": {"layers": len(self.cross_layers), "heads": tc.num_attention_heads,
                         "hidden_size": tc.hidden_size},
            "vision": {"layers": self.n_local + self.n_global, "heads": vc.attention_heads,
                       "hidden_size": vc.hidden_size},
        }
        self.paths = MODULES
        # cross-attention weights come as [batch, head, query, tile * n_tile]; probes get them on the
        # vision stream's sequence (tile * tile_len, the padding patches' columns 0)
        self.cross_probes = [AttnProbe() for _ in self.cross_layers]
        for probe, d in zip(self.cross_probes, self.cross_layers):
            module_at(model, MODULES["lm_cross"]["attention"].format(layer=d)).register_forward_hook(
                self._cross_hook(probe))
        self.vision_probe = Probe()
        module_at(model, MODULES["vision"]["hidden_0"]).register_forward_pre_hook(self._feed_vision)

    # -- loading ------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, MODEL_CLASS, "mllama")

    @classmethod
    def load_processor(cls, model_id: str, revision: str | None = None):
        return processor_or(model_id, revision, _PilProcessor)

    # -- streams and hooks ------------------------------------------------------------
    def streams(self) -> dict[str, dict[str, int]]:
        return {s: dict(v) for s, v in self._shapes.items()}

    def hook_points(self, keep_hidden, explain=()):
        """``lm`` from the self-attention layers, ``lm_cross`` from the probes the cross layers feed,
        ``vision`` from the local then the global transformer's layers (no ``--explain value``)."""
        m, lm, vp = self.model, MODULES["lm"], MODULES["vision"]
        lm_attn = [module_at(m, lm["attention"].format(layer=d)) for d in self.self_layers]
        lm_hidden = [module_at(m, lm["hidden_0"])] + [module_at(m, lm["hidden"].format(layer=d))
                                                      for d in self.self_layers]
        tower = ([module_at(m, vp["local"].format(layer=i)) for i in range(self.n_local)]
                 + [module_at(m, vp["global"].format(layer=j)) for j in range(self.n_global)])
        return (probed_points("lm", lm_attn, lm_hidden, keep_hidden, explain)
                + probed_points("lm_cross", self.cross_probes, [], keep_hidden, explain)
                + probed_points("vision", [layer.self_attn for layer in tower], [self.vision_probe] + tower,
                                keep_hidden, explain))

    def _feed_vision(self, module, args):
        """A pre-hook on the local transformer: its input (``[example, tile * tile_len, dim]``, the padded
        tiles of each image) is the ``vision`` stream's hidden state 0."""
        if self._watched(self.vision_probe):
            self.vision_probe(args[0])

    def _cross_hook(self, probe: AttnProbe):
        T, n, L = self.max_tiles, self.n_tile, self.tile_len

        def fn(module, args, output):
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if w is None or not self._watched(probe):
                return None
            B, H, S, K = w.shape  # [batch, head, query, tile * n_tile]
            if K != T * n:
                raise RuntimeError(f"cross-attention over {K} keys where {T} tiles of {n} tokens make {T * n} "
                                   "(several images per example are not supported)")
            out = w.new_zeros(B, H, S, T, L)  # [batch, head, query, tile, tile_len]
            out[..., :n] = w.view(B, H, S, T, n)
            probe(out.view(B, H, S, T * L))
            return None

        return fn

    def lens(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The language model's final norm and unembedding, for ``--explain lens`` (of the ``lm`` hidden
        states: after a self-attention layer, whatever cross layers come before or after it)."""
        return module_at(self.model, LM_NORM), self.model.lm_head

    # -- inputs ---------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """The processor's chat template (user turn: the image, then the question) when it has one, else
        ``<|image|>question`` (the processor puts bos after the leading image token)."""
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{IMAGE_TOKEN}{text}"

    def encode(self, texts: list[str], images: list):
        # the prompt already holds bos (the template's, or the processor's): the tokenizer adds none
        enc = self.processor(images=[[im] for im in images], text=[self.prompt(t) for t in texts],
                             return_tensors="pt", padding=True, add_special_tokens=False)
        return Inputs(enc), [[] for _ in texts]

    def generation_config(self, prompt_length: int | None = None):
        """Greedy under the checkpoint's own config; ``<|image|>`` suppressed where the head has it."""
        vocab = self.model.lm_head.out_features
        suppress = (self.image_token_id,) if self.image_token_id < vocab else ()
        return greedy_generation_config(self.model, self.tokenizer, suppress=suppress,
                                        max_new_tokens=self.max_new_tokens, default_new_tokens=MAX_NEW_TOKENS,
                                        prompt_length=prompt_length)

    def extend_inputs(self, out: Inputs, model_inputs: dict, new: torch.Tensor) -> None:
        """Each answer token sees the tiles the prompt's last token sees (as ``generate`` extends the mask)."""
        cam = model_inputs["cross_attention_mask"]  # [batch, seq, image, tile]
        out["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, new.shape[1], -1, -1)], dim=1)

    # -- layout ---------------------------------------------------------------------
    def tile_grid(self, inputs, b: int) -> tuple[int, int]:
        """(rows, cols) of example ``b``'s tiles, from its ``aspect_ratio_ids``, checked against its
        ``aspect_ratio_mask``."""
        aid = int(inputs["aspect_ratio_ids"][b, 0])
        rows, cols = self.supported[aid - 1]
        used = int(inputs["aspect_ratio_mask"][b, 0].sum())
        if used != rows * cols:
            raise RuntimeError(f"aspect ratio id {aid} is a {rows}x{cols} grid, but the mask marks {used} tiles")
        return rows, cols

    def _vision_columns(self, inputs, b: int, image) -> dict[str, list]:
        """The ``vision`` columns of example ``b``: every tile slot in the tower's order, each real tile's
        CLS and patches (boxed) then its padding patches, the unused tiles' tokens all padding."""
        W, H = image.size
        g = self.tile_size // self.patch_size
        if tuple(inputs["pixel_values"].shape[-2:]) != (self.tile_size, self.tile_size):
            raise RuntimeError(f"the image processor made {tuple(inputs['pixel_values'].shape[-2:])} tiles where "
                               f"its settings say {self.tile_size} px")
        tiles = tile_patch_boxes(self.tile_size, W, H, self.tile_grid(inputs, b), self.patch_size)
        cols = crop_columns([(t + 1, boxes, whole) for t, (boxes, whole) in enumerate(tiles)], g, True)
        n, L = self.n_tile, self.tile_len
        cols["seq_pos"] = [s // n * L + s % n for s in cols["seq_pos"]]  # crop_columns packs tiles unpadded
        pads = [(t, q) for t in range(len(tiles)) for q in range(n, L)]
        pads += [(t, q) for t in range(len(tiles), self.max_tiles) for q in range(L)]
        for t, q in pads:
            for key, v in zip(cols, ("vision", "image", "pad", None, t * L + q, None, None, None, t + 1)):
                cols[key].append(v)
        order = sorted(range(len(cols["seq_pos"])), key=cols["seq_pos"].__getitem__)  # the tower's order
        return {k: [v[i] for i in order] for k, v in cols.items()}

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        tables, lm_orders, vis_orders, offsets, grids = [], [], [], [], []
        for b in range(ids.shape[0]):
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            lm = self._lm_columns(tid, pos, [False] * len(tid), start[b], [])
            vision = self._vision_columns(inputs, b, images[b])
            tables.append(stack_columns(lm, vision))
            lm_orders.append(pos)
            vis_orders.append(vision["seq_pos"])
            offsets.append(len(pos))
            grids.append((self.tile_size // self.patch_size,) * 2)  # a tile's patch grid
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        # lm_cross: the lm tokens as queries, with their words' boxes over the vision tokens (keys)
        nq, nk = lm_sl.valid.shape[1], vis_sl.valid.shape[1]
        in_box = torch.zeros(len(tables), nq, nk, dtype=torch.bool)
        boxed = torch.zeros(len(tables), nq, dtype=torch.bool)
        for b, (t, nt) in enumerate(zip(tables, offsets)):
            bx, ib = boxed_masks(t, boxes[b], self._pieces)  # over the whole table: lm then vision
            boxed[b, :nt] = torch.from_numpy(bx[:nt])
            in_box[b, :nt, :t.num_rows - nt] = torch.from_numpy(ib[:nt, nt:])
        cross = replace(lm_sl, masks=replace(lm_sl.masks, in_box=in_box, boxed=boxed))
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl, "lm_cross": cross}, grids,
                           keys={"lm_cross": "vision"})


class _PilProcessor:
    """``MllamaProcessor`` from the checkpoint's tokenizer and ``MllamaImageProcessorPil`` (where
    ``AutoProcessor`` cannot build the image processor)."""

    @staticmethod
    def from_pretrained(model_id: str, revision: str | None = None):
        from transformers import AutoTokenizer, MllamaImageProcessorPil, MllamaProcessor

        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = MllamaImageProcessorPil.from_pretrained(model_id, revision=revision)
        return MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=getattr(tok, "chat_template", None))
