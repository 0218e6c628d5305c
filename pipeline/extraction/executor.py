"""Where the chunks run: one :class:`Executor` interface, in this process or on a Ray cluster.

The driver (:mod:`pipeline.extraction.run`) asks an executor what model it holds
(:meth:`Executor.describe`), hands it the run's :class:`~pipeline.extraction.chunk.ChunkWork` and the
chunks to do (:meth:`Executor.run`), and closes it; it never asks which kind it has. Both kinds run
the same chunk function, :func:`pipeline.extraction.chunk.run_chunks`, so a lake is the same
whichever ran it.

- :class:`LocalExecutor` holds the model in this process and runs every chunk in one pass (the
  input workers read ahead across chunks).
- :class:`RayExecutor` (``vlatlas extract ... --ray [ADDRESS]``): one **actor per GPU** (``--device
  cuda``: each holds the model on the GPU Ray gives it) or one actor per requested CPU slot
  (``--ray-actors N``, ``--ray-cpus C`` each); each loads the model once, then takes chunk after
  chunk. A chunk is **one task**, written with its done marker straight into the lake, which must
  therefore be reachable from every node (a shared folder, or an object store such as
  ``s3://bucket/prefix``). **Ray's own retries**: an actor whose process dies is restarted
  (``max_restarts``) and the chunk it was running is run again (``max_task_retries``); the redo
  first deletes what the dead attempt left, and file names are fixed by chunk and partition, so a
  chunk done twice leaves no duplicates. A chunk that still fails stops the run; finished chunks
  are kept and the same command resumes it, on the cluster or on one machine. **Progress** comes
  back per batch, so the terminal shows one bar as for a local run.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Protocol

from pipeline.extraction.chunk import ChunkWork, describe, run_chunks
from pipeline.extraction.spec import RunSpec
from pipeline.extraction.summary import Summary

# Ray's retries: an actor process that dies (killed, out of memory, node lost) is restarted this
# many times, and each of its unfinished chunks is run again as many times.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
POLL_S = 0.25  # how often the driver looks at the progress of running chunks


class Executor(Protocol):
    def describe(self) -> dict:
        """What the model says of itself (:func:`pipeline.extraction.chunk.describe`)."""

    def run(self, work: ChunkWork, chunks: dict[int, list], bar, summary: Summary) -> None:
        """Run every chunk into the lake, updating ``bar`` (``n``, ``update``) and ``summary``."""

    def close(self) -> None:
        """Free what the executor holds."""


def executor_for(spec: RunSpec, adapter=None) -> Executor:
    """The executor ``spec`` asks for; ``adapter``: a model already loaded (local runs only)."""
    if spec.ray is not None:
        return RayExecutor(spec)
    return LocalExecutor(adapter) if adapter is not None else LocalExecutor.load(spec)


class LocalExecutor:
    """The chunks in this process, with the model it holds."""

    def __init__(self, adapter):
        self.adapter = adapter

    @staticmethod
    def load(spec: RunSpec) -> "LocalExecutor":
        from pipeline.models import load_adapter

        return LocalExecutor(load_adapter(spec.model, device=spec.device, dtype=spec.dtype, revision=spec.revision))

    def describe(self) -> dict:
        return describe(self.adapter)

    def run(self, work, chunks: dict[int, list], bar, summary: Summary) -> None:
        if not isinstance(work, ChunkWork):  # another step's chunks (vlatlas intervene): work.run_on
            for c in sorted(chunks):
                res = work.run_on(self.adapter, self.adapter.device, c, chunks[c], bar)
                summary.add(Summary(summary.run, "", res["extracted"], res["skipped"], res["truncated"],
                                    errors=res["errors"]))
            return
        summary.workers = work.workers
        run_chunks(self.adapter, work, chunks, bar, summary)

    def call(self, fn, *args):
        """``fn(adapter, *args)`` with the model this executor holds."""
        return fn(self.adapter, *args)

    def close(self) -> None:
        pass


class RayError(RuntimeError):
    """The cluster could not be reached, has no room for the actors, or a chunk failed for good."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs Ray: pip install 'ray>=2.40'") from None
    return ray


class ChunkWorker:
    """A Ray actor that holds the model and runs chunks (the class is wrapped by ``ray.remote``
    at run time, so importing this module needs no Ray)."""

    def __init__(self, spec: RunSpec, threads: int):
        import torch

        from pipeline.models import load_adapter

        torch.set_num_threads(max(1, threads))
        # Ray hands each GPU actor one device, visible to it as cuda:0
        self.device = "cuda" if str(spec.device).startswith("cuda") else spec.device
        self.adapter = load_adapter(spec.model, device=self.device, dtype=spec.dtype, revision=spec.revision)

    def describe(self) -> dict:
        return describe(self.adapter)

    def call(self, fn, *args):
        """``fn(adapter, *args)`` with the actor's model (a step's checks and passes that need the model)."""
        return fn(self.adapter, *args)

    def run_chunk(self, work, chunk: int, rows: list, progress) -> dict:
        """Run one chunk into the lake; return its counts for the driver's summary. ``work``: a
        :class:`ChunkWork`, or another step's (``vlatlas intervene``), which runs itself: ``work.run_on``."""
        from lake.writer import LakeWriter

        if not isinstance(work, ChunkWork):
            res = work.run_on(self.adapter, self.device, chunk, rows, _ProgressReporter(progress, chunk))
            return {**res, "pid": os.getpid()}

        writer = LakeWriter(work.lake, work.run, work.metadata)
        if chunk not in writer.done_chunks():
            writer.purge_chunk(chunk)  # what an attempt that died left (a retry)
        summary = Summary(work.run, str(work.lake))
        work = replace(work, device=self.device, workers=0,
                       manifest_errors=work.manifest_errors if chunk == work.first_chunk else ())
        run_chunks(self.adapter, work, {chunk: rows}, _ProgressReporter(progress, chunk), summary)
        return {"chunk": chunk, "extracted": summary.extracted, "skipped": summary.skipped,
                "truncated": summary.truncated, "errors": summary.errors, "pid": os.getpid()}


class _ProgressReporter:
    """What the pipeline calls ``bar`` inside an actor: tells the driver's progress actor how many
    rows of the chunk are done (an absolute count, so a retried chunk starts again from 0)."""

    def __init__(self, progress, chunk: int):
        self.progress, self.chunk, self.n = progress, chunk, 0
        progress.set.remote(chunk, 0)

    def update(self, n: int) -> None:
        self.n += n
        self.progress.set.remote(self.chunk, self.n)


class Progress:
    """A tiny actor: rows done per running chunk."""

    def __init__(self):
        self.n: dict[int, int] = {}

    def set(self, chunk: int, n: int) -> None:
        self.n[chunk] = n

    def get(self) -> dict[int, int]:
        return dict(self.n)


class RayExecutor:
    """The actors of one extraction, as ``spec.ray`` asks (:class:`pipeline.extraction.spec.RaySpec`):
    the cluster at its address (``""``: the one in ``$RAY_ADDRESS`` or already running on this
    machine, else a new local instance on the loopback interface; or ``HOST:PORT``,
    ``ray://HOST:10001``, ``auto``), with its number of actors (default: one per GPU of the cluster
    on CUDA; on CPU, the cluster's CPUs divided by ``cpus``) of ``cpus`` CPUs each (their torch
    threads). Every actor loads the model."""

    def __init__(self, spec: RunSpec):
        address, actors, cpus, device = spec.ray.address, spec.ray.actors, spec.ray.cpus, spec.device
        addr = address or os.environ.get("RAY_ADDRESS") or ""
        host_port = _host_port(addr)
        if host_port:
            _reachable(*host_port)
            if host_port[0] in LOOPBACK:
                # a cluster bound to the loopback interface: Ray must not swap 127.0.0.1 for this
                # machine's network address when it connects (read when Ray is imported)
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = _ray()
        self.ray = ray
        self._own = False
        if cpus <= 0:
            raise ValueError("--ray-cpus must be more than 0")
        if actors is not None and actors < 1:
            raise ValueError("--ray-actors must be at least 1")
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(log_to_driver=False, logging_level="ERROR", configure_logging=True)
            try:
                if addr:
                    ray.init(address=addr, **kw)
                else:
                    try:
                        ray.init(address="auto", **kw)  # a cluster started on this machine
                    except ConnectionError:
                        # nothing running: a private instance, listening on loopback only
                        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kw)
                        self._own = True
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise RayError(f"cannot reach the Ray cluster at {addr or 'this machine'}: {e}") from None
        cuda = str(device).startswith("cuda")
        res = ray.cluster_resources()
        if cuda:
            gpus = int(res.get("GPU", 0))
            if gpus < 1:
                raise RayError("--device cuda with --ray: the Ray cluster has no GPUs")
            n = actors or gpus
            opts = dict(num_gpus=1, num_cpus=cpus)
        else:
            n = actors or max(1, int(res.get("CPU", 1) // cpus))
            opts = dict(num_cpus=cpus)
        self.size = n
        worker = ray.remote(ChunkWorker).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                                                 **opts)
        self.actors = [worker.remote(spec, max(1, int(cpus))) for _ in range(n)]
        self.progress = ray.remote(Progress).options(num_cpus=0).remote()

    def describe(self) -> dict:
        """The model's description from the first actor (the driver never loads the model)."""
        from pipeline import __version__
        from pipeline.models import ModelLoadError

        try:
            info = self.ray.get(self.actors[0].describe.remote())
        except self.ray.exceptions.RayActorError as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(getattr(cause, "cause", None), ModelLoadError):
                raise cause.cause from None
            raise RayError(f"the Ray actors could not load the model: {_last_line(cause)}") from None
        if info.get("version") != __version__:
            raise RayError(f"the Ray cluster runs VL-Atlas {info.get('version')}, this machine {__version__}: "
                           "install the same version on every node")
        return info

    def call(self, fn, *args):
        """``fn(adapter, *args)`` on the first actor (its result comes back by value)."""
        try:
            return self.ray.get(self.actors[0].call.remote(fn, *args))
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, ValueError):  # a refusal (one sentence), raised here as it was there
                raise cause from None
            raise RayError(f"the Ray actor failed: {_last_line(cause or e)}") from None

    def run(self, work, chunks: dict[int, list], bar, summary: Summary) -> None:
        """Run every chunk on the actors, updating ``bar`` and ``summary`` as they finish."""
        ray = self.ray
        summary.ray_actors = self.size
        work_ref = ray.put(replace(work, lake=getattr(work.lake, "uri", work.lake)))  # actors open the lake
        todo = sorted(chunks)
        base = bar.n
        finished = 0
        running: dict[Any, tuple[Any, int]] = {}

        def submit(actor) -> None:
            c = todo.pop(0)
            running[actor.run_chunk.remote(work_ref, c, chunks[c], self.progress)] = (actor, c)

        for actor in self.actors:
            if todo:
                submit(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in ready:
                actor, c = running.pop(ref)
                try:
                    res = ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                    raise RayError(f"chunk {c} failed on the Ray cluster after Ray's retries: "
                                   f"{_last_line(getattr(e, 'cause', None) or e)}. Finished chunks are saved; "
                                   "run the same command again to resume") from None
                finished += len(chunks[c])
                summary.add(Summary(work.run, "", res["extracted"], res["skipped"], res["truncated"],
                                    errors=res["errors"]))
                if todo:
                    submit(actor)
            live = ray.get(self.progress.get.remote())
            bar.n = base + finished + sum(min(live.get(c, 0), len(chunks[c])) for _, c in running.values())
            bar.refresh()

    def close(self) -> None:
        """Stop the actors (frees their GPUs), and a Ray instance this pool started."""
        ray = self.ray
        for a in getattr(self, "actors", []) + ([self.progress] if hasattr(self, "progress") else []):
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._own:
            ray.shutdown()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``HOST:PORT`` cluster address (None for ``auto``, ``ray://…``, empty)."""
    if not address or "://" in address or address == "auto":
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayError(f"--ray {address!r}: give the cluster's address as HOST:PORT (e.g. 10.0.0.5:6379), "
                       "ray://HOST:10001 or auto")
    return host.strip("[]"), int(port)


def _reachable(host: str, port: int, timeout_s: float = 5.0) -> None:
    """RayError now when nothing listens at the address (Ray itself would retry for minutes)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayError(f"cannot reach the Ray cluster at {host}:{port}: {e.strerror or e}. Start one with "
                       "`ray start --head`, or give its address") from None


def _last_line(e: BaseException) -> str:
    """The last non-empty line of an error's text: where a Ray error, which carries the remote
    traceback, says what went wrong."""
    text = str(e).strip()
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(e).__name__
