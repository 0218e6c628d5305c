"""The driver of ``vlatlas extract``: a :class:`~pipeline.extraction.spec.RunSpec` and an executor
-> committed chunks, progress, summary.

Everything about the arguments is checked (options, manifest columns, run name, the model) before
any example is processed. The driver writes the ``runs`` row, deletes what an interrupted attempt
left, plans the chunks (resuming: only those without a done marker), hands them to the executor
(:mod:`pipeline.extraction.executor`: this process or a Ray cluster, the same chunk function), and
at the end marks the run complete. Stopping (Ctrl-C, kill -9, even with the writer mid-file) loses
at most the chunks not yet marked done, and running the same command again resumes where it
stopped, with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from lake.store import Store
from lake.writer import LakeWriter
from pipeline.capture import ModuleOutputError
from pipeline.data import read_manifest
from pipeline.extraction.chunk import ChunkWork
from pipeline.extraction.executor import Executor, executor_for
from pipeline.extraction.modules import match_modules
from pipeline.extraction.plan import default_workers, hidden_vector_examples, plan_run
from pipeline.extraction.rows import runs_row
from pipeline.extraction.spec import RunSpec
from pipeline.extraction.summary import Summary


class RunConflict(Exception):
    """A run of that name exists with another model, manifest or capture configuration."""


def extract(model: str, data: str | Path, lake: str | Path, run: str, *, adapter=None, **options) -> Summary:
    """Run ``model`` over the manifest ``data`` and write run ``run`` into ``lake`` (a folder or an
    object-store URI such as ``s3://bucket/prefix``).

    ``options`` are ``vlatlas extract``'s, named as its flags (``batch_size``, ``keep_attention``,
    ``explain``, ``ray``, ``ray_actors`` …: :attr:`RunSpec.OPTIONS`); ``adapter``: a model already
    loaded (then ``model`` only names it). Bad rows are recorded in ``errors`` and skipped; running
    the same command again resumes an interrupted run.
    """
    return run_spec(RunSpec.from_options(model, data, lake, run, **options), adapter)


def run_spec(spec: RunSpec, adapter=None) -> Summary:
    """Carry out ``spec`` (see :func:`extract`)."""
    summary = Summary(spec.run, "")
    rows, manifest_errors = read_manifest(spec.data)
    if spec.limit is not None:  # manifest errors are kept whole: they describe the manifest
        rows = [r for r in rows if r.example_id < spec.limit]
    store = Store(spec.lake)
    if spec.ray is not None and store.local:
        store.ensure_dir()  # before the actors start: every node writes into it
    ex = executor_for(spec, adapter)
    try:
        info = ex.describe()
        check_model(spec, info)
        return _run(spec, ex, info, (rows, manifest_errors), summary)
    finally:
        ex.close()


def check_model(spec: RunSpec, info: dict) -> None:
    """What the capture asks of the model, against what the model says of itself (``info``:
    :func:`pipeline.extraction.chunk.describe`); ValueError with one sentence."""
    methods = spec.capture.explain
    if "relevancy" in methods and info.get("relevancy"):
        raise ValueError(f"{info['relevancy']}; rollout, value, sinks (and lens for decoders) are available")
    if "lens" in methods and not info.get("lens"):
        from pipeline.models import families_with

        raise ValueError(f"--explain lens reads hidden states through a language model's head: it needs a decoder "
                         f"LVLM ({', '.join(families_with('lens'))}), and this model is a {info['family']}")
    if spec.capture.modules:  # a pattern matching nothing: refused here, before any example is read
        match_modules(info.get("modules", []), spec.capture.modules)
    layers = spec.capture.hidden.layers()
    top = max(s["layers"] for s in info["streams"].values())  # hidden states run 0..layers
    if layers and max(layers) > top:
        raise ValueError(f"--keep-hidden {str(spec.capture.hidden)!r} asks for hidden-state layer(s) "
                         f"{sorted(x for x in layers if x > top)}, but this model has hidden states "
                         f"0..{top} (0 is the embedding output, l + 1 the output of block l)")


def _run(spec: RunSpec, ex: Executor, info: dict, manifest: tuple, summary: Summary) -> Summary:
    rows, manifest_errors = manifest
    store = Store(spec.lake)
    store.ensure_dir()
    summary.lake = str(store.uri)
    summary.errors = list(manifest_errors)
    writer = LakeWriter(store, spec.run, spec.metadata(info))
    row = runs_row(spec, info, datetime.now(timezone.utc))

    previous = writer.read_run_row()
    if previous and spec.overwrite:
        writer.delete_run()
        previous = None
    if previous:
        same = (previous["model"] == spec.model and previous["manifest"] == row["manifest"]
                and previous["capture"] == row["capture"] and previous["dtype"] == spec.dtype)
        if not same:
            raise RunConflict(
                f"run {spec.run!r} already exists in {store.uri} with another model, manifest, dtype or capture "
                f"configuration (model {previous['model']}, manifest {previous['manifest']}). "
                "Choose another --run name, or pass --overwrite to replace it."
            )
        if previous["status"] == "complete":
            summary.already_complete = True
            return summary
        row["created_at"] = previous["created_at"]
    writer.purge_incomplete()
    writer.write_run_row(row)

    plan = plan_run(rows, spec.capture.chunk_size, writer.done_chunks())
    summary.resumed_chunks = plan.resumed
    work = ChunkWork(store, spec.run, spec.metadata(info), spec.capture_of(info), device=spec.device,
                     workers=default_workers(spec.device) if spec.workers is None else spec.workers,
                     batch_size=spec.batch_size, first_chunk=plan.first,
                     vec_ids=_frozen(hidden_vector_examples(rows, spec.capture.hidden.sample())),
                     known_images=frozenset(writer.known_image_ids()), manifest_errors=tuple(manifest_errors))
    bar = tqdm(total=len(rows), initial=plan.rows_done, unit="ex", desc=f"extract {spec.run}",
               disable=not spec.progress, dynamic_ncols=True)
    try:
        ex.run(work, plan.todo, bar, summary)
    except ModuleOutputError:
        if not previous and not writer.done_chunks():  # refused on the first batch: leave no run behind
            writer.delete_run()
        raise
    finally:
        bar.close()
    n_examples = writer.count_examples()
    if summary.resumed_chunks:
        summary.extracted = n_examples
    writer.write_run_row({**row, "status": "complete", "n_examples": n_examples})
    return summary.finish()


def _frozen(ids: set[int] | None) -> frozenset[int] | None:
    return None if ids is None else frozenset(ids)
