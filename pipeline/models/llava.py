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
with the manifest's answer after ``normalise_answer``. The image placeholder is suppressed during
generation (a generated ``<image>`` would make the teacher-forced pass ask for a second image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor

from pipeline.capture import HookPoint
from pipeline.models.base import (BatchLayout, Prediction, module_at, normalise_answer, require_eager,
                                  split_stream_layouts, stream_hook_points, stream_shapes, token_rows)
from pipeline.models.dual import crop_geometry

# Native module paths -> (stream, layer). Attention modules return (attn_output, attn_weights).
# ``hidden_0`` of ``lm`` is the language model's ``inputs_embeds`` (text embeddings with the
# projected image features scattered in), handed to ``_Probe`` by a pre-hook.
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
MAX_NEW_TOKENS = 16
# bookkeeping keys in encode()/prepare()'s inputs (not model inputs)
GEN_START = "vlatlas_gen_start"  # [batch] long: index of the first generated token


class _Probe(torch.nn.Module):
    """Identity; a forward hook on it sees the language model's ``inputs_embeds`` (hidden 0)."""

    def forward(self, x):
        return x


@dataclass
class LlavaOutputs:
    outputs: Any
    generated: list[list[int]]  # per example, the generated ids (up to and including eos)


class LlavaAdapter:
    """LlavaForConditionalGeneration: streams ``lm`` and ``vision``."""

    family = "llava"

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation pads on the left
        self.device = device
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
        self.probe = _Probe()
        lm = module_at(model, "model.language_model")
        lm.register_forward_pre_hook(self._feed_probe, with_kwargs=True)

    def relevancy_targets(self, inputs, outputs: LlavaOutputs) -> list[dict]:
        """``--explain relevancy`` targets of a decoder: each generated token, scored by its logit at
        the position before it (the one that predicted it) and read there, in the ``lm`` stream."""
        ids, start = inputs["input_ids"], inputs[GEN_START]
        logits = outputs.outputs.logits
        dev = logits.device
        out = []
        for s in range(max((len(g) for g in outputs.generated), default=0)):
            active = torch.tensor([s < len(g) for g in outputs.generated], device=dev)
            pos = (start.to(dev) + s).clamp(max=ids.shape[1] - 1)  # the generated token's position
            row = pos - 1
            tok = ids.to(dev).gather(1, pos[:, None])[:, 0]
            score = logits[torch.arange(len(pos), device=dev), row].gather(1, tok[:, None])[:, 0]
            out.append({"stream": "lm", "row": row, "score": score, "active": active, "target": pos})
        return out

    def lens(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The language model's final norm and unembedding, for ``--explain lens``."""
        return module_at(self.model, "model.language_model.norm"), self.model.lm_head

    def _feed_probe(self, module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is not None:
            self.probe(emb)

    # -- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, model_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32, revision: str | None = None):
        from transformers import LlavaForConditionalGeneration

        config = AutoConfig.from_pretrained(model_id, revision=revision)
        if "LlavaForConditionalGeneration" not in (getattr(config, "architectures", None) or
                                                   ["LlavaForConditionalGeneration"]):
            raise NotImplementedError(f"{model_id!r} is a {config.architectures}; VL-Atlas's llava adapter "
                                      "handles LlavaForConditionalGeneration")
        model = LlavaForConditionalGeneration.from_pretrained(
            model_id, revision=revision, attn_implementation="eager", dtype=dtype)
        require_eager(model, model_id, "LlavaForConditionalGeneration")
        processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        return cls(model.to(device).eval(), processor, device)

    def streams(self) -> dict[str, dict[str, int]]:
        return stream_shapes(self.configs)

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        return stream_hook_points(self.model, self.configs, {s: self.paths[s] for s in STREAMS}, keep_hidden,
                                  first_hidden={"lm": self.probe}, explain=explain)

    # -- inputs ---------------------------------------------------------------------
    def check_image(self, image) -> None:
        """Every image the loader accepts can be resized (and cropped) to the tower's size."""

    def prompt(self, text: str) -> str:
        """The prompt for one question: the processor's chat template when it has one, else
        ``"<image> question"``."""
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return f"{self.image_token} {text}"

    def encode(self, texts: list[str], images: list):
        prompts = [self.prompt(t) for t in texts]
        enc = dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))
        return dict(enc), [[] for _ in texts]  # on the host

    def _model_inputs(self, inputs):
        return {k: v for k, v in inputs.items() if not k.startswith("vlatlas_")}

    def prepare(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Generate the answer greedily (no capture) and append it to the inputs."""
        tok = self.tokenizer
        mi = self._model_inputs(inputs)
        P = mi["input_ids"].shape[1]
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        with torch.no_grad():
            seq = self.model.generate(**mi, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      suppress_tokens=[self.image_token_id], pad_token_id=pad,
                                      num_beams=1)
        new = seq[:, P:]  # [batch, n]
        keep = torch.ones_like(new, dtype=torch.bool)
        for b in range(new.shape[0]):
            row = new[b].tolist()
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            if stop is not None:
                keep[b, stop + 1:] = False
        out = dict(inputs)
        out["input_ids"] = seq
        out["attention_mask"] = torch.cat([mi["attention_mask"], keep.to(mi["attention_mask"].dtype)], dim=1)
        out[GEN_START] = torch.full((seq.shape[0],), P, dtype=torch.long, device=seq.device)
        return out

    def forward(self, inputs: dict[str, torch.Tensor], example_ids=None, grad: bool = False) -> LlavaOutputs:
        """One teacher-forced pass over prompt + generated tokens (``prepare`` must have run);
        ``grad``: build the autograd graph (``--explain relevancy``'s second pass)."""
        if GEN_START not in inputs:
            inputs.update(self.prepare(inputs))
        with torch.set_grad_enabled(grad):
            out = self.model(**self._model_inputs(inputs), use_cache=False, return_dict=True)
        ids, mask, start = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool(), inputs[GEN_START].cpu()
        gen = [ids[b, int(start[b]):][mask[b, int(start[b]):]].tolist() for b in range(ids.shape[0])]
        return LlavaOutputs(out, gen)

    # -- layout ---------------------------------------------------------------------
    def _text_role(self, i: int) -> str:
        tok = self.tokenizer
        for role in ("bos", "eos", "cls", "sep", "pad"):
            if getattr(tok, f"{role}_token_id", None) == i:
                return role
        return "word"

    def _geometry(self, W: int, H: int):
        """``(sx, sy, left, top, out_w, out_h)`` as ``crop_geometry``, with a pad-to-square first."""
        ip = self.processor.image_processor
        if getattr(ip, "do_pad", False):  # LlavaImageProcessor: pad to a centred square, then resize
            S = max(W, H)
            sx, sy, left, top, ow, oh = crop_geometry(ip, S, S)
            # processed (u, v) <- padded ((u + left) / sx, ...) <- original (... - pad_x)
            return sx, sy, left - (S - W) // 2 * sx, top - (S - H) // 2 * sy, ow, oh
        return crop_geometry(ip, W, H)

    def layout(self, inputs: dict[str, torch.Tensor], images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        start = inputs[GEN_START].cpu().tolist() if GEN_START in inputs else [ids.shape[1]] * ids.shape[0]
        ph, pw = inputs["pixel_values"].shape[-2:]
        ps = self.patch_size
        gh, gw = ph // ps, pw // ps
        first = 1 if self.tower_cls else 0
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
            if n_img != gh * gw + (1 if full else 0):
                raise RuntimeError(f"example has {n_img} image tokens where a {gh}x{gw} grid and "
                                   f"vision_feature_select_strategy={self.strategy!r} make "
                                   f"{gh * gw + (1 if full else 0)}")
            W, H = images[b].size
            sx, sy, left, top, ow, oh = self._geometry(W, H)
            if (ow, oh) != (pw, ph):
                raise RuntimeError(f"the image processor made a {pw}x{ph} image where its settings say "
                                   f"{ow}x{oh}; VL-Atlas cannot place patches on the original image")

            def px(u, v):  # processed pixel -> original pixel, clipped to the image
                return min(max((u + left) / sx, 0.0), float(W)), min(max((v + top) / sy, 0.0), float(H))

            rc = [(r, c) for r in range(gh) for c in range(gw)]
            pbox = [px(c * ps, r * ps) + px((c + 1) * ps, (r + 1) * ps) for r, c in rc]
            cls_box = px(0, 0) + px(pw, ph)
            pieces = self.tokenizer.convert_ids_to_tokens(tid)
            lm = {k: [] for k in ("modality", "role", "token", "text_pos", "row", "col", "box")}
            k = nt = 0
            for i, p, img, piece in zip(tid, pos, is_img, pieces):
                if img:
                    j = k - 1 if full else k  # patch index of image token k (-1: the tower's CLS)
                    lm["modality"].append("image")
                    lm["role"].append("image_cls" if j < 0 else "patch")
                    lm["token"].append(None)
                    lm["text_pos"].append(None)
                    lm["row"].append(None if j < 0 else rc[j][0])
                    lm["col"].append(None if j < 0 else rc[j][1])
                    lm["box"].append(cls_box if j < 0 else pbox[j])
                    k += 1
                else:
                    lm["modality"].append("text")
                    lm["role"].append("generated" if p >= start[b] else self._text_role(i))
                    lm["token"].append(piece)
                    lm["text_pos"].append(nt)
                    lm["row"].append(None)
                    lm["col"].append(None)
                    lm["box"].append(None)
                    nt += 1
            n_lm, nv = len(pos), first + len(rc)
            none_v = [None] * nv
            vbox = ([cls_box] if first else []) + pbox
            vis_seq = list(range(first)) + [first + r * gw + c for r, c in rc]
            lbox = lm["box"]
            tables.append(token_rows(
                token_idx=list(range(n_lm + nv)),
                stream=["lm"] * n_lm + ["vision"] * nv,
                modality=lm["modality"] + ["image"] * nv,
                role=lm["role"] + ["image_cls"] * first + ["patch"] * len(rc),
                token=lm["token"] + none_v,
                seq_pos=[p - p0 for p in pos] + vis_seq,
                text_pos=lm["text_pos"] + none_v,
                patch_row=lm["row"] + [None] * first + [r for r, _ in rc],
                patch_col=lm["col"] + [None] * first + [c for _, c in rc],
                **{name: [q[i] if q else None for q in lbox] + [q[i] for q in vbox]
                   for i, name in enumerate(("x0", "y0", "x1", "y1"))},
            ))
            lm_orders.append(pos)
            vis_orders.append(vis_seq)
            offsets.append(n_lm)
            grids.append((gh, gw))
        lm_sl, vis_sl = split_stream_layouts(tables, offsets, lm_orders, vis_orders, boxes, self._pieces)
        return BatchLayout(tables, {"lm": lm_sl, "vision": vis_sl}, grids)

    def _pieces(self, label: str) -> list[str]:
        return self.tokenizer.tokenize(label)

    # -- predictions ----------------------------------------------------------------
    def predict(self, outputs: LlavaOutputs, answers: list[str | None]) -> list[Prediction]:
        preds = []
        for gen, ans in zip(outputs.generated, answers):
            text = self.tokenizer.decode(gen, skip_special_tokens=True).strip()
            correct = None if ans is None else normalise_answer(text) == normalise_answer(ans)
            preds.append(Prediction(text, correct, {"generated_tokens": len(gen)}))
        return preds
