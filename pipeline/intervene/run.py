"""The driver of ``vlatlas intervene``: an :class:`~pipeline.intervene.spec.InterventionSpec` over a run's
examples -> ``interventions`` rows, chunk by chunk, resumable, in this process or on Ray actors.

Everything is checked before any row is written: the run (it exists, its manifest is readable, it
has boxes when box regions are asked), the model (it loads; its streams, depth and heads fit the
spec), the explanations the regions kind ranks by. The run's own model runs over the run's own
examples, read from its manifest as extraction read them, in the run's chunks (``chunk_size`` of
its capture). A chunk's rows are one file, which appears whole; running the same intervention
again does only the chunks without a file (``--overwrite`` starts it anew). Mean ablation first
takes each head's mean output over the examples, saved beside the run's state so a resumed
intervention ablates with the same means.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lake.catalog import Catalog
from lake.commit import partition_rel, read_run_row, state_rel
from lake.queries import interventions as IQ
from lake.schema import INTERVENTIONS
from pipeline.capture_config import Capture
from pipeline.data import read_manifest
from pipeline.intervene.spec import InterventionError, InterventionSpec, chunk_of_file


@dataclass
class InterventionSummary:
    run: str
    key: str
    lake: str
    examples: int = 0
    skipped: int = 0
    resumed_chunks: int = 0
    rows: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        s = (f"intervention {self.key!r} on run {self.run!r}: {self.examples} examples in {self.seconds:.1f} s, "
             f"{self.rows} rows in {self.lake}")
        if self.resumed_chunks:
            s += f"; resumed after {self.resumed_chunks} finished chunks"
        if self.skipped:
            s += f"; {self.skipped} skipped (their image no longer reads)"
        return s


def intervene(lake, run: str, kind: str, *, device: str = "cpu", batch_size: int = 16, overwrite: bool = False,
              progress: bool = True, ray: str | None = None, ray_actors: int | None = None,
              ray_cpus: float | None = None, adapter=None, **options) -> InterventionSummary:
    """Run one intervention (``kind`` and ``options`` as ``vlatlas intervene``'s flags) over run ``run``'s
    examples and write its rows to ``interventions``; ``adapter``: the run's model already loaded."""
    spec = InterventionSpec.from_options(kind, **options)
    if batch_size < 1:
        raise InterventionError("--batch-size must be at least 1")
    t0 = time.perf_counter()
    cat = Catalog(lake, timeout_s=300)
    try:
        row = read_run_row(cat.store, run)
        if row is None:
            runs = ", ".join(sorted(cat.df("SELECT run FROM runs").run)) or "none"
            raise InterventionError(f"no run {run!r} in {cat.store.uri} (runs: {runs})")
        rows = _examples(cat, run, row, spec)
        summary = InterventionSummary(run, spec.key, str(cat.store.uri))
        plan = _plan_regions(cat, run, spec, rows) if spec.kind == "regions" else {}
        chunk_size = Capture.from_json(row["capture"]).chunk_size
        ex = _executor(row, device, ray, ray_actors, ray_cpus, adapter)
        try:
            work = ex.call(_work, spec, run, plan)  # checks the spec against the model: nothing written yet
            work = replace(work, lake=cat.store, batch_size=batch_size)
            folder = partition_rel(INTERVENTIONS, {"run": run})
            if overwrite:
                for rel in _files(cat.store, folder, spec):
                    cat.store.delete(rel)
                if spec.kind == "heads":
                    cat.store.delete(_means_rel(run, spec, _sites(work)))
            done = {chunk_of_file(r.rsplit("/", 1)[-1], spec.digest) for r in _files(cat.store, folder, spec)}
            chunks: dict[int, list] = {}
            for r in rows:
                chunks.setdefault(r.example_id // chunk_size, []).append(r)
            todo = {c: rs for c, rs in chunks.items() if c not in done}
            summary.resumed_chunks = len(chunks) - len(todo)
            if todo and spec.kind == "heads" and spec.ablate == "mean":
                work = replace(work, means=_means(cat.store, run, spec, ex, work, rows, progress))
            _run(ex, work, todo, rows, summary, progress)
        finally:
            ex.close()
        summary.rows = sum(cat.store.parquet_rows(r) for r in _files(cat.store, folder, spec))
        summary.examples = sum(len(rs) for rs in chunks.values()) - summary.skipped
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        cat.close()


def _examples(cat, run: str, row: dict, spec: InterventionSpec) -> list:
    ids = set(IQ.run_example_ids(cat, run))
    if spec.limit is not None:
        ids = {i for i in ids if i < spec.limit}
    if not ids:
        raise InterventionError(f"run {run!r} has no examples" + (f" below --limit {spec.limit}" if spec.limit else ""))
    manifest = Path(row.get("manifest") or "")
    if not manifest.is_file():
        raise InterventionError(f"run {run!r}'s manifest {str(manifest)!r} is missing: an intervention runs the "
                                "run's model on the run's own images again")
    rows = [r for r in read_manifest(manifest)[0] if r.example_id in ids]
    if not rows:
        raise InterventionError(f"run {run!r}'s manifest {str(manifest)!r} no longer holds its examples")
    if spec.kind == "regions" and spec.regions == "boxes" and not any(r.boxes for r in rows):
        raise InterventionError(f"--regions boxes: run {run!r}'s examples have no boxes (the manifest's "
                                "`boxes` column); rank regions by an explanation instead (--regions ranked)")
    return rows


def _plan_regions(cat, run: str, spec: InterventionSpec, rows: list) -> dict:
    from pipeline.intervene.rank import choose_methods, rankings, unit_stream

    head = IQ.best_grounding_head(cat, run)  # a group-by over the run's head statistics: read once
    stream = unit_stream(cat, run, head)
    if spec.regions == "boxes":
        return {"unit_stream": stream}
    methods = choose_methods(cat, run, spec.methods, head)
    return {"unit_stream": stream, "methods": tuple(methods),
            "rankings": rankings(cat, run, [m for m in methods if m != "random"], [r.example_id for r in rows], head)}


def _work(adapter, spec: InterventionSpec, run: str, plan: dict):
    """The chunks' shared work, checked against the model (runs where the model is: here or on an actor)."""
    from pipeline.intervene.chunk import InterventionWork, head_sites, knockout_windows
    from pipeline.intervene.engine import scorer_for

    scorer_for(adapter)  # refuses a model whose answer has no score
    w = InterventionWork(lake="", run=run, spec=spec, device=adapter.device)
    if spec.kind == "heads":
        exact, est = head_sites(adapter, spec)
        return replace(w, sites=tuple(exact), estimate_sites=tuple(est))
    if spec.kind == "knockout":
        return replace(w, windows=tuple(knockout_windows(adapter, spec)))
    if spec.replace == "embedding":
        from pipeline.intervene.engine import first_block

        first_block(adapter, plan["unit_stream"])
    return replace(w, unit_stream=plan["unit_stream"], methods=plan.get("methods", ()),
                   rankings=plan.get("rankings", {}))


def _files(store, folder: str, spec: InterventionSpec) -> list[str]:
    return [r for r in store.list(folder, recursive=False)
            if chunk_of_file(r.rsplit("/", 1)[-1], spec.digest) is not None]


def _sites(work) -> list[tuple[str, int]]:
    """The (stream, layer) whose heads a heads intervention ablates or estimates."""
    return sorted({s[:2] for s in work.sites} | set(work.estimate_sites))


def _means_rel(run: str, spec: InterventionSpec, sites: list) -> str:
    """Where the heads' means of an intervention are saved: named by the sites and examples they cover
    (not by the whole key), so an exact and an estimated ablation of the same heads share them."""
    import hashlib
    import json

    what = json.dumps([sorted([list(x) for x in sites]), spec.streams, spec.limit])
    return f"{state_rel(run)}/intervene-means-{hashlib.sha1(what.encode()).hexdigest()[:16]}.npz"


def _means(store, run: str, spec: InterventionSpec, ex, work, rows: list, progress: bool) -> dict:
    """Each head's mean output over the intervention's examples: read back when an earlier attempt saved
    them, else computed (one pass) and saved."""
    from tqdm import tqdm

    sites = _sites(work)
    rel = _means_rel(run, spec, sites)
    if store.is_file(rel):
        with np.load(io.BytesIO(store.read_bytes(rel))) as z:
            saved = {(k.split("|")[0], int(k.split("|")[1])): z[k] for k in z.files}
        if set(saved) >= set(sites):
            return saved
    bar = tqdm(total=len(rows), unit="ex", desc="head means", disable=not progress, dynamic_ncols=True)
    try:
        means = ex.call(_head_means, rows, sites, bar if not hasattr(ex, "actors") else None)
    finally:
        bar.close()
    buf = io.BytesIO()
    np.savez(buf, **{f"{s}|{layer}": v for (s, layer), v in means.items()})
    store.write_bytes(rel, buf.getvalue())
    return means


def _head_means(adapter, rows, sites, bar):
    from pipeline.intervene.chunk import head_means

    return head_means(adapter, rows, sites, adapter.device, bar)


def _run(ex, work, todo: dict, rows: list, summary: InterventionSummary, progress: bool) -> None:
    from tqdm import tqdm

    from pipeline.extraction.summary import Summary

    total = len(rows)
    bar = tqdm(total=total, initial=total - sum(len(r) for r in todo.values()), unit="ex",
               desc=f"intervene {work.spec.kind}", disable=not progress, dynamic_ncols=True)
    s = Summary(work.run, "")
    try:
        ex.run(work, todo, bar, s)
    finally:
        bar.close()
    summary.skipped = s.skipped


def _executor(row: dict, device: str, ray, ray_actors, ray_cpus, adapter):
    from pipeline.extraction.executor import LocalExecutor, RayExecutor
    from pipeline.extraction.spec import RaySpec, RunSpec

    spec = RunSpec(row["model"], Path(row.get("manifest") or "."), "", row["run"], device=device,
                   dtype=row.get("dtype") or "float32", revision=row.get("revision"), progress=False,
                   ray=None if ray is None else RaySpec(ray, ray_actors, 1.0 if ray_cpus is None else ray_cpus))
    if spec.ray is not None:
        return RayExecutor(spec)
    return LocalExecutor(adapter) if adapter is not None else LocalExecutor.load(spec)
