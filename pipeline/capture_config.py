"""What a run captures, as typed objects: the attention policy, the hidden-state policy, the explain set.

This module imports neither torch nor transformers, so the app reads a run's capture (to say what a
policy stores, which methods ran) without loading the pipeline's torch. Each option is parsed once,
from the command line (:meth:`Capture.from_options`) or from the ``runs`` row
(:meth:`Capture.from_json`), and serialised once (:meth:`Capture.to_json`); in between it travels as
one of the types below, and the code that acts on it matches on the type, never on a string.

Attention policies (``--keep-attention``): which weights of the full attention are stored in the
``attention`` table (statistics are always computed on the full attention):

- :class:`KeepAll` ``all``: every weight a query can see (keys masked out by the model's causal or
  padding mask are not stored: see :class:`KeepAll`);
- :class:`TopK` ``topk:K``: the ``K`` largest keys of each query row;
- :class:`Mass` ``mass:P``: the largest keys of each row, in descending order, until their mass
  reaches ``P`` (the key that crosses ``P`` is kept);
- :class:`KeepCross` ``cross``: only weights between tokens of different modalities;
- :class:`Budget` ``budget:K:P:C`` (the default, :data:`DEFAULT_KEEP_ATTENTION`): the largest keys
  in descending order until their mass reaches ``P`` (the crossing key kept), at most ``K`` of
  them, plus the ``C`` largest keys *of the other modality* with a non-zero weight (text -> image
  for a text query, image -> text for an image query), so the cross-modal views always have the
  strongest cross-modal weights even when a row's mass sits on its own modality. At most
  ``K + C`` weights a row;
- :class:`KeepNone` ``none``: nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import ClassVar, Iterator

DEFAULT_KEEP_ATTENTION = "budget:8:0.9:2"
DEFAULT_KEEP_HIDDEN = "sample:256"
DEFAULT_CHUNK_SIZE = 64
EXPLAIN_METHODS = ("relevancy", "rollout", "value", "lens", "sinks")  # canonical order


# ---------------------------------------------------------------------------- attention
class AttentionPolicy:
    """A ``--keep-attention`` policy. ``kind`` is its name in the option and in ``runs.capture``
    (serialisation only); ``k``, ``p``, ``c`` its numbers (None where the policy has none)."""

    kind: ClassVar[str]
    sparse: ClassVar[bool] = False  # the kept weights leave the device as per-row slots (bounded)
    k: int | None = None
    p: float | None = None
    c: int | None = None

    @staticmethod
    def parse(text: str | None) -> "AttentionPolicy":
        """Parse ``all``, ``topk:K``, ``mass:P``, ``budget:K:P:C``, ``cross`` or ``none``."""
        t = (text or "all").strip().lower()
        plain = {"all": KeepAll, "cross": KeepCross, "none": KeepNone}
        if t in plain:
            return plain[t]()
        name, _, arg = t.partition(":")
        try:
            if name == "topk" and int(arg) >= 1:
                return TopK(int(arg))
            if name == "mass" and 0 < float(arg) <= 1:
                return Mass(float(arg))
            parts = arg.split(":")
            if name == "budget" and len(parts) == 3:
                k, p, c = int(parts[0]), float(parts[1]), int(parts[2])
                if k >= 1 and 0 < p <= 1 and c >= 0:
                    return Budget(k, p, c)
        except ValueError:
            pass
        raise ValueError(
            f"--keep-attention {text!r} is not understood: use all, topk:K (K >= 1), "
            "mass:P (0 < P <= 1), budget:K:P:C (K >= 1, 0 < P <= 1, C >= 0; the default is "
            f"{DEFAULT_KEEP_ATTENTION}), cross or none"
        )

    def __str__(self) -> str:
        return self.kind

    def describe(self) -> str:
        """One sentence for a user: what a query row keeps."""
        raise NotImplementedError

    def to_json(self) -> str:
        d = {"kind": self.kind, "k": self.k, "p": self.p, "c": self.c}
        return json.dumps({k: v for k, v in d.items() if v is not None})


@dataclass(frozen=True)
class KeepAll(AttentionPolicy):
    """Every weight a query can see. The rule: an entry is stored when its raw weight (before the
    float16 rounding of the stored value) is > 0. In eager attention a key the causal or padding
    mask hides gets a score of the dtype's minimum, hence a softmax weight of exactly 0.0, so the
    rule keeps exactly the visible keys (a visible key underflowing to 0.0 would need a logit gap
    of ~100 in float32, and carries no mass)."""

    kind: ClassVar[str] = "all"

    def describe(self) -> str:
        return "every weight is stored"


@dataclass(frozen=True)
class KeepNone(AttentionPolicy):
    kind: ClassVar[str] = "none"

    def describe(self) -> str:
        return "no weights are stored (statistics only)"


@dataclass(frozen=True)
class KeepCross(AttentionPolicy):
    kind: ClassVar[str] = "cross"

    def describe(self) -> str:
        return "only weights between text and image tokens are stored"


@dataclass(frozen=True)
class TopK(AttentionPolicy):
    k: int
    kind: ClassVar[str] = "topk"
    sparse: ClassVar[bool] = True

    def __str__(self) -> str:
        return f"topk:{self.k}"

    def describe(self) -> str:
        return f"each query row keeps its {self.k} largest weights"


@dataclass(frozen=True)
class Mass(AttentionPolicy):
    p: float
    kind: ClassVar[str] = "mass"

    def __str__(self) -> str:
        return f"mass:{self.p:g}"

    def describe(self) -> str:
        return f"each query row keeps its largest weights until they reach {self.p:g} of its mass"


@dataclass(frozen=True)
class Budget(AttentionPolicy):
    k: int
    p: float
    c: int  # cross-modal keys kept on top of the row's own
    kind: ClassVar[str] = "budget"
    sparse: ClassVar[bool] = True

    def __str__(self) -> str:
        return f"budget:{self.k}:{self.p:g}:{self.c}"

    def describe(self) -> str:
        return (f"each query row keeps its largest weights until they reach {self.p:g} of its mass (at most "
                f"{self.k}), plus its {self.c} largest weights on the other modality")


# ---------------------------------------------------------------------------- hidden states
class HiddenPolicy:
    """A ``--keep-hidden`` policy: which hidden-state layers are stored (:meth:`layers`) and which
    examples keep their vectors (:meth:`sample`)."""

    @staticmethod
    def parse(text: str | None) -> "HiddenPolicy":
        """``sample:N`` (norms of every token, vectors of N sampled examples), ``all``, ``none`` or a
        comma-separated list of hidden-state layers such as ``0,4,12``."""
        raw = DEFAULT_KEEP_HIDDEN if text is None else text
        k = raw.strip().lower()
        if k == "all":
            return HiddenAll()
        if k == "none":
            return HiddenNone()
        if k.startswith("sample:"):
            try:
                n = int(k.partition(":")[2])
            except ValueError:
                n = -1
            if n < 0:
                raise ValueError(f"--keep-hidden {raw!r} is not understood: sample:N needs a whole "
                                 "number of examples N >= 0")
            return HiddenSample(n)
        try:
            layers = frozenset(int(x) for x in k.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--keep-hidden {raw!r} is not understood: use sample:N (norms of every "
                             "token, vectors of N sampled examples), all, none or a comma-separated list of layers "
                             "such as 0,4,12") from None
        if any(x < 0 for x in layers):
            raise ValueError("--keep-hidden layers are 0 (embeddings) or more")
        return HiddenLayers(layers)

    def layers(self) -> set[int] | None:
        """None for every layer, else the set of hidden-state layers kept."""
        return None

    def sample(self) -> int | None:
        """N of ``sample:N`` (vectors of N examples, norms of all), None when every kept row has its vector."""
        return None


@dataclass(frozen=True)
class HiddenAll(HiddenPolicy):
    def __str__(self) -> str:
        return "all"


@dataclass(frozen=True)
class HiddenNone(HiddenPolicy):
    def __str__(self) -> str:
        return "none"

    def layers(self) -> set[int]:
        return set()


@dataclass(frozen=True)
class HiddenSample(HiddenPolicy):
    n: int

    def __str__(self) -> str:
        return f"sample:{self.n}"

    def sample(self) -> int:
        return self.n


@dataclass(frozen=True)
class HiddenLayers(HiddenPolicy):
    chosen: frozenset[int]

    def __str__(self) -> str:
        return ",".join(str(x) for x in sorted(self.chosen))

    def layers(self) -> set[int]:
        return set(self.chosen)


# ---------------------------------------------------------------------------- explain
@dataclass(frozen=True)
class ExplainSet:
    """The ``--explain`` methods, in canonical order (:data:`EXPLAIN_METHODS`)."""

    methods: tuple[str, ...] = ()

    @staticmethod
    def parse(text: str | None) -> "ExplainSet":
        """``relevancy,rollout,...`` -> the set; ValueError on a typo."""
        if not text:
            return ExplainSet()
        want = {x.strip().lower() for x in text.split(",") if x.strip()}
        bad = sorted(want - set(EXPLAIN_METHODS))
        if bad:
            raise ValueError(f"--explain {text!r}: unknown method(s) {', '.join(bad)}; choose any of "
                             f"{','.join(EXPLAIN_METHODS)}")
        return ExplainSet(tuple(m for m in EXPLAIN_METHODS if m in want))

    def __contains__(self, method: str) -> bool:
        return method in self.methods

    def __iter__(self) -> Iterator[str]:
        return iter(self.methods)

    def __bool__(self) -> bool:
        return bool(self.methods)

    def __str__(self) -> str:
        return ",".join(self.methods)


# ---------------------------------------------------------------------------- the whole capture
@dataclass(frozen=True)
class Capture:
    """What a run stores; recorded once as ``runs.capture`` (and in every file's metadata)."""

    attention: AttentionPolicy = field(default_factory=lambda: AttentionPolicy.parse(DEFAULT_KEEP_ATTENTION))
    hidden: HiddenPolicy = field(default_factory=lambda: HiddenPolicy.parse(DEFAULT_KEEP_HIDDEN))
    explain: ExplainSet = field(default_factory=ExplainSet)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    random_weights: bool = False
    modules: tuple[str, ...] = ()  # --capture-modules name patterns (pipeline/extraction/modules.py)

    @staticmethod
    def from_options(keep_attention: str | None = None, keep_hidden: str | None = None,
                     explain: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     capture_modules: str | None = None) -> "Capture":
        """From the command line's text (None: the defaults); ValueError with one sentence."""
        return Capture(AttentionPolicy.parse(keep_attention or DEFAULT_KEEP_ATTENTION),
                       HiddenPolicy.parse(keep_hidden or DEFAULT_KEEP_HIDDEN), ExplainSet.parse(explain), chunk_size,
                       modules=parse_modules(capture_modules))

    @staticmethod
    def from_json(text: str | dict) -> "Capture":
        """From ``runs.capture``; ValueError (or TypeError) when it cannot be read back."""
        d = json.loads(text) if isinstance(text, str) else dict(text)
        extra = set(d) - {"keep_attention", "keep_hidden", "explain", "chunk_size", "random_weights",
                          "capture_modules"}
        if extra:
            raise TypeError(f"unknown capture field(s) {', '.join(sorted(extra))}")
        return Capture(AttentionPolicy.parse(d.get("keep_attention", DEFAULT_KEEP_ATTENTION)),
                       HiddenPolicy.parse(d.get("keep_hidden", DEFAULT_KEEP_HIDDEN)),
                       ExplainSet.parse(d.get("explain", "")), int(d.get("chunk_size", DEFAULT_CHUNK_SIZE)),
                       bool(d.get("random_weights", False)), parse_modules(d.get("capture_modules")))

    def to_json(self) -> str:
        d = {"chunk_size": self.chunk_size, "explain": str(self.explain), "keep_attention": str(self.attention),
             "keep_hidden": str(self.hidden), "random_weights": self.random_weights}
        if self.modules:  # only when asked: a run without it records (and resumes against) the same JSON as before
            d["capture_modules"] = ",".join(self.modules)
        return json.dumps(d, sort_keys=True)


def parse_modules(text: str | None) -> tuple[str, ...]:
    """``--capture-modules PATTERN[,PATTERN]`` -> the patterns, in order, each once; ValueError for an
    empty pattern such as ``a,,b`` or ``a..b``."""
    if not text:
        return ()
    out: list[str] = []
    for p in (x.strip() for x in text.split(",")):
        if not p or "" in p.split("."):
            raise ValueError(f"--capture-modules {text!r}: give module name patterns separated by commas, such as "
                             "model.language_model.layers.*.mlp (an empty name or segment is not a pattern)")
        if p not in out:
            out.append(p)
    return tuple(out)


def module_matches(pattern: str, name: str) -> bool:
    """Whether module ``name`` matches a ``--capture-modules`` (or ``vlatlas probe --source``) pattern:
    ``*`` (and any ``fnmatch`` wildcard) stays within one dotted segment, ``**`` spans any number of
    segments, none included."""
    return _match(pattern.split("."), name.split("."))


def _match(pat: list[str], segs: list[str]) -> bool:
    if not pat:
        return not segs
    if pat[0] == "**":
        return any(_match(pat[1:], segs[i:]) for i in range(len(segs) + 1))
    return bool(segs) and fnmatchcase(segs[0], pat[0]) and _match(pat[1:], segs[1:])
