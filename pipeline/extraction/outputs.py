"""What the device sink hands to row building: one typed result per layer and table.

Each result names the lake table it becomes (``table``, a declaration of ``lake/schema.py``), so row
building (:mod:`pipeline.extraction.rows`) looks its builder up by that declaration. The fields are
tensors on the device until :meth:`Out.to_host`, numpy arrays after :meth:`Out.to_numpy`; this module
itself imports no torch (the tensors' own methods move them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from lake.schema import (ACTIVATIONS, ATTENTION, HEAD_STATS, HIDDEN_STATES, LENS, RELEVANCY, SINKS, STATS, VALUE_NORMS,
                         Table)


@dataclass
class Kept:
    """What one layer keeps of a batch's attention: tensors on the device, numpy arrays on the host.

    Dense: ``weight`` ``[batch, head, query, key]`` float16 and ``keep`` of the same shape.
    Sparse: ``index`` ``[batch, head, query, slots]`` key positions (ascending, unkept slots last),
    ``weight`` their float16 weights and ``keep`` which slots are stored.
    ``mass`` ``[batch, head, query]`` is the row mass kept, computed in float32 on the full rows
    (it stays on the device: the statistics have used it).
    """

    weight: object
    keep: object
    mass: object
    index: object = None

    @property
    def sparse(self) -> bool:
        return self.index is not None


def _move(v, how):
    if isinstance(v, Kept):
        return Kept(_move(v.weight, how), _move(v.keep, how), None, _move(v.index, how))
    return v if v is None or isinstance(v, (str, int, float, np.ndarray)) else how(v)


@dataclass
class Out:
    """One layer's result of one batch (``layer`` -1 where the result is of no layer)."""

    table: ClassVar[Table]
    stream: str
    layer: int

    def to_host(self) -> "Out":
        """A copy with every tensor on its way to the CPU (asynchronously: synchronise before reading)."""
        return replace(self, **{f.name: _move(getattr(self, f.name), lambda t: t.to("cpu", non_blocking=True))
                                for f in fields(self)})

    def to_numpy(self) -> "Out":
        """A copy with every (host) tensor a numpy array."""
        return replace(self, **{f.name: _move(getattr(self, f.name), lambda t: t.numpy()) for f in fields(self)})


@dataclass
class StatsOut(Out):
    table: ClassVar[Table] = HEAD_STATS
    stats: object = None  # [stat, batch, head] in the batch's stat_order


@dataclass
class KeptOut(Out):
    table: ClassVar[Table] = ATTENTION
    kept: Kept | None = None
    key_stream: str | None = None  # cross attention: the stream whose tokens are the keys


@dataclass
class HiddenOut(Out):
    table: ClassVar[Table] = HIDDEN_STATES
    norm: object = None  # [batch, token] L2 norms
    vectors: object = None  # [n with vectors, token, dim] float16


@dataclass
class ActivationOut(Out):
    """A ``--capture-modules`` module's output over its stream's tokens (``layer`` -1: in no block)."""

    table: ClassVar[Table] = ACTIVATIONS
    module: str = ""
    norm: object = None  # [batch, token] L2 norms
    vectors: object = None  # [n with vectors, token, dim] float16
    mask: object = None  # [batch, token] bool: the tokens the output has a row for


@dataclass
class ValueOut(Out):
    table: ClassVar[Table] = VALUE_NORMS
    norm: object = None  # [batch, head, token] over the key stream's tokens
    key_stream: str | None = None


@dataclass
class SinksOut(Out):
    table: ClassVar[Table] = SINKS
    ratio: object = None  # [batch, token] max |h_d| / rms(h)
    flag: object = None  # [batch, token] bool: a sink (valid tokens only)
    dim: object = None  # [batch, token] the massive dimension


@dataclass
class LensOut(Out):
    table: ClassVar[Table] = LENS
    prob: object = None  # [batch, token, k]
    ids: object = None  # [batch, token, k] vocabulary ids
    mask: object = None  # [batch, token] valid tokens


@dataclass
class RelevancyOut(Out):
    """Rows of the ``relevancy`` table: for each example, target and token, a value.

    ``values``/``mask`` ``[batch, target, token]``; ``target`` ``[batch, target]`` the token slot (in
    the stream) each target row explains, or None when it explains the model's prediction (null)."""

    table: ClassVar[Table] = RELEVANCY
    method: str = "rollout"
    values: object = None
    mask: object = None
    target: object = None


@dataclass
class BatchRows:
    """Everything row building needs of one batch, on the host; a batch whose every image was bad
    carries only its ``errors``."""

    example_ids: list[int] = field(default_factory=list)
    outs: list[Out] = field(default_factory=list)
    valid: dict[str, np.ndarray] = field(default_factory=dict)  # stream -> [batch, token]
    offsets: dict[str, list[int]] = field(default_factory=dict)  # stream -> token_offset
    with_vec: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [batch] hidden vectors stored
    stat_order: list[str] = field(default_factory=lambda: sorted(STATS))
    pieces: dict[int, str] = field(default_factory=dict)  # vocabulary id -> piece, for the lens rows
    examples: list[dict] = field(default_factory=list)
    tokens: list = field(default_factory=list)  # pa.Table per example
    images: list[dict] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
