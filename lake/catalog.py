"""DuckDB over the lake: one view per table, and the read-only sandbox for user SQL.

A :class:`Catalog` owns one in-memory DuckDB database holding one VIEW per table
of ``lake.schema.TABLES``, named as the table, with the partition keys as typed
columns (run VARCHAR, stream VARCHAR, layer INTEGER) in ``Table.columns`` order.
A table with no files yet is an empty view of the right types, so a query never
fails on a fresh lake.

Two ways in:

- :meth:`Catalog.df` runs the trusted, parameterised queries of
  ``lake/queries.py`` and returns a pandas DataFrame.
- :meth:`Catalog.user_sql` runs what a person typed (``vlatlas sql``, the SQL
  page): one read-only SELECT over the views, with a time and a row limit.

The sandbox has two layers. The statement is parsed by DuckDB's own parser and
refused unless it is exactly one SELECT (which includes ``WITH … SELECT``,
``FROM …``, ``VALUES``, ``DESCRIBE``, ``SUMMARIZE`` and ``SHOW``). Under that, the
database itself is locked down for every query, trusted or not: no file outside
the lake root can be opened, no extension installed or loaded, no spill files
written, Python objects cannot be scanned, and ``lock_configuration`` stops any
setting from changing afterwards. The settings layer cannot stop a ``COPY … TO``
*inside* the lake root (DuckDB's ``allowed_directories`` grants writes as well as
reads), nor DDL on the in-memory views; the parser layer does.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lake.schema import IMAGES, PARTITION_TYPES, RUNS, TABLES, Table
from lake.store import Store, open_store
from lake.writer import (IMAGE_FILE, NOT_CHUNKED, STATE_DIR, chunk_of, chunk_rel, done_chunks, read_run_row,
                         run_of)

# DuckDB threads per catalog; the app and the CLI share the machine with the user.
THREADS = max(1, min(4, os.cpu_count() or 1))
# After interrupt(), how long to wait for DuckDB to unwind before giving up on the worker.
INTERRUPT_GRACE_S = 5.0

# On an object store, how often (seconds) the catalog lists the lake to see whether it changed.
STALE_CHECK_S = 2.0

ALLOWED = "only read-only SELECT queries over the lake's views are allowed"


class LakeError(Exception):
    """The root is not a lake (missing, or no ``runs/`` folder); the message says what to do."""


class SandboxError(Exception):
    """A user query was refused; the message names what was refused and why."""


class QueryError(Exception):
    """A query failed (syntax, binder, time or memory limit); the message says why."""


@dataclass(frozen=True)
class QueryResult:
    df: pd.DataFrame
    truncated: bool  # more rows than max_rows existed
    elapsed_s: float


# -- types and views ------------------------------------------------------------------


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


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def view_sql(table: Table, sources: list[str], lacking: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """The SELECT behind one table's view over ``sources`` (files or globs DuckDB opens); an
    empty view of the right types when there are none.

    ``lacking`` names the sources whose files were written before some of the table's added
    columns (``Table.added``), and which columns they lack: their rows get each column's default
    (one scan per set of lacking columns, joined by UNION ALL; one scan when nothing lacks any).
    """
    types = column_types(table)
    if not sources:
        cols = ", ".join(f"CAST(NULL AS {t}) AS {_ident(c)}" for c, t in types.items())
        return f"SELECT {cols} WHERE false"
    groups: dict[tuple[str, ...], list[str]] = {}
    for x in sources:
        groups.setdefault(tuple((lacking or {}).get(x, ())), []).append(x)
    defaults = dict(table.added)
    selects = []
    for missing, group in groups.items():
        # Casting to the declared type pins the view's types to the schema (a no-op,
        # so filters still push down into the Parquet scan).
        cols = ", ".join(f"CAST({defaults[c] if c in missing else _ident(c)} AS {t}) AS {_ident(c)}"
                         for c, t in types.items())
        files = "[" + ", ".join(_literal(x) for x in group) + "]"
        if table.partition:
            hive = ", ".join(f"{_literal(k)}: {types[k]}" for k in table.partition)
            src = f"read_parquet({files}, hive_partitioning = true, hive_types = {{{hive}}})"
        else:
            src = f"read_parquet({files}, hive_partitioning = false, filename = true)"
        selects.append(f"SELECT {cols} FROM {src}")
    sql = " UNION ALL ".join(selects)
    if table is IMAGES:
        # Two runs may store the same image (content-addressed); keep one row per id.
        sql += " QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY filename) = 1"
    return sql


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


def committed_sources(store: Store, runs: dict[str, str | None] | None = None) -> dict[str, list[str]]:
    """``{table: what its view reads}``: only rows of committed chunks (``lake/writer.py``).

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
    runs = run_statuses(store) if runs is None else runs
    probed = {} if probed is None else probed
    done = {run: done_chunks(store, run) for run, status in runs.items() if status != "complete"}
    out: dict[str, list[str]] = {}
    lacking: dict[str, dict[str, tuple[str, ...]]] = {}
    for t in TABLES.values():
        if t is RUNS:
            out[t.name] = [store.url(f"{RUNS.name}/{run}.parquet") for run in runs]
            continue
        infos = {f: (m, n) for f, m, n in store.list_info(t.name)
                 if f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith(".")}
        files = list(infos)
        lack = lacking[t.name] = {}
        src: list[str] = []
        if t is IMAGES:
            for f in files:
                m = IMAGE_FILE.match(f.rsplit("/", 1)[-1])
                if m and m.group(1) in runs and (runs[m.group(1)] == "complete"
                                                 or int(m.group(2)) in done.get(m.group(1), ())):
                    src.append(store.url(f))
        else:
            by_run: dict[str, list[str]] = {}
            for f in files:
                r = run_of(f)
                if r in runs:
                    by_run.setdefault(r, []).append(f)
            for run, fs in sorted(by_run.items()):
                whole = runs[run] == "complete" or t.name in NOT_CHUNKED
                if not whole:
                    fs = [f for f in fs if chunk_of(f) in done[run]]
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


def _fsspec_view(store: Store):
    """``store``'s pyarrow filesystem as an fsspec filesystem DuckDB can register for its scheme."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    class _Wrapped(ArrowFSWrapper):
        protocol = store.scheme

    return _Wrapped(store.fs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- the catalog ----------------------------------------------------------------------


class Catalog:
    """The lake's tables as DuckDB views, with the sandbox for user SQL.

    Parameters
    ----------
    root : the lake's root folder (it must hold a ``runs/`` folder).
    timeout_s : time limit of every query, trusted or not, in seconds.
    memory_limit : DuckDB's memory limit, e.g. ``"2GB"``.
    max_rows : row limit of :meth:`user_sql` results.
    """

    def __init__(self, root: str | Path | Store, *, timeout_s: float = 10.0, memory_limit: str = "2GB",
                 max_rows: int = 10_000):
        try:
            self.store = open_store(root)
            is_lake = self.store.is_dir(RUNS.name)
        except (OSError, ValueError) as e:
            raise LakeError(f"cannot open the lake at {root}: {_first_line(e)}") from None
        # a local lake's root is a Path (older callers join paths to it); an object store's, its URI
        self.root = self.store.local_path() if self.store.local else self.store.uri
        if not is_lake:
            raise LakeError(
                f"{self.store.uri} is not a VL-Atlas lake: no runs/ folder. "
                "Build one with `vlatlas extract ...` or `vlatlas demo`"
            )
        self.timeout_s = float(timeout_s)
        self.memory_limit = memory_limit
        self.max_rows = int(max_rows)
        self._lock = threading.RLock()
        self._con = self._connect()
        self._signature: tuple | None = None
        self._checked = 0.0
        self._runs: dict[str, str | None] = {}  # run -> status, as of the last refresh
        self._probed: dict = {}  # (file, time, size) -> the added columns it lacks (view_sources)
        self.refresh()

    # -- setup ------------------------------------------------------------------------
    def _connect(self) -> duckdb.DuckDBPyConnection:
        # Extension autoloading must be off from the start, before any query runs.
        con = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        })
        if not self.store.local:
            # DuckDB reads the object store through pyarrow's filesystem (the same one the writer
            # used, with the same credentials), registered before the sandbox below is locked.
            con.register_filesystem(_fsspec_view(self.store))
        allowed = self.store.url() + ("/" if not self.store.local else os.sep)
        # Order matters: allowed_directories and temp_directory can no longer
        # change once external access is off, and nothing can after the lock.
        # GLOBAL, because each query runs on a cursor, which starts from the
        # global values and does not inherit this connection's local ones.
        for stmt in (
            "SET temp_directory = ''",  # no spill files (the default .tmp would also be readable)
            f"SET allowed_directories = [{_literal(allowed)}]",
            "SET enable_external_access = false",
            "SET GLOBAL python_enable_replacements = false",  # no scans of Python variables by name
            "SET allow_community_extensions = false",
            f"SET memory_limit = {_literal(self.memory_limit)}",
            f"SET threads = {THREADS}",
            "SET lock_configuration = true",
        ):
            con.execute(stmt)
        return con

    def _state(self) -> tuple:
        """What, when it changes, changes what the views must read: the runs' files (a run added,
        completed, replaced or deleted), the done markers of runs still running (a chunk
        committed) and the maps of ``vlatlas embed``."""
        return (tuple(self.store.list_info(RUNS.name, recursive=False)),
                tuple(tuple(self.store.list(f"{STATE_DIR}/{r}", recursive=False))
                      for r, status in sorted(self._runs.items()) if status != "complete"),
                tuple(self.store.list_info("embeddings")))

    def refresh(self) -> None:
        """Recreate every view from the lake's committed chunks."""
        with self._lock:
            runs = run_statuses(self.store)
            sources, lacking = view_sources(self.store, runs, self._probed)
            for t in TABLES.values():
                self._con.execute(f"CREATE OR REPLACE VIEW {_ident(t.name)} AS "
                                  f"{view_sql(t, sources[t.name], lacking.get(t.name))}")
            self._runs = runs
            self._signature = self._state()
            self._checked = time.monotonic()

    def _refresh_if_stale(self) -> None:
        """Refresh when the lake changed; on an object store at most every STALE_CHECK_S seconds
        (each check lists objects)."""
        if not self.store.local and time.monotonic() - self._checked < STALE_CHECK_S:
            return
        with self._lock:
            now = self._state()
            self._checked = time.monotonic()
            if now != self._signature:
                self.refresh()

    def tables(self) -> list[str]:
        """The views' names, one per lake table."""
        return list(TABLES)

    def chunk_file(self, table: str, values: dict, chunk: int) -> str | None:
        """The path (or URI) of one committed chunk's file of a partitioned table (``values``: every
        partition key), or None when there is no such file.

        For trusted queries that know which chunk holds their rows: reading that one file
        (``read_parquet(?)``) spares DuckDB opening every chunk's footer, which is what a view
        scan costs when a run has many chunks (see ``lake.queries.attention_block``).
        """
        self._refresh_if_stale()
        rel = chunk_rel(TABLES[table], values, int(chunk))
        run = values.get("run")
        if run not in self._runs:
            return None
        if self._runs[run] != "complete" and int(chunk) not in done_chunks(self.store, run):
            return None  # not committed (yet)
        return self.store.url(rel) if self.store.is_file(rel) else None

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running ----------------------------------------------------------------------
    def _run(self, sql: str | duckdb.Statement, params, trusted: bool) -> tuple[pd.DataFrame, float]:
        """Run one statement on a fresh cursor in a worker thread, under the time limit."""
        self._refresh_if_stale()
        for attempt in (0, 1):
            try:
                return self._run_once(sql, params)
            except duckdb.IOException as e:
                # A table lost its last file (a run was deleted): rebuild its view once.
                if attempt == 0 and "No files found" in str(e):
                    self.refresh()
                    continue
                raise self._explain(e, trusted) from None
            except duckdb.Error as e:
                raise self._explain(e, trusted) from None
        raise AssertionError("unreachable")

    def _run_once(self, sql, params) -> tuple[pd.DataFrame, float]:
        with self._lock:
            cur = self._con.cursor()
        box: dict[str, object] = {}

        def work() -> None:
            try:
                box["df"] = cur.execute(sql, params).df()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        worker = threading.Thread(target=work, name="vlatlas-query", daemon=True)
        t0 = time.perf_counter()
        worker.start()
        timed_out = False
        try:
            worker.join(self.timeout_s)
            if worker.is_alive():
                timed_out = True
                cur.interrupt()
                worker.join(INTERRUPT_GRACE_S)
        except BaseException:  # e.g. Ctrl-C in `vlatlas sql`: stop the query too
            cur.interrupt()
            raise
        finally:
            if not worker.is_alive():
                cur.close()
        elapsed = time.perf_counter() - t0
        if timed_out and "df" not in box:
            raise QueryError(
                f"query stopped after {self.timeout_s:g} s (the time limit). Read less: filter on "
                "run, stream, layer or example_id, aggregate, or add a LIMIT"
            )
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["df"], elapsed  # type: ignore[return-value]

    def _explain(self, e: duckdb.Error, trusted: bool) -> Exception:
        """A DuckDB error as the sentence a user sees."""
        said = _first_line(e)
        if isinstance(e, duckdb.PermissionException) or "configuration has been locked" in said:
            return SandboxError(
                f"refused: {said}. The SQL sandbox sees only the lake's views (and Parquet files "
                f"under {self.store.uri}); reading other files, writing, extensions and settings are off"
            )
        if isinstance(e, duckdb.OutOfMemoryException):
            return QueryError(
                f"query stopped: it needs more than the memory limit ({self.memory_limit}). Read less: "
                f"filter on run, stream, layer or example_id, or aggregate. DuckDB said: {said}"
            )
        if isinstance(e, duckdb.InterruptException):
            return QueryError(f"query interrupted: {said}")
        # Trusted queries are ours: keep DuckDB's whole message (LINE/caret context) for debugging.
        return QueryError(str(e).strip() if trusted else said)

    def df(self, sql: str, params: list | dict | None = None) -> pd.DataFrame:
        """Run a trusted query (``lake/queries.py``) over the views; thread-safe.

        Parameters
        ----------
        sql : one statement, with ``?`` or ``$name`` placeholders.
        params : the placeholders' values.
        """
        out, _ = self._run(sql, params, trusted=True)
        return out

    def check_user_sql(self, sql: str) -> str:
        """The text of the one read-only SELECT in ``sql``; SandboxError or QueryError otherwise."""
        if not isinstance(sql, str):
            raise TypeError(f"sql must be a string, not {type(sql).__name__}")
        try:
            with self._lock:
                stmts = self._con.extract_statements(sql)
        except duckdb.Error as e:
            raise QueryError(_first_line(e)) from None
        if not stmts:
            raise QueryError("empty query: write one SELECT over the lake's views, e.g. SELECT * FROM runs")
        kinds = [_statement_type(s) for s in stmts]
        if len(stmts) > 1:
            raise SandboxError(
                f"refused: {len(stmts)} statements ({', '.join(kinds)}); "
                f"send one statement at a time: {ALLOWED}"
            )
        stmt, kind = stmts[0], kinds[0]
        if kind != "SELECT":
            kw = _keyword(stmt.query)
            a = "an" if kind[0] in "AEIOU" else "a"
            what = f"{a} {kind} statement" if kw == kind else f"{kw} ({a} {kind} statement)"
            raise SandboxError(f"refused {what}: {ALLOWED}")
        return _strip_tail(stmt.query)

    def user_sql(self, sql: str) -> QueryResult:
        """Run what a person typed in the sandbox: one read-only SELECT, time and row limits.

        Raises SandboxError when the statement is refused, QueryError when it fails.
        """
        body = self.check_user_sql(sql)
        # The row limit is a LIMIT around the user's query, so DuckDB stops early.
        limited = f"SELECT * FROM (\n{body}\n) AS user_query LIMIT {self.max_rows + 1}"
        try:
            with self._lock:
                stmts = self._con.extract_statements(limited)
        except duckdb.Error:
            stmts = []
        if len(stmts) != 1 or _statement_type(stmts[0]) != "SELECT":
            raise QueryError("could not apply the row limit to this query; write it as one plain SELECT")
        out, elapsed = self._run(stmts[0], None, trusted=False)
        truncated = len(out) > self.max_rows
        if truncated:
            out = out.iloc[: self.max_rows]
        return QueryResult(df=out, truncated=truncated, elapsed_s=elapsed)


def open_catalog(root: str | Path) -> Catalog:
    """A :class:`Catalog` over the lake at ``root`` with the default limits."""
    return Catalog(root)


def _statement_type(stmt: duckdb.Statement) -> str:
    """The statement's type name; the Python client cannot name some (UPDATE EXTENSIONS in 2.0)."""
    try:
        return stmt.type.name
    except ValueError:
        return "UNKNOWN"


def _keyword(sql: str) -> str:
    words = sql.strip().split(None, 1)
    return words[0].upper().rstrip(";") if words else ""


def _strip_tail(sql: str) -> str:
    """``sql`` without its trailing semicolons and comments (so it can sit in a subquery)."""
    tokens = duckdb.tokenize(sql)
    cut = len(sql)
    for pos, kind in reversed(tokens):
        if kind == duckdb.token_type.comment or (kind == duckdb.token_type.operator and sql[pos] == ";"):
            cut = pos
        else:
            break
    return sql[:cut].rstrip()


# -- plain-text tables -------------------------------------------------------------------


def _cell(v: object, max_width: int) -> str:
    if v is None or v is pd.NA or v is pd.NaT:
        s = "NULL"
    elif isinstance(v, (float, np.floating)):
        s = "NULL" if math.isnan(v) else f"{v:.6g}"
    elif isinstance(v, (bytes, bytearray, memoryview)):
        s = f"<{len(v)} bytes>"
    elif isinstance(v, (list, tuple, np.ndarray)):
        items = list(v[: max_width // 2 + 1])
        s = "[" + ", ".join(_cell(x, max_width) for x in items)
        s += (", …]" if len(v) > len(items) else "]")
    elif isinstance(v, dict):
        s = "{" + ", ".join(f"{k}: {_cell(x, max_width)}" for k, x in v.items()) + "}"
    else:
        s = str(v)
    s = " ".join(s.split()) if any(c in s for c in "\n\r\t") else s
    return s if len(s) <= max_width else s[: max_width - 1] + "…"


def format_table(df: pd.DataFrame, *, max_width: int = 40, truncated: bool = False) -> str:
    """Render a DataFrame as a plain-text table (for ``vlatlas sql``).

    Parameters
    ----------
    df : the rows to show.
    max_width : longest cell (and header), in characters; longer ones are cut with "…".
    truncated : whether the query had more rows than ``df`` holds (adds a note).
    """
    max_width = max(2, int(max_width))
    headers = [_cell(str(c), max_width) for c in df.columns]
    columns = [[_cell(v, max_width) for v in df.iloc[:, i].tolist()] for i in range(df.shape[1])]
    right = [pd.api.types.is_numeric_dtype(df.dtypes.iloc[i]) and not pd.api.types.is_bool_dtype(df.dtypes.iloc[i])
             for i in range(df.shape[1])]
    widths = [max([len(h)] + [len(s) for s in col]) for h, col in zip(headers, columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(s.rjust(w) if r else s.ljust(w) for s, w, r in zip(cells, widths, right)).rstrip()

    lines = []
    if headers:
        lines.append(line(headers))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(line([col[r] for col in columns]) for r in range(len(df)))
    n = len(df)
    footer = f"{n} row" + ("" if n == 1 else "s")
    if truncated:
        footer += f" (truncated at {n} rows)"
    lines.append(footer)
    return "\n".join(lines)
