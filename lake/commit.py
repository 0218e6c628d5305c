"""The commit protocol: where a chunk's files and its done marker live, and which rows are committed.

A run is written in *chunks*. Every table's rows of a chunk go into files whose names are fixed by
the chunk and the partition (``<table>/run=R/.../part-<chunk>.parquet``; the unpartitioned
``images`` table has ``images/part-<run>-<chunk>.parquet``), each appearing whole or not at all
(``lake/store.py``). When all of a chunk's files are in place, the marker
``_state/<run>/chunk-<chunk>.done`` is written: that marker is the chunk's commit.

The committed-chunk rule, the one both the writer (``lake/writer.py``, resuming) and the views
(``lake/views.py``, reading) follow:

- a run shows only once it has a ``runs`` row;
- a ``complete`` run's chunks are all committed (a resumed run deleted whatever else was there
  before it completed), and so are the files of tables that later steps write whole
  (:data:`NOT_CHUNKED`);
- any other run's chunk is committed when, and only when, its done marker exists.

This module only names paths and reads markers and run rows; it writes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pyarrow as pa

from lake.schema import IMAGES, RUNS, Table
from lake.store import Store, open_store

STATE_DIR = "_state"
NOT_CHUNKED = ("embeddings", "probes", "interventions")  # tables written by later steps (embed, probe, intervene),
# each file whole and committed by appearing, never by an extraction chunk's marker
CHUNK_FILE = re.compile(r"^part-(\d{6})\.parquet$")
IMAGE_FILE = re.compile(r"^part-(.+)-(\d{6})\.parquet$")
MARKER_FILE = re.compile(r"^chunk-(\d{6})\.done$")


# -- names ------------------------------------------------------------------------------


def partition_rel(table: Table, values: Mapping[str, object]) -> str:
    """Folder of one partition, relative to the root: ``table/run=R/stream=S/layer=L``."""
    parts = [table.name]
    for key in table.partition:
        if key not in values:
            raise KeyError(f"partition key {key!r} missing for table {table.name}")
        parts.append(f"{key}={values[key]}")
    return "/".join(parts)


def chunk_rel(table: Table, values: Mapping[str, object], chunk: int) -> str:
    """The file holding one chunk's rows of a partitioned table, relative to the root."""
    return f"{partition_rel(table, values)}/part-{chunk:06d}.parquet"


def image_rel(run: str, chunk: int) -> str:
    """The file holding the images one chunk of ``run`` stored (``images`` has no partitions)."""
    return f"{IMAGES.name}/part-{run}-{chunk:06d}.parquet"


def run_rel(run: str) -> str:
    """The file holding ``run``'s row of the ``runs`` table."""
    return f"{RUNS.name}/{run}.parquet"


def state_rel(run: str) -> str:
    """The folder of ``run``'s done markers."""
    return f"{STATE_DIR}/{run}"


def marker_rel(run: str, chunk: int) -> str:
    """The done marker whose existence commits one chunk of ``run``."""
    return f"{state_rel(run)}/chunk-{chunk:06d}.done"


def chunk_of(rel: str) -> int | None:
    """The chunk number of a data file (a partitioned table's ``part-NNNNNN.parquet``), else None."""
    m = CHUNK_FILE.match(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def run_of(rel: str) -> str | None:
    """The ``run=`` partition value in a relative path, else None."""
    for part in rel.split("/"):
        if part.startswith("run="):
            return part[4:]
    return None


def image_owner(rel: str) -> tuple[str, int] | None:
    """``(run, chunk)`` of an ``images`` file (``part-<run>-<chunk>.parquet``), else None."""
    m = IMAGE_FILE.match(rel.rsplit("/", 1)[-1])
    return (m.group(1), int(m.group(2))) if m else None


# -- what is committed ----------------------------------------------------------------------


def done_chunks(store: Store, run: str) -> set[int]:
    """The committed chunks of ``run``: those with a done marker."""
    out = set()
    for rel in store.list(state_rel(run), recursive=False):
        m = MARKER_FILE.match(rel.rsplit("/", 1)[-1])
        if m:
            out.add(int(m.group(1)))
    return out


def read_run_row(root: str | Path | Store, run: str) -> dict | None:
    """``run``'s row of the ``runs`` table as a dict (None when it has none)."""
    store = open_store(root)
    rel = run_rel(run)
    if not store.is_file(rel):
        return None
    rows = store.read_parquet(rel).to_pylist()
    return rows[0] if rows else None


def run_statuses(store: Store) -> dict[str, str | None]:
    """``{run: status}`` of every run with a ``runs`` row (None while its row is being replaced)."""
    runs: dict[str, str | None] = {}
    for rel in store.list(RUNS.name, recursive=False):
        if rel.endswith(".parquet"):
            run = rel.rsplit("/", 1)[-1][: -len(".parquet")]
            try:
                row = read_run_row(store, run)
            except (OSError, pa.ArrowInvalid):
                row = None
            runs[run] = row.get("status") if row else None
    return runs


def chunk_committed(store: Store, run: str, status: str | None, chunk: int) -> bool:
    """Whether one chunk of ``run`` (whose ``runs`` row has ``status``) is committed."""
    return status == "complete" or int(chunk) in done_chunks(store, run)


@dataclass(frozen=True)
class Commits:
    """What is committed in a lake at one moment: the runs shown and the done markers of those not
    complete (a complete run's markers are never read: all its chunks are committed).

    Parameters
    ----------
    statuses : ``{run: status}`` of every run with a ``runs`` row (:func:`run_statuses`).
    done : ``{run: its done chunks}`` of every run that is not complete.
    """

    statuses: Mapping[str, str | None]
    done: Mapping[str, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def read(cls, store: Store, statuses: Mapping[str, str | None] | None = None) -> Commits:
        """The lake's commits now (``statuses`` when the caller has just read them)."""
        statuses = run_statuses(store) if statuses is None else statuses
        done = {run: frozenset(done_chunks(store, run)) for run, s in statuses.items() if s != "complete"}
        return cls(statuses, done)

    def whole(self, table: Table, run: str) -> bool:
        """Whether every file of ``run`` in ``table`` is committed (so its folder can be read whole)."""
        return self.statuses.get(run) == "complete" or table.name in NOT_CHUNKED

    def shows(self, table: Table, rel: str) -> bool:
        """Whether the data file ``rel`` of ``table`` (not ``runs``) holds committed rows."""
        if table is IMAGES:
            owner = image_owner(rel)
            if owner is None or owner[0] not in self.statuses:
                return False
            run, chunk = owner
        else:
            run, chunk = run_of(rel), chunk_of(rel)
            if run not in self.statuses:
                return False
        return self.whole(table, run) or chunk in self.done.get(run, ())
