"""The chunk function: a run's chunks through the three stages, into the lake.

The same function runs in the driver's process (:class:`pipeline.extraction.executor.LocalExecutor`,
and the live example) and on a Ray actor (:class:`pipeline.extraction.executor.RayExecutor`):

1. **inputs, ahead of the model** (:mod:`pipeline.extraction.inputs`, in a torch ``DataLoader``
   with ``workers`` processes);
2. **the model, hooked** (:mod:`pipeline.extraction.sink`): statistics, kept weights and explain
   outputs on the device, then one transfer to the host per batch;
3. **rows and Parquet, behind the model** (:class:`WriteStage`, a background thread with a bounded
   queue): host arrays become Arrow rows (:mod:`pipeline.extraction.rows`), and each chunk's files
   are written atomically with its done marker. The queue's depth bounds memory; the model never
   waits for the disk unless the disk is slower than the model.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

import pipeline
from lake.schema import ERRORS
from lake.writer import LakeWriter
from pipeline.capture import capture
from pipeline.capture_config import Capture
from pipeline.data import Row
from pipeline.extraction.inputs import InputBatches, identity, to_device, worker_init
from pipeline.extraction.modules import module_points
from pipeline.extraction.outputs import BatchRows, LensOut
from pipeline.extraction.plan import Job, plan_jobs
from pipeline.extraction.rows import ChunkRows, errors_table, example_rows
from pipeline.extraction.sink import BatchSink, SinkBatch, relevancy
from pipeline.extraction.summary import Summary
from pipeline.models.base import conform, map_inputs


@dataclass(frozen=True)
class ChunkWork:
    """What every chunk of a run shares: where its rows go and what is captured.

    ``lake``: a ``lake.store.Store`` or a URI (an actor opens it itself); ``vec_ids``: the examples
    whose hidden vectors are stored (None: all); ``known_images``: image ids the lake has already;
    ``manifest_errors``: the manifest's own rejects, recorded with chunk ``first_chunk``.
    """

    lake: object
    run: str
    metadata: dict
    capture: Capture
    device: str = "cpu"
    workers: int = 0
    batch_size: int = 8
    first_chunk: int = 0
    vec_ids: frozenset[int] | None = None
    known_images: frozenset[str] = frozenset()
    manifest_errors: tuple = ()


def describe(adapter) -> dict:
    """What the run row needs to know of a loaded model (also asked of a Ray actor's model)."""
    return {
        "family": adapter.family,
        "streams": adapter.streams(),
        "attn_implementation": adapter.model.config._attn_implementation,
        "random_weights": bool(getattr(adapter.model.config, "vlatlas_random_weights", False)),
        "lens": hasattr(adapter, "lens"),
        # None when --explain relevancy works for this model, else why not
        "relevancy": (getattr(adapter, "relevancy_unavailable", None) if hasattr(adapter, "relevancy_targets")
                      else f"--explain relevancy is not available for {adapter.family}"),
        "version": pipeline.__version__,
        "modules": [n for n, _ in adapter.model.named_modules() if n],  # what --capture-modules may name
    }


def run_chunks(adapter, work: ChunkWork, chunks: dict[int, list[Row]], bar, summary: Summary) -> None:
    """Run the chunks' batches through the three stages; every chunk's files and marker are written
    before this returns (or, on an error or Ctrl-C, the unfinished chunk is abandoned). ``bar``: a
    progress bar (``update(n)``); ``summary``: counts, updated."""
    adapter = conform(adapter)
    stage = WriteStage(LakeWriter(work.lake, work.run, work.metadata))
    ok = False
    try:
        points = adapter.hook_points(work.capture.hidden.layers(), explain=work.capture.explain.methods)
        modules, sites = module_points(adapter, work.capture.modules)
        jobs = plan_jobs(chunks, work.batch_size, work.first_chunk)
        _run_jobs(adapter, _Pass(work, points + modules, jobs, stage, sites), bar, summary)
        ok = True
    finally:
        stage.close(abandon=not ok)


@dataclass(frozen=True)
class _Pass:
    """One call of :func:`run_chunks`: its work, hook points, batches and write stage."""

    work: ChunkWork
    points: list
    jobs: list[Job]
    stage: "WriteStage"
    sites: dict  # --capture-modules: module name -> pipeline.extraction.modules.Site


def _run_jobs(adapter, p: _Pass, bar, summary: Summary) -> None:
    work, jobs, stage = p.work, p.jobs, p.stage
    if not jobs:
        stage.start()
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize on their own
    import multiprocessing as mp

    workers = work.workers
    if "fork" not in mp.get_all_start_methods():
        workers = 0  # workers inherit the loaded adapter; without fork they would have to load it again
    loader = torch.utils.data.DataLoader(
        InputBatches(adapter, jobs, work.known_images), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=identity, pin_memory=False, worker_init_fn=worker_init if workers else None,
        prefetch_factor=2 if workers else None, persistent_workers=False,
        multiprocessing_context="fork" if workers else None)
    seen = set(work.known_images)  # images stored already: the lake's, then the chunk's
    items = iter(loader)  # forks the input workers
    stage.start()
    try:
        for item in items:
            job = jobs[item["job"]]
            bad = item["errors"]
            summary.skipped += len(bad)
            summary.errors.extend(bad)
            if item["rows"]:
                payload = _run_batch(adapter, item, p, seen)
                summary.extracted += len(payload.examples)
                summary.truncated += sum(len(n) for n in item["notes"])
                payload.errors = bad + payload.errors
                stage.put(("batch", job.chunk, payload))
            elif bad:
                stage.put(("batch", job.chunk, BatchRows(errors=bad)))
            bar.update(item["n_rows"])
            if job.last:
                chunk_errors = list(work.manifest_errors) if job.first_chunk else []
                summary.skipped += len(chunk_errors)  # the manifest's own rejects, with the first chunk
                stage.put(("end", job.chunk, chunk_errors))
                seen = set(work.known_images)
    finally:
        # stop the input workers now, even on Ctrl-C: left to the garbage collector, the iterator
        # would shut them down at interpreter exit, where it can hang
        del items


def _run_batch(adapter, item: dict, p: _Pass, seen_images: set[str]) -> BatchRows:
    rows: list[Row] = item["rows"]
    work = p.work
    pics = item["images"]
    ids = [r.example_id for r in rows]
    boxes = [r.boxes for r in rows]
    inputs = map_inputs(item["inputs"], lambda v: to_device(v, work.device))
    inputs = adapter.prepare(inputs)  # e.g. a decoder LVLM generates its answer first, uncaptured
    with_vec = np.array([work.vec_ids is None or i in work.vec_ids for i in ids], dtype=bool)
    sink = BatchSink(adapter, SinkBatch(inputs, pics, boxes, ids, with_vec), work.capture, work.device, p.sites)
    with capture(p.points, sink):
        outputs = adapter.forward(inputs, example_ids=ids)
    layout = sink.layout or adapter.layout(inputs, pics, boxes)
    if "relevancy" in work.capture.explain:
        relevancy(adapter, inputs, ids, sink, p.points)
    outs = sink.finish()
    lens_ids = sorted({int(i) for o in outs if isinstance(o, LensOut) for i in np.unique(o.ids)})
    preds = adapter.predict(outputs, [r.answer for r in rows])
    b = example_rows(item, preds, layout, seen_images)
    b.outs = outs
    b.pieces = dict(zip(lens_ids, adapter.tokenizer.convert_ids_to_tokens(lens_ids))) if lens_ids else {}
    b.valid = {n: sl.valid.cpu().numpy() for n, sl in layout.streams.items()}
    b.offsets = {n: list(sl.token_offset) for n, sl in layout.streams.items()}
    b.with_vec, b.stat_order = with_vec, sink.stat_order
    return b


class WriteStage:
    """Flattening, Parquet encoding and writing, in a background thread behind the model.

    ``put`` blocks when ``depth`` batches are waiting: that bounds the host memory held for
    writing. An error in the thread is raised in the caller at its next ``put`` or ``close``.
    """

    def __init__(self, writer: LakeWriter, depth: int = 4):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._abandon = threading.Event()
        self._t = threading.Thread(target=self._run, name="vlatlas-writer", daemon=True)

    def start(self) -> None:
        """Start the thread (after the input workers are forked: a fork copies no running thread's
        half-held locks that way)."""
        if not self._t.is_alive() and self._t.ident is None:
            self._t.start()

    def put(self, item) -> None:
        while True:
            self._raise()
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the lake failed: {self.error}") from self.error

    def close(self, abandon: bool = False) -> None:
        """Finish every queued chunk (or, with ``abandon``, stop after the current file)."""
        self.start()  # no-op when running; a stage that never started has nothing queued but the stop
        if abandon:
            self._abandon.set()
            while True:  # make room for the stop signal
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    break
        while self._t.is_alive():
            try:
                self.q.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._t.join()
        if not abandon:
            self._raise()

    def _run(self) -> None:
        parts: dict[int, ChunkRows] = {}
        try:
            while True:
                item = self.q.get()
                if item is None or self._abandon.is_set():
                    return
                kind, chunk, payload = item
                p = parts.setdefault(chunk, ChunkRows())
                if kind == "batch":
                    p.add_batch(payload)
                else:  # "end": payload = chunk-level errors (the manifest's, for the first chunk)
                    if payload:
                        p.add(ERRORS, {}, errors_table(payload))
                    self.writer.write_chunk(chunk, parts.pop(chunk).tables(), stop=self._abandon.is_set)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
