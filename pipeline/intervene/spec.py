"""What one ``vlatlas intervene`` was asked to do: :class:`InterventionSpec`, torch-free.

Built once from the command line (or :func:`pipeline.intervene.run.intervene`'s keywords) by
:meth:`InterventionSpec.from_options`, which checks every option that needs no model; what needs
the run (its streams, depth, boxes, stored explanations) is checked by ``pipeline.intervene.run``
before anything is written. ``key`` names the intervention's rows in the lake: running the same
intervention again resumes it, chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

KINDS = ("heads", "knockout", "regions")
ABLATIONS = ("mean", "zero")
# knockout: attention edges from one token set (queries) to another (keys); ``last`` is the token the
# answer is read from (a decoder's last prompt token; an encoder's [CLS] or pooled token); ``image`` holds
# every image token, the image's [CLS] included
SETS = ("text->image", "generated->image", "image->text", "last->image")
REGIONS = ("ranked", "boxes")
# how image tokens are ranked for the deletion and insertion curves (``random``: a seeded baseline)
METHODS = ("attention", "rollout", "relevancy", "value", "random")
REPLACE = ("pixels", "embedding")
FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
CURVES = ("deletion", "insertion")


class InterventionError(ValueError):
    """An intervention that cannot be run as asked (one sentence; nothing is written)."""


def _ints(text: str | None, what: str) -> tuple[int, ...]:
    """``"0,2-4"`` -> (0, 2, 3, 4); None or "all" -> () (all)."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return ()
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out += range(a, b + 1)
            else:
                out.append(int(part))
        except ValueError:
            raise InterventionError(f"--{what} {text!r}: give numbers and ranges such as 0,2-4") from None
    if any(x < 0 for x in out):
        raise InterventionError(f"--{what} {text!r}: layers and heads count from 0")
    return tuple(sorted(set(out)))


def _heads(text: str | None) -> tuple[tuple[int, int], ...]:
    """``"3.1,2.0"`` -> ((2, 0), (3, 1)): heads as layer.head."""
    if text is None or not str(text).strip():
        return ()
    out = []
    for part in str(text).split(","):
        try:
            layer, head = (int(x) for x in part.strip().split("."))
        except ValueError:
            raise InterventionError(f"--heads {text!r}: name heads as LAYER.HEAD, e.g. 3.1,2.0") from None
        if layer < 0 or head < 0:
            raise InterventionError(f"--heads {text!r}: layers and heads count from 0")
        out.append((layer, head))
    return tuple(sorted(set(out)))


def _names(text, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text is None:
        return ()
    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise InterventionError(f"--{what}: unknown {', '.join(map(repr, bad))}; use {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def _choice(value, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise InterventionError(f"--{what} {value!r}: use one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class InterventionSpec:
    """One intervention over a run's examples.

    kind : ``heads`` (each head's output replaced by its mean over the examples, or zero),
        ``knockout`` (attention edges between two token sets blocked in a window of ``window``
        layers sliding over the depth) or ``regions`` (image tokens' pixels replaced by the
        image's mean colour, or their embeddings by the mean image-token embedding).
    streams : the streams intervened on (empty: every stream the kind applies to).
    layers, heads : heads kind: the layers (empty: all) and, instead, single heads (layer, head).
    estimate : heads kind: attribution patching for every head of the streams (one forward and one
        backward pass an example); exact ablation then runs only for ``heads``.
    sets : knockout kind: the edges blocked (``SETS``).
    regions : ``ranked`` (the top fraction of image tokens by each method: deletion and insertion
        curves) or ``boxes`` (each ground-truth box's image tokens).
    limit : only the run's examples with example_id < limit.
    """

    kind: str
    ablate: str = "mean"
    streams: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    heads: tuple[tuple[int, int], ...] = ()
    estimate: bool = False
    window: int = 1
    sets: tuple[str, ...] = ("text->image",)
    regions: str = "ranked"
    methods: tuple[str, ...] = ()  # empty: every explanation the run holds, and random
    fractions: tuple[float, ...] = FRACTIONS
    replace: str = "pixels"
    limit: int | None = None

    OPTIONS = ("ablate", "streams", "layers", "heads", "estimate", "window", "sets", "regions", "methods",
               "fractions", "replace", "limit")

    @staticmethod
    def from_options(kind: str, **options) -> "InterventionSpec":
        """The spec of ``vlatlas intervene``'s options (keywords named as the flags); one sentence
        (:class:`InterventionError`) for a bad one."""
        unknown = sorted(set(options) - set(InterventionSpec.OPTIONS))
        if unknown:
            raise TypeError(f"unknown intervention option(s): {', '.join(unknown)}")
        o = {k: v for k, v in options.items() if v is not None}
        kind = _choice(kind, KINDS, "kind")
        fractions = FRACTIONS
        if "fractions" in o:
            try:
                fractions = tuple(sorted({round(float(x), 6) for x in str(o["fractions"]).split(",")}))
            except ValueError:
                raise InterventionError(f"--fractions {o['fractions']!r}: give numbers from 0 to 1, "
                                        "e.g. 0,0.1,0.5,1") from None
            if not fractions or fractions[0] < 0 or fractions[-1] > 1:
                raise InterventionError(f"--fractions {o['fractions']!r}: fractions lie between 0 and 1")
        window = int(o.get("window", 1))
        if window < 1:
            raise InterventionError("--window must be at least 1 layer")
        limit = o.get("limit")
        if limit is not None and int(limit) < 1:
            raise InterventionError("--limit must be at least 1")
        streams = tuple(dict.fromkeys(s.strip() for s in str(o.get("streams", "")).split(",") if s.strip()))
        spec = InterventionSpec(
            kind, ablate=_choice(o.get("ablate", "mean"), ABLATIONS, "ablate"), streams=streams,
            layers=_ints(o.get("layers"), "layers"), heads=_heads(o.get("heads")), estimate=bool(o.get("estimate")),
            window=window, sets=_names(o.get("sets", "text->image"), SETS, "sets") or ("text->image",),
            regions=_choice(o.get("regions", "ranked"), REGIONS, "regions"),
            methods=_names(o.get("methods"), METHODS, "methods"), fractions=fractions,
            replace=_choice(o.get("replace", "pixels"), REPLACE, "replace"),
            limit=None if limit is None else int(limit))
        if spec.heads and spec.layers:
            raise InterventionError("--heads names single heads; --layers all heads of some layers: give one of them")
        return spec

    @property
    def key(self) -> str:
        """The intervention's name in the lake (``interventions.intervention``): the kind and the options
        that change its rows."""
        lim = "all" if self.limit is None else str(self.limit)
        streams = ",".join(self.streams) or "all"
        if self.kind == "heads":
            which = ",".join(f"{a}.{b}" for a, b in self.heads) if self.heads else (
                ",".join(map(str, self.layers)) or "all")
            est = " estimate" if self.estimate else ""
            return f"heads {self.ablate} streams={streams} {'heads' if self.heads else 'layers'}={which}{est} limit={lim}"
        if self.kind == "knockout":
            return f"knockout {','.join(self.sets)} window={self.window} streams={streams} limit={lim}"
        if self.regions == "boxes":
            return f"regions boxes replace={self.replace} limit={lim}"
        methods = ",".join(self.methods) or "held"
        return (f"regions ranked methods={methods} fractions={','.join(f'{f:g}' for f in self.fractions)} "
                f"replace={self.replace} limit={lim}")

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.key.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"key": self.key, **{k: getattr(self, k) for k in ("kind",) + self.OPTIONS}})


def chunk_file(digest: str, chunk: int) -> str:
    """The file (in ``interventions/run=<run>/``) of one chunk of one intervention's rows."""
    return f"iv-{digest}-{chunk:06d}.parquet"


def chunk_of_file(name: str, digest: str) -> int | None:
    """The chunk of an intervention file name of ``digest`` (None for another's, or a temp file)."""
    prefix = f"iv-{digest}-"
    if name.startswith(prefix) and name.endswith(".parquet"):
        try:
            return int(name[len(prefix):-len(".parquet")])
        except ValueError:
            return None
    return None
