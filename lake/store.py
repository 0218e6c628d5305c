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

import contextlib
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

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
        return self.read_bytes(rel).decode()

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

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

    # -- locking ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, rel: str, wait_s: float = 300.0) -> Iterator[None]:
        """Hold the lock ``rel`` across processes and machines while the block runs; raise
        :class:`LockTimeout` after waiting ``wait_s`` seconds for another holder.

        On a disk, ``flock`` on the file ``rel``, removed by its holder as it lets go (the kernel
        frees the lock of a holder that dies; a shared folder must be one whose filesystem honours
        ``flock``, as NFSv4 does). On S3, the object
        ``rel`` created with a conditional put (``If-None-Match: *``: S3 creates it for one writer
        and refuses the others, 412), deleted on release by its holder; one older than
        :data:`STALE_LOCK_S` is taken as left by a dead holder and removed. Other object stores have
        no such write here: NotImplementedError."""
        if not self.lockable:
            raise NotImplementedError(f"a {self.scheme}:// lake offers no lock across processes here "
                                      "(a folder or an s3:// lake does)")
        with (self._file_lock if self.local else self._s3_lock)(rel, wait_s):
            yield

    @property
    def lockable(self) -> bool:
        """Whether :meth:`lock` works here: on a disk, and on S3 (a conditional put)."""
        return self.local or self.scheme == "s3"

    @contextlib.contextmanager
    def _file_lock(self, rel: str, wait_s: float) -> Iterator[None]:
        import fcntl

        path = Path(self.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise LockTimeout(f"{path} is locked by another process") from None
                        time.sleep(0.1)
                # the holder before us removes the file as it lets go: a lock on that file is no one's
                st, now = os.fstat(fd), (os.stat(path) if path.exists() else None)
            except BaseException:
                os.close(fd)
                raise
            if now is not None and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
            os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # before letting go: the lake keeps no lock file
            os.close(fd)

    @contextlib.contextmanager
    def _s3_lock(self, rel: str, wait_s: float) -> Iterator[None]:
        try:  # pyarrow's S3 filesystem has no conditional write
            import boto3
            from botocore.exceptions import ClientError
        except ImportError:
            raise NotImplementedError("a lock on an s3:// lake needs boto3 (pip install boto3)") from None
        bucket, _, prefix = self.base.partition("/")
        key = f"{prefix}/{rel}" if prefix else rel
        s3 = boto3.client("s3")  # the AWS settings pyarrow reads too (AWS_ENDPOINT_URL …)
        token = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex}".encode()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                s3.put_object(Bucket=bucket, Key=key, Body=token, IfNoneMatch="*")
                break
            except ClientError as e:  # 412: another holder's object is there; 409: a put racing ours
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (409, 412):
                    raise
            try:
                head = s3.head_object(Bucket=bucket, Key=key)
                if time.time() - head["LastModified"].timestamp() > STALE_LOCK_S:
                    s3.delete_object(Bucket=bucket, Key=key)
                    continue
            except ClientError:  # released meanwhile: try again
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"{self.url(rel)} is held by another process")
            time.sleep(0.2)
        try:
            yield
        finally:
            try:  # only our own: a lock taken as stale and retaken by another stays
                if s3.get_object(Bucket=bucket, Key=key)["Body"].read() == token:
                    s3.delete_object(Bucket=bucket, Key=key)
            except ClientError:
                pass

    def ensure_dir(self, rel: str = "") -> None:
        """Create a local folder (object stores need none)."""
        if self.local:
            Path(self.path(rel)).mkdir(parents=True, exist_ok=True)


class LockTimeout(TimeoutError):
    """Another process held a :meth:`Store.lock` for longer than the caller would wait."""


STALE_LOCK_S = 3600  # an object-store lock older than this was left by a process that died holding it


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
