"""DuckDB over the lake: one connection holding one view per table, and the queries run on it.

A :class:`Catalog` owns one in-memory DuckDB database (locked down by ``lake/sandbox.py``) holding
one VIEW per table of ``lake.schema.TABLES`` over the lake's committed chunks (``lake/views.py``
says what each view reads, ``lake/commit.py`` what is committed). It re-creates the views when the
lake changes.

Two ways in:

- :meth:`Catalog.df` runs the trusted queries of ``lake/queries/`` (named ``$parameters``) and
  returns a pandas DataFrame.
- :meth:`Catalog.user_sql` runs what a person typed (``vlatlas sql``, the SQL page): one read-only
  SELECT over the views (``lake.sandbox.one_select``), with a time and a row limit.

Every query runs on its own cursor in a worker thread, under the catalog's time limit.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from lake import sandbox
from lake.commit import NOT_CHUNKED, chunk_committed, chunk_rel, run_statuses, state_rel
from lake.errors import LakeError, QueryError, first_line
from lake.schema import RUNS, TABLES
from lake.store import Store, open_store
from lake.views import ident, view_sources, view_sql

__all__ = ["Catalog", "QueryResult", "open_catalog", "THREADS"]

# DuckDB threads per catalog; the app and the CLI share the machine with the user.
THREADS = max(1, min(4, os.cpu_count() or 1))
# After interrupt(), how long to wait for DuckDB to unwind before giving up on the worker.
INTERRUPT_GRACE_S = 5.0

# On an object store, how often (seconds) the catalog lists the lake to see whether it changed.
STALE_CHECK_S = 2.0


@dataclass(frozen=True)
class QueryResult:
    df: pd.DataFrame
    truncated: bool  # more rows than max_rows existed
    elapsed_s: float


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
            raise LakeError(f"cannot open the lake at {root}: {first_line(e)}") from None
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
        return sandbox.connect(self.store, self.memory_limit, THREADS)

    def _state(self) -> tuple:
        """What, when it changes, changes what the views must read: the runs' files (a run added,
        completed, replaced or deleted), the done markers of runs still running (a chunk
        committed), and the files of the tables later steps write (``lake.commit.NOT_CHUNKED``: maps,
        probes, interventions)."""
        return (tuple(self.store.list_info(RUNS.name, recursive=False)),
                tuple(tuple(self.store.list(state_rel(r), recursive=False))
                      for r, status in sorted(self._runs.items()) if status != "complete"),
                *(tuple(self.store.list_info(name)) for name in NOT_CHUNKED))

    def refresh(self) -> None:
        """Recreate every view from the lake's committed chunks."""
        with self._lock:
            runs = run_statuses(self.store)
            sources, lacking = view_sources(self.store, runs, self._probed)
            for t in TABLES.values():
                self._con.execute(f"CREATE OR REPLACE VIEW {ident(t.name)} AS "
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
        (``read_parquet($path)``) spares DuckDB opening every chunk's footer, which is what a view
        scan costs when a run has many chunks (see ``lake.queries.attention_block``).
        """
        self._refresh_if_stale()
        rel = chunk_rel(TABLES[table], values, int(chunk))
        run = values.get("run")
        if run not in self._runs:
            return None
        if not chunk_committed(self.store, run, self._runs[run], int(chunk)):
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
        said = first_line(e)
        refused = sandbox.refusal(e, self.store.uri)
        if refused is not None:
            return refused
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
        """Run a trusted query (``lake/queries/``) over the views; thread-safe.

        Parameters
        ----------
        sql : one statement, with ``$name`` placeholders (or ``?``).
        params : the placeholders' values: ``{name: value}`` (or a list, in order).
        """
        out, _ = self._run(sql, params, trusted=True)
        return out

    def check_user_sql(self, sql: str) -> str:
        """The text of the one read-only SELECT in ``sql``; SandboxError or QueryError otherwise."""
        with self._lock:
            return sandbox.one_select(self._con, sql)

    def user_sql(self, sql: str) -> QueryResult:
        """Run what a person typed in the sandbox: one read-only SELECT, time and row limits.

        Raises SandboxError when the statement is refused, QueryError when it fails.
        """
        body = self.check_user_sql(sql)
        # The row limit is a LIMIT around the user's query, so DuckDB stops early.
        with self._lock:
            stmt = sandbox.row_limited(self._con, body, self.max_rows)
        out, elapsed = self._run(stmt, None, trusted=False)
        truncated = len(out) > self.max_rows
        if truncated:
            out = out.iloc[: self.max_rows]
        return QueryResult(df=out, truncated=truncated, elapsed_s=elapsed)


def open_catalog(root: str | Path) -> Catalog:
    """A :class:`Catalog` over the lake at ``root`` with the default limits."""
    return Catalog(root)
