"""Where the capture hooks go: module paths to :class:`~pipeline.capture.HookPoint`, and the probes an
adapter feeds with tensors no module outputs.

A family names each stream's modules in one dict (``family.FamilySpec.streams``)::

    {"attention": "model.language_model.layers.{layer}.self_attn",   # returns (output, weights)
     "hidden": "model.language_model.layers.{layer}",                 # hidden state layer + 1
     "hidden_0": "model.vision_tower.embeddings",                     # hidden state 0
     "value": "...v_proj", "out": "...o_proj",                        # --explain value
     "layers": "model.language_model.layers"}                         # the layer list itself

:func:`stream_hook_points` turns those into hook points; a tower whose batch is not the examples
(``towers.py``) hands its regrouped tensors to :class:`Probe` / :class:`AttnProbe` modules and
:func:`probed_points` hooks those instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.capture import HookPoint


class Probe(torch.nn.Module):
    """Identity; a capture hook on it sees what the adapter hands it (hidden states the model never
    exposes as a module output)."""

    def forward(self, x):
        return x


class AttnProbe(torch.nn.Module):
    """``(None, weights)``: an attention module's output as the capture hooks read it (index 1), for
    weights the adapter collects itself."""

    def forward(self, w):
        return None, w


def watched(probe: torch.nn.Module) -> bool:
    """Whether a hook (a capture) reads the probe: no work for passes nobody captures."""
    return bool(probe._forward_hooks or probe._forward_pre_hooks)


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted path such as ``vilt.encoder.layer.3.attention``."""
    m = root
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


@dataclass(frozen=True)
class StreamShape:
    """A stream's shape where no one sub-config says it, read as a config (``num_hidden_layers``...):
    its layers are some of a module list's, or several lists' one after another (Mllama's ``lm``:
    the decoder's self-attention layers between its cross layers; its ``vision``: the local then the
    global transformer). ``layer_slots[i]`` is what stream layer ``i`` formats ``{layer}`` with in
    the stream's paths."""

    layer_slots: tuple
    num_attention_heads: int
    hidden_size: int
    num_key_value_heads: int | None = None

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_slots)


def layer_slots(config) -> list:
    """What each layer of a stream formats ``{layer}`` with: ``config.layer_slots`` (:class:`StreamShape`),
    else ``0 .. num_hidden_layers - 1``."""
    return list(getattr(config, "layer_slots", None) or range(config.num_hidden_layers))


def stream_shapes(configs: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{stream: {"layers", "heads", "hidden_size"}}`` from each stream's (sub-)config."""
    return {s: {"layers": c.num_hidden_layers, "heads": c.num_attention_heads, "hidden_size": c.hidden_size}
            for s, c in configs.items()}


def stream_hook_points(model: torch.nn.Module, configs: dict[str, Any], paths: dict[str, dict[str, str]],
                       keep_hidden: set[int] | None,
                       first_hidden: dict[str, torch.nn.Module] | None = None,
                       explain: tuple[str, ...] = ()) -> list[HookPoint]:
    """Hook points of every stream: each layer's attention (index 1 of its module's output) and the
    hidden states kept (``keep_hidden``: hidden-state layers, None = all).

    ``paths[stream]`` maps ``attention`` and ``hidden`` (formatted with ``layer``) and ``hidden_0``
    (the module whose output is hidden state 0) to module paths; a stream without ``hidden`` keeps
    no hidden states; layer ``i`` formats ``{layer}`` with its slot (:func:`layer_slots`).
    ``first_hidden[stream]`` replaces the ``hidden_0`` module.

    ``explain`` (``pipeline.explain``): with ``value``, each layer's value projection (``value``,
    ``PATH#i/n`` for part ``i`` of a fused projection) with its output projection (``out``); with
    ``sinks`` or ``lens``, every hidden state, those outside ``keep_hidden`` marked not to be stored.
    """
    pts: list[HookPoint] = []
    for stream, p in paths.items():
        c = configs[stream]
        slots = layer_slots(c)
        n = len(slots)
        if "value" in explain and "value" in p:
            for i in range(n):
                path, _, part = p["value"].format(layer=slots[i]).partition("#")
                pts.append(HookPoint(stream, i, "value", module_at(model, path), index=0, drop=False,
                                     out=module_at(model, p["out"].format(layer=slots[i])),
                                     heads=c.num_attention_heads,
                                     kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                                     part=tuple(int(x) for x in part.split("/")) if part else None))
        pts += [HookPoint(stream, i, "attention", module_at(model, p["attention"].format(layer=slot)), index=1)
                for i, slot in enumerate(slots)]
        if "hidden" not in p:
            continue
        every = "sinks" in explain or "lens" in explain  # both read every layer's hidden state

        def kept(layer: int) -> bool:
            return keep_hidden is None or layer in keep_hidden

        if kept(0) or every:
            first = (first_hidden or {}).get(stream) or module_at(model, p["hidden_0"])
            pts.append(HookPoint(stream, 0, "hidden", first, store=kept(0)))
        pts += [HookPoint(stream, i + 1, "hidden", module_at(model, p["hidden"].format(layer=slots[i])),
                          store=kept(i + 1)) for i in range(n) if kept(i + 1) or every]
    return pts


def probed_points(stream: str, attn: list[AttnProbe], hidden: list[Probe], keep_hidden: set[int] | None,
                  explain: tuple[str, ...] = ()) -> list[HookPoint]:
    """The hook points of a stream whose attention maps and hidden states the adapter's own hooks hand
    to probes (a tower that packs or crops its batch): every layer's attention, and the hidden states
    kept (all of them pass through when ``sinks`` or ``lens`` reads them unstored)."""
    pts = [HookPoint(stream, i, "attention", p, index=1) for i, p in enumerate(attn)]
    every = "sinks" in explain or "lens" in explain
    for i, p in enumerate(hidden):
        kept = keep_hidden is None or i in keep_hidden
        if kept or every:
            pts.append(HookPoint(stream, i, "hidden", p, store=kept))
    return pts
