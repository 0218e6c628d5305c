"""What each table's DuckDB view reads, and the SELECT behind it.

Each table of ``lake.schema.TABLES`` has one VIEW, named as the table, with the partition keys
as typed columns (run VARCHAR, stream VARCHAR, layer INTEGER) in ``Table.columns`` order. A
view reads only committed rows (the rule is ``lake/commit.py``'s): a complete run's partition
folders through a glob, a running or stopped run's committed chunk files by name. A table with
no files yet is an empty view of the right types, so a query never fails on a fresh lake.

Nothing here opens a DuckDB connection: :class:`lake.catalog.Catalog` creates the views from
:func:`view_sources` and :func:`view_sql`.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from lake.commit import Commits, chunk_of, run_of, run_rel
from lake.schema import IMAGES, PARTITION_TYPES, RUNS, TABLES, Table
from lake.store import Store


def duckdb_type(t: pa.DataType) -> str:
    """The DuckDB type a Parquet column written from pyarrow type ``t`` reads back as."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    ints = {8: "TINYINT", 16: "SMALLINT", 32: "INTEGER", 64: "BIGINT"}
    if pa.types.is_signed_integer(t):
        return ints[t.bit_width]
    if pa.types.is_unsigned_integer(t):
        return "U" + ints[t.bit_width]
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "FLOAT"  # DuckDB has no half type; Parquet FLOAT16 reads as FLOAT
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz else "TIMESTAMP"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "BLOB"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return duckdb_type(t.value_type) + "[]"
    raise TypeError(f"no DuckDB type declared for pyarrow type {t}")


def column_types(table: Table) -> dict[str, str]:
    """``{column: DuckDB type}`` of a table's view, in view order (partition keys first)."""
    types = {k: duckdb_type(PARTITION_TYPES[k]) for k in table.partition}
    types.update({f.name: duckdb_type(f.type) for f in table.schema})
    return types


def ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """``text`` as a quoted SQL string literal (for DDL and settings, which take no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def view_sql(table: Table, sources: list[str], lacking: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """The SELECT behind one table's view over ``sources`` (files or globs DuckDB opens); an
    empty view of the right types when there are none.

    ``lacking`` names the sources whose files were written before some of the table's added
    columns (``Table.added``), and which columns they lack: their rows get each column's default
    (one scan per set of lacking columns, joined by UNION ALL; one scan when nothing lacks any).
    A view's definition takes no parameters, so the sources are quoted as literals.
    """
    types = column_types(table)
    if not sources:
        cols = ", ".join(f"CAST(NULL AS {t}) AS {ident(c)}" for c, t in types.items())
        return f"SELECT {cols} WHERE false"
    groups: dict[tuple[str, ...], list[str]] = {}
    for x in sources:
        groups.setdefault(tuple((lacking or {}).get(x, ())), []).append(x)
    defaults = dict(table.added)
    selects = []
    for missing, group in groups.items():
        # Casting to the declared type pins the view's types to the schema (a no-op,
        # so filters still push down into the Parquet scan).
        cols = ", ".join(f"CAST({defaults[c] if c in missing else ident(c)} AS {t}) AS {ident(c)}"
                         for c, t in types.items())
        files = "[" + ", ".join(literal(x) for x in group) + "]"
        if table.partition:
            hive = ", ".join(f"{literal(k)}: {types[k]}" for k in table.partition)
            src = f"read_parquet({files}, hive_partitioning = true, hive_types = {{{hive}}})"
        else:
            src = f"read_parquet({files}, hive_partitioning = false, filename = true)"
        selects.append(f"SELECT {cols} FROM {src}")
    sql = " UNION ALL ".join(selects)
    if table is IMAGES:
        # Two runs may store the same image (content-addressed); keep one row per id.
        sql += " QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY filename) = 1"
    return sql


def committed_sources(store: Store, runs: dict[str, str | None] | None = None) -> dict[str, list[str]]:
    """``{table: what its view reads}``: only rows of committed chunks (``lake/commit.py``).

    A complete run's partition folders are read whole through a glob (its chunks are all
    committed, and a resumed run deleted whatever else was there first); a running or stopped
    run contributes only the files of chunks that have a done marker, so a chunk being written
    (or left half-written) is never seen, whether or not the store can rename. Runs without a
    ``runs`` row are not shown.
    """
    return view_sources(store, runs)[0]


def _lacking(store: Store, table: Table, rel: str, info: tuple, probed: dict) -> tuple[str, ...]:
    """The added columns (``Table.added``) that one Parquet file lacks, from its footer (cached by the
    file's path, time and size in ``probed``: lake files are written once, atomically)."""
    key = (rel, *info)
    if key not in probed:
        try:
            names = set(pq.read_schema(store.path(rel), filesystem=store.fs).names)
        except (OSError, pa.ArrowInvalid):  # gone or unreadable: the scan will say so
            return ()
        probed[key] = tuple(c for c, _ in table.added if c not in names)
    return probed[key]


def _run_lacking(store: Store, table: Table, files: list[str], infos: dict, probed: dict) -> dict[str, tuple[str, ...]]:
    """``{file: the added columns it lacks}`` of one run's files of a table with added columns.

    A run whose first chunk has every column was started by software that writes them, and so
    was each later chunk: one footer is read. Otherwise (an older run, perhaps resumed or given a
    live example by newer software) every file's footer is read once.
    """
    if not files:
        return {}
    ordered = sorted(files, key=lambda f: (chunk_of(f) is None, chunk_of(f) or 0, f))
    if not _lacking(store, table, ordered[0], infos[ordered[0]], probed):
        return {f: () for f in files}
    return {f: _lacking(store, table, f, infos[f], probed) for f in files}


def view_sources(store: Store, runs: dict[str, str | None] | None = None, probed: dict | None = None
                 ) -> tuple[dict[str, list[str]], dict[str, dict[str, tuple[str, ...]]]]:
    """(:func:`committed_sources`, ``{table: {source: the added columns its files lack}}``).

    Files written before a column was added to their table (``Table.added``, ``SCHEMA_VERSION``)
    lack it; :func:`view_sql` gives their rows its default. A complete run whose files differ in
    this is read file by file instead of through its glob. ``probed`` caches what each file lacks.
    """
    commits = Commits.read(store, runs)
    probed = {} if probed is None else probed
    out: dict[str, list[str]] = {}
    lacking: dict[str, dict[str, tuple[str, ...]]] = {}
    for t in TABLES.values():
        if t is RUNS:
            out[t.name] = [store.url(run_rel(run)) for run in commits.statuses]
            continue
        infos = {f: (m, n) for f, m, n in store.list_info(t.name)
                 if f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith(".")}
        lack = lacking[t.name] = {}
        src: list[str] = []
        if t is IMAGES:
            src = [store.url(f) for f in infos if commits.shows(t, f)]
        else:
            by_run: dict[str, list[str]] = {}
            for f in infos:
                if commits.shows(t, f):
                    by_run.setdefault(run_of(f), []).append(f)
            for run, fs in sorted(by_run.items()):
                whole = commits.whole(t, run)
                miss = _run_lacking(store, t, fs, infos, probed) if t.added else {}
                if whole and len(set(miss.values())) <= 1:
                    glob = store.url(f"{t.name}/run={run}/**/*.parquet")
                    src.append(glob)
                    if any(miss.values()):
                        lack[glob] = next(iter(miss.values()))
                else:
                    src.extend(store.url(f) for f in fs)
                    lack.update({store.url(f): m for f, m in miss.items() if m})
        out[t.name] = src
    return out, lacking
