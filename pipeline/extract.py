"""model + manifest -> lake: the extraction driver behind ``vlatlas extract``.

Extraction is a three-stage pipeline, so that the model is what sets the pace:

1. **Inputs, ahead of the model** (:class:`_InputBatches`, run by a torch
   ``DataLoader`` in ``--workers`` processes): read and validate each image once,
   hash it, make its thumbnail, and encode the batch with the model's processor
   (pinned memory on CUDA). Batches come back in manifest order whatever the
   number of workers.
2. **The model, hooked** (:class:`_BatchSink`): each layer's statistics are
   computed on the device from the attention in the model's own sequence order
   (the token masks are scattered to it once per batch), the weights to keep are
   selected there too, and nothing comes to the host until the batch is done;
   then everything crosses in one transfer.
3. **Rows and Parquet, behind the model** (:class:`_WriteStage`, a background
   thread with a bounded queue): host arrays become Arrow tables, chunk by
   chunk, and each chunk's files are written atomically with its done marker.
   The queue's depth bounds memory; the model never waits for the disk unless
   the disk is slower than the model (then the queue is full and the model waits,
   instead of memory growing).

Examples are processed in chunks of ``chunk_size`` manifest rows (see
``lake/writer.py``); stopping (Ctrl-C, kill -9, even with the writer mid-file)
loses at most the chunks not yet marked done, and running the same command again
resumes where it stopped, with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

import pipeline
from lake.schema import ERRORS, EXAMPLES, EXPLAIN_STATS, IMAGES, LENS, RELEVANCY, SINKS, STATS, VALUE_NORMS
from lake.store import Store
from lake.writer import LakeWriter, check_run_name
from pipeline.capture import HookPoint, capture
from pipeline.data import BadInput, Row, load_image, read_manifest, thumbnail_png
from pipeline.capture_config import (DEFAULT_KEEP_ATTENTION, DEFAULT_KEEP_HIDDEN, AttentionPolicy, Budget, Capture,
                                     ExplainSet, KeepNone)
from pipeline.explain import lens_topk, norm_weighted, relevancy_cross, relevancy_self, rollout_step, sinks, value_norms
from pipeline.flatten import (Kept, SeqLayout, attention_arrow,
                              head_stats_arrow, hidden_arrow, kept_rows, row_mean_mass, select, select_budget_seq,
                              seq_in_box, seq_layout)
from pipeline.models import families_with, load_adapter
from pipeline.models.base import BatchLayout, StreamLayout, conform, map_inputs
from pipeline.stats import head_stats

HIDDEN_SAMPLE_SEED = 0
STAT_ORDER = sorted(STATS)  # rows of the per-layer statistics block (runs without --explain)


def stat_order(explain: tuple[str, ...] = ()) -> list[str]:
    """The statistics a run computes, in the order of the per-layer statistics block."""
    return sorted(set(STATS).union(*(EXPLAIN_STATS.get(m, ()) for m in explain)))


class RunConflict(Exception):
    """A run of that name exists with another model, manifest or capture configuration."""


def default_workers(device: str = "cpu") -> int:
    """Input worker processes: half the cores (the model's own threads need the rest on a CPU),
    at least 1, at most 8; on CUDA all but one core, at most 8."""
    n = os.cpu_count() or 2
    return max(1, min(8, n - 1 if str(device).startswith("cuda") else n // 2))


def hidden_vector_examples(rows: list[Row], n: int | None, seed: int = HIDDEN_SAMPLE_SEED) -> set[int] | None:
    """The example ids whose hidden vectors are stored: a seeded sample of ``n`` of the manifest's
    accepted rows (None = all). It depends on the manifest alone, not on batches, workers or chunks."""
    if n is None:
        return None
    ids = np.array(sorted(r.example_id for r in rows), dtype=np.int64)
    if n >= len(ids):
        return set(ids.tolist())
    return set(np.random.default_rng(seed).choice(ids, size=n, replace=False).tolist())


@dataclass
class Summary:
    run: str
    lake: str
    extracted: int = 0
    skipped: int = 0
    truncated: int = 0
    resumed_chunks: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    workers: int = 0
    ray_actors: int = 0
    peak_rss_mb: float | None = None
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    def line(self) -> str:
        if self.already_complete:
            return f"run {self.run!r} in {self.lake} is already complete; nothing to do"
        rate = self.extracted / self.seconds if self.seconds else 0.0
        s = (f"extracted {self.extracted} examples into {self.lake} (run {self.run!r}) in {self.seconds:.1f} s "
             f"({rate:.1f} examples/s); {self.skipped} skipped")
        if self.truncated:
            s += f", {self.truncated} truncated"
        if self.skipped or self.truncated:
            s += f" (see: vlatlas sql --lake {self.lake} \"SELECT * FROM errors WHERE run = '{self.run}'\")"
        if self.ray_actors:
            s += f"; on {self.ray_actors} Ray actor" + ("" if self.ray_actors == 1 else "s")
        if self.resumed_chunks:
            s += f"; resumed after {self.resumed_chunks} finished chunks"
        if self.peak_rss_mb is not None:
            s += f"; peak memory {self.peak_rss_mb:.0f} MB"
        return s


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux/macOS), MB."""
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024
    except Exception:  # noqa: BLE001 - informational only
        return None


# ---------------------------------------------------------------------------- stage 1: inputs
@dataclass
class _Job:
    chunk: int
    rows: list[Row]
    last: bool  # the chunk's last batch
    first_chunk: bool


class _InputBatches(torch.utils.data.Dataset):
    """Batch ``i`` of the plan: rows read, validated and encoded (one item = one batch).

    Each process (a worker has its own copy) remembers the thumbnails it made last, so an image
    that many manifest rows share (several questions about one picture) is shrunk and encoded once.
    """

    THUMBNAILS_KEPT = 32  # a few MB of PNG per worker

    def __init__(self, adapter, jobs: list[_Job], known_images: set[str]):
        self.adapter, self.jobs, self.known = adapter, jobs, known_images
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        job = self.jobs[i]
        out = prepare_batch(self.adapter, job.rows, self.known, self._thumbnail)
        if out["inputs"] is not None:  # as numpy: pickled through the pipe, no file descriptors to share,
            # so a worker has nothing left to serve (or to complain about) when Ctrl-C stops the main process
            out["inputs"] = map_inputs(out["inputs"], lambda v: v.numpy() if isinstance(v, torch.Tensor)
                                       and v.dtype != torch.bfloat16 else v)
        return {"job": i, **out}

    def _thumbnail(self, li) -> bytes:
        png = self._thumbs.pop(li.image_id, None)
        if png is None:
            png = thumbnail_png(li.image)
        self._thumbs[li.image_id] = png  # most recent last
        if len(self._thumbs) > self.THUMBNAILS_KEPT:
            self._thumbs.popitem(last=False)
        return png


def _identity(x):
    return x


def _worker_init(_):
    """An input worker: one thread (the model's process owns the cores), Ctrl-C left to the main
    process (which stops the workers itself), and on Linux it dies with the main process even when
    that is killed with SIGKILL, so nothing is left holding the terminal or the lake."""
    import signal

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the DataLoader's own watchdog stops it
        pass


def prepare_batch(adapter, rows: list[Row], known_images: set[str], thumbnail=None) -> dict:
    """Read, validate and encode one batch; every image is decoded and processed once.

    The processor runs on the whole batch; only when it fails (or yields an image without a whole
    patch) are the images checked one by one, and the bad ones recorded and left out.
    ``thumbnail``: ``LoadedImage -> PNG bytes`` for images not in ``known_images`` (default
    :func:`pipeline.data.thumbnail_png` of the image).
    """
    adapter = conform(adapter)
    thumbnail = thumbnail or (lambda li: thumbnail_png(li.image))
    errors: list[tuple[str, str, str]] = []
    ok, images = [], []
    for r in rows:
        try:
            li = load_image(r.image_path)
        except BadInput as e:
            errors.append((r.source_id, e.stage, e.message))
            continue
        png = None if li.image_id in known_images else thumbnail(li)
        ok.append((r, li))
        images.append(png)
    inputs, notes = None, []
    while ok:
        texts, pics = [r.text for r, _ in ok], [li.image for _, li in ok]
        try:
            inputs, notes = adapter.encode(texts, pics)
        except Exception:  # noqa: BLE001 - find the image(s) the processor cannot take
            bad = _check_each(adapter, pics)
            if not bad:
                raise
        else:
            bad = adapter.rejects(inputs, pics)
            if not bad:
                break
        for j in sorted(bad, reverse=True):
            r, _ = ok.pop(j)
            images.pop(j)
            errors.append((r.source_id, "image", bad[j]))
        inputs = None
    return {
        "rows": [r for r, _ in ok],
        "images": [li.image for _, li in ok],
        "image_info": [(li.image_id, li.width, li.height, li.mode, png) for (_, li), png in zip(ok, images)],
        "inputs": inputs, "notes": notes, "errors": errors, "n_rows": len(rows),
    }


def _check_each(adapter, pics) -> dict[int, str]:
    bad = {}
    for j, im in enumerate(pics):
        try:
            adapter.check_image(im)
        except BadInput as e:
            bad[j] = e.message
    return bad


# ---------------------------------------------------------------------------- stage 2: the model
def _gather_tokens(attn: torch.Tensor, sl: StreamLayout, key_sl: StreamLayout | None = None) -> torch.Tensor:
    """``[batch, head, seq, seq_k]`` in sequence order -> ``[batch, head, token, token_k]`` in token order.

    Rows follow ``sl``, columns ``key_sl`` (``sl`` itself unless a cross stream's keys are another's).
    """
    key_sl = sl if key_sl is None else key_sl
    B, H, _, Sk = attn.shape
    idx, kidx = sl.seq_index, key_sl.seq_index  # [batch, token], [batch, token_k]
    N, Nk = idx.shape[1], kidx.shape[1]
    rows = attn.gather(2, idx[:, None, :, None].expand(B, H, N, Sk))  # [batch, head, token, seq_k]
    a = rows.gather(3, kidx[:, None, None, :].expand(B, H, N, Nk))  # [batch, head, token, token_k]
    pair = (sl.valid[:, :, None] & key_sl.valid[:, None, :])[:, None]  # [batch, 1, token, token_k]
    return a * pair


@dataclass
class _LayerOut:
    """One layer's results of one batch, on the device until :meth:`_BatchSink.finish`."""

    stream: str
    layer: int
    kind: str  # attention / hidden / value / sinks / rollout
    stats: torch.Tensor | None = None  # [stat, batch, head] in the run's stat_order
    kept: Kept | None = None
    norm: torch.Tensor | None = None  # [batch, token] (hidden); [batch, head, token] (value); [batch, token] ratio (sinks)
    vectors: torch.Tensor | None = None  # [n with vectors, token, dim] float16
    mask: torch.Tensor | None = None  # sinks: [batch, token] flags; rollout: [batch, query, key] block kept
    index: torch.Tensor | None = None  # sinks: [batch, token] dimension; rollout: [batch, query, key] values
    key_stream: str | None = None
    target: torch.Tensor | None = None  # relevancy: [batch] token_idx (within the stream) explained, or None


class _BatchSink:
    """Receives each layer's tensors during the forward pass; keeps every result on the device."""

    def __init__(self, adapter, inputs, images, boxes, example_ids, policy: AttentionPolicy, device,
                 with_vec: np.ndarray, explain: tuple[str, ...] = ()):
        """``with_vec`` ``[batch]`` bool: the examples whose hidden vectors are stored; ``explain``:
        the --explain methods computed in the same pass (value, sinks, rollout)."""
        self.adapter, self.inputs, self.images, self.boxes = adapter, inputs, images, boxes
        self.example_ids = example_ids
        self.policy = policy
        self.device = device
        self.explain = explain
        self.stat_order = stat_order(explain)
        self._vnorm: dict[tuple[str, int], torch.Tensor] = {}  # value norms, sequence order
        self._sink: dict[tuple[str, int], torch.Tensor] = {}  # sink flags of each block's input, sequence order
        self._roll: dict[str, torch.Tensor] = {}  # rollout so far, per stream
        self._vec_rows = torch.as_tensor(np.flatnonzero(with_vec), dtype=torch.long)
        self.layout: BatchLayout | None = None
        self._streams: dict[str, StreamLayout] = {}
        self._seq_cache: dict[tuple[str, int], SeqLayout] = {}
        self.out: list[_LayerOut] = []

    def stream(self, name: str) -> StreamLayout:
        if self.layout is None:
            self.layout = self.adapter.layout(self.inputs, self.images, self.boxes)
        if name not in self._streams:
            self._streams[name] = self.layout.streams[name].to(self.device)
        return self._streams[name]

    def _seq(self, name: str, S: int) -> SeqLayout:
        """The stream's masks scattered to the model's sequence order (length ``S``), cached."""
        key = (name, S)
        if key not in self._seq_cache:
            self._seq_cache[key] = seq_layout(self.stream(name), S)
        return self._seq_cache[key]

    def __call__(self, point: HookPoint, tensor: torch.Tensor) -> None:
        sl = self.stream(point.stream)
        if point.kind == "value":
            self._value(point, tensor)
            return
        if point.kind == "attention":
            key_stream = self.layout.keys.get(point.stream)  # cross attention: keys of another stream
            ksl = sl if key_stream is None else self.stream(key_stream)
            q_seq = self._seq(point.stream, tensor.shape[2])
            k_seq = q_seq if key_stream is None else self._seq(key_stream, tensor.shape[3])
            # statistics in the model's own order: the masks move, not the matrix
            masks = q_seq.masks if key_stream is None else replace(q_seq.masks, in_box=seq_in_box(sl, ksl, q_seq, k_seq))
            stats = head_stats(tensor, masks, None if key_stream is None else k_seq.masks)
            kept = None
            if isinstance(self.policy, Budget):
                kept = select_budget_seq(tensor, self.policy, sl, q_seq, k_seq)
            elif not isinstance(self.policy, KeepNone):
                a = _gather_tokens(tensor.float(), sl, ksl)  # [batch, head, token, token_k]
                kept = select(a, sl.valid, sl.masks.image, self.policy, ksl.valid, ksl.masks.image)
            stats["kept_mass"] = (row_mean_mass(kept.mass, sl.valid) if kept is not None
                                  else torch.zeros_like(stats["t2i"]))
            if self.explain:
                stats.update(self._explained(point, tensor, masks, None if key_stream is None else k_seq.masks,
                                             q_seq, sl, ksl, key_stream is None))
            nan = torch.full_like(stats["t2i"], float("nan"))
            block = torch.stack([stats.get(s, nan).float() for s in self.stat_order], 0)  # [stat, batch, head]
            self.out.append(_LayerOut(point.stream, point.layer, "attention", stats=block, kept=kept))
        else:
            if "sinks" in self.explain:
                valid = self._seq(point.stream, tensor.shape[1]).masks.valid
                flag, dim, ratio = sinks(tensor, valid)
                self._sink[(point.stream, point.layer)] = flag
                tok = sl.seq_index
                self.out.append(_LayerOut(point.stream, point.layer, "sinks", norm=ratio.gather(1, tok),
                                          mask=flag.gather(1, tok) & sl.valid, index=dim.gather(1, tok)))
            lens = "lens" in self.explain and hasattr(self.adapter, "lens") and point.stream == "lm"
            if not (lens or point.store):
                return
            tok = sl.seq_index
            h = tensor.gather(1, tok[:, :, None].expand(-1, -1, tensor.shape[-1]))  # [batch, token, dim]
            if lens:
                norm, head = self.adapter.lens()
                with torch.no_grad():
                    p, ids = lens_topk(h.reshape(-1, h.shape[-1]), norm, head)
                k = p.shape[-1]
                self.out.append(_LayerOut(point.stream, point.layer, "lens", norm=p.reshape(*tok.shape, k),
                                          index=ids.reshape(*tok.shape, k), mask=sl.valid))
            if not point.store:
                return
            norm = h.float().norm(dim=-1)  # [batch, token]
            vec = h[self._vec_rows.to(h.device)].to(torch.float16) if len(self._vec_rows) else None
            self.out.append(_LayerOut(point.stream, point.layer, "hidden", norm=norm, vectors=vec))

    def _value(self, point: HookPoint, tensor: torch.Tensor) -> None:
        """A value projection's output: every head's value norms, kept for the layer's attention."""
        if point.part is not None:
            i, n = point.part
            w = tensor.shape[-1] // n
            tensor = tensor[..., i * w:(i + 1) * w]
        norms = value_norms(tensor, point.out.weight.detach(), point.heads, point.kv_heads)  # [batch, head, seq]
        self._vnorm[(point.stream, point.layer)] = norms
        key_stream = self.layout.keys.get(point.stream) if self.layout is not None else None
        ksl = self.stream(key_stream or point.stream)
        tok = ksl.seq_index[:, None, :].expand(-1, norms.shape[1], -1)
        self.out.append(_LayerOut(point.stream, point.layer, "value", norm=norms.gather(2, tok),
                                  key_stream=key_stream or point.stream))

    def _explained(self, point, attn, masks, kmasks, q_seq, sl, ksl, square: bool) -> dict[str, torch.Tensor]:
        """The --explain statistics of one layer, and its rollout rows."""
        out: dict[str, torch.Tensor] = {}
        key = (point.stream, point.layer)
        if key in self._vnorm:
            s = head_stats(norm_weighted(attn, self._vnorm.pop(key)), masks, kmasks)
            out.update({f"{k}_norm": s[k] for k in ("t2i", "t2t", "i2t", "i2i", "sink")})
        if square and key in self._sink:
            flag = self._sink.pop(key)  # the tokens massive in this block's input
            a = attn.float()
            on_sinks = (a * flag[:, None, None, :].float()).sum(-1)  # [batch, head, query]
            out["sink_mass"] = row_mean_mass(on_sinks, masks.valid)
            rest = a * (~flag)[:, None, None, :].float()
            rest = rest / rest.sum(-1, keepdim=True).clamp(min=1e-30)
            s = head_stats(rest, masks)
            out.update({f"{k}_nosink": s[k] for k in ("t2i", "t2t", "i2t", "i2i", "entropy", "grounding",
                                                        "pointing")})
        if square and "rollout" in self.explain:
            r = rollout_step(attn, q_seq.masks.valid, self._roll.get(point.stream))
            self._roll[point.stream] = r
            tok = sl.seq_index  # [batch, token]
            n = tok.shape[1]
            rt = r.gather(1, tok[:, :, None].expand(-1, -1, r.shape[2])).gather(2, tok[:, None, :].expand(-1, n, -1))
            block = (sl.masks.text & sl.valid)[:, :, None] & (sl.masks.patch & sl.valid)[:, None, :]
            self.out.append(_LayerOut(point.stream, point.layer, "rollout", mask=block, index=rt))
        return out

    def finish(self) -> list[_LayerOut]:
        """Bring every layer's results to the host in one go (one synchronisation)."""
        def host(t):
            return None if t is None else t.to("cpu", non_blocking=True)

        moved = []
        for o in self.out:
            k = o.kept
            hk = None if k is None else Kept(host(k.weight), host(k.keep), None, host(k.index))
            moved.append(_LayerOut(o.stream, o.layer, o.kind, host(o.stats), hk, host(o.norm), host(o.vectors),
                                   host(o.mask), host(o.index), o.key_stream, host(o.target)))
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        for o in moved:
            o.stats = None if o.stats is None else o.stats.numpy()
            if o.kept is not None:
                o.kept = Kept(o.kept.weight.numpy(), o.kept.keep.numpy(), None,
                              None if o.kept.index is None else o.kept.index.numpy())
            o.norm = None if o.norm is None else o.norm.numpy()
            o.vectors = None if o.vectors is None else o.vectors.numpy()
            o.mask = None if o.mask is None else o.mask.numpy()
            o.index = None if o.index is None else o.index.numpy()
            o.target = None if o.target is None else o.target.numpy()
        return moved


# ---------------------------------------------------------------------------- stage 3: rows and Parquet
@dataclass
class _BatchRows:
    """What the write stage turns into rows for one batch (host data only); a batch whose every
    image was bad carries only its ``errors``."""

    example_ids: list[int] = field(default_factory=list)
    layers: list[_LayerOut] = field(default_factory=list)
    valid: dict[str, np.ndarray] = field(default_factory=dict)  # stream -> [batch, token]
    offsets: dict[str, list[int]] = field(default_factory=dict)  # stream -> token_offset
    keys: dict[str, str] = field(default_factory=dict)
    with_vec: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    stat_order: list[str] = field(default_factory=lambda: list(STAT_ORDER))
    pieces: dict[int, str] = field(default_factory=dict)  # vocabulary id -> piece, for the lens rows
    examples: list[dict] = field(default_factory=list)
    tokens: list[pa.Table] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)


class _ChunkParts:
    def __init__(self):
        self.examples, self.tokens, self.stats, self.images = [], [], [], []
        self.attention: dict[tuple, list[pa.Table]] = {}
        self.hidden: dict[tuple, list[pa.Table]] = {}
        self.value_norms: dict[tuple, list[pa.Table]] = {}
        self.sinks: dict[tuple, list[pa.Table]] = {}
        self.relevancy: list[pa.Table] = []
        self.lens: dict[str, list[pa.Table]] = {}
        self.errors: list[tuple[str, str, str]] = []


class _WriteStage:
    """Flattening, Parquet encoding and writing, in a background thread behind the model.

    ``put`` blocks when ``depth`` batches are waiting: that bounds the host memory held for
    writing. An error in the thread is raised in the caller at its next ``put`` or ``close``.
    """

    def __init__(self, writer: LakeWriter, depth: int = 4):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._abandon = threading.Event()
        self._t = threading.Thread(target=self._run, name="vlatlas-writer", daemon=True)

    def start(self) -> None:
        """Start the thread (after the input workers are forked: a fork copies no running thread's
        half-held locks that way)."""
        if not self._t.is_alive() and self._t.ident is None:
            self._t.start()

    def put(self, item) -> None:
        while True:
            self._raise()
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the lake failed: {self.error}") from self.error

    def close(self, abandon: bool = False) -> None:
        """Finish every queued chunk (or, with ``abandon``, stop after the current file)."""
        self.start()  # no-op when running; a stage that never started has nothing queued but the stop
        if abandon:
            self._abandon.set()
            while True:  # make room for the stop signal
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    break
        while self._t.is_alive():
            try:
                self.q.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._t.join()
        if not abandon:
            self._raise()

    def _run(self) -> None:
        parts: dict[int, _ChunkParts] = {}
        try:
            while True:
                item = self.q.get()
                if item is None or self._abandon.is_set():
                    return
                kind, chunk, payload = item
                p = parts.setdefault(chunk, _ChunkParts())
                if kind == "batch":
                    _flatten_batch(payload, p)
                else:  # "end": payload = chunk-level errors (the manifest's, for the first chunk)
                    p.errors.extend(payload)
                    _write_chunk(self.writer, chunk, parts.pop(chunk), self._abandon)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e


def _flatten_batch(b: _BatchRows, p: _ChunkParts) -> None:
    p.examples.extend(b.examples)
    p.tokens.extend(b.tokens)
    p.images.extend(b.images)
    p.errors.extend(b.errors)
    ids = np.asarray(b.example_ids, np.int64)
    for o in b.layers:
        key = (o.stream, o.layer)
        if o.kind in ("value", "sinks", "rollout", "lens", "relevancy"):
            _flatten_explained(o, b, ids, p)
        elif o.kind == "attention":
            p.stats.append(head_stats_arrow(b.stat_order, o.stats, b.example_ids, o.stream, o.layer))
            if o.kept is not None:
                koff = b.offsets[b.keys.get(o.stream, o.stream)]
                cols = kept_rows(o.kept, b.example_ids, b.offsets[o.stream], koff)
                p.attention.setdefault(key, []).append(attention_arrow(cols))
        else:
            p.hidden.setdefault(key, []).append(
                hidden_arrow(o.norm, b.valid[o.stream], b.example_ids, b.offsets[o.stream], o.vectors, b.with_vec))


def _flatten_explained(o: _LayerOut, b: _BatchRows, ids: np.ndarray, p: _ChunkParts) -> None:
    """Rows of the --explain tables from one layer's results (host arrays)."""
    key = (o.stream, o.layer)
    if o.kind == "value":  # [batch, head, token] over the key stream's tokens
        off = np.asarray(b.offsets[o.key_stream], np.int64)
        bi, h, t = np.nonzero(np.broadcast_to(b.valid[o.key_stream][:, None, :], o.norm.shape))
        p.value_norms.setdefault(key, []).append(pa.table({
            "example_id": ids[bi], "head": h.astype(np.int16), "token_idx": (t + off[bi]).astype(np.int32),
            "norm": o.norm[bi, h, t].astype(np.float32)}, schema=VALUE_NORMS.schema))
    elif o.kind == "sinks":
        off = np.asarray(b.offsets[o.stream], np.int64)
        bi, t = np.nonzero(o.mask)
        if len(bi):
            p.sinks.setdefault(key, []).append(pa.table({
                "example_id": ids[bi], "token_idx": (t + off[bi]).astype(np.int32),
                "dim": o.index[bi, t].astype(np.int32), "ratio": o.norm[bi, t].astype(np.float32)},
                schema=SINKS.schema))
    elif o.kind == "lens":  # [batch, token, k] probabilities and vocabulary ids of valid tokens
        off = np.asarray(b.offsets[o.stream], np.int64)
        bi, t = np.nonzero(o.mask)
        k = o.norm.shape[-1]
        ids_k = o.index[bi, t].reshape(-1)
        p.lens.setdefault(o.stream, []).append(pa.table({
            "example_id": np.repeat(ids[bi], k), "layer": np.full(len(bi) * k, o.layer, np.int32),
            "token_idx": np.repeat((t + off[bi]).astype(np.int32), k),
            "rank": np.tile(np.arange(k, dtype=np.int16), len(bi)), "vocab_id": ids_k.astype(np.int32),
            "piece": pa.array([b.pieces.get(int(i)) for i in ids_k], pa.string()),
            "prob": o.norm[bi, t].reshape(-1).astype(np.float32)}, schema=LENS.schema))
    elif o.kind == "relevancy":  # [batch, token]: each token's relevancy to the prediction
        off = np.asarray(b.offsets[o.stream], np.int64)
        bi, t = np.nonzero(o.mask)
        n = len(bi)
        target = (pa.nulls(n, pa.int32()) if o.target is None
                  else pa.array((o.target[bi] + off[bi]).astype(np.int32)))
        p.relevancy.append(pa.table({
            "example_id": ids[bi], "target": target,
            "method": pa.array(np.full(n, "relevancy", dtype=object), pa.string()),
            "stream": pa.array(np.full(n, o.stream, dtype=object), pa.string()),
            "layer": pa.nulls(n, pa.int32()), "token_idx": (t + off[bi]).astype(np.int32),
            "value": o.index[bi, t].astype(np.float32)}, schema=RELEVANCY.schema))
    else:  # rollout: [batch, query, key] values where mask
        off = np.asarray(b.offsets[o.stream], np.int64)
        bi, q, k = np.nonzero(o.mask)
        n = len(bi)
        p.relevancy.append(pa.table({
            "example_id": ids[bi], "target": (q + off[bi]).astype(np.int32),
            "method": pa.array(np.full(n, "rollout", dtype=object), pa.string()),
            "stream": pa.array(np.full(n, o.stream, dtype=object), pa.string()),
            "layer": np.full(n, o.layer, np.int32), "token_idx": (k + off[bi]).astype(np.int32),
            "value": o.index[bi, q, k].astype(np.float32)}, schema=RELEVANCY.schema))


def _write_chunk(writer: LakeWriter, chunk: int, p: _ChunkParts, abandon: threading.Event) -> None:
    def one(tables):
        return [({}, pa.concat_tables(tables))] if tables else []

    def parts(groups):
        return [({"stream": s, "layer": l}, pa.concat_tables(v)) for (s, l), v in groups.items()]

    out = {
        "examples": [({}, pa.Table.from_pylist(p.examples, schema=EXAMPLES.schema))],
        "tokens": one(p.tokens),
        "head_stats": one(p.stats),
        "attention": parts(p.attention),
        "hidden_states": parts(p.hidden),
        "errors": [({}, pa.Table.from_pylist(
            [{"source_id": s, "stage": st, "message": m} for s, st, m in p.errors], schema=ERRORS.schema))],
    }
    if p.images:
        out["images"] = [({}, pa.Table.from_pylist(p.images, schema=IMAGES.schema))]
    if p.value_norms:
        out["value_norms"] = parts(p.value_norms)
    if p.sinks:
        out["sinks"] = parts(p.sinks)
    if p.relevancy:
        out["relevancy"] = one(p.relevancy)
    if p.lens:
        out["lens"] = [({"stream": st}, pa.concat_tables(v)) for st, v in p.lens.items()]
    writer.write_chunk(chunk, out, stop=abandon.is_set)


# ---------------------------------------------------------------------------- the driver
def describe(adapter) -> dict:
    """What the run row needs to know of a loaded model (also asked of a Ray actor's model)."""
    return {
        "family": adapter.family,
        "streams": adapter.streams(),
        "attn_implementation": adapter.model.config._attn_implementation,
        "random_weights": bool(getattr(adapter.model.config, "vlatlas_random_weights", False)),
        "lens": hasattr(adapter, "lens"),
        # None when --explain relevancy works for this model, else why not
        "relevancy": (getattr(adapter, "relevancy_unavailable", None) if hasattr(adapter, "relevancy_targets")
                      else f"--explain relevancy is not available for {adapter.family}"),
        "version": pipeline.__version__,
    }


def plan_jobs(chunks: dict[int, list[Row]], batch_size: int, first_chunk: int) -> list[_Job]:
    """The batches of the given chunks, in order; a chunk always starts a batch, so a chunk's
    batches (and hence its results) are the same whichever process runs it."""
    jobs = []
    for c in sorted(chunks):
        rs = chunks[c]
        starts = list(range(0, len(rs), batch_size)) or [0]
        jobs += [_Job(c, rs[i:i + batch_size], i == starts[-1], c == first_chunk) for i in starts]
    return jobs


def run_chunks(adapter, writer: LakeWriter, jobs: list[_Job], known_images: set[str], policy: AttentionPolicy,
               hidden_layers: set[int] | None, vec_ids: set[int] | None, device: str, workers: int, bar,
               summary: Summary, manifest_errors, explain: tuple[str, ...] = ()) -> None:
    """Run the planned batches through the three stages; every chunk's files and marker are
    written before this returns (or, on an error or Ctrl-C, the unfinished chunk is abandoned)."""
    adapter = conform(adapter)
    stage = _WriteStage(writer)
    ok = False
    try:
        points = adapter.hook_points(hidden_layers, explain=explain)
        _run_jobs(adapter, jobs, known_images, policy, points, vec_ids, device, workers, stage, bar, summary,
                  manifest_errors, explain)
        ok = True
    finally:
        stage.close(abandon=not ok)


def extract(model: str, data: str | Path, lake: str | Path, run: str, *, batch_size: int = 8,
            device: str = "cpu", dtype: str = "float32", limit: int | None = None,
            keep_attention: str = DEFAULT_KEEP_ATTENTION, keep_hidden: str = DEFAULT_KEEP_HIDDEN,
            chunk_size: int = 64, overwrite: bool = False, progress: bool = True, revision: str | None = None,
            workers: int | None = None, adapter=None, ray: str | None = None, ray_actors: int | None = None,
            ray_cpus: float = 1.0, explain: str | None = None) -> Summary:
    """Run ``model`` over the manifest ``data`` and write run ``run`` into ``lake``.

    Everything about the arguments is checked (manifest columns, run name,
    capture options, the model) before any example is processed. Bad rows are
    recorded in ``errors`` and skipped; running the same command again resumes
    an interrupted run. ``workers``: input processes (None = :func:`default_workers`,
    0 = read and encode in this process); results do not depend on it.

    ``lake`` is a folder or an object-store URI (``s3://bucket/prefix``, ``lake/store.py``).
    ``ray``: run the chunks on a Ray cluster instead of in this process (``""``: the cluster
    in ``$RAY_ADDRESS`` or one running on this machine, else a new local one; or an address),
    with ``ray_actors`` model-holding actors of ``ray_cpus`` CPUs each (or one GPU each on
    CUDA); see :mod:`pipeline.distributed`. The lake is the same as a single-process run's.
    """
    t0 = time.perf_counter()
    check_run_name(run)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("--batch-size and --chunk-size must be at least 1")
    if workers is not None and workers < 0:
        raise ValueError("--workers must be 0 (read and encode in the main process) or more")
    capture = Capture.from_options(keep_attention, keep_hidden, explain, chunk_size)  # bad options fail here
    data = Path(data).resolve()
    rows, manifest_errors = read_manifest(data)
    if limit is not None:  # manifest errors are kept whole: they describe the manifest
        rows = [r for r in rows if r.example_id < limit]
    store = Store(lake)
    pool = None
    if ray is not None:
        from pipeline.distributed import RayPool

        if store.local:
            store.ensure_dir()
        pool = RayPool(ray, model, device=device, dtype=dtype, revision=revision, actors=ray_actors,
                       cpus=ray_cpus)
    try:
        if pool is not None:
            info = pool.describe()
        else:
            if adapter is None:
                adapter = load_adapter(model, device=device, dtype=dtype, revision=revision)
            info = describe(adapter)
        return _extract(model, data, store, run, rows, manifest_errors, capture, info, adapter, pool,
                        batch_size=batch_size, device=device, dtype=dtype, overwrite=overwrite, progress=progress, revision=revision,
                        workers=workers, t0=t0)
    finally:
        if pool is not None:
            pool.close()


def _extract(model, data, store, run, rows, manifest_errors, capture, info, adapter, pool, *, batch_size,
             device, dtype, overwrite, progress, revision, workers, t0) -> Summary:
    methods = capture.explain.methods
    if "relevancy" in methods and info.get("relevancy"):
        raise ValueError(f"{info['relevancy']}; rollout, value, sinks (and lens for decoders) are available")
    if "lens" in methods and not info.get("lens"):
        raise ValueError(f"--explain lens reads hidden states through a language model's head: it needs a decoder "
                         f"LVLM ({', '.join(families_with('lens'))}), and this model is a {info['family']}")
    cfg = replace(capture, random_weights=info["random_weights"])
    policy, methods, chunk_size = cfg.attention, cfg.explain.methods, cfg.chunk_size
    hidden_layers = cfg.hidden.layers()
    top = max(s["layers"] for s in info["streams"].values())  # hidden states run 0..layers
    if hidden_layers and max(hidden_layers) > top:
        raise ValueError(f"--keep-hidden {str(cfg.hidden)!r} asks for hidden-state layer(s) "
                         f"{sorted(x for x in hidden_layers if x > top)}, but this model has hidden states "
                         f"0..{top} (0 is the embedding output, l + 1 the output of block l)")
    vec_ids = hidden_vector_examples(rows, cfg.hidden.sample())
    store.ensure_dir()
    lake = store.uri
    metadata = {"vlatlas.model": model, "vlatlas.capture": cfg.to_json(), "vlatlas.version": pipeline.__version__}
    writer = LakeWriter(store, run, metadata)
    summary = Summary(run, str(lake), errors=list(manifest_errors))

    previous = writer.read_run_row()
    if previous and overwrite:
        writer.delete_run()
        previous = None
    if previous:
        same = (previous["model"] == model and previous["manifest"] == str(data)
                and previous["capture"] == cfg.to_json() and previous["dtype"] == dtype)
        if not same:
            raise RunConflict(
                f"run {run!r} already exists in {lake} with another model, manifest, dtype or capture "
                f"configuration (model {previous['model']}, manifest {previous['manifest']}). "
                "Choose another --run name, or pass --overwrite to replace it."
            )
        if previous["status"] == "complete":
            summary.already_complete = True
            return summary
    writer.purge_incomplete()
    created = previous["created_at"] if previous else datetime.now(timezone.utc)
    run_row = {
        "run": run, "model": model, "model_family": info["family"], "revision": revision,
        "dtype": dtype, "attn_implementation": info["attn_implementation"],
        "streams": json.dumps(info["streams"]), "manifest": str(data), "n_examples": None,
        "capture": cfg.to_json(), "status": "running", "created_at": created,
        "software_version": pipeline.__version__,
    }
    writer.write_run_row(run_row)

    chunks: dict[int, list[Row]] = {}
    for r in rows:
        chunks.setdefault(r.example_id // chunk_size, []).append(r)
    if not chunks:
        chunks[0] = []
    done = writer.done_chunks()
    summary.resumed_chunks = len(done & set(chunks))
    todo = {c: rs for c, rs in chunks.items() if c not in done}
    bar = tqdm(total=len(rows), initial=sum(len(chunks[c]) for c in chunks if c in done), unit="ex",
               desc=f"extract {run}", disable=not progress, dynamic_ncols=True)
    try:
        if pool is not None:
            summary.ray_actors = pool.size
            pool.run(store.uri, run, metadata, todo, min(chunks), batch_size, writer.known_image_ids(), policy,
                     hidden_layers, vec_ids, manifest_errors, bar, summary, methods)
        else:
            workers = default_workers(device) if workers is None else workers
            summary.workers = workers
            run_chunks(adapter, writer, plan_jobs(todo, batch_size, min(chunks)), writer.known_image_ids(),
                       policy, hidden_layers, vec_ids, device, workers, bar, summary, manifest_errors, methods)
    finally:
        bar.close()
    n_examples = writer.count_examples()
    if summary.resumed_chunks:
        summary.extracted = n_examples
    run_row.update(status="complete", n_examples=n_examples)
    writer.write_run_row(run_row)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = peak_rss_mb()
    return summary


def _run_jobs(adapter, jobs: list[_Job], known_images: set[str], policy: AttentionPolicy, points: list[HookPoint],
              vec_ids: set[int] | None, device: str, workers: int, stage: _WriteStage, bar, summary: Summary,
              manifest_errors, explain: tuple[str, ...] = ()) -> None:
    if not jobs:
        stage.start()
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize on their own
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        workers = 0  # workers inherit the loaded adapter; without fork they would have to load it again
    loader = torch.utils.data.DataLoader(
        _InputBatches(adapter, jobs, known_images), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity, pin_memory=False, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None, persistent_workers=False,
        multiprocessing_context="fork" if workers else None)
    chunk_images: set[str] = set()
    items = iter(loader)  # forks the input workers
    stage.start()
    try:
        for item in items:
            job = jobs[item["job"]]
            bad = item["errors"]
            summary.skipped += len(bad)
            summary.errors.extend(bad)
            batch_rows = item["rows"]
            if batch_rows:
                payload = _run_batch(adapter, item, policy, points, vec_ids, device, known_images, chunk_images,
                                     summary, explain)
                payload.errors = bad + payload.errors
                stage.put(("batch", job.chunk, payload))
            elif bad:
                stage.put(("batch", job.chunk, _BatchRows(errors=bad)))
            bar.update(item["n_rows"])
            if job.last:
                if job.first_chunk:  # the manifest's own rejects are recorded with the first chunk
                    summary.skipped += len(manifest_errors)
                stage.put(("end", job.chunk, list(manifest_errors) if job.first_chunk else []))
                chunk_images.clear()
    finally:
        # stop the input workers now, even on Ctrl-C: left to the garbage collector, the iterator
        # would shut them down at interpreter exit, where it can hang
        del items


def _relevancy(adapter, inputs, ids, sink: _BatchSink, points: list[HookPoint]) -> None:
    """Gradient-weighted relevancy (Chefer et al. 2021), a second pass with autograd: for every target
    of ``adapter.relevancy_targets`` (an encoder's prediction; each token a decoder generated), the
    gradient of its score with respect to every attention of its stream, ``R = I + sum Ā R``, and the
    row of the token the score is read at, in token order."""
    grabbed: dict[tuple[str, int], torch.Tensor] = {}

    def grab(p: HookPoint):
        def fn(module, args, output):
            grabbed[(p.stream, p.layer)] = output[p.index]
        return fn

    att = [p for p in points if p.kind == "attention"]
    handles = [p.module.register_forward_hook(grab(p)) for p in att]
    try:
        outputs = adapter.forward(inputs, example_ids=ids, grad=True)
    finally:
        for h in handles:
            h.remove()
    targets = adapter.relevancy_targets(inputs, outputs)
    att = {}  # stream -> its attentions, layer by layer
    for (s, l) in sorted(grabbed):
        att.setdefault(s, []).append(grabbed[(s, l)])
    for i, t in enumerate(targets):
        active = t["active"]
        if not bool(active.any()):
            continue
        streams = ("vision", "text", "cross") if t.get("rule") == "cross" else (t["stream"],)
        flat = [a for s in streams for a in att[s]]
        grads = torch.autograd.grad((t["score"] * active).sum(), flat, retain_graph=i < len(targets) - 1,
                                    allow_unused=True)
        grads = iter([torch.zeros_like(a) if g is None else g for a, g in zip(flat, grads)])
        gs = {s: [next(grads) for _ in att[s]] for s in streams}
        a = {s: [x.detach() for x in att[s]] for s in streams}
        seq = {s: sink._seq(s, a[s][0].shape[-1]) for s in streams if s != "cross"}
        b = torch.arange(len(active), device=active.device)
        row = t["row"].to(active.device)
        if t.get("rule") == "cross":
            r_tt, r_ti = relevancy_cross(a["vision"], gs["vision"], a["text"], gs["text"], a["cross"], gs["cross"],
                                         seq["vision"].masks.valid, seq["text"].masks.valid)
            rows = {"text": r_tt[b, row], "vision": r_ti[b, row]}  # [batch, S], sequence order
        else:
            s = t["stream"]
            rows = {s: relevancy_self(a[s], gs[s], seq[s].masks.valid)[b, row]}
        target = None
        if t["target"] is not None:  # sequence position -> token_idx within the stream
            target = seq[t["stream"]].token_of.gather(1, t["target"].to(active.device)[:, None])[:, 0]
        for s, vals in rows.items():
            sl = sink.stream(s)
            sink.out.append(_LayerOut(s, -1, "relevancy", index=vals.gather(1, sl.seq_index),
                                      mask=sl.valid & active.to(sl.valid.device)[:, None], target=target))


def _to_device(v, device: str):
    """An input array or tensor on ``device`` (through pinned memory on CUDA, copied asynchronously)."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, torch.Tensor):
        return v
    if str(device).startswith("cuda"):
        return v.pin_memory().to(device, non_blocking=True)
    return v.to(device)


def _run_batch(adapter, item: dict, policy: AttentionPolicy, points, vec_ids, device, known_images: set[str],
               chunk_images: set[str], summary: Summary, explain: tuple[str, ...] = ()) -> _BatchRows:
    rows: list[Row] = item["rows"]
    pics = item["images"]
    ids = [r.example_id for r in rows]
    boxes = [r.boxes for r in rows]
    inputs = map_inputs(item["inputs"], lambda v: _to_device(v, device))
    inputs = adapter.prepare(inputs)  # e.g. a decoder LVLM generates its answer first, uncaptured
    with_vec = np.array([vec_ids is None or i in vec_ids for i in ids], dtype=bool)
    sink = _BatchSink(adapter, inputs, pics, boxes, ids, policy, device, with_vec, explain)
    with capture(points, sink):
        outputs = adapter.forward(inputs, example_ids=ids)
    layout = sink.layout or adapter.layout(inputs, pics, boxes)
    if "relevancy" in explain:
        _relevancy(adapter, inputs, ids, sink, points)
    layers = sink.finish()
    lens_ids = sorted({int(i) for o in layers if o.kind == "lens" for i in np.unique(o.index)})
    pieces = dict(zip(lens_ids, adapter.tokenizer.convert_ids_to_tokens(lens_ids))) if lens_ids else {}
    preds = adapter.predict(outputs, [r.answer for r in rows])
    examples, tokens, images, errors = [], [], [], []
    for r, info, note, pred, tok, grid in zip(rows, item["image_info"], item["notes"], preds, layout.tokens,
                                              layout.grid):
        image_id, width, height, mode, png = info
        meta = dict(r.meta)
        if mode != "RGB":
            meta["image_mode"] = mode
        for stage_name, msg in note:
            errors.append((r.source_id, stage_name, msg))
            meta["truncated"] = True
            summary.truncated += 1
        meta.update(pred.meta)
        examples.append({
            "example_id": r.example_id, "source_id": r.source_id, "split": r.split, "text": r.text,
            "answer": r.answer, "prediction": pred.prediction, "correct": pred.correct,
            "image_id": image_id, "image_width": width, "image_height": height,
            "grid_h": grid[0], "grid_w": grid[1], "n_tokens": tok.num_rows,
            "boxes": json.dumps(r.boxes) if r.boxes is not None else None,
            "meta": json.dumps(meta, default=str),
        })
        tokens.append(tok.add_column(0, "example_id", pa.array(np.full(tok.num_rows, r.example_id), pa.int64())))
        if png is not None and image_id not in known_images and image_id not in chunk_images:
            chunk_images.add(image_id)
            images.append({"image_id": image_id, "png": png, "width": width, "height": height})
    summary.extracted += len(examples)
    streams = layout.streams
    return _BatchRows(ids, layers, {n: sl.valid.cpu().numpy() for n, sl in streams.items()},
                      {n: list(sl.token_offset) for n, sl in streams.items()}, dict(layout.keys), with_vec,
                      sink.stat_order, pieces, examples, tokens, images, errors)
