"""Vision towers as strategy objects: how the ``vision`` stream is hooked, chosen by a family's tower kind.

An adapter holds one tower (``adapter.tower``) and asks it for the stream's hook points and, around the
captured pass, to expect a batch of a given make-up (:meth:`Tower.batch`). Three strategies cover the
six tower kinds of ``family.TOWER_KINDS``:

- :class:`ModuleTower` (``plain``, ``pooled``, ``query_tokens``): the tower's batch is the examples;
  its own modules are hooked as they are. :class:`TiledTower` (``tiles``: Mllama) is one whose
  sequence is an example's tiles, each padded, and whose output drops the padding.
- :class:`CropTower` (``crops``, ``pixel_shuffle``, Gemma 3 with pan-and-scan): the tower's batch is
  the crops of all examples; hooks regroup each layer per example into probes, each example's crops
  one after another (``seq_pos = crop * n + patch``), its attention block diagonal (a crop sees only
  its own tokens), examples with fewer crops zero padded.
- :class:`PackedTower` (``packed``: Pixtral) and :class:`SegmentedTower` (``packed``: Qwen-VL): every
  image of the batch in ONE tower sequence, cut per image into ``[image, head, n, n]`` (padded to the
  batch's largest ``n``) and ``[image, n, dim]``.

No tower offers ``--explain value`` but the plain one: the others' batch is not the examples. A
``--capture-modules`` module inside a probed tower is regrouped by the tower itself
(:meth:`ProbedTower.regroup`), as its hidden states are.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.capture import HookPoint
from pipeline.models.base import GEN_START
from pipeline.models.hooks import (AttnProbe, Probe, layer_slots, module_at, probed_points, stream_hook_points,
                                   watched)

STREAM = "vision"


class ModuleTower:
    """A tower whose batch is the examples: its modules (``paths``) are the hook points."""

    def __init__(self, model: torch.nn.Module, config, paths: dict[str, str]):
        self.model, self.config, self.paths = model, config, paths

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        return stream_hook_points(self.model, {STREAM: self.config}, {STREAM: self.paths}, keep_hidden,
                                  explain=explain)

    def cross_points(self, stream: str, config, paths: dict[str, str], keep_hidden: set[int] | None,
                     explain: tuple[str, ...] = ()) -> list[HookPoint]:
        """A cross stream whose keys are the tower's output tokens (``BatchLayout.keys = {stream: "vision"}``):
        its modules as they are, their keys the tower's tokens in order."""
        return stream_hook_points(self.model, {stream: config}, {stream: paths}, keep_hidden, explain=explain)

    @contextmanager
    def batch(self, sizes):
        yield


@dataclass(frozen=True)
class Tiles:
    """A tiled tower's sequence: ``tiles`` tiles (always; the unused ones zeros) of ``n`` tokens each,
    padded to ``padded``."""

    tiles: int
    n: int
    padded: int


class TiledTower(ModuleTower):
    """``tiles`` (Mllama): each example's tiles in ONE tower sequence (tiles attend to each other), every
    tile's ``n`` tokens padded to ``padded``; the tower's batch is the examples, its modules hooked as
    they are. Hidden state 0 is the input of the module at ``paths["input_0"]`` (the padded tiles, which
    no module outputs). The tower's output drops the padding, so a cross stream over it has its weights
    put back on the tower's sequence (key ``t * n + q`` at ``t * padded + q``, the padding's columns 0):
    its keys are the ``vision`` stream's tokens, as :meth:`ModuleTower.cross_points` says."""

    def __init__(self, model: torch.nn.Module, config, paths: dict[str, str], shape: Tiles):
        super().__init__(model, config, paths)
        self.shape = shape
        self.first = Probe()
        module_at(model, paths["input_0"]).register_forward_pre_hook(self._feed_first)
        self.cross: dict[str, AttnProbe] = {}  # a cross module's path -> the probe its weights go to

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        return stream_hook_points(self.model, {STREAM: self.config}, {STREAM: self.paths}, keep_hidden,
                                  first_hidden={STREAM: self.first}, explain=explain)

    def _feed_first(self, module, args):
        if watched(self.first):
            self.first(args[0])

    def cross_points(self, stream, config, paths, keep_hidden, explain=()):
        probes = []
        for slot in layer_slots(config):
            path = paths["attention"].format(layer=slot)
            if path not in self.cross:
                self.cross[path] = AttnProbe()
                module_at(self.model, path).register_forward_hook(self._scatter(self.cross[path]))
            probes.append(self.cross[path])
        return probed_points(stream, probes, [], keep_hidden, explain)

    def _scatter(self, probe: AttnProbe):
        T, n, L = self.shape.tiles, self.shape.n, self.shape.padded

        def fn(module, args, output):
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if w is None or not watched(probe):
                return
            B, H, S, K = w.shape  # [batch, head, query, tile * n]
            if K != T * n:
                raise RuntimeError(f"cross-attention over {K} keys where {T} tiles of {n} tokens make {T * n} "
                                   "(several images per example are not supported)")
            out = w.new_zeros(B, H, S, T, L)  # [batch, head, query, tile, padded]
            out[..., :n] = w.view(B, H, S, T, n)
            probe(out.view(B, H, S, T * L))

        return fn


class ProbedTower:
    """A tower whose layers the adapter's own hooks regroup per example and hand to probes:
    ``attn[l]`` the attention of layer ``l``, ``hidden[l]`` hidden state ``l``. ``sizes`` (crops per
    example, or patches per image) is set for the captured pass only; the hooks are idle otherwise."""

    def __init__(self, layers: int):
        self.attn = [AttnProbe() for _ in range(layers)]
        self.hidden = [Probe() for _ in range(layers + 1)]
        self.sizes: list[int] | None = None

    def hook_points(self, keep_hidden: set[int] | None, explain: tuple[str, ...] = ()) -> list[HookPoint]:
        return probed_points(STREAM, self.attn, self.hidden, keep_hidden, explain)

    @contextmanager
    def batch(self, sizes: list[int] | None):
        self.sizes = sizes
        try:
            yield
        finally:
            self.sizes = None

    def _feeds(self, probe) -> bool:
        return self.sizes is not None and watched(probe)

    def _hidden_hook(self, layer: int):
        probe = self.hidden[layer]

        def fn(module, args, output):
            if self._feeds(probe):
                probe(self.per_example(output[0] if isinstance(output, (tuple, list)) else output))

        return fn

    def per_example(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fits(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is laid out as the tower's batch (its hidden states' shape, any width)."""
        raise NotImplementedError

    def regroup(self, t: torch.Tensor) -> torch.Tensor | None:
        """A ``--capture-modules`` module's output inside the tower, per example exactly as the hidden
        states are (:meth:`per_example`), so it lies over the ``vision`` stream's tokens; None outside the
        captured pass or where its shape is not the tower's batch (a pooled output, another token count)."""
        if self.sizes is None or not self.fits(t):
            return None
        return self.per_example(t)


class CropTower(ProbedTower):
    """The tower's batch is crops (``sizes``: crops per example, the base image included)."""

    def __init__(self, model: torch.nn.Module, paths: dict[str, str], layers: int):
        super().__init__(layers)
        for i in range(layers):
            module_at(model, paths["attention"].format(layer=i)).register_forward_hook(self._attn_hook(i))
            module_at(model, paths["hidden"].format(layer=i)).register_forward_hook(self._hidden_hook(i + 1))
        module_at(model, paths["hidden_0"]).register_forward_hook(self._hidden_hook(0))

    def _attn_hook(self, layer: int):
        probe = self.attn[layer]

        def fn(module, args, output):
            if self._feeds(probe) and isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                probe(self.blocks(output[1]))

        return fn

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """``[crop, head, n, n]`` (the crops of the whole batch) -> ``[example, head, C n, C n]``: each
        example's crops on the block diagonal, ``C`` the batch's most crops, zero elsewhere."""
        crops, n = self.sizes, w.shape[-1]
        N = max(crops) * n
        out = w.new_zeros(len(crops), w.shape[1], N, N)
        k = 0
        for b, c in enumerate(crops):
            for j in range(c):
                out[b, :, j * n:(j + 1) * n, j * n:(j + 1) * n] = w[k]
                k += 1
        return out

    def per_example(self, h: torch.Tensor) -> torch.Tensor:
        """``[crop, n, dim]`` -> ``[example, C n, dim]`` (each example's crops one after the other)."""
        parts = [p.reshape(-1, h.shape[-1]) for p in torch.split(h, self.sizes, dim=0)]
        return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)

    def fits(self, t: torch.Tensor) -> bool:
        """``[crop, n, dim]`` over the batch's crops."""
        return t.dim() == 3 and t.shape[0] == sum(self.sizes)


class PackedTower(ProbedTower):
    """Every image of the batch in one sequence (``sizes``: patches per image, in order); the attention
    modules return ``[1, head, N, N]`` over it (block diagonal by the tower's own mask), cut here into
    each image's diagonal block (the off-diagonal blocks are exactly 0 after the mask's softmax)."""

    def __init__(self, model: torch.nn.Module, paths: dict[str, str], layers: int):
        super().__init__(layers)
        blocks = module_at(model, paths["layers"])
        for i, block in enumerate(blocks):
            self._hook_attention(module_at(model, paths["attention"].format(layer=i)), i)
            block.register_forward_hook(self._hidden_hook(i + 1))
        blocks[0].register_forward_pre_hook(self._hidden_0)

    def _hook_attention(self, attn: torch.nn.Module, layer: int) -> None:
        probe = self.attn[layer]

        def fn(module, args, output):
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if w is not None and self._feeds(probe):
                probe(self.diagonal_blocks(w))

        attn.register_forward_hook(fn)

    def diagonal_blocks(self, w: torch.Tensor) -> torch.Tensor:
        """``[1, head, N, N]`` over the packed sequence -> ``[image, head, n, n]``: each image's diagonal block."""
        lengths = self.sizes
        if w.shape[-1] != sum(lengths):
            raise RuntimeError(f"tower attention over {w.shape[-1]} patches where the images make {sum(lengths)}")
        N = max(lengths)
        out = w.new_zeros(len(lengths), w.shape[1], N, N)
        o = 0
        for b, n in enumerate(lengths):
            out[b, :, :n, :n] = w[0, :, o:o + n, o:o + n]
            o += n
        return out

    def per_example(self, h: torch.Tensor) -> torch.Tensor:
        """``[(1,) patches of all images, dim]`` -> ``[image, max patches, dim]`` (zero padded)."""
        parts = torch.split(h[0] if h.dim() == 3 else h, self.sizes, dim=0)
        return torch.nn.utils.rnn.pad_sequence(list(parts), batch_first=True)

    def fits(self, t: torch.Tensor) -> bool:
        """``[patches, dim]`` or ``[1, patches, dim]`` over every image's patches (a merger's fewer
        tokens do not fit)."""
        n = sum(self.sizes)
        return (t.dim() == 2 and t.shape[0] == n) or (t.dim() == 3 and t.shape[0] == 1 and t.shape[1] == n)

    def _hidden_0(self, module, args):
        if self._feeds(self.hidden[0]):
            self.hidden[0](self.per_example(args[0]))


ATTN_FUNCTION = "vlatlas_eager"


def _recording_eager(module, query, key, value, attention_mask, **kwargs):
    """``vlatlas_eager``: the modeling module's own eager attention, its weights handed on to each
    tower capturing the pass (``module._vlatlas_segments``: tower id -> its list of segments)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward as eager
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    for segments in getattr(module, "_vlatlas_segments", {}).values():
        segments.append(weights)
    return out, weights


class SegmentedTower(PackedTower):
    """A packed tower whose attention modules run eager attention segment by segment (``cu_seqlens``:
    one segment per image, or per window) and return no weights: each module is pointed at
    ``vlatlas_eager`` (registered in transformers' ``AttentionInterface``, through a copy of the tower's
    config with that name), which calls the modeling module's own ``eager_attention_forward`` unchanged
    and hands each segment's weights here; each image's segments go on its block diagonal."""

    def __init__(self, model: torch.nn.Module, paths: dict[str, str], layers: int, config):
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_FUNCTION, _recording_eager)  # global, by name; again is harmless
        self._config = copy.copy(config)
        self._config._attn_implementation = ATTN_FUNCTION
        super().__init__(model, paths, layers)

    def _hook_attention(self, attn: torch.nn.Module, layer: int) -> None:
        probe = self.attn[layer]
        attn.config = self._config
        if not hasattr(attn, "_vlatlas_segments"):
            attn._vlatlas_segments = {}

        def open_segments(module, args):
            module._vlatlas_segments.pop(id(self), None)
            if self._feeds(probe):
                module._vlatlas_segments[id(self)] = []

        def close_segments(module, args, output):
            segments = module._vlatlas_segments.pop(id(self), None)
            if segments:
                probe(self.segment_blocks(segments))

        attn.register_forward_pre_hook(open_segments)
        attn.register_forward_hook(close_segments)

    def segment_blocks(self, segments: list[torch.Tensor]) -> torch.Tensor:
        """``[image, head, n, n]`` from the weights of each attention segment (``[1, head, s, s]``,
        in sequence order): each image's segments on its block diagonal, zero elsewhere."""
        lengths = self.sizes
        N = max(lengths)
        out = segments[0].new_zeros(len(lengths), segments[0].shape[1], N, N)
        b, off = 0, 0  # the image, the position in its part of the packed sequence
        for w in segments:
            s = w.shape[-1]
            while b < len(lengths) and off >= lengths[b]:
                b, off = b + 1, 0
            if b >= len(lengths) or off + s > lengths[b]:
                raise RuntimeError("a vision attention segment spans two images; VL-Atlas cannot split it")
            out[b, :, off:off + s, off:off + s] = w[0]
            off += s
        if b != len(lengths) - 1 or off != lengths[-1]:
            raise RuntimeError("the vision attention segments do not cover the batch's images")
        return out


def crops_by_image_tokens(inputs, image_token_id: int, per_crop: int) -> list[int]:
    """Crops per example counted from its prompt's image tokens, ``per_crop`` a crop (the answer's
    tokens are never image features), checked against the crops in ``pixel_values``."""
    ids = inputs["input_ids"].cpu()
    state = getattr(inputs, "state", {})
    start = state[GEN_START].cpu().tolist() if GEN_START in state else [ids.shape[1]] * ids.shape[0]
    counts = [int((ids[b, :start[b]] == image_token_id).sum()) for b in range(ids.shape[0])]
    if any(c == 0 or c % per_crop for c in counts):
        raise RuntimeError(f"image tokens per example {counts} are not whole crops of {per_crop}")
    crops = [c // per_crop for c in counts]
    if sum(crops) != inputs["pixel_values"].shape[0]:
        raise RuntimeError(f"{sum(crops)} crops' image tokens in the prompts for {inputs['pixel_values'].shape[0]} "
                           "crops in pixel_values")
    return crops


def shuffled_blocks(side: int, shuffle) -> list[list[tuple[int, int]]]:
    """Per image token of one ``side x side`` crop (in the model's order): the tower patches ``(row, col)``
    its channels hold. Not re-derived: ``shuffle``, the model's own pixel shuffle taking
    ``[1, side, side, 2]`` features, runs on features holding each patch's coordinates."""
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    feats = torch.tensor(np.stack([r, c], -1), dtype=torch.float64).reshape(1, side, side, 2)
    out = shuffle(feats)
    out = out.reshape(-1, out.shape[-1]).numpy()  # [token, 2 k]
    return [sorted({(int(t[2 * i]), int(t[2 * i + 1])) for i in range(len(t) // 2)}) for t in out]
