"""Decoder LVLMs, shared: a family's declaration (``family.FamilySpec``) drives everything here.

:class:`DecoderAdapter` answers in two passes. :meth:`~DecoderAdapter.prepare` generates the answer
greedily, without capture, under :meth:`~DecoderAdapter.generation_config` (the checkpoint's own, see
:func:`greedy_generation_config`) and appends it to the inputs, cut after its first eos; then
:meth:`~DecoderAdapter.forward` is one teacher-forced pass over prompt + answer, so each generated
token's attention row is the one it had when the model fed it back. Where the answer starts goes to
``Inputs.state[GEN_START]``.

Its token table (:meth:`~DecoderAdapter.layout`): the ``lm`` tokens in sequence order, pads left out
(``seq_pos`` counts from the example's first real token), text tokens by role (``generated`` for the
answer), image token ``k`` as the family maps it (:meth:`~DecoderAdapter.image_tokens`, the one method
a family must write), then the ``vision`` stream's tokens as the family lays them out. The tower is a
strategy object (``towers.py``) chosen by the declared tower kind.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.capture import HookPoint
from pipeline.models.base import (GEN_START, Adapter, BatchLayout, ForwardOutput, Inputs, Prediction,
                                  checked_architecture, normalise_answer, query_cross_layout, require_eager,
                                  stacked_layouts, stream_layout)
from pipeline.models.family import LAST, MAX_NEW_TOKENS, FamilySpec
from pipeline.models.hooks import Probe, module_at, stream_hook_points, watched
from pipeline.models.processors import first_line
from pipeline.models.tokens import lm_columns, stack_columns
from pipeline.models.towers import CropTower, ModuleTower, PackedTower

__all__ = ["GEN_START", "MAX_NEW_TOKENS", "DecoderAdapter", "ExplainedDecoder", "Example", "ImageTokens",
           "eos_ids", "greedy_generation_config"]


def greedy_generation_config(model: torch.nn.Module, tokenizer, *, suppress: tuple[int, ...] = (),
                             max_new_tokens: int | None = None, default_new_tokens: int = MAX_NEW_TOKENS,
                             prompt_length: int | None = None):
    """The checkpoint's own generation config, made greedy, for the answer of a decoder.

    A copy of ``model.generation_config``: ``suppress`` added to its ``suppress_tokens`` (a union,
    never a replacement), its ``bad_words_ids``, ``eos_token_id`` (one id or a list) and other
    logits processors kept; ``do_sample`` False and ``num_beams`` 1 (the captured teacher-forced
    pass reproduces greedy decoding only). Length: the checkpoint's ``max_new_tokens`` or
    ``max_length``; ``default_new_tokens`` when it sets neither (transformers' global default,
    ``max_length`` 20 with the prompt, leaves an LVLM's long image prompt no room); a
    ``max_new_tokens`` given here (the user's) caps either. ``pad_token_id`` falls back to the
    tokenizer's, then to the first eos id.
    """
    gc = copy.deepcopy(model.generation_config)
    have = list(gc.suppress_tokens or [])
    gc.suppress_tokens = have + [int(t) for t in suppress if int(t) not in have] or None
    gc.do_sample = False
    gc.num_beams = 1
    if gc.eos_token_id is None:
        gc.eos_token_id = tokenizer.eos_token_id
    if gc.pad_token_id is None:
        eos = eos_ids(gc)
        gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    if gc.max_new_tokens is None and gc.max_length is None:
        gc.max_new_tokens = default_new_tokens
    if max_new_tokens is not None:
        room = gc.max_new_tokens
        if room is None and prompt_length is not None:
            room = gc.max_length - prompt_length
        gc.max_new_tokens = max_new_tokens if room is None else max(0, min(room, max_new_tokens))
    return gc


def eos_ids(generation_config) -> list[int]:
    """A generation config's end-of-sequence ids as a list (it may hold one id or several)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

@dataclass
class Example:
    """One example of a batch as :meth:`DecoderAdapter.layout` reads it: its image, its real tokens'
    ids (``tid``) at sequence positions ``pos``, and where its answer starts (``start``)."""

    b: int
    image: Any
    tid: list[int]
    pos: list[int]
    start: int
    image_token_id: int | None  # None: no token carries image features (a family with image_in_lm False)
    is_img: list[bool] = field(init=False)

    def __post_init__(self):
        self.is_img = [i == self.image_token_id and p < self.start for i, p in zip(self.tid, self.pos)]

    @property
    def prompt_ids(self) -> list[int]:
        return [i for i, p in zip(self.tid, self.pos) if p < self.start]


@dataclass
class ImageTokens:
    """A family's mapping of one example's image tokens: ``rows[k]`` = (role, tile, patch_row, patch_col,
    box in original pixels) of ``lm`` image token ``k``; ``vision`` the ``vision`` stream's token-table
    columns (``tokens.COLUMNS``); ``grid`` the example's ``(grid_h, grid_w)``; ``want`` finishes the
    sentence "example has n image tokens where ..." when the prompt's count is not ``len(rows)``."""

    rows: list[tuple]
    vision: dict[str, list]
    grid: tuple[int, int]
    want: str
    # further streams' columns after ``vision``, in token-table order (a perceiver's latents)
    more: dict[str, dict[str, list]] = field(default_factory=dict)
    # a stream's places in its module's sequence where they are not its ``seq_pos``, and each declared
    # key set's (``FamilySpec.key_sets``)
    orders: dict[str, list[int]] = field(default_factory=dict)


class DecoderAdapter(Adapter):
    """A decoder LVLM declared by ``spec`` (see the module docstring). A family subclass sets ``spec``
    and writes :meth:`image_tokens`; where its tower's batch is not the examples, :meth:`tower_batch`."""

    spec: FamilySpec

    def __init__(self, model: torch.nn.Module, processor: Any, device: str = "cpu",
                 max_new_tokens: int | None = None):
        """``max_new_tokens``: a cap on the answer's length (default: the checkpoint's own)."""
        super().__init__(model, processor, device)
        spec, cfg = self.spec, model.config
        if spec.tower == "packed":  # its hooks read the tower's weights: refuse SDPA before hooking
            require_eager(model, getattr(cfg, "_name_or_path", "") or cfg.model_type, type(model).__name__,
                          self.EAGER_PARTS)
        self.family = spec.name or cfg.model_type
        self.tokenizer.padding_side = spec.padding_side
        self.max_new_tokens = max_new_tokens
        self.configs = self.stream_configs(cfg)
        ps = getattr(cfg.vision_config, "patch_size", None)
        self.patch_size = ps if isinstance(ps, int) else None  # the tower's, in processed pixels
        px = getattr(cfg.vision_config, "image_size", None)
        self.crop_px = px if isinstance(px, int) else None  # the side of the tower's input (one crop)
        self.side = self.crop_px // self.patch_size if self.crop_px and self.patch_size else None  # patches a side
        self.paths = self.module_paths(model)
        token = getattr(cfg, spec.image_token, None)
        self.image_token_id = int(token if token is not None else cfg.image_token_index)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.marker_roles: dict[int, str] = {}
        for key, role in spec.markers.items():
            i = self._token_id(key)
            if i is not None:
                self.marker_roles.setdefault(i, role)
        self.marker_pieces = {}  # role -> the piece of its first marker (for the prompt without a template)
        for i, role in self.marker_roles.items():
            self.marker_pieces.setdefault(role, self.tokenizer.convert_ids_to_tokens(i))
        self.suppress = (self.image_token_id,) + tuple(self._token_id(k) for k in spec.suppress)
        self.probe = Probe()  # the lm's hidden state 0: what the language model is fed
        # (unless the lm stream declares its hidden_0: a language model fed input_ids, e.g. Mllama's)
        self.first_hidden = {} if "hidden_0" in self.paths.get("lm", {}) else {"lm": self.probe}
        module_at(model, spec.lm).register_forward_pre_hook(self._feed_probe, with_kwargs=True)
        self.tower = self.make_tower()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:  # the sub-configs Adapter.load checks for eager attention
            cls.EAGER_PARTS = cls.spec.eager_parts

    def _token_id(self, key: str) -> int | None:
        """A declared token's id: ``config.<attr>`` from the model's config, ``processor.<attr>`` the piece
        the processor (or tokenizer) names, else a piece of the vocabulary (None when it has none)."""
        if key.startswith("config."):
            return int(getattr(self.model.config, key[len("config."):]))
        if key.startswith("processor."):
            attr = key[len("processor."):]
            key = getattr(self.processor, attr, None) or getattr(self.tokenizer, attr, None)
            return None if key is None else int(self.tokenizer.convert_tokens_to_ids(key))
        return self.tokenizer.get_vocab().get(key)

    # -- declaration -> parts ---------------------------------------------------------------
    def stream_configs(self, cfg) -> dict[str, Any]:
        """Each stream's sub-config (layers, heads, hidden size)."""
        return {"lm": cfg.text_config, "vision": cfg.vision_config}

    def module_paths(self, model: torch.nn.Module) -> dict[str, dict[str, str]]:
        """Each stream's module paths: the declaration's."""
        return dict(self.spec.streams)

    def make_tower(self):
        """The strategy that hooks the ``vision`` stream, by the declared tower kind (``towers.py``)."""
        paths, config = self.paths["vision"], self.configs["vision"]
        if self.spec.tower in ("crops", "pixel_shuffle"):
            return CropTower(self.model, paths, int(config.num_hidden_layers))
        if self.spec.tower == "packed":
            return PackedTower(self.model, paths, int(config.num_hidden_layers))
        return ModuleTower(self.model, config, paths)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def model_class(cls, config, model_id: str) -> str:
        return checked_architecture(config, model_id, cls.spec.architecture(config.model_type),
                                    cls.spec.name or config.model_type)

    # -- streams and hooks ----------------------------------------------------------------
    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        """Every stream's modules, in the declared order; ``vision``, and a cross stream over it, as the
        tower strategy hooks them."""
        pts: list[HookPoint] = []
        for stream, paths in self.paths.items():
            if stream == "vision":
                pts += self.tower.hook_points(keep_hidden, explain)
            elif self.spec.cross.get(stream) == "vision":
                pts += self.tower.cross_points(stream, self.configs[stream], paths, keep_hidden, explain)
            else:
                pts += stream_hook_points(self.model, self.configs, {stream: paths}, keep_hidden,
                                          first_hidden=self.first_hidden, explain=explain)
        return pts

    def _feed_probe(self, module, args, kwargs):
        """A forward pre-hook on the language model: hands its ``inputs_embeds`` (text embeddings with the
        image features scattered in, which no module outputs) to ``self.probe``, the lm's hidden state 0."""
        emb = kwargs.get("inputs_embeds")
        if emb is not None:
            self.probe(emb)

    _watched = staticmethod(watched)

    # -- inputs ---------------------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """The prompt for one question: the processor's chat template with one image and the question
        (where the declaration says so and the processor has one), else the declared ``prompt``."""
        if self.spec.chat_template and getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return self.spec.prompt.format(image=self.image_token, text=text, **self.marker_pieces)

    def check_image(self, image) -> None:
        """Where the declaration asks (``image_check``), run the image processor on the image alone: it
        refuses some images (Qwen-VL's and Pixtral's an aspect ratio over 200), so that one example is
        skipped instead of its batch failing."""
        from pipeline.data import BadInput

        if not self.spec.image_check:
            return
        try:
            self.processor.image_processor(images=[image], return_tensors="pt")
        except ValueError as e:
            raise BadInput("image", f"the {type(self.model).__name__} image processor cannot take this image: "
                                    f"{first_line(e)}") from None

    def processor_kwargs(self, prompts: list[str]) -> dict[str, Any]:
        """More keywords for the processor (none by default)."""
        return {}

    def fill_inputs(self, enc: Inputs) -> None:
        """Model inputs the processor may leave out (none by default)."""

    def encode(self, texts: list[str], images: list):
        prompts = [self.prompt(t) for t in texts]
        imgs = [[im] for im in images] if self.spec.nested_images else images  # one image each
        enc = self.processor(images=imgs, text=prompts, return_tensors="pt", padding=True,
                             **self.processor_kwargs(prompts))
        enc = Inputs({k: v for k, v in dict(enc).items() if k not in self.spec.drop_inputs})
        self.fill_inputs(enc)
        return enc, [[] for _ in texts]  # on the host

    def generation_config(self, prompt_length: int | None = None):
        """The checkpoint's own generation config, greedy, with the image placeholder (and the declared
        ``suppress`` tokens) added to its suppressed tokens (:func:`greedy_generation_config`)."""
        return greedy_generation_config(self.model, self.tokenizer, suppress=self.suppress,
                                        max_new_tokens=self.max_new_tokens,
                                        default_new_tokens=self.spec.max_new_tokens, prompt_length=prompt_length)

    def extend_inputs(self, out: Inputs, model_inputs: dict, new: torch.Tensor) -> None:
        """The declared ``answer_inputs`` (e.g. ``token_type_ids``), extended over the appended answer
        ``new`` ([batch, n]) with the value its tokens take (``LAST``: the prompt's last position's)."""
        for key, value in self.spec.answer_inputs.items():
            t = model_inputs.get(key)
            if t is None:
                continue
            if value == LAST:  # [batch, seq, ...]
                ext = t[:, -1:].expand(t.shape[0], new.shape[1], *t.shape[2:])
            else:
                ext = torch.full_like(new, value, dtype=t.dtype)
            out[key] = torch.cat([t, ext], dim=1)

    def prepare(self, inputs: "Inputs") -> "Inputs":
        mi = self._model_inputs(inputs)
        P = mi["input_ids"].shape[1]
        gc = self.generation_config(P)
        stops = set(eos_ids(gc))
        with torch.no_grad():
            seq = self.model.generate(**mi, generation_config=gc)
        new = seq[:, P:]  # [batch, n]
        keep = torch.ones_like(new, dtype=torch.bool)
        for b in range(new.shape[0]):
            row = new[b].tolist()
            stop = next((i for i, t in enumerate(row) if t in stops), None)
            if stop is not None:
                keep[b, stop + 1:] = False
        out = Inputs(mi, getattr(inputs, "state", None))
        out["input_ids"] = seq
        out["attention_mask"] = torch.cat([mi["attention_mask"], keep.to(mi["attention_mask"].dtype)], dim=1)
        self.extend_inputs(out, mi, new)
        out.state[GEN_START] = torch.full((seq.shape[0],), P, dtype=torch.long, device=seq.device)
        return out

    # -- the model ------------------------------------------------------------------------
    def tower_batch(self, inputs: Inputs, model_inputs: dict) -> list[int] | None:
        """What the tower strategy needs to regroup its batch (crops per example, patches per image);
        None where the tower's batch is the examples."""
        return None

    def run(self, inputs: Inputs, model_inputs: dict[str, Any], example_ids: list[int] | None) -> Any:
        """The teacher-forced pass: the model on prompt + answer, no cache."""
        with self.tower.batch(self.tower_batch(inputs, model_inputs)):
            return self.model(**model_inputs, use_cache=False, return_dict=True)

    def generated(self, inputs: Inputs) -> list[list[int]]:
        """The ids :meth:`prepare` appended to each example (its answer, pads left out)."""
        ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
        start = inputs.state[GEN_START].cpu()
        return [ids[b, int(start[b]):][mask[b, int(start[b]):]].tolist() for b in range(ids.shape[0])]

    # -- layout ---------------------------------------------------------------------------
    def batch_context(self, inputs: Inputs, images: list) -> Any:
        """What :meth:`image_tokens` reads once per batch (None by default)."""
        return None

    def image_tokens(self, ex: Example, ctx: Any) -> ImageTokens:
        """The family's mapping from one example's image tokens to the processor's grid."""
        raise NotImplementedError

    def layout(self, inputs: Inputs, images: list, boxes: list) -> BatchLayout:
        ids = inputs["input_ids"].cpu()
        seen = inputs["attention_mask"].cpu().bool()
        state = getattr(inputs, "state", {})
        start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
        ctx = self.batch_context(inputs, images)
        tables, sizes, grids, orders = [], [], [], {}
        for b in range(ids.shape[0]):
            pos = torch.nonzero(seen[b]).flatten().tolist()
            ex = Example(b, images[b], ids[b, pos].tolist(), pos, start[b],
                         self.image_token_id if self.spec.image_in_lm else None)
            img = self.image_tokens(ex, ctx)
            if sum(ex.is_img) != len(img.rows):
                raise RuntimeError(f"example has {sum(ex.is_img)} image tokens where {img.want}")
            roles = ["generated" if p >= ex.start else self._text_role(i) for i, p in zip(ex.tid, pos)]
            lm = lm_columns(self.tokenizer.convert_ids_to_tokens(ex.tid), roles, pos, ex.is_img, img.rows)
            parts = {"lm": lm, "vision": img.vision, **img.more}
            tables.append(stack_columns(*parts.values()))
            sizes.append({s: len(cols["seq_pos"]) for s, cols in parts.items()})
            for s, cols in parts.items():
                orders.setdefault(s, []).append(pos if s == "lm" else img.orders.get(s, cols["seq_pos"]))
            for s in self.spec.key_sets:
                orders.setdefault(s, []).append(img.orders[s])
            grids.append(img.grid)
        streams = stacked_layouts(tables, sizes, orders, boxes, self._pieces)
        for name, spans in self.spec.key_sets.items():  # keys spanning consecutive streams
            first = streams[spans[0]].token_offset
            keys = stream_layout([t.slice(o, sum(sz[s] for s in spans)) for t, o, sz in zip(tables, first, sizes)],
                                 orders[name], boxes, self._pieces)
            keys.token_offset = list(first)
            streams[name] = keys
        for stream, keys in self.spec.cross.items():
            if stream in streams:  # a token stream whose queries attend over other tokens
                streams[stream] = query_cross_layout(streams[stream], streams[keys])
        return BatchLayout(tables, streams, grids, keys=dict(self.spec.cross))

    # -- answers --------------------------------------------------------------------------
    def predict(self, outputs: "ForwardOutput", answers: list[str | None]) -> list["Prediction"]:
        """The generated text (special tokens dropped); correct when it matches the answer, normalised."""
        preds = []
        for gen, ans in zip(outputs.generated, answers):
            text = self.tokenizer.decode(gen, skip_special_tokens=True).strip()
            correct = None if ans is None else normalise_answer(text) == normalise_answer(ans)
            preds.append(Prediction(text, correct, {"generated_tokens": len(gen)}))
        return preds

    def forward(self, inputs: "Inputs", example_ids=None, grad: bool = False) -> "ForwardOutput":
        """One teacher-forced pass over prompt + generated tokens (``prepare`` runs first when it has
        not); ``grad``: build the autograd graph (``--explain relevancy``'s second pass)."""
        if GEN_START not in getattr(inputs, "state", {}):
            prepared = self.prepare(inputs)
            inputs.update(prepared)
            if isinstance(inputs, Inputs):
                inputs.state.update(prepared.state)
            else:
                inputs = prepared
        return super().forward(inputs, example_ids, grad)



class ExplainedDecoder(DecoderAdapter):
    """A decoder whose language model ends in a final norm (``spec.lm_norm``) and the model's ``lm_head``:
    ``--explain relevancy`` and ``lens`` (BLIP-2, whose OPT head differs, offers neither)."""

    def relevancy_targets(self, inputs, outputs: ForwardOutput) -> list[dict]:
        """Each generated token, scored by its logit at the position before it (the one that predicted
        it) and read there, in the ``lm`` stream."""
        ids, start = inputs["input_ids"], inputs.state[GEN_START]
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
        return module_at(self.model, self.spec.lm_norm), self.model.lm_head
