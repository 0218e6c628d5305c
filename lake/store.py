"""Where a lake lives: a local folder or an object store, behind one small interface.

A lake root is a folder (``/data/lake``, ``file:///data/lake``) or a URI that pyarrow's
filesystems open: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``abfs://…``, ``hdfs://…``.
S3 credentials and endpoint come from the usual AWS settings (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible server).

Every path below is *relative to the root*, with ``/`` separators. Writes are whole or
nothing for a reader: on a disk a file is written aside and renamed into place; on an
object store, which cannot rename, an object appears only when its upload completes. What
makes a chunk of rows visible is its done marker, written after its files (``lake/writer.py``);
readers list the markers (``lake/views.py``; the rule is ``lake/commit.py``'s), never the data
files alone.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(root: str | Path) -> bool:
    """Whether ``root`` names an object store (``scheme://…``) rather than a local folder."""
    s = str(root)
    return "://" in s and not s.startswith("file://")


class Store:
    """A lake root: read, list, write and delete files under it.

    Parameters
    ----------
    root : a local folder (``str`` or ``Path``, ``file://`` allowed) or an object-store URI.
    """

    def __init__(self, root: str | Path):
        s = str(root)
        if is_uri(s):
            try:
                self.fs, base = pafs.FileSystem.from_uri(s)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise ValueError(f"cannot open the lake at {s}: {e}") from None
            self.local = False
            self.scheme = s.split("://", 1)[0]
            self.base = base.rstrip("/")
            self.uri = f"{self.scheme}://{self.base}"
        else:
            p = Path(s.removeprefix("file://")).expanduser().resolve()
            self.fs = pafs.LocalFileSystem()
            self.local = True
            self.scheme = "file"
            self.base = str(p)
            self.uri = str(p)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    # -- names ----------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what ``self.fs`` takes)."""
        return f"{self.base}/{rel}" if rel else self.base

    def url(self, rel: str = "") -> str:
        """What DuckDB (and a user) calls ``rel``: a local path, or ``scheme://bucket/…``."""
        return f"{self.uri}/{rel}" if rel else self.uri

    def local_path(self, rel: str = "") -> Path:
        """``rel`` as a local ``Path`` (local lakes only)."""
        if not self.local:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.path(rel))

    # -- reading ----------------------------------------------------------------------------
    def _info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            return True
        # an object store has no folders, only keys with a common prefix
        return not self.local and info.type == pafs.FileType.NotFound and bool(self.list(rel, recursive=False))

    def list(self, rel: str = "", recursive: bool = True) -> list[str]:
        """The files under ``rel`` (relative to the root, sorted); [] when there is none."""
        return [p for p, _, _ in self.list_info(rel, recursive)]

    def list_info(self, rel: str = "", recursive: bool = True) -> list[tuple[str, int | None, int | None]]:
        """``(path, mtime_ns, size)`` of the files under ``rel``, sorted."""
        sel = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except (FileNotFoundError, NotADirectoryError):
            return []
        cut = len(self.base) + 1
        return sorted((i.path[cut:], i.mtime_ns, i.size) for i in infos if i.type == pafs.FileType.File)

    def mtime_ns(self, rel: str) -> int | None:
        info = self._info(rel)
        return None if info.mtime_ns is None else int(info.mtime_ns)

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.fs)

    def parquet_rows(self, rel: str) -> int:
        with self.fs.open_input_file(self.path(rel)) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode()

    # -- writing ----------------------------------------------------------------------------
    def _atomic(self, rel: str, write: Callable[[object], None]) -> None:
        """Call ``write(sink)`` so that ``rel`` appears whole or not at all."""
        if self.local:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            # a name of its own per writer: two processes redoing one chunk never share a temp file
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        else:  # an object appears when its upload completes
            with self.fs.open_output_stream(self.path(rel)) as out:
                write(out)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._atomic(rel, lambda sink: sink.write(data))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_parquet(self, rel: str, data: pa.Table, row_groups: list[int] | None = None,
                      row_group_size: int = 256 * 1024, **options) -> None:
        """Write ``data`` to ``rel`` atomically with zstd compression and statistics.

        ``row_groups``: sizes of consecutive row groups (each still split at ``row_group_size``);
        ``options``: more ``pyarrow.parquet.ParquetWriter`` options (encodings).
        """
        self._atomic(rel, lambda sink: write_parquet_to(sink, data, row_groups, row_group_size, **options))

    def delete(self, rel: str) -> None:
        """Delete one file (nothing when it is missing)."""
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def delete_tree(self, rel: str) -> None:
        """Delete everything under ``rel`` (nothing when it is missing)."""
        if self.local:
            import shutil

            shutil.rmtree(self.path(rel), ignore_errors=True)
            return
        for f in self.list(rel):  # an object store has no folders to remove, only keys
            self.delete(f)

    def ensure_dir(self, rel: str = "") -> None:
        """Create a local folder (object stores need none)."""
        if self.local:
            Path(self.path(rel)).mkdir(parents=True, exist_ok=True)


def write_parquet_to(sink, data: pa.Table, row_groups: list[int] | None = None, row_group_size: int = 256 * 1024,
                     **options) -> None:
    """Write ``data`` as Parquet (zstd, statistics) to an open ``sink``, as every lake file is written."""
    with pq.ParquetWriter(sink, data.schema, compression="zstd", write_statistics=True, **options) as w:
        if row_groups is None:
            w.write_table(data, row_group_size=row_group_size)
        else:
            start = 0
            for n in row_groups:
                w.write_table(data.slice(start, n), row_group_size=row_group_size)
                start += n


def open_store(root: str | Path | Store) -> Store:
    return root if isinstance(root, Store) else Store(root)
