"""BLIP-2 (``Blip2ForConditionalGeneration``) and InstructBLIP (``InstructBlipForConditionalGeneration``):
streams ``vision``, ``qformer``, ``qformer_cross`` and ``lm``.

The image goes through a ViT (stream ``vision``: image ``[CLS]`` then patches, every layer
captured); the Q-Former's ``num_query_tokens`` learned query tokens attend to each other (stream
``qformer``: its self-attention, ``[batch, head, Q, Q]``) and, in the layers that have one, to
the ViT's output through cross-attention (stream ``qformer_cross``); a linear projection maps the
Q-Former's query outputs into the language model (OPT, or Llama/Vicuna; an encoder-decoder one, Flan-T5, is refused),
where they replace the ``<image>`` placeholders that the processor puts before the prompt (stream
``lm``). InstructBLIP's Q-Former also reads the instruction (:class:`InstructBlipAdapter`): its
tokens follow the query tokens in ``qformer``; only the query tokens attend to the image.

``qformer_cross`` is a cross stream like BLIP's ``cross`` (``BatchLayout.keys =
{"qformer_cross": "vision"}``): its rows are the Q-Former's query tokens (the ``qformer`` stream's
tokens: ``query_idx`` is a query token's ``token_idx``) and its columns the ``vision`` stream's
tokens (``key_idx`` a vision token's ``token_idx``), ``[batch, head, Q, V]``. Only every
``cross_attention_frequency``-th Q-Former layer has cross-attention: ``qformer_cross`` layer ``l``
sits in Q-Former layer ``l * cross_attention_frequency`` (BLIP-2's checkpoints: 2, so 6 of 12).
Its statistics are those of a cross stream with image queries and image keys (``i2i``); the query
tokens have no words, so no grounding.

Token table of one example, one index space::

    lm:      <q 0> ... <q Q-1> <s> w1 ... wn g1 ... gm      (pads left out)
    qformer: q 0 ... q Q-1
    vision:  [image CLS] p(0,0) ... p(g-1,g-1)

- ``lm`` query tokens (the ``<image>`` placeholders, the projected Q-Former outputs) and the
  ``qformer`` tokens are modality ``image``, role ``query``, with no patch and no box: a query
  token reads the whole image. ``lm`` query token ``k`` carries Q-Former query ``k``.
- The processor pads the text on the left *after* the placeholders (``<q..> <pad>.. <s> w..``):
  pads are left out and ``seq_pos`` is the token's rank among the example's real tokens (its
  position without padding, the same whatever its batch).
- Patch ``(r, c)`` is vision position ``1 + r * g + c``; boxes are mapped back through
  BlipImageProcessor's resize to a square (no crop; x and y scales differ).
- ``hidden_0`` of ``lm`` is the language model's ``inputs_embeds`` (text embeddings with the query
  outputs scattered in, before OPT's position embeddings), of ``qformer`` the Q-Former's
  ``layernorm`` output (the query tokens as they enter layer 0); ``qformer_cross`` keeps none.

Two passes per batch (``decoder.DecoderAdapter``): ``prepare()`` answers greedily under the
checkpoint's own generation config (``<image>`` added to its suppressed tokens) with the model's own
``generate`` (which scatters the query outputs into the prompt), uncaptured; then one captured
teacher-forced pass over prompt + answer.

The LM's query tokens have no patch: the Attention page follows them back to the image with a
composed view, "LM token -> query tokens -> patches", ``c[p] = Σ_k A_lm[t, q_k] C[k, p]`` (the lm
stream's attention to query token ``k`` times ``qformer_cross`` query ``k``'s attention to patch ``p``;
``streamlit_app.views.compose_through_queries``), labelled as a product, not a weight the model
computes. Tested with ``cross_attention_frequency`` 1 and 2 (the released checkpoints use 2).

Not captured: ``--explain value``, ``relevancy`` and ``lens``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

from pipeline.capture import HookPoint
from pipeline.models.base import GEN_START, BatchLayout, Inputs, query_cross_layout, stacked_layouts, stream_layout
from pipeline.models.decoder import DecoderAdapter
from pipeline.models.family import FamilySpec
from pipeline.models.geometry import crop_geometry, patch_grid
from pipeline.models.hooks import module_at
from pipeline.models.tokens import image_columns, stack_columns

CROSS = "qformer.encoder.layer.{layer}.crossattention.attention"  # in the layers that have cross-attention
BLIP2 = FamilySpec(
    name="blip2",
    classes={"blip-2": "Blip2ForConditionalGeneration"},
    # and lm: the language model's layers, OPT's or Llama's (Blip2Adapter.module_paths)
    streams={"vision": {"attention": "vision_model.encoder.layers.{layer}.self_attn",
                        "hidden_0": "vision_model.embeddings", "hidden": "vision_model.encoder.layers.{layer}"},
             "qformer": {"attention": "qformer.encoder.layer.{layer}.attention.attention",
                         "hidden_0": "qformer.layernorm", "hidden": "qformer.encoder.layer.{layer}"}},
    tower="query_tokens",
    lm="language_model",
    cross={"qformer_cross": "vision"},
    eager_parts=("text_config", "vision_config", "qformer_config"),
)
INSTRUCTBLIP = replace(
    BLIP2, name="instructblip", classes={"instructblip": "InstructBlipForConditionalGeneration"},
    streams={**BLIP2.streams, "qformer": {**BLIP2.streams["qformer"], "hidden_0": "qformer.embeddings"}})
STREAMS = ("lm", "qformer", "vision")  # token-table order


class Blip2Adapter(DecoderAdapter):
    """Blip2ForConditionalGeneration with a decoder-only language model (OPT or Llama-like)."""

    spec = BLIP2

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        cfg = model.config
        if getattr(cfg.text_config, "is_encoder_decoder", False):
            raise NotImplementedError("BLIP-2 with an encoder-decoder language model (Flan-T5) is not supported; "
                                      "VL-Atlas handles BLIP-2 with a decoder-only one (OPT)")
        if getattr(processor, "num_query_tokens", None) != cfg.num_query_tokens:
            raise NotImplementedError(f"the processor expands {getattr(processor, 'num_query_tokens', None)} "
                                      f"image tokens, the model has {cfg.num_query_tokens} query tokens; "
                                      "VL-Atlas needs a processor with num_query_tokens set (recent checkpoints)")
        self.cross_layers = [i for i in range(cfg.qformer_config.num_hidden_layers)
                             if module_at(model, f"qformer.encoder.layer.{i}").has_cross_attention]
        super().__init__(model, processor, device, max_new_tokens)
        self.num_query = int(cfg.num_query_tokens)

    def stream_configs(self, cfg) -> dict[str, Any]:
        qc = cfg.qformer_config
        cross_cfg = copy.copy(qc)
        cross_cfg.num_hidden_layers = len(self.cross_layers)
        return {"lm": cfg.text_config, "qformer": qc, "qformer_cross": cross_cfg, "vision": cfg.vision_config}

    def module_paths(self, model):
        inner = getattr(module_at(model, "language_model"), "model", None)
        self.mask_positions = False  # OPT numbers positions from the attention mask itself
        if hasattr(inner, "decoder"):  # OPT
            lm_layers = "language_model.model.decoder.layers.{layer}"
        elif hasattr(inner, "layers"):  # Llama / Vicuna (InstructBLIP's Vicuna checkpoints)
            lm_layers = "language_model.model.layers.{layer}"
            self.mask_positions = True
        else:
            raise NotImplementedError("VL-Atlas's blip2 adapter knows BLIP-2 and InstructBLIP with an OPT or "
                                      "Llama-like (Vicuna) language model")
        return {**self.spec.streams, "lm": {"attention": lm_layers + ".self_attn", "hidden": lm_layers}}

    INPUTS = ("input_ids", "attention_mask", "pixel_values")

    def hook_points(self, keep_hidden, explain=()):
        """Every stream's modules (no ``--explain``), and ``qformer_cross`` layer ``k`` in the ``k``-th
        Q-Former layer that has cross-attention."""
        pts = super().hook_points(keep_hidden, ())
        return pts + [HookPoint("qformer_cross", k, "attention", module_at(self.model, CROSS.format(layer=i)), index=1)
                      for k, i in enumerate(self.cross_layers)]

    # -- inputs ---------------------------------------------------------------------
    def encode(self, texts: list[str], images: list):
        enc = self.processor(images=images, text=list(texts), return_tensors="pt", padding=True)
        return Inputs({k: enc[k] for k in self.INPUTS}), [[] for _ in texts]

    def _model_inputs(self, inputs):
        return {k: inputs[k] for k in self.INPUTS}

    def run(self, inputs, model_inputs, example_ids):
        """The teacher-forced pass. A Llama-like language model numbers positions 0, 1, ... whatever the
        mask unless told: it is given ``position_ids`` counted over real tokens (what ``generate``
        gives it), since the processor's pads sit between the query tokens and the prompt."""
        kw = dict(model_inputs)
        if self.mask_positions:
            kw["position_ids"] = (kw["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return self.model(**kw, use_cache=False, return_dict=True)

    # -- layout ---------------------------------------------------------------------
    def _qformer_rows(self, inputs, b: int):
        """The Q-Former's tokens of example ``b`` (BLIP-2: its query tokens): (columns, positions)."""
        Q = self.num_query
        cols = {"stream": ["qformer"] * Q, "modality": ["image"] * Q, "role": ["query"] * Q, "token": [None] * Q,
                "seq_pos": list(range(Q)), "patch_row": [None] * Q, "patch_col": [None] * Q, "box": [None] * Q}
        return cols, list(range(Q))

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        ph, pw = inputs["pixel_values"].shape[-2:]
        Q = self.num_query
        tables, orders, sizes, grids = [], {s: [] for s in STREAMS}, [], []
        for b in range(ids.shape[0]):
            pos = torch.nonzero(seen[b]).flatten().tolist()
            tid = ids[b, pos].tolist()
            is_q = [i == self.image_token_id and p < start[b] for i, p in zip(tid, pos)]
            if sum(is_q) != Q:
                raise RuntimeError(f"example has {sum(is_q)} image tokens where the model has {Q} query tokens")
            pieces = self.tokenizer.convert_ids_to_tokens(tid)
            n = len(pos)
            lm = {"stream": ["lm"] * n, "modality": ["image" if q else "text" for q in is_q],
                  "role": ["query" if q else "generated" if p >= start[b] else self._text_role(i)
                           for i, p, q in zip(tid, pos, is_q)],
                  "token": [None if q else s for q, s in zip(is_q, pieces)], "seq_pos": list(range(n)),
                  "patch_row": [None] * n, "patch_col": [None] * n, "box": [None] * n}
            qf, qf_order = self._qformer_rows(inputs, b)
            W, H = images[b].size  # resized to a square, no crop: x and y scales differ
            grid = patch_grid(crop_geometry(self.processor.image_processor, W, H), W, H, (pw, ph), self.patch_size)
            vision = image_columns(grid, "vision", image_cls=True)
            tables.append(stack_columns(lm, qf, vision))
            orders["lm"].append(pos)
            orders["qformer"].append(qf_order)
            orders["vision"].append(vision["seq_pos"])
            sizes.append(dict(zip(STREAMS, (n, len(qf_order), len(vision["seq_pos"])))))
            grids.append((grid.rows, grid.cols))
        layouts = stacked_layouts(tables, sizes, orders, boxes, self._pieces)
        # qformer_cross: its queries are the first Q qformer tokens (the query tokens)
        qf = stream_layout([t.slice(sz["lm"], Q) for t, sz in zip(tables, sizes)], [o[:Q] for o in orders["qformer"]],
                           boxes, self._pieces)
        qf.token_offset = layouts["qformer"].token_offset
        layouts["qformer_cross"] = query_cross_layout(qf, layouts["vision"])
        return BatchLayout(tables, layouts, grids, keys=dict(self.spec.cross))


class InstructBlipAdapter(Blip2Adapter):
    """InstructBlipForConditionalGeneration with an OPT or Llama-like (Vicuna) language model: as BLIP-2, and the Q-Former
    also reads the instruction (its own BERT tokenizer's ``qformer_input_ids``).

    Stream ``qformer`` holds the query tokens then the instruction's tokens (modality ``text``,
    roles ``cls``/``sep``/``word``; the instruction is padded on the right, pads left out),
    ``seq_pos`` their Q-Former positions (queries ``0..Q-1``, instruction token ``j`` at ``Q + j``). Only the query tokens attend to the image: ``qformer_cross`` rows are the first ``Q``
    ``qformer`` tokens. ``hidden_0`` of ``qformer`` is ``qformer.embeddings`` (queries and
    instruction embedded and normalised together)."""

    INPUTS = ("input_ids", "attention_mask", "pixel_values", "qformer_input_ids", "qformer_attention_mask")

    spec = INSTRUCTBLIP

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        super().__init__(model, processor, device, max_new_tokens)
        self.qformer_tokenizer = processor.qformer_tokenizer

    def encode(self, texts: list[str], images: list):
        """As BLIP-2, with the instruction padded on the right: the Q-Former numbers its instruction
        tokens from Q up (absolute position embeddings), so only then do an instruction's tokens keep
        their positions, and its answer, whatever its batch (the processor pads both tokenizers on the
        side of the language model's, the left)."""
        enc, notes = super().encode(texts, images)
        ids, mask = enc["qformer_input_ids"], enc["qformer_attention_mask"]
        order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
        enc["qformer_input_ids"], enc["qformer_attention_mask"] = ids.gather(1, order), mask.gather(1, order)
        return enc, notes

    def _qformer_rows(self, inputs, b: int):
        """The query tokens then the instruction's real tokens: (columns, sequence positions)."""
        Q = self.num_query
        real = inputs["qformer_attention_mask"][b].cpu().bool()
        pos = torch.nonzero(real).flatten().tolist()
        tid = inputs["qformer_input_ids"][b, pos].cpu().tolist()
        qt = self.qformer_tokenizer
        roles = ["cls" if i == qt.cls_token_id else "sep" if i == qt.sep_token_id else "word" for i in tid]
        n = Q + len(pos)
        cols = {"stream": ["qformer"] * n, "modality": ["image"] * Q + ["text"] * len(pos),
                "role": ["query"] * Q + roles, "token": [None] * Q + qt.convert_ids_to_tokens(tid),
                "seq_pos": list(range(n)), "patch_row": [None] * n, "patch_col": [None] * n, "box": [None] * n}
        return cols, list(range(Q)) + [Q + p for p in pos]
