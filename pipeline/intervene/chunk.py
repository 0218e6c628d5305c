"""The chunk function of ``vlatlas intervene``: a chunk of a run's examples -> one file of ``interventions`` rows.

It runs in the driver's process or on a Ray actor (``pipeline.extraction.executor``), with the model
the actor holds. Each example is read and encoded as extraction does (``extraction.inputs``), scored
once clean (:class:`~pipeline.intervene.engine.Scorer`), then under every variant the kind asks for,
``batch_size`` variants a forward pass. The chunk's rows are written as one file, atomically
(``interventions/run=<run>/iv-<digest>-<chunk>.parquet``): the file is the chunk's commit, so a
resumed intervention redoes only the chunks without one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from lake.commit import partition_rel
from lake.schema import INTERVENTIONS, ROLES_SPECIAL
from lake.store import open_store
from lake.writer import write_table
from pipeline.data import Row
from pipeline.extraction.inputs import prepare_batch, to_device
from pipeline.intervene.engine import (CROSS_QUERIES, Base, EmbeddingReplace, HeadAblation, HeadRecorder, Knockout,
                                       TokenSets, ablatable_streams, base_rows, head_count, repeat_inputs, scorer_for,
                                       stream_layers)
from pipeline.intervene.spec import InterventionError, InterventionSpec, chunk_file
from pipeline.models.base import GEN_START, map_inputs


@dataclass(frozen=True)
class InterventionWork:
    """What every chunk of one intervention shares.

    ``sites``: heads kind, the exact ablations ``(stream, layer, head)``; ``estimate_sites``: the
    ``(stream, layer)`` whose heads attribution patching estimates; ``means``: ``{(stream, layer):
    [heads, d]}`` each head's mean output (None: ablate to zero); ``windows``: knockout kind,
    ``(stream, layers, from, to)`` candidates (a stream where an example has no such edges is
    skipped for it); ``unit_stream``: regions kind, the stream whose image tokens are removed;
    ``rankings``: ``{example_id: {method: [token_idx, best first]}}``."""

    lake: object
    run: str
    spec: InterventionSpec
    device: str = "cpu"
    batch_size: int = 16
    sites: tuple = ()
    estimate_sites: tuple = ()
    means: dict | None = None
    windows: tuple = ()
    unit_stream: str | None = None
    methods: tuple = ()
    rankings: dict = field(default_factory=dict)

    def run_on(self, adapter, device: str, chunk: int, rows: list[Row], bar) -> dict:
        """Run one chunk with ``adapter`` (on ``device``); its counts for the driver's summary."""
        from dataclasses import replace

        n, skipped = run_chunk(adapter, replace(self, device=device), chunk, rows, bar)
        return {"chunk": chunk, "extracted": n, "skipped": skipped, "truncated": 0, "errors": []}


def run_chunk(adapter, work: InterventionWork, chunk: int, rows: list[Row], bar) -> tuple[int, int]:
    """Every example of the chunk under every variant; write the chunk's file. Returns (examples done,
    examples skipped: their image no longer reads)."""
    scorer = scorer_for(adapter)
    out: list[dict] = []
    done = skipped = 0
    for row in rows:
        item = prepare_batch(adapter, [row], set(), thumbnail=lambda li: b"")
        if not item["rows"]:
            skipped += 1
            bar.update(1)
            continue
        inputs = map_inputs(item["inputs"], lambda v: to_device(v, work.device))
        base = scorer.base(inputs, item["images"][0], row.boxes, row.example_id)
        out += example_rows(scorer, work, base, row, item["images"][0])
        done += 1
        bar.update(1)
    store = open_store(work.lake)
    rel = f"{partition_rel(INTERVENTIONS, {'run': work.run})}/{chunk_file(work.spec.digest, chunk)}"
    df = pd.DataFrame(out, columns=[f.name for f in INTERVENTIONS.schema])
    write_table(store, rel, INTERVENTIONS, pa.Table.from_pandas(df, preserve_index=False),
                {"vlatlas.run": work.run, "vlatlas.intervention": work.spec.key})
    return done, skipped


def _row(work: InterventionWork, base: Base, metric: str, *, method: str, stream=None, layer=None, head=None,
         spec: dict, fraction=None, after: float, answer=None, estimated=False) -> dict:
    changed = None if answer is None or base.answer is None else (
        " ".join(answer.lower().split()) != " ".join(base.answer.lower().split()))
    return {"intervention": work.spec.key, "example_id": base.example_id, "kind": work.spec.kind, "method": method,
            "stream": stream, "layer": layer, "head": head, "spec": json.dumps(spec), "fraction": fraction,
            "metric": metric, "metric_before": base.metric, "metric_after": float(after),
            "answer_after": None if estimated else answer, "changed": None if estimated else changed,
            "estimated": estimated}


def _batches(items: list, n: int):
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + n]


def example_rows(scorer, work: InterventionWork, base: Base, row: Row, image) -> list[dict]:
    kind = work.spec.kind
    if kind == "heads":
        return head_rows(scorer, work, base)
    if kind == "knockout":
        return knockout_rows(scorer, work, base)
    return region_rows(scorer, work, base, row, image)


# -- heads -----------------------------------------------------------------------------------------------
def _means(work: InterventionWork, device) -> dict | None:
    if work.means is None:
        return None
    return {k: torch.as_tensor(v, device=device) for k, v in work.means.items()}


def head_rows(scorer, work: InterventionWork, base: Base) -> list[dict]:
    a = scorer.adapter
    means = _means(work, a.device)
    method = work.spec.ablate
    out = []
    for batch in _batches(list(work.sites), work.batch_size):
        inputs = repeat_inputs(base_rows(scorer, base), len(batch))
        with HeadAblation(a, list(batch), means)():
            metric, answers = scorer.after(base, inputs, len(batch))
        for (stream, layer, head), m, ans in zip(batch, metric, answers):
            out.append(_row(work, base, scorer.metric, method=method, stream=stream, layer=layer, head=head,
                            spec={"ablate": method}, after=m, answer=ans))
    if work.estimate_sites:
        est = estimate_heads(scorer, base, list(work.estimate_sites), means)
        for (stream, layer), effects in est.items():
            for head, e in enumerate(effects):
                out.append(_row(work, base, scorer.metric, method=method, stream=stream, layer=layer, head=head,
                                spec={"ablate": method, "estimate": "attribution patching"},
                                after=base.metric + e, estimated=True))
    return out


def estimate_heads(scorer, base: Base, sites: list[tuple[str, int]], means: dict | None) -> dict:
    """Attribution patching: each head's ablation effect to first order, ``Σ_s ∇_{z_h(s)} m · (z̃_h - z_h(s))``
    over the positions ``s`` of the scored pass, where ``z_h`` is head ``h``'s output (its slice of the
    output projection's input), ``z̃_h`` its mean (or 0) and ``m`` the score. One forward and one
    backward pass for every head of ``sites``. Returns ``{(stream, layer): [effect per head]}``."""
    a = scorer.adapter
    rec = HeadRecorder(a, sites, grad=True)
    with rec():
        out = scorer.forward(base.inputs, base.example_id, 1, grad=True)
        score = scorer.score_tensor(base, out).sum()
    score.backward()
    a.model.zero_grad(set_to_none=True)
    result = {}
    for site in sites:
        x = rec.seen[site]
        g = x.grad
        if g is None:  # the score does not depend on this layer (e.g. after the read-out token)
            g = torch.zeros_like(x)
        heads = head_count(a, site[0])
        d = x.shape[-1] // heads
        xs = x.detach().reshape(*x.shape[:-1], heads, d).float()  # [1, ..., heads, d]
        gs = g.reshape(*g.shape[:-1], heads, d).float()
        target = torch.zeros_like(xs) if means is None else means[site].float().to(xs.device).expand_as(xs)
        eff = (gs * (target - xs)).sum(-1)  # [1, ..., heads]
        result[site] = eff.reshape(-1, heads).sum(0).tolist()
    return result


def head_means(adapter, examples: list[Row], sites: list[tuple[str, int]], device: str, bar=None) -> dict:
    """Each head's mean output over ``examples`` at ``sites``: ``{(stream, layer): [heads, d]}`` float32
    (numpy), averaged over every position of every example's scored pass."""
    scorer = scorer_for(adapter)
    sums: dict = {}
    count: dict = {}
    for row in examples:
        item = prepare_batch(adapter, [row], set(), thumbnail=lambda li: b"")
        if item["rows"]:
            inputs = map_inputs(item["inputs"], lambda v: to_device(v, device))
            rec = HeadRecorder(adapter, sites)
            with rec():  # the scored pass is the base's last forward (a decoder generates its answer first)
                scorer.base(inputs, item["images"][0], row.boxes, row.example_id)
            for site in sites:
                x = rec.seen[site].detach().float()
                flat = x.reshape(-1, x.shape[-1])
                sums[site] = sums.get(site, 0) + flat.sum(0)
                count[site] = count.get(site, 0) + flat.shape[0]
        if bar is not None:
            bar.update(1)
    out = {}
    for site in sites:
        if site not in sums:
            raise InterventionError("--ablate mean: none of the run's examples could be read to take the heads' means")
        heads = head_count(adapter, site[0])
        out[site] = (sums[site] / count[site]).reshape(heads, -1).cpu().numpy().astype(np.float32)
    return out


def head_sites(adapter, spec: InterventionSpec) -> tuple[list[tuple[str, int, int]], list[tuple[str, int]]]:
    """(exact ablations ``(stream, layer, head)``, estimated ``(stream, layer)``) for a heads spec."""
    streams = list(spec.streams) or ablatable_streams(adapter)
    can = ablatable_streams(adapter)
    bad = [s for s in streams if s not in can]
    if bad:
        raise InterventionError(f"heads: stream(s) {', '.join(bad)} of {adapter.family} cannot be ablated; "
                                f"these can: {', '.join(can) or 'none'}")
    exact, est = [], []
    for s in streams:
        L, H = stream_layers(adapter, s), head_count(adapter, s)
        if spec.heads:
            for layer, head in spec.heads:
                if layer >= L or head >= H:
                    raise InterventionError(f"--heads {layer}.{head}: the {s} stream has layers 0..{L - 1} and "
                                            f"heads 0..{H - 1}")
                exact.append((s, layer, head))
        else:
            for layer in spec.layers:
                if layer >= L:
                    raise InterventionError(f"--layers {layer}: the {s} stream has layers 0..{L - 1}")
            if not spec.estimate:
                exact += [(s, layer, h) for layer in (spec.layers or range(L)) for h in range(H)]
        if spec.estimate:
            est += [(s, layer) for layer in (spec.layers or range(L))]
    return exact, est


# -- knockout ----------------------------------------------------------------------------------------------
def token_sets(scorer, base: Base) -> dict[str, TokenSets]:
    """The example's token sets (text, image, generated, last) in each stream, by sequence position."""
    a = scorer.adapter
    layout = base.layout
    table = layout.tokens[0].to_pandas()
    readout = {}
    if hasattr(a, "relevancy_rows") and base.prompt is None:
        readout = {s: int(v[0]) for s, v in a.relevancy_rows(base.inputs).items()}

    def positions(stream: str) -> tuple[pd.DataFrame, np.ndarray]:
        sl = layout.streams[stream]
        n = int(sl.valid[0].sum())
        rows = table.iloc[sl.token_offset[0]:sl.token_offset[0] + n]
        return rows, sl.seq_index[0, :n].cpu().numpy()

    def sets_of(stream: str) -> dict[str, np.ndarray]:
        rows, seq = positions(stream)
        size = int(seq.max()) + 1 if len(seq) else 0
        role, mod = rows.role.to_numpy(), rows.modality.to_numpy()
        # every image token, its [CLS] included: a knockout that left the image's summary token open
        # would let the image through (regions, by contrast, remove only tokens with a box)
        named = {"text": (mod == "text") & ~np.isin(role, ["pad", "generated"]),
                 "image": (mod == "image") & (role != "pad"),
                 "generated": role == "generated"}
        out = {}
        for name, m in named.items():
            v = np.zeros(size, bool)
            v[seq[m]] = True
            out[name] = v
        last = np.zeros(size, bool)
        if base.prompt is not None:  # a decoder: the last prompt token
            prompt = seq[named["text"]]
            if len(prompt):
                last[prompt.max()] = True
        elif stream in readout and readout[stream] < size:
            last[readout[stream]] = True
        out["last"] = last
        return out

    gen_from = int(base.inputs.state[GEN_START][0]) if base.prompt is not None else None
    result = {}
    for stream in layout.streams:
        if stream not in a.paths:
            continue  # a key set spanning streams (Idefics2's perceiver keys), not a stream of modules
        q = sets_of(CROSS_QUERIES.get(stream, stream)) if stream in layout.keys else sets_of(stream)
        if stream in layout.keys:
            q["last"] = sets_of(CROSS_QUERIES.get(stream, stream))["last"]
        k = sets_of(layout.keys[stream]) if stream in layout.keys else q
        result[stream] = TokenSets(q, k, gen_from if stream == "lm" else None)
    return result


def knockout_rows(scorer, work: InterventionWork, base: Base) -> list[dict]:
    a = scorer.adapter
    sets = token_sets(scorer, base)
    variants = []
    for stream, layers, src, dst in work.windows:
        ts = sets.get(stream)
        if ts is None:
            continue
        has_q = ts.queries.get(src, np.zeros(0, bool)).any() or (src == "generated" and ts.generated_from is not None)
        if has_q and ts.keys.get(dst, np.zeros(0, bool)).any():
            variants.append((stream, tuple(layers), src, dst))
    out = []
    cross = dict(base.layout.keys)
    for batch in _batches(variants, work.batch_size):
        inputs = repeat_inputs(base_rows(scorer, base), len(batch))
        with Knockout(a, list(batch), sets, cross)():
            metric, answers = scorer.after(base, inputs, len(batch))
        for (stream, layers, src, dst), m, ans in zip(batch, metric, answers):
            out.append(_row(work, base, scorer.metric, method=f"{src}->{dst}", stream=stream, layer=layers[0],
                            spec={"from": src, "to": dst, "layers": list(layers)}, after=m, answer=ans))
    return out


def knockout_windows(adapter, spec: InterventionSpec) -> list[tuple[str, tuple[int, ...], str, str]]:
    """Every (stream, window, from, to) the spec asks for, over the streams that can hold such edges."""
    streams = list(spec.streams) or [s for s in adapter.paths if s in adapter.configs]
    out = []
    for s in streams:
        if s not in adapter.paths or s not in adapter.configs:
            raise InterventionError(f"knockout: {adapter.family} has no stream {s!r}; it has "
                                    f"{', '.join(p for p in adapter.paths if p in adapter.configs)}")
        L = stream_layers(adapter, s)
        if spec.window > L:
            raise InterventionError(f"--window {spec.window}: the {s} stream has {L} layers")
        for pair in spec.sets:
            src, dst = pair.split("->")
            out += [(s, tuple(range(l0, l0 + spec.window)), src, dst) for l0 in range(L - spec.window + 1)]
    return out


# -- regions -----------------------------------------------------------------------------------------------
@dataclass
class Units:
    """The image tokens an example's regions are made of, in the unit stream: token_idx, position in
    the stream's sequence, box in original pixels."""

    token_idx: np.ndarray
    seq: np.ndarray
    boxes: np.ndarray  # [n, 4]


def units_of(base: Base, stream: str) -> Units:
    layout = base.layout
    if stream not in layout.streams:
        raise InterventionError(f"regions: the model has no stream {stream!r}")
    table = layout.tokens[0].to_pandas()
    sl = layout.streams[stream]
    n = int(sl.valid[0].sum())
    off = sl.token_offset[0]
    rows = table.iloc[off:off + n].reset_index(drop=True)
    seq = sl.seq_index[0, :n].cpu().numpy()
    keep = ((rows.modality == "image") & ~rows.role.isin(ROLES_SPECIAL) & rows.x0.notna()).to_numpy()
    return Units(np.arange(off, off + n)[keep], seq[keep],
                 rows.loc[keep, ["x0", "y0", "x1", "y1"]].to_numpy(np.float64))


def paint(image, boxes: np.ndarray):
    """``image`` with every box filled with the image's mean colour (pixels whose area the box touches)."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB")).copy()
    mean = arr.reshape(-1, 3).mean(0).round().astype(arr.dtype)
    H, W = arr.shape[:2]
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
        c1, r1 = min(W, int(math.ceil(x1))), min(H, int(math.ceil(y1)))
        arr[r0:r1, c0:c1] = mean
    return Image.fromarray(arr)


def region_variants(work: InterventionWork, base: Base, row: Row, units: Units) -> list[tuple[dict, np.ndarray]]:
    """(row fields, the units removed: a bool mask over ``units``) of every variant."""
    n = len(units.token_idx)
    out = []
    if work.spec.regions == "boxes":
        cx = (units.boxes[:, 0] + units.boxes[:, 2]) / 2
        cy = (units.boxes[:, 1] + units.boxes[:, 3]) / 2
        for i, b in enumerate(row.boxes or []):
            x0, y0, x1, y1 = (float(c) for c in b["box"])
            m = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
            out.append(({"method": "box", "fraction": float(m.mean()) if n else 0.0,
                         "spec": {"box": i, "label": b.get("label"), "tokens": units.token_idx[m].tolist()}}, m))
        return out
    ranks = work.rankings.get(base.example_id, {})
    for method in work.methods:
        order = _order(ranks.get(method), units, method, base.example_id)
        for curve in ("deletion", "insertion"):
            for p in work.spec.fractions:
                k = int(round(p * n))
                m = np.zeros(n, bool)
                if curve == "deletion":
                    m[order[:k]] = True
                else:
                    m[order[k:]] = True
                out.append(({"method": method, "fraction": float(p),
                             "spec": {"curve": curve, "fraction": float(p), "removed": int(m.sum())}}, m))
    return out


def _order(ranking, units: Units, method: str, example_id: int) -> np.ndarray:
    """Positions in ``units``, best first: the method's ranking (token_idx), then the rest by token_idx;
    ``random``: a permutation seeded by the example."""
    n = len(units.token_idx)
    if method == "random":
        return np.random.default_rng(example_id).permutation(n)
    where = {int(t): i for i, t in enumerate(units.token_idx)}
    first = [where[int(t)] for t in (ranking or []) if int(t) in where]
    seen = set(first)
    return np.array(first + [i for i in range(n) if i not in seen], dtype=np.int64)


def region_rows(scorer, work: InterventionWork, base: Base, row: Row, image) -> list[dict]:
    a = scorer.adapter
    units = units_of(base, work.unit_stream)
    variants = region_variants(work, base, row, units)
    out = []
    for batch in _batches(variants, work.batch_size):
        if work.spec.replace == "pixels":
            images = [paint(image, units.boxes[m]) for _, m in batch]
            inputs = scorer.encode(base, row.text, images)
            metric, answers = scorer.after(base, inputs, len(batch))
        else:
            inputs = repeat_inputs(base_rows(scorer, base), len(batch))
            with EmbeddingReplace(a, work.unit_stream, [units.seq[m].tolist() for _, m in batch],
                                  units.seq.tolist())():
                metric, answers = scorer.after(base, inputs, len(batch))
        for (f, _), m, ans in zip(batch, metric, answers):
            out.append(_row(work, base, scorer.metric, method=f["method"], spec={**f["spec"], "replace": work.spec.replace,
                                                                                 "stream": work.unit_stream},
                            fraction=f["fraction"], after=m, answer=ans))
    return out
