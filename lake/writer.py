"""Atomic, resumable writes of lake partitions.

A run is written in *chunks*: a chunk holds the examples whose manifest
positions fall in ``[chunk * chunk_size, (chunk + 1) * chunk_size)``. Every
table's rows of a chunk go into files named ``part-<chunk>.parquet`` inside
their partition folders, each written aside (``.part-<chunk>.parquet.tmp``) and
renamed into place, so a reader never sees half a file. When all files of a
chunk are in place, a marker ``_state/<run>/chunk-<chunk>.done`` is written.

Resuming a run (the same command again) first deletes every file of a chunk
that has no marker, then skips the chunks that have one; since file names are
fixed by chunk and partition, redoing a chunk can never duplicate rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lake.schema import IMAGES, RUNS, TABLES, Table

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
STATE_DIR = "_state"
NOT_CHUNKED = ("embeddings",)  # tables written whole by later steps, never by a chunk


def check_run_name(run: str) -> str:
    if not RUN_NAME.match(run or ""):
        raise ValueError(
            f"run name {run!r} is not allowed: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit (at most 100 characters)"
        )
    return run


def partition_dir(root: Path, table: Table, values: Mapping[str, object]) -> Path:
    """Folder of one partition: ``root/table/run=R/stream=S/layer=L``."""
    d = Path(root) / table.name
    for key in table.partition:
        if key not in values:
            raise KeyError(f"partition key {key!r} missing for table {table.name}")
        d = d / f"{key}={values[key]}"
    return d


def chunk_file(root: Path, table: Table, values: Mapping[str, object], chunk: int) -> Path:
    """The file holding one chunk's rows of a partitioned table (``values`` include ``run``)."""
    return partition_dir(root, table, values) / f"part-{chunk:06d}.parquet"


# How rows are ordered and grouped inside a chunk's file (the rows themselves are unchanged):
# ``{table: (sort keys, row-group keys)}``. Each file's row groups carry min/max statistics, so a
# query that filters on the row-group keys reads only the groups that hold its values. The Head
# summary and the top examples of a head read ONE statistic of every chunk: with a row group per
# (stream, stat), sorted by layer, head and example inside, DuckDB skips the other statistics
# (measured in bench/bench_queries.py: about half the time at 10,000 ViLT-B examples).
LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "head_stats": (("stream", "stat", "layer", "head", "example_id"), ("stream", "stat")),
}


# Columns written without dictionary encoding: their values almost never repeat, so Parquet's
# dictionary attempt (then fallback) only costs time (measured: writing 64 ViLT-B examples' hidden
# vectors took 8.2 s with it and 2.7 s without, for the same size).
NO_DICTIONARY: dict[str, tuple[str, ...]] = {"hidden_states": ("norm", "vec")}


def arrange(table: Table, data: pa.Table) -> tuple[pa.Table, list[int] | None]:
    """``data`` in the table's :data:`LAYOUT` order and the sizes of its row groups (None: default)."""
    if table.name not in LAYOUT or data.num_rows == 0:
        return data, None
    sort_keys, group_keys = LAYOUT[table.name]
    data = data.sort_by([(k, "ascending") for k in sort_keys])
    edge = np.zeros(data.num_rows, dtype=bool)  # [row]: a new group starts here
    edge[0] = True
    for k in group_keys:
        v = np.asarray(data.column(k).to_numpy(zero_copy_only=False), dtype=object)
        edge[1:] |= v[1:] != v[:-1]
    starts = np.flatnonzero(edge).tolist()
    return data, [b - a for a, b in zip(starts, starts[1:] + [data.num_rows])]


def conform(table: Table, data: pa.Table) -> pa.Table:
    """Check ``data`` has exactly the table's columns and cast to its types."""
    want = [f.name for f in table.schema]
    have = data.column_names
    if sorted(have) != sorted(want):
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        raise ValueError(f"table {table.name}: missing columns {missing}, unexpected columns {extra}")
    return data.select(want).cast(table.schema)


def write_parquet_atomic(path: Path, data: pa.Table, metadata: Mapping[str, str] | None = None,
                         row_group_size: int = 256 * 1024, row_groups: list[int] | None = None,
                         no_dictionary: tuple[str, ...] = ()) -> None:
    """Write ``data`` to ``path`` so that the file appears whole or not at all.

    ``row_groups``: the sizes of consecutive row groups (each still split at ``row_group_size``);
    by default the rows are cut every ``row_group_size`` rows. ``no_dictionary``: columns written
    without dictionary encoding.
    """
    dictionary = [c for c in data.column_names if c not in no_dictionary] if no_dictionary else True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    if metadata:
        meta = dict(data.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        data = data.replace_schema_metadata(meta)
    if row_groups is None:
        pq.write_table(data, tmp, compression="zstd", row_group_size=row_group_size,
                       write_statistics=True, use_dictionary=dictionary)
    else:
        with pq.ParquetWriter(tmp, data.schema, compression="zstd", write_statistics=True,
                              use_dictionary=dictionary) as w:
            start = 0
            for n in row_groups:
                w.write_table(data.slice(start, n), row_group_size=row_group_size)
                start += n
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class LakeWriter:
    """Writes one run's chunks into a lake root.

    Parameters
    ----------
    root : the lake's root folder.
    run : the run's name (also its partition value).
    metadata : key/value pairs recorded in every Parquet file's metadata
        (the run's model and capture configuration).
    """

    def __init__(self, root: str | Path, run: str, metadata: Mapping[str, str] | None = None):
        self.root = Path(root)
        self.run = check_run_name(run)
        self.metadata = {"vlatlas.run": run, **(metadata or {})}
        self.state = self.root / STATE_DIR / run
        self.state.mkdir(parents=True, exist_ok=True)

    # -- chunks -----------------------------------------------------------------
    def _marker(self, chunk: int) -> Path:
        return self.state / f"chunk-{chunk:06d}.done"

    def done_chunks(self) -> set[int]:
        return {int(p.stem.split("-")[1].split(".")[0]) for p in self.state.glob("chunk-*.done")}

    def _own_image_file(self, path: Path) -> bool:
        return re.match(rf"^\.?part-{re.escape(self.run)}-\d{{6}}\.parquet(\.tmp)?$", path.name) is not None

    def _run_files(self) -> Iterable[Path]:
        """Every data file (and leftover temp file) this run owns in partitioned tables.

        Image files are content-addressed and may be referenced by other runs
        (which skip images already in the lake), so they are never deleted;
        redoing a chunk rewrites its image file under the same name. The
        ``embeddings`` table is left out too: extraction never writes it, and its
        maps (``vlatlas embed``, one ``part-tsne.parquet`` per run) are not chunk
        files, so a resumed extraction must not take them for leftovers.
        """
        for t in TABLES.values():
            if t.partition and t.name not in NOT_CHUNKED:
                base = self.root / t.name / f"run={self.run}"
                if base.exists():
                    yield from (p for p in base.rglob("*") if p.is_file())

    @staticmethod
    def _chunk_of(path: Path) -> int | None:
        m = re.search(r"part-(?:.*-)?(\d{6})\.parquet(?:\.tmp)?$", path.name)
        return int(m.group(1)) if m else None

    def purge_incomplete(self) -> int:
        """Delete the files of every chunk without a done marker; return how many."""
        done = self.done_chunks()
        n = 0
        for p in list(self._run_files()):
            c = self._chunk_of(p)
            if p.name.endswith(".tmp") or c is None or c not in done:
                p.unlink()
                n += 1
        return n

    def known_image_ids(self) -> set[str]:
        """Image ids other runs have already stored."""
        base = self.root / IMAGES.name
        ids: set[str] = set()
        for p in base.glob("*.parquet") if base.exists() else []:
            if self._own_image_file(p):
                continue  # this run rewrites its own image files in full
            ids.update(pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())
        return ids

    def write_chunk(self, chunk: int, parts: Mapping[str, Iterable[tuple[Mapping[str, object], pa.Table]]],
                    stop=None) -> bool:
        """Write every table's rows of one chunk, then mark the chunk done.

        Parameters
        ----------
        chunk : the chunk number.
        parts : ``{table name: [(partition values without run, rows), ...]}``;
            rows must carry exactly the table's columns.
        stop : a callable checked before each file; when it returns True the chunk is left
            unfinished (no marker: a resumed run deletes its files and redoes it).

        Returns
        -------
        True when the chunk was written and marked done.
        """
        for name, items in parts.items():
            t = TABLES[name]
            for values, data in items:
                if stop is not None and stop():
                    return False
                data, groups = arrange(t, conform(t, data))
                if t.partition:
                    path = chunk_file(self.root, t, {"run": self.run, **values}, chunk)
                else:
                    path = self.root / t.name / f"part-{self.run}-{chunk:06d}.parquet"
                write_parquet_atomic(path, data, self.metadata, row_groups=groups,
                                     no_dictionary=NO_DICTIONARY.get(t.name, ()))
        tmp = self._marker(chunk).with_suffix(".tmp")
        tmp.write_text(json.dumps({"chunk": chunk}))
        os.replace(tmp, self._marker(chunk))
        return True

    # -- the runs table -----------------------------------------------------------
    def write_run_row(self, row: Mapping[str, object]) -> None:
        data = pa.Table.from_pylist([dict(row)], schema=RUNS.schema)
        write_parquet_atomic(self.root / RUNS.name / f"{self.run}.parquet", data, self.metadata)

    def read_run_row(self) -> dict | None:
        return read_run_row(self.root, self.run)

    def delete_run(self) -> None:
        """Remove every file of this run (used by ``--overwrite``)."""
        for t in TABLES.values():
            if t.partition:
                shutil.rmtree(self.root / t.name / f"run={self.run}", ignore_errors=True)
        (self.root / RUNS.name / f"{self.run}.parquet").unlink(missing_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True, exist_ok=True)


def read_run_row(root: str | Path, run: str) -> dict | None:
    p = Path(root) / RUNS.name / f"{run}.parquet"
    if not p.exists():
        return None
    rows = pq.read_table(p).to_pylist()
    return rows[0] if rows else None
