"""Atomic, resumable writes of lake partitions, on a local disk or an object store.

A run is written in *chunks*: a chunk holds the examples whose manifest
positions fall in ``[chunk * chunk_size, (chunk + 1) * chunk_size)``. Every
table's rows of a chunk go into files named ``part-<chunk>.parquet`` inside
their partition folders, each appearing whole or not at all (written aside and
renamed on a disk; an object store shows an object only once its upload is
complete, ``lake/store.py``). When all files of a chunk are in place, a marker
``_state/<run>/chunk-<chunk>.done`` is written: that marker is the chunk's
commit. Readers (``lake/views.py``) show a run's rows only from committed
chunks, so a chunk being written, or left half-written by a crash, is never
seen, on a disk or on an object store that cannot rename. The names of files
and markers, and the committed-chunk rule, are ``lake/commit.py``'s, shared by
this writer and the views.

Resuming a run (the same command again) first deletes every file of a chunk
that has no marker, then skips the chunks that have one; since file names are
fixed by chunk and partition, redoing a chunk (a resumed run, or a task that a
cluster retried) can never duplicate rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa

from lake.commit import (NOT_CHUNKED, chunk_of, chunk_rel, done_chunks, image_owner, image_rel, marker_rel,
                         partition_rel, read_run_row, run_rel, state_rel)
from lake.schema import IMAGES, RUNS, TABLES, Table
from lake.store import Store, open_store

RUN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,99}$")
# Names that a hive-partition reader would turn into something else than the string (measured:
# polars reads run=true as a boolean and run=NaN as a float, DuckDB run=infinity or run=Epoch as
# a date, Spark run=Infinity as a double); refused in any case.
RESERVED_RUN_NAMES = frozenset({"nan", "inf", "infinity", "true", "false", "null", "none", "na", "nat",
                                "epoch", "now", "today", "tomorrow", "yesterday", "allballs"})


def check_run_name(run: str) -> str:
    """``run`` when it is a valid run name, else ValueError with the rule.

    A run name is also a hive partition value (``run=<name>``) that Spark, polars, pyarrow,
    pandas and DuckDB parse from the path, each guessing its type: ``001`` would come back as
    the integer 1 (so ``run = '001'`` matches nothing), ``2024-06-01`` as a date, ``true`` as a
    boolean. Names therefore start with a letter and are none of the words those readers take
    for a value.
    """
    if not isinstance(run, str) or not RUN_NAME.match(run):
        raise ValueError(
            f"run name {run!r} is not allowed: use letters, digits, '_', '-' and '.', starting with a "
            "letter (at most 100 characters), e.g. vilt-vqa-001. A name that starts with a digit would "
            "be read back as a number or a date by Spark, polars, pyarrow and DuckDB"
        )
    if run.lower() in RESERVED_RUN_NAMES:
        raise ValueError(
            f"run name {run!r} is not allowed: Spark, polars, pyarrow or DuckDB would read it back as a "
            f"number, a boolean, a date or a null instead of the name; choose another (e.g. {run}-run)"
        )
    return run


def partition_dir(root: str | Path, table: Table, values: Mapping[str, object]) -> Path:
    """Folder of one partition of a local lake: ``root/table/run=R/stream=S/layer=L``."""
    return Path(root) / partition_rel(table, values)


def chunk_file(root: str | Path, table: Table, values: Mapping[str, object], chunk: int) -> Path:
    """The file holding one chunk's rows of a partitioned table of a local lake."""
    return Path(root) / chunk_rel(table, values, chunk)


# How rows are ordered and grouped inside a chunk's file (the rows themselves are unchanged):
# ``{table: (sort keys, row-group keys)}``. Each file's row groups carry min/max statistics, so a
# query that filters on the row-group keys reads only the groups that hold its values. The Head
# summary and the top examples of a head read ONE statistic of every chunk: with a row group per
# (stream, stat), sorted by layer, head and example inside, DuckDB skips the other statistics
# (measured in bench/bench_queries.py: about half the time at 10,000 ViLT-B examples).
LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "head_stats": (("stream", "stat", "layer", "head", "example_id"), ("stream", "stat")),
}


# Parquet encodings per table (default: dictionary encoding for every column). Hidden states'
# norms and vectors almost never repeat, so a dictionary attempt only costs time (writing 64
# ViLT-B examples' vectors took 8.2 s with it, 2.7 s without); BYTE_STREAM_SPLIT groups the bytes
# of each float, and since the vectors hold float16-rounded values in float32, the low bytes are
# all zero and compress to nearly nothing: the float32 vectors take fewer bytes than Parquet
# FLOAT16 did (bench/bench_lake_types.py). Spark, polars, pyarrow and DuckDB all read it.
ENCODINGS: dict[str, dict] = {
    "hidden_states": {
        "use_dictionary": ["example_id", "token_idx"],
        "column_encoding": {"norm": "BYTE_STREAM_SPLIT", "vec.list.element": "BYTE_STREAM_SPLIT"},
    },
    "activations": {  # laid out like hidden_states (a module's output at each token)
        "use_dictionary": ["example_id", "token_idx", "layer"],
        "column_encoding": {"norm": "BYTE_STREAM_SPLIT", "vec.list.element": "BYTE_STREAM_SPLIT"},
    },
}


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


def with_metadata(data: pa.Table, metadata: Mapping[str, str] | None) -> pa.Table:
    if not metadata:
        return data
    meta = dict(data.schema.metadata or {})
    meta.update({k.encode(): v.encode() for k, v in metadata.items()})
    return data.replace_schema_metadata(meta)


def write_table(store: Store, rel: str, table: Table, data: pa.Table,
                metadata: Mapping[str, str] | None = None) -> None:
    """Conform ``data`` to ``table``, arrange it and write it to ``rel`` atomically."""
    data, groups = arrange(table, conform(table, data))
    store.write_parquet(rel, with_metadata(data, metadata), row_groups=groups, **ENCODINGS.get(table.name, {}))


def write_parquet_atomic(path: Path, data: pa.Table, metadata: Mapping[str, str] | None = None,
                         row_groups: list[int] | None = None) -> None:
    """Write ``data`` to the local file ``path`` so that it appears whole or not at all."""
    path = Path(path)
    Store(path.parent).write_parquet(path.name, with_metadata(data, metadata), row_groups=row_groups)


class LakeWriter:
    """Writes one run's chunks into a lake root.

    Parameters
    ----------
    root : the lake's root: a folder or an object-store URI (``lake/store.py``).
    run : the run's name (also its partition value).
    metadata : key/value pairs recorded in every Parquet file's metadata
        (the run's model and capture configuration).
    """

    def __init__(self, root: str | Path | Store, run: str, metadata: Mapping[str, str] | None = None):
        self.store = open_store(root)
        self.root = self.store.uri
        self.run = check_run_name(run)
        self.metadata = {"vlatlas.run": run, **(metadata or {})}
        self.state = state_rel(run)
        self.store.ensure_dir(self.state)

    # -- chunks -----------------------------------------------------------------
    def done_chunks(self) -> set[int]:
        return done_chunks(self.store, self.run)

    def _own_image_file(self, rel: str) -> bool:
        owner = image_owner(rel)
        return owner is not None and owner[0] == self.run

    def _run_files(self) -> Iterable[str]:
        """Every data file (and leftover temp file) this run owns in partitioned tables.

        Image files are content-addressed and may be referenced by other runs
        (which skip images already in the lake), so they are never deleted;
        redoing a chunk rewrites its image file under the same name. The
        ``embeddings`` and ``probes`` tables are left out too: extraction never writes
        them, and their files (``vlatlas embed``'s ``part-tsne.parquet``, ``vlatlas
        probe``'s ``probe-<hash>.parquet``) are not chunk files, so a resumed extraction
        must not take them for leftovers.
        """
        for t in TABLES.values():
            if t.partition and t.name not in NOT_CHUNKED:
                yield from self.store.list(f"{t.name}/run={self.run}")

    def _purge(self, doomed) -> int:
        """Delete this run's files for which ``doomed(path)`` holds; return how many."""
        gone = [rel for rel in self._run_files() if doomed(rel)]
        for rel in gone:
            self.store.delete(rel)
        return len(gone)

    def purge_incomplete(self) -> int:
        """Delete the files of every chunk without a done marker; return how many."""
        done = self.done_chunks()
        return self._purge(lambda rel: chunk_of(rel) not in done)  # temp files have no chunk: None

    def purge_chunk(self, chunk: int) -> int:
        """Delete the files an unfinished attempt at ``chunk`` left (before redoing it); return how many."""
        temp = f".part-{chunk:06d}.parquet."  # Store's temp files: .<name>.<id>.tmp
        return self._purge(lambda rel: chunk_of(rel) == chunk
                           or (rel.rsplit("/", 1)[-1].startswith(temp) and rel.endswith(".tmp")))

    def known_image_ids(self) -> set[str]:
        """Image ids other runs have already stored."""
        ids: set[str] = set()
        for rel in self.store.list(IMAGES.name, recursive=False):
            if not rel.endswith(".parquet") or self._own_image_file(rel):
                continue  # this run rewrites its own image files in full
            ids.update(self.store.read_parquet(rel, columns=["image_id"]).column("image_id").to_pylist())
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
                if t.partition:
                    rel = chunk_rel(t, {"run": self.run, **values}, chunk)
                else:
                    rel = image_rel(self.run, chunk)
                write_table(self.store, rel, t, data, self.metadata)
        self.store.write_text(marker_rel(self.run, chunk), json.dumps({"chunk": chunk}))
        return True

    # -- the runs table -----------------------------------------------------------
    def write_run_row(self, row: Mapping[str, object]) -> None:
        data = pa.Table.from_pylist([dict(row)], schema=RUNS.schema)
        self.store.write_parquet(run_rel(self.run), with_metadata(data, self.metadata))

    def read_run_row(self) -> dict | None:
        return read_run_row(self.store, self.run)

    def count_examples(self) -> int:
        """Rows of this run's ``examples`` table in committed chunks."""
        done = self.done_chunks()
        return sum(self.store.parquet_rows(rel) for rel in self.store.list(f"examples/run={self.run}")
                   if chunk_of(rel) in done)

    def delete_run(self) -> None:
        """Remove every file of this run (used by ``--overwrite``)."""
        for t in TABLES.values():
            if t.partition:
                self.store.delete_tree(f"{t.name}/run={self.run}")
        self.store.delete(run_rel(self.run))
        self.store.delete_tree(self.state)
        self.store.ensure_dir(self.state)

