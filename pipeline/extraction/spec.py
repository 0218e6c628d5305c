"""The run specification: everything ``vlatlas extract`` was asked to do, in one frozen object.

:class:`RunSpec` is built once, from the command line (or :func:`pipeline.extraction.run.extract`'s
keywords) by :meth:`RunSpec.from_options`, which checks every option before any model loads; its
capture is serialised once, into the ``runs`` row (:func:`pipeline.extraction.rows.runs_row`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from lake.writer import check_run_name
from pipeline.capture_config import DEFAULT_CHUNK_SIZE, Capture


@dataclass(frozen=True)
class RaySpec:
    """``--ray [ADDRESS]``: ``address`` ``""`` for the cluster in ``$RAY_ADDRESS`` or one running on
    this machine (else a private local one); ``actors`` model-holding actors (None: one per GPU on
    CUDA, else the cluster's CPUs / ``cpus``) of ``cpus`` CPUs each."""

    address: str = ""
    actors: int | None = None
    cpus: float = 1.0


@dataclass(frozen=True)
class RunSpec:
    """One extraction: model, data, capture, device, dtype and sizes."""

    model: str
    data: Path  # the manifest, resolved
    lake: str  # a folder or an object-store URI
    run: str
    capture: Capture = field(default_factory=Capture)
    device: str = "cpu"
    dtype: str = "float32"
    revision: str | None = None
    batch_size: int = 8
    limit: int | None = None  # only manifest rows with example_id < limit
    workers: int | None = None  # input processes (None: pipeline.extraction.plan.default_workers)
    overwrite: bool = False
    progress: bool = True
    ray: RaySpec | None = None  # None: in this process

    OPTIONS = ("batch_size", "device", "dtype", "limit", "keep_attention", "keep_hidden", "chunk_size", "overwrite",
               "progress", "revision", "workers", "ray", "ray_actors", "ray_cpus", "explain", "capture_modules")

    @staticmethod
    def from_options(model: str, data, lake, run: str, **options) -> "RunSpec":
        """The spec of ``vlatlas extract``'s options (keywords named as the flags: ``keep_attention``,
        ``ray_actors`` …); ValueError with one sentence for a bad one."""
        unknown = sorted(set(options) - set(RunSpec.OPTIONS))
        if unknown:
            raise TypeError(f"unknown extraction option(s): {', '.join(unknown)}")
        o = dict(options)
        check_run_name(run)
        chunk_size = o.pop("chunk_size", None) or DEFAULT_CHUNK_SIZE
        if o.get("batch_size", 8) < 1 or chunk_size < 1:
            raise ValueError("--batch-size and --chunk-size must be at least 1")
        if o.get("workers") is not None and o["workers"] < 0:
            raise ValueError("--workers must be 0 (read and encode in the main process) or more")
        capture = Capture.from_options(o.pop("keep_attention", None), o.pop("keep_hidden", None),
                                       o.pop("explain", None), chunk_size, o.pop("capture_modules", None))
        address, actors, cpus = o.pop("ray", None), o.pop("ray_actors", None), o.pop("ray_cpus", None)
        ray = None if address is None else RaySpec(address, actors, 1.0 if cpus is None else cpus)
        return RunSpec(model, Path(data).resolve(), str(lake), run, capture, ray=ray, **o)

    @staticmethod
    def from_run_row(row: dict, lake: str, device: str) -> "RunSpec":
        """The spec a run's ``runs`` row records (its capture parsed back), for one more example on
        ``device`` in this process (the live example); ValueError or TypeError when this version
        cannot read the capture."""
        return RunSpec(row["model"], Path(row.get("manifest") or "."), lake, row["run"],
                       Capture.from_json(row["capture"]), device=device, dtype=row.get("dtype") or "float32",
                       revision=row.get("revision"), batch_size=1, workers=0, progress=False)

    def capture_of(self, info: dict) -> Capture:
        """The capture as recorded: with whether the model's weights are random."""
        return replace(self.capture, random_weights=bool(info["random_weights"]))

    def metadata(self, info: dict) -> dict:
        """What every Parquet file of the run records of it."""
        return {"vlatlas.model": self.model, "vlatlas.capture": self.capture_of(info).to_json(),
                "vlatlas.version": info["version"]}
