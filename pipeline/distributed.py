"""Extraction on a Ray cluster: ``vlatlas extract ... --ray [ADDRESS]``.

The driver (the process that runs ``vlatlas extract``) does what a single-process run does
before and after the model: it checks the arguments, writes the run row, deletes what an
interrupted attempt left, plans the chunks and, at the end, marks the run complete. The
chunks themselves run on the cluster:

- one **actor per GPU** (``--device cuda``: each holds the model on the GPU Ray gives it) or
  one actor per requested CPU slot (``--ray-actors N``, ``--ray-cpus C`` each); each loads the
  model once, then takes chunk after chunk;
- a chunk is **one task**: the actor runs the same three-stage pipeline as a local run over
  that chunk's batches (the same batches, so the same numbers) and writes the chunk's files,
  then its done marker, straight into the lake, which must therefore be reachable from every
  node (a shared folder, or an object store such as ``s3://bucket/prefix``);
- **Ray's own retries**: an actor whose process dies is restarted (``max_restarts``) and the
  chunk it was running is run again (``max_task_retries``). The redo first deletes what the
  dead attempt left, and file names are fixed by chunk and partition, so a chunk done twice
  leaves no duplicates. A chunk that still fails stops the run; finished chunks are kept and
  the same command resumes it, on the cluster or on one machine;
- **progress** comes back per batch, so the terminal shows one bar as for a local run.
"""

from __future__ import annotations

import os
from typing import Any

# Ray's retries: an actor process that dies (killed, out of memory, node lost) is restarted this
# many times, and each of its unfinished chunks is run again as many times.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
POLL_S = 0.25  # how often the driver looks at the progress of running chunks


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

    def __init__(self, model: str, device: str, dtype: str, revision: str | None, threads: int):
        import torch

        from pipeline.models import load_adapter

        torch.set_num_threads(max(1, threads))
        # Ray hands each GPU actor one device, visible to it as cuda:0
        self.device = "cuda" if str(device).startswith("cuda") else device
        self.adapter = load_adapter(model, device=self.device, dtype=dtype, revision=revision)

    def describe(self) -> dict:
        from pipeline.extract import describe

        return describe(self.adapter)

    def run_chunk(self, spec: dict, known_images: set[str], vec_ids: set[int] | None, progress) -> dict:
        """Run one chunk into the lake; return its counts for the driver's summary."""
        from pipeline.extract import LakeWriter, Summary, plan_jobs, run_chunks

        chunk = spec["chunk"]
        writer = LakeWriter(spec["lake"], spec["run"], spec["metadata"])
        if chunk not in writer.done_chunks():
            writer.purge_chunk(chunk)  # what an attempt that died left (a retry)
        summary = Summary(spec["run"], spec["lake"])
        bar = _ProgressReporter(progress, chunk)
        jobs = plan_jobs({chunk: spec["rows"]}, spec["batch_size"], spec["first_chunk"])
        run_chunks(self.adapter, writer, jobs, known_images, spec["policy"], spec["hidden_layers"],
                   vec_ids, self.device, spec["workers"], bar, summary, spec["manifest_errors"], spec["explain"])
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


class RayPool:
    """The actors of one extraction.

    Parameters
    ----------
    address : ``""`` for the cluster in ``$RAY_ADDRESS`` or one already running on this machine
        (else a new local instance on the loopback interface), or a cluster address
        (``HOST:PORT``, ``ray://HOST:10001``, ``auto``).
    model, device, dtype, revision : as for ``vlatlas extract``; every actor loads the model.
    actors : how many actors (default: one per GPU of the cluster on CUDA; on CPU, the
        cluster's CPUs divided by ``cpus``).
    cpus : CPUs per actor (its torch threads).
    """

    def __init__(self, address: str, model: str, *, device: str = "cpu", dtype: str = "float32",
                 revision: str | None = None, actors: int | None = None, cpus: float = 1.0):
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
        self.actors = [worker.remote(model, device, dtype, revision, max(1, int(cpus))) for _ in range(n)]
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

    def run(self, lake: str, run: str, metadata: dict, chunks: dict[int, list], first_chunk: int, batch_size: int,
            known_images: set[str], policy, hidden_layers, vec_ids, manifest_errors, bar, summary,
            explain: tuple[str, ...] = ()) -> None:
        """Run every chunk on the actors, updating ``bar`` and ``summary`` as they finish."""
        ray = self.ray
        known_ref, vec_ref = ray.put(known_images), ray.put(vec_ids)
        todo = sorted(chunks)
        base = bar.n
        finished = 0
        running: dict[Any, tuple[Any, int]] = {}

        def submit(actor) -> None:
            c = todo.pop(0)
            spec = {"lake": lake, "run": run, "metadata": metadata, "chunk": c, "rows": chunks[c],
                    "first_chunk": first_chunk, "batch_size": batch_size, "policy": policy,
                    "hidden_layers": hidden_layers, "workers": 0, "explain": tuple(explain),
                    "manifest_errors": list(manifest_errors) if c == first_chunk else []}
            running[actor.run_chunk.remote(spec, known_ref, vec_ref, self.progress)] = (actor, c)

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
                summary.extracted += res["extracted"]
                summary.skipped += res["skipped"]
                summary.truncated += res["truncated"]
                summary.errors.extend(tuple(x) for x in res["errors"])
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
