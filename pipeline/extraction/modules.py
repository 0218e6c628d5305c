"""``--capture-modules``: name patterns -> the model's modules, each placed in a stream and a layer.

Patterns match the names ``model.named_modules()`` gives, one dotted segment at a time: ``*`` (and any
``fnmatch`` wildcard inside a segment) stays within one segment, ``**`` spans any number of segments
(none included). So ``model.language_model.layers.*.mlp`` is every layer's MLP and nothing below it,
and ``model.**.mlp`` every MLP anywhere. A pattern matching nothing is refused before any work starts,
with the nearest names (:func:`match_modules`).

Each module is placed by the family's declared stream paths (``adapter.paths``, ``hooks.py``): a module
at or under a stream's ``hidden`` path formatted with layer ``i``'s slot is that stream's layer ``i``
(the attention's layer); any other module has no layer, and its stream is the one whose modules it
sits among, or -- where it sits among none, like LLaVA's ``model.multi_modal_projector`` -- the one
its output's length fits, which the device sink decides per batch
(:meth:`pipeline.extraction.sink.BatchSink.finish`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pipeline.capture import HookPoint
from pipeline.capture_config import module_matches as matches
from pipeline.models.hooks import layer_slots

NEAREST = 3  # names a refusal offers


def match_modules(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    """The module names matching any pattern, in the model's order; ValueError (one line naming the
    nearest module names) for a pattern that matches none."""
    names = [n for n in names if n]  # "" is the model itself
    for p in patterns:
        if not any(matches(p, n) for n in names):
            near = difflib.get_close_matches(p, names, n=NEAREST, cutoff=0.0)
            raise ValueError(f"--capture-modules {p!r} matches no module of this model; the nearest names are "
                             f"{', '.join(near)} (* matches one dotted segment, ** any number)")
    return [n for n in names if any(matches(p, n) for p in patterns)]


@dataclass(frozen=True)
class Site:
    """Where a captured module sits: its stream and layer (None where the declaration places it in no
    block), and the streams its output may be laid over, in the order they are tried."""

    name: str
    stream: str | None
    layer: int | None
    streams: tuple[str, ...]


def _within(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _root(paths: dict[str, str]) -> str | None:
    """The module holding all of a stream's declared modules (``model.vision_tower`` of its embeddings
    and its ``encoder.layers``; the parent of the layer list when only the blocks are declared:
    ``model.language_model``), None when they share no prefix."""
    split = [p.split(".{layer}")[0].split("#")[0].split(".") for p in paths.values()]
    common = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    root = ".".join(common)
    if root == paths.get("layers", paths.get("hidden", "").split(".{layer}")[0]):
        root = root.rpartition(".")[0]
    return root or None


def site(adapter, name: str) -> Site:
    """Place module ``name`` by the adapter's declared stream paths (module docstring)."""
    best: tuple[int, str, int] | None = None  # (length of the matched path, stream, layer)
    for stream, p in adapter.paths.items():
        if "{layer}" not in p.get("hidden", ""):
            continue
        for i, slot in enumerate(layer_slots(adapter.configs[stream])):
            path = p["hidden"].format(layer=slot)
            if _within(name, path) and (best is None or len(path) > best[0]):
                best = (len(path), stream, i)
    if best is not None:
        return Site(name, best[1], best[2], (best[1],))
    among = tuple(s for s, p in adapter.paths.items() if (r := _root(p)) and _within(name, r))
    return Site(name, among[0] if len(among) == 1 else None, None, among or tuple(adapter.paths))


def module_points(adapter, patterns: tuple[str, ...]) -> tuple[list[HookPoint], dict[str, Site]]:
    """The hook points of the modules the patterns match, and each one's :class:`Site` by name."""
    if not patterns:
        return [], {}
    modules = dict(adapter.model.named_modules())
    names = match_modules(list(modules), patterns)
    sites = {n: site(adapter, n) for n in names}
    pts = [HookPoint(sites[n].stream or "", -1 if sites[n].layer is None else sites[n].layer, "module",
                     modules[n], index=0, drop=False, name=n) for n in names]
    return pts, sites
