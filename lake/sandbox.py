"""The read-only SQL sandbox: a locked-down DuckDB connection, and the check of what a person typed.

The sandbox has two layers. The statement is parsed by DuckDB's own parser and refused unless it
is exactly one SELECT (which includes ``WITH … SELECT``, ``FROM …``, ``VALUES``, ``DESCRIBE``,
``SUMMARIZE`` and ``SHOW``): :func:`one_select`. Under that, the database itself is locked down
for every query, trusted or not (:func:`connect`): no file outside the lake root can be opened,
no extension installed or loaded, no spill files written, Python objects cannot be scanned, and
``lock_configuration`` stops any setting from changing afterwards. The settings layer cannot stop
a ``COPY … TO`` *inside* the lake root (DuckDB's ``allowed_directories`` grants writes as well as
reads), nor DDL on the in-memory views; the parser layer does.
"""

from __future__ import annotations

import io
import os
import threading

import duckdb

from lake.errors import QueryError, SandboxError, first_line
from lake.store import Store
from lake.views import literal

ALLOWED = "only read-only SELECT queries over the lake's views are allowed"


class PositionalFile(io.RawIOBase):
    """A read-only object-store file whose position belongs to the thread that moved it.

    DuckDB shares one open file among its threads and reads at an offset as ``seek`` then
    ``read``; the GIL is released between the two (and inside pyarrow's I/O), so on a file with
    one shared position another thread's ``seek`` can land in between and the read comes back
    short ("only 0 bytes returned"). Here each thread has its own position and every read is
    pyarrow's ``read_at``, which is safe from many threads at once.
    """

    def __init__(self, native):
        super().__init__()
        self._native = native
        self._size = native.size()
        self._at = threading.local()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return getattr(self._at, "pos", 0)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._size}[whence]
        self._at.pos = max(0, base + offset)
        return self._at.pos

    def read(self, n: int = -1) -> bytes:
        pos = self.tell()
        n = self._size - pos if n is None or n < 0 else min(n, self._size - pos)
        data = self._native.read_at(n, pos) if n > 0 else b""
        self._at.pos = pos + len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._native.close()
        super().close()


def _fsspec_view(store: Store):
    """``store``'s pyarrow filesystem as an fsspec filesystem DuckDB can register for its scheme."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    class _Wrapped(ArrowFSWrapper):
        protocol = store.scheme

        def _open(self, path, mode="rb", block_size=None, seekable=True, **kwargs):
            if mode == "rb" and seekable:
                return PositionalFile(self.fs.open_input_file(path))
            return super()._open(path, mode, block_size, seekable, **kwargs)

    return _Wrapped(store.fs)


def connect(store: Store, memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB database that can read Parquet under ``store``'s root and nothing else."""
    # Extension autoloading must be off from the start, before any query runs.
    con = duckdb.connect(":memory:", config={
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    })
    if not store.local:
        # DuckDB reads the object store through pyarrow's filesystem (the same one the writer
        # used, with the same credentials), registered before the sandbox below is locked.
        con.register_filesystem(_fsspec_view(store))
    allowed = store.url() + ("/" if not store.local else os.sep)
    # Order matters: allowed_directories and temp_directory can no longer
    # change once external access is off, and nothing can after the lock.
    # GLOBAL, because each query runs on a cursor, which starts from the
    # global values and does not inherit this connection's local ones.
    for stmt in (
        "SET temp_directory = ''",  # no spill files (the default .tmp would also be readable)
        f"SET allowed_directories = [{literal(allowed)}]",
        "SET enable_external_access = false",
        "SET GLOBAL python_enable_replacements = false",  # no scans of Python variables by name
        "SET allow_community_extensions = false",
        f"SET memory_limit = {literal(memory_limit)}",
        f"SET threads = {int(threads)}",
        "SET lock_configuration = true",
    ):
        con.execute(stmt)
    return con


def refusal(e: duckdb.Error, lake_uri: str) -> SandboxError | None:
    """The sentence for a DuckDB error that the locked-down settings raised, else None."""
    said = first_line(e)
    if isinstance(e, duckdb.PermissionException) or "configuration has been locked" in said:
        return SandboxError(
            f"refused: {said}. The SQL sandbox sees only the lake's views (and Parquet files "
            f"under {lake_uri}); reading other files, writing, extensions and settings are off"
        )
    return None


def one_select(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The text of the one read-only SELECT in ``sql``; SandboxError or QueryError otherwise.

    ``con`` only parses (the caller holds whatever lock guards it).
    """
    if not isinstance(sql, str):
        raise TypeError(f"sql must be a string, not {type(sql).__name__}")
    try:
        stmts = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(first_line(e)) from None
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


def row_limited(con: duckdb.DuckDBPyConnection, body: str, max_rows: int) -> duckdb.Statement:
    """The checked SELECT ``body`` (:func:`one_select`) wrapped in a LIMIT of ``max_rows + 1`` rows,
    so DuckDB stops early and the caller can tell whether more existed."""
    limited = f"SELECT * FROM (\n{body}\n) AS user_query LIMIT {int(max_rows) + 1}"
    try:
        stmts = con.extract_statements(limited)
    except duckdb.Error:
        stmts = []
    if len(stmts) != 1 or _statement_type(stmts[0]) != "SELECT":
        raise QueryError("could not apply the row limit to this query; write it as one plain SELECT")
    return stmts[0]


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
