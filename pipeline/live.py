"""Live examples: one uploaded image and text, run through a run's own model and appended to the run.

As VL-InterpreT and LVLM-Interpret offer, a user brings an example of their own. Here it becomes an
example of the run like any other: :func:`add_example` loads the model the ``runs`` row names (a local
folder that exists, or a Hugging Face id already in the local cache; nothing is ever downloaded),
runs it with the run's capture configuration (keep-attention, keep-hidden, explain, dtype: read from
the ``runs`` row, never chosen here) through the extraction's own machinery
(the run's :class:`~pipeline.capture_config.Capture`, a
:class:`~pipeline.extraction.executor.LocalExecutor` and the chunk function behind ``vlatlas extract``:
capture, statistics, rows, the writer), and commits it
as a NEW chunk of the run with its done marker, so every view, query and page sees it.

- ``example_id`` is the next free id after the run's largest (past every row of the manifest while
  the run is not complete, so a resumed extraction never reuses it); the chunk is the next free
  chunk number after every chunk the run has or will have. The chunk holds that one example.
- The image is stored in ``images`` (keyed by the sha256 of the uploaded bytes, a PNG of a PIL image
  given as such), unless the lake has it already; the example's ``source_id`` is
  ``live-<id>-<8 hex digits of the image and text's sha256>`` (the Compare page pairs two runs' examples
  by id and source id: live examples pair only when they are the same input), its split ``live``, its
  meta ``{"live": true, "device": …}``.
- Hidden vectors: a ``sample:N`` run (N > 0) keeps the live example's vectors (it is not one of the
  manifest's sampled rows, but the one a user is looking at); ``sample:0``, ``none`` and a layer list
  act as for any example.
- While the chunk is written, a complete run's status is ``running`` (the catalog then reads only
  committed chunks, so a half-written chunk is never seen); afterwards it is ``complete`` again with
  ``n_examples`` counted from the committed chunks. A failure removes what was written and restores
  the row; a bad upload (not an image, too large, empty text), an unreachable model or a model that
  is no longer the run's raises :class:`LiveError` (one line) before anything is written.
- Device: CUDA when torch sees one (the lake does not record which device a run used), else the CPU,
  and :attr:`LiveResult.note` says when a requested CUDA device was not available here.
- One live example is added to a run at a time, across processes and machines (two app servers on
  one lake): from reading the run's ids to the restored ``runs`` row, the adder holds the run's lock
  ``_state/<run>/live.lock`` (:meth:`lake.store.Store.lock`: ``flock`` on a disk, a create-only
  conditional put on S3), and a second adder waits for it, then numbers its example after the first's.
  A lake on another object store offers no live examples.
- ``$VLATLAS_READ_ONLY`` (set by ``vlatlas app --read-only``) turns live examples off: nothing here
  writes to the lake while it is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lake.schema import IMAGES, TABLES
from lake.store import LockTimeout, Store, open_store
from lake.commit import IMAGE_FILE, NOT_CHUNKED, chunk_of, done_chunks, read_run_row, state_rel
from lake.writer import LakeWriter

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an uploaded file's size
MAX_UPLOAD_PIXELS = 50_000_000  # width x height of an uploaded image
MAX_TEXT_CHARS = 2000  # the question or text typed with it
LIVE_SPLIT = "live"
UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp")  # what the app's uploader offers
READ_ONLY_ENV = "VLATLAS_READ_ONLY"  # set (to anything but "", 0, false, no): no live examples
LOCK_WAIT_S = 600.0  # how long an adder waits for another app server's live example on the same run

_LOCK = threading.Lock()  # one live example at a time in this process (chunk and id numbering)
_ADAPTERS: dict[tuple, object] = {}  # the last loaded model, kept for the next upload


class LiveError(ValueError):
    """A live example could not be added; the message is one line a user can act on, and the lake
    is as it was."""


@dataclass(frozen=True)
class LiveResult:
    example_id: int
    source_id: str
    chunk: int
    prediction: str | None
    correct: bool | None
    device: str  # where the model ran
    note: str | None = None  # e.g. the requested device was not available here


# ---------------------------------------------------------------------------- the model
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_folder(model: str, revision: str | None = None) -> tuple[Path | None, str | None]:
    """``(folder, None)`` where the model ``model`` (a ``runs.model`` value) can be loaded from without
    any download, else ``(None, why not)``: a local folder that exists, or a hub id whose snapshot is
    in the local Hugging Face cache."""
    if not model:
        return None, "the run records no model"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None, f"the run's model folder {model} has no config.json"
        return path, None
    looks_local = path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
    if looks_local:
        return None, f"the run's model folder {model} is not on this machine"
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub client): not reachable without a download
        return None, (f"the run's model {model} is not in this machine's Hugging Face cache, and live "
                      "examples never download a model")
    if not (folder / "config.json").is_file():
        return None, f"the cached snapshot of {model} has no config.json"
    return folder, None


def read_only() -> bool:
    """Whether this process serves the lake read-only (``$VLATLAS_READ_ONLY``, read here only)."""
    return os.environ.get(READ_ONLY_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_lock(run: str) -> str:
    """The lock (relative to the lake's root) an adder of a live example to ``run`` holds."""
    return f"{state_rel(run)}/live.lock"


def unavailable(lake, run: str) -> str | None:
    """Why live examples cannot be added to ``run`` of ``lake`` (one line), or None when they can."""
    if read_only():
        return "uploads are off, as this app serves the lake read-only (`vlatlas app --read-only`)"
    try:
        store = open_store(lake)
    except Exception as e:  # noqa: BLE001 - an unreachable lake is a reason, not a traceback
        return f"the lake cannot be opened: {_first_line(e)}"
    if not store.lockable:
        return (f"on a {store.scheme}:// lake two app servers' live examples could not be kept apart "
                "(a folder or an s3:// lake has a lock for them)")
    try:
        row = read_run_row(store, run)
    except Exception as e:  # noqa: BLE001 - an unreadable runs row is a reason, not a traceback
        return f"the runs row of {run!r} cannot be read: {_first_line(e)}"
    if row is None:
        return f"there is no run {run!r} in this lake"
    try:
        json.loads(row.get("capture") or "")
    except ValueError:
        return f"run {run!r} records no capture configuration"
    return model_folder(row.get("model"), row.get("revision"))[1]


def _device(requested: str | None) -> tuple[str, str | None]:
    import torch

    want = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        return "cpu", f"{want} is not available here, so the model ran on the CPU"
    return want, None


def _adapter(folder: Path, dtype: str, device: str):
    """The run's model on ``device`` (the last one is kept loaded for the next upload)."""
    from pipeline.models import load_adapter

    key = (str(folder.resolve()), dtype, device)
    if key not in _ADAPTERS:
        _ADAPTERS.clear()  # one model in memory at a time
        try:
            _ADAPTERS[key] = load_adapter(str(folder), device=device, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - any load failure is one line for the user
            raise LiveError(f"cannot load the run's model from {folder}: {_first_line(e)}") from None
    return _ADAPTERS[key]


# ---------------------------------------------------------------------------- the upload
def _image_bytes(image) -> bytes:
    """The upload as file bytes, checked to be an image within the limits (LiveError otherwise)."""
    if isinstance(image, Image.Image):
        w, h = image.size
        if w * h > MAX_UPLOAD_PIXELS:
            raise LiveError(f"the image is {w}x{h} px, more than the limit of {MAX_UPLOAD_PIXELS / 1e6:g} "
                            "megapixels")
        buf = io.BytesIO()
        try:
            image.save(buf, format="PNG")
        except (OSError, ValueError):
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        raise LiveError(f"the image must be the bytes of an image file or a PIL image, not {type(image).__name__}")
    if not data:
        raise LiveError("the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise LiveError(f"the uploaded file is {len(data) / 2**20:.1f} MB, more than the limit of "
                        f"{MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size  # from the header, nothing decoded yet
    except Image.DecompressionBombError:
        raise LiveError(f"the image is larger than the limit of {MAX_UPLOAD_PIXELS / 1e6:g} megapixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise LiveError("the uploaded file is not an image (or not a format PIL can open: PNG, JPEG, "
                        "WebP …)") from None
    if w * h > MAX_UPLOAD_PIXELS:
        raise LiveError(f"the image is {w}x{h} px, more than the limit of {MAX_UPLOAD_PIXELS / 1e6:g} megapixels")
    return data


def _about_upload(message: str, path: str) -> str:
    """An extraction message about the image file at ``path`` (the upload's temporary file) as a clause
    about the upload: "image /tmp/x.img is truncated …" reads "the uploaded image is truncated …",
    "file is not an image …: /tmp/x.img" reads "the uploaded file is not an image …"; the temporary
    path never shows. A message that names no path (the model's processor) is kept as it is."""
    m = message.strip()
    if m.endswith(f": {path}"):  # "<what is wrong with the file>: <path>"
        m = m[: -len(f": {path}")]
        m = {"image file not found": "the uploaded file is missing"}.get(m, m)
        for old in ("image file ", "file "):
            if m.startswith(old):
                m = "the uploaded file " + m[len(old):]
                break
    for old, new in ((f"cannot read image file {path}", "the uploaded file cannot be read"),
                     (f"image file {path}", "the uploaded file"), (f"image {path}", "the uploaded image")):
        m = m.replace(old, new)
    return m.replace(path, "the upload")


def _text(text, what: str, required: bool) -> str | None:
    if text is not None and not isinstance(text, str):
        raise LiveError(f"the {what} must be text, not {type(text).__name__}")
    t = (text or "").strip()
    if not t:
        if required:
            raise LiveError(f"the {what} is empty: type a question or a text about the image")
        return None
    if len(t) > MAX_TEXT_CHARS:
        raise LiveError(f"the {what} has {len(t)} characters, more than the limit of {MAX_TEXT_CHARS}")
    return t


# ---------------------------------------------------------------------------- the run's numbering
def _run_ids(store: Store, run: str) -> tuple[int, set[str]]:
    """The largest example id of the run's files (-1 when none) and their source ids."""
    top, sources = -1, set()
    for rel in store.list(f"examples/run={run}"):
        if chunk_of(rel) is None:
            continue
        t = store.read_parquet(rel, columns=["example_id", "source_id"])
        ids = [i for i in t.column("example_id").to_pylist() if i is not None]
        if ids:
            top = max(top, max(ids))
        sources.update(s for s in t.column("source_id").to_pylist() if s is not None)
    return top, sources


def _used_chunks(store: Store, run: str) -> set[int]:
    """Every chunk number the run has a marker or a file of (committed or not)."""
    used = set(done_chunks(store, run))
    for t in TABLES.values():
        if t.partition and t.name not in NOT_CHUNKED:
            used.update(c for c in map(chunk_of, store.list(f"{t.name}/run={run}")) if c is not None)
    for rel in store.list(IMAGES.name, recursive=False):
        m = IMAGE_FILE.match(rel.rsplit("/", 1)[-1])
        if m and m.group(1) == run:
            used.add(int(m.group(2)))
    return used


def _manifest_reserve(row: dict, chunk_size: int) -> tuple[int, int]:
    """(largest example id, largest chunk) the manifest of a run that is not complete still may use."""
    from pipeline.data import read_manifest

    try:
        rows, _ = read_manifest(row["manifest"])
    except Exception as e:  # noqa: BLE001 - the ids a resumed run would use are unknown
        raise LiveError(f"run {row['run']!r} is not complete and its manifest cannot be read "
                        f"({_first_line(e)}), so the example ids it will still use are unknown; finish the "
                        "run first") from None
    top = max((r.example_id for r in rows), default=-1)
    return top, top // chunk_size if top >= 0 else -1


def _all_image_ids(store: Store) -> set[str]:
    """Every image id in the lake (this run's included: a live chunk rewrites no other chunk)."""
    ids: set[str] = set()
    for rel in store.list(IMAGES.name, recursive=False):
        if rel.endswith(".parquet") and not rel.rsplit("/", 1)[-1].startswith("."):
            ids.update(store.read_parquet(rel, columns=["image_id"]).column("image_id").to_pylist())
    return ids


# ---------------------------------------------------------------------------- adding
def add_live_example(lake, run: str, image, text: str, answer: str | None = None, *,
                     device: str | None = None, adapter=None) -> LiveResult:
    """Run ``run``'s model on ``image`` and ``text`` and append the example to the run as a new chunk
    (see the module docstring). ``image``: the bytes of an image file or a PIL image. ``device``:
    ``cuda``/``cpu`` (default: CUDA when available). ``adapter``: an already loaded adapter of the
    run's model (tests). Raises :class:`LiveError` with one line, the lake unchanged, when it cannot."""
    if read_only():
        raise LiveError("live examples are off: this app serves the lake read-only (`vlatlas app --read-only`)")
    text = _text(text, "text", required=True)
    answer = _text(answer, "answer", required=False)
    data = _image_bytes(image)
    store = open_store(lake)
    row = read_run_row(store, run)
    if row is None:
        raise LiveError(f"there is no run {run!r} in the lake at {store.uri}")
    try:
        json.loads(row["capture"])
    except (TypeError, ValueError):
        raise LiveError(f"run {run!r} records no capture configuration") from None
    folder = None
    if adapter is None:
        folder, why = model_folder(row["model"], row.get("revision"))
        if folder is None:
            raise LiveError(f"live examples are not available for run {run!r}: {why}")
    used_device, note = _device(device)
    with _LOCK, _run_locked(store, run):
        # read again under the lock: another app server may have added an example meanwhile
        row = read_run_row(store, run) or row
        return _add(store, row, _Upload(data, text, answer), _Model(folder, adapter, used_device, note))


@contextlib.contextmanager
def _run_locked(store: Store, run: str):
    """Hold ``run``'s live-example lock (a LiveError when it cannot be had)."""
    with contextlib.ExitStack() as held:
        try:  # only taking the lock is translated, not what the block raises
            held.enter_context(store.lock(run_lock(run), LOCK_WAIT_S))
        except LockTimeout:
            raise LiveError(f"another app is still adding a live example to run {run!r} after "
                            f"{LOCK_WAIT_S / 60:g} minutes; try again later") from None
        except NotImplementedError as e:
            raise LiveError(f"live examples are not available on this lake: {e}") from None
        yield


def add_example(lake, run: str, image, text: str, answer: str | None = None, **kwargs) -> int:
    """:func:`add_live_example`, returning the new example's id."""
    return add_live_example(lake, run, image, text, answer, **kwargs).example_id


@dataclass(frozen=True)
class _Upload:
    data: bytes  # the image file
    text: str
    answer: str | None


@dataclass(frozen=True)
class _Model:
    folder: Path | None  # where the run's model loads from (None: ``adapter`` given)
    adapter: object
    device: str
    note: str | None  # why ``device`` is not the one asked for


def _add(store, row: dict, up: _Upload, m: _Model) -> LiveResult:
    from pipeline.data import Row
    from pipeline.extraction.chunk import ChunkWork
    from pipeline.extraction.executor import LocalExecutor
    from pipeline.extraction.inputs import prepare_batch
    from pipeline.extraction.spec import RunSpec
    from pipeline.extraction.summary import Summary

    run, data, text, answer, folder, device = row["run"], up.data, up.text, up.answer, m.folder, m.device
    try:
        spec = RunSpec.from_run_row(row, store.uri, device)
    except (TypeError, ValueError) as e:
        raise LiveError(f"run {run!r} has a capture configuration this version cannot repeat: "
                        f"{_first_line(e)}") from None
    cfg = spec.capture
    executor = LocalExecutor(m.adapter if m.adapter is not None else _adapter(folder, spec.dtype, device))
    info = executor.describe()
    if info["family"] != row.get("model_family") or info["streams"] != json.loads(row.get("streams") or "{}"):
        raise LiveError(f"the model at {folder or row['model']} is no longer the run's model (its family or "
                        f"layers and heads differ from run {run!r}'s)")

    top, sources = _run_ids(store, run)
    used = _used_chunks(store, run)
    if row.get("status") != "complete":
        m_top, m_chunk = _manifest_reserve(row, cfg.chunk_size)
        top, used = max(top, m_top), used | {m_chunk}
    example_id = top + 1
    chunk = max(used, default=-1) + 1
    # the input's digest in the id: runs over one manifest are compared by (example_id, source_id), and
    # two runs' live examples with the same id pair only when they are the same image and text
    digest = hashlib.sha256(data + b"\0" + text.encode()).hexdigest()[:8]
    source_id, k = f"live-{example_id}-{digest}", 1
    while source_id in sources:
        k += 1
        source_id = f"live-{example_id}-{digest}-{k}"
    n = cfg.hidden.sample()
    vec_ids = None if n is None else ({example_id} if n > 0 else set())
    known = _all_image_ids(store)

    fd, tmp = tempfile.mkstemp(prefix="vlatlas-live-", suffix=".img")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        r = Row(example_id=example_id, source_id=source_id, image_path=Path(tmp), text=text, answer=answer,
                split=LIVE_SPLIT, boxes=None, meta={"live": True, "device": device})
        # the checks the extraction makes (image decoding, the processor), made before anything is written
        checked = prepare_batch(executor.adapter, [r], known)
        if checked["errors"]:
            raise LiveError(_about_upload(checked["errors"][0][2], tmp))
        metadata = {"vlatlas.model": row["model"], "vlatlas.capture": row["capture"],
                    "vlatlas.version": info["version"]}
        writer = LakeWriter(store, run, metadata)
        complete = row.get("status") == "complete"
        if complete:  # the catalog reads only committed chunks of a running run
            writer.write_run_row({**row, "status": "running"})
        ok = False
        try:
            summary = Summary(run, store.uri)
            work = ChunkWork(store, run, metadata, cfg, device=device, workers=spec.workers,
                             batch_size=spec.batch_size, first_chunk=chunk, vec_ids=vec_ids,
                             known_images=frozenset(known))
            executor.run(work, {chunk: [r]}, _NoBar(), summary)
            if chunk not in writer.done_chunks() or summary.extracted != 1:
                why = "; ".join(m for _, _, m in summary.errors) or "the chunk was not committed"
                raise LiveError(f"the example could not be extracted: {_about_upload(why, tmp)}")
            ok = True
        except LiveError:
            raise
        except Exception as e:  # noqa: BLE001 - the model or the writer failed: one line, the lake restored
            raise LiveError(f"running the model failed on {device}: {_first_line(e)}") from None
        finally:
            if not ok:
                writer.store.delete(f"{writer.state}/chunk-{chunk:06d}.done")
                writer.purge_chunk(chunk)
                writer.store.delete(f"{IMAGES.name}/part-{run}-{chunk:06d}.parquet")
            if complete:
                writer.write_run_row({**row, "status": "complete", "n_examples": writer.count_examples()})
    finally:
        Path(tmp).unlink(missing_ok=True)
    ex = store.read_parquet(f"examples/run={run}/part-{chunk:06d}.parquet",
                            columns=["prediction", "correct"]).to_pylist()[0]
    return LiveResult(example_id, source_id, chunk, ex["prediction"], ex["correct"], device, m.note)


class _NoBar:
    """The progress bar the executor updates, for one example: none."""

    def update(self, n: int = 1) -> None:
        pass
