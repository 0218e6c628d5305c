"""Forward hooks -> per-layer attention and hidden tensors.

A model's forward pass runs with one hook per attention sublayer and per
hidden state. Each hook hands its tensor to a callback *as the layer runs*
(statistics and flattening happen there) and then drops the attention
weights from the module's output, so memory holds one layer's attention at a
time instead of the whole tuple ``outputs.attentions``.

Hook points are named ``(stream, layer)`` (see docs/DESIGN.md, Conventions): one
dict per family in ``pipeline/models`` maps native module paths to them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


class NoAttentionError(RuntimeError):
    """The model ran but returned no attention weights."""


class ModuleOutputError(ValueError):
    """A ``--capture-modules`` module's output is not one vector per token of the batch's examples (one line)."""


@dataclass(frozen=True)
class HookPoint:
    """One tensor to capture.

    Parameters
    ----------
    stream, layer : the canonical name of the tensor (docs/DESIGN.md).
    kind : ``attention``, ``hidden``, ``value`` or ``module`` (``--capture-modules``: the module's output,
        a tuple's first tensor).
    module : the module whose forward output carries the tensor.
    index : position of the tensor in the module's output tuple.
    drop : for attention, replace the weights in the output by ``None`` once
        captured (the model's own ``outputs.attentions`` then holds ``None``).
    store : for hidden states, whether the rows are stored (``--explain sinks`` reads every
        layer's hidden state, whatever ``--keep-hidden`` stores).
    out, heads, kv_heads, part : for ``value`` points (``--explain value``): the attention's output
        projection, its query and value heads, and ``(i, n)`` when the value is part ``i`` of ``n``
        of a fused projection's output.
    name : for ``module`` points, the module's name as ``named_modules()`` gives it.
    """

    stream: str
    layer: int
    kind: str
    module: nn.Module
    index: int = 0
    drop: bool = True
    store: bool = True
    out: nn.Module | None = None
    heads: int = 0
    kv_heads: int = 0
    part: tuple[int, int] | None = None
    name: str = ""


Callback = Callable[[HookPoint, torch.Tensor], None]


def _hook(point: HookPoint, callback: Callback):
    def fn(module, args, output):
        if point.kind == "module":  # a tuple's (or a ModelOutput's) first tensor
            seq = output.to_tuple() if hasattr(output, "to_tuple") else output
            seq = seq if isinstance(seq, (tuple, list)) else (seq,)
            tensor = next((x for x in seq if isinstance(x, torch.Tensor)), None)
            if tensor is None:
                raise ModuleOutputError(f"--capture-modules: module {point.name} returned no tensor "
                                        f"({type(output).__name__}), so it has no activations to store")
            callback(point, tensor.detach())
            return None
        seq = output if isinstance(output, (tuple, list)) else (output,)
        tensor = seq[point.index] if len(seq) > point.index else None
        if tensor is None:
            raise NoAttentionError(
                f"{type(module).__name__} returned no {point.kind} for stream {point.stream!r} "
                f"layer {point.layer}. Load the model with attn_implementation='eager' and call it "
                "with output_attentions=True (SDPA and flash attention compute no weights)."
            )
        callback(point, tensor.detach())
        if point.kind == "attention" and point.drop and isinstance(output, tuple):
            return output[: point.index] + (None,) + output[point.index + 1:]
        return None

    return fn


@contextmanager
def capture(points: list[HookPoint], callback: Callback) -> Iterator[None]:
    """Register a forward hook on each point for the duration of the block."""
    handles = [p.module.register_forward_hook(_hook(p, callback)) for p in points]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
