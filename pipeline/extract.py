"""model + manifest -> lake: the extraction driver behind ``vlatlas extract``.

Examples are processed in chunks of ``chunk_size`` manifest rows (see
``lake/writer.py``); each chunk's tables are written when the chunk is done,
so stopping (Ctrl-C, kill -9) loses at most one chunk, and running the same
command again resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch
from tqdm import tqdm

import pipeline
from lake.schema import ERRORS, EXAMPLES, IMAGES
from lake.writer import LakeWriter, check_run_name
from pipeline.capture import HookPoint, capture
from pipeline.data import BadInput, LoadedImage, Row, load_image, read_manifest, thumbnail_png
from pipeline.flatten import KeepPolicy, attention_table, head_stats_table, hidden_table, keep_mask, kept_mass
from pipeline.models import load_adapter
from pipeline.models.base import BatchLayout, StreamLayout
from pipeline.stats import head_stats


class RunConflict(Exception):
    """A run of that name exists with another model, manifest or capture configuration."""


@dataclass(frozen=True)
class CaptureConfig:
    """What a run stores; recorded in ``runs.capture`` and every file's metadata."""

    keep_attention: str = "all"
    keep_hidden: str = "all"  # all / none / comma-separated hidden-state layers
    chunk_size: int = 64
    random_weights: bool = False

    def hidden_layers(self) -> set[int] | None:
        """None for all layers, else the set of hidden-state layers to keep."""
        k = self.keep_hidden.strip().lower()
        if k == "all":
            return None
        if k == "none":
            return set()
        try:
            layers = {int(x) for x in k.split(",") if x.strip()}
        except ValueError:
            raise ValueError(f"--keep-hidden {self.keep_hidden!r} is not understood: use all, none or "
                             "a comma-separated list of layers such as 0,4,12") from None
        if any(x < 0 for x in layers):
            raise ValueError("--keep-hidden layers are 0 (embeddings) or more")
        return layers

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


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
        if self.resumed_chunks:
            s += f"; resumed after {self.resumed_chunks} finished chunks"
        return s


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


class _BatchSink:
    """Receives each layer's tensors during the forward pass and turns them into rows."""

    def __init__(self, adapter, inputs, images, boxes, example_ids, policy: KeepPolicy, device):
        self.adapter, self.inputs, self.images, self.boxes = adapter, inputs, images, boxes
        self.example_ids = example_ids
        self.policy = policy
        self.device = device
        self.layout: BatchLayout | None = None
        self._streams: dict[str, StreamLayout] = {}
        self.attention: list[tuple[dict, pa.Table]] = []
        self.hidden: list[tuple[dict, pa.Table]] = []
        self.stats: list[pa.Table] = []

    def stream(self, name: str) -> StreamLayout:
        if self.layout is None:
            self.layout = self.adapter.layout(self.inputs, self.images, self.boxes)
        if name not in self._streams:
            self._streams[name] = self.layout.streams[name].to(self.device)
        return self._streams[name]

    def __call__(self, point: HookPoint, tensor: torch.Tensor) -> None:
        sl = self.stream(point.stream)
        part = {"stream": point.stream, "layer": point.layer}
        if point.kind == "attention":
            key_stream = self.layout.keys.get(point.stream)  # cross attention: keys of another stream
            ksl = sl if key_stream is None else self.stream(key_stream)
            a = _gather_tokens(tensor.float(), sl, ksl)  # [batch, head, token, token_k]
            stats = head_stats(a, sl.masks, None if key_stream is None else ksl.masks)
            keep = keep_mask(a, sl.valid, sl.masks.image, self.policy, ksl.valid, ksl.masks.image)
            stats["kept_mass"] = kept_mass(a, keep, sl.valid)
            self.stats.append(head_stats_table(stats, self.example_ids, point.stream, point.layer))
            if self.policy.kind != "none":
                self.attention.append((part, attention_table(a, keep, self.example_ids, sl.token_offset,
                                                             ksl.token_offset)))
        else:
            h = tensor.gather(1, sl.seq_index[:, :, None].expand(-1, -1, tensor.shape[-1]))  # [batch, token, dim]
            self.hidden.append((part, hidden_table(h, sl.valid, self.example_ids, sl.token_offset)))


def _merge(parts: list[tuple[dict, pa.Table]]) -> list[tuple[dict, pa.Table]]:
    """Concatenate the tables of equal partitions, keeping first-seen order."""
    groups: dict[tuple, list[pa.Table]] = {}
    keys: dict[tuple, dict] = {}
    for values, t in parts:
        k = tuple(sorted(values.items()))
        groups.setdefault(k, []).append(t)
        keys[k] = values
    return [(keys[k], pa.concat_tables(v)) for k, v in groups.items()]


def extract(model: str, data: str | Path, lake: str | Path, run: str, *, batch_size: int = 8,
            device: str = "cpu", dtype: str = "float32", limit: int | None = None,
            keep_attention: str = "all", keep_hidden: str = "all", chunk_size: int = 64,
            overwrite: bool = False, progress: bool = True, revision: str | None = None,
            adapter=None) -> Summary:
    """Run ``model`` over the manifest ``data`` and write run ``run`` into ``lake``.

    Everything about the arguments is checked (manifest columns, run name,
    capture options, the model) before any example is processed. Bad rows are
    recorded in ``errors`` and skipped; running the same command again resumes
    an interrupted run.
    """
    t0 = time.perf_counter()
    check_run_name(run)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("--batch-size and --chunk-size must be at least 1")
    policy = KeepPolicy.parse(keep_attention)
    data = Path(data).resolve()
    rows, manifest_errors = read_manifest(data)
    if limit is not None:  # manifest errors are kept whole: they describe the manifest
        rows = [r for r in rows if r.example_id < limit]
    if adapter is None:
        adapter = load_adapter(model, device=device, dtype=dtype, revision=revision)
    cfg = CaptureConfig(str(policy), keep_hidden, chunk_size,
                        bool(getattr(adapter.model.config, "vlatlas_random_weights", False)))
    hidden_layers = cfg.hidden_layers()
    top = max(s["layers"] for s in adapter.streams().values())  # hidden states run 0..layers
    if hidden_layers and max(hidden_layers) > top:
        raise ValueError(f"--keep-hidden {keep_hidden!r} asks for hidden-state layer(s) "
                         f"{sorted(x for x in hidden_layers if x > top)}, but this model has hidden states "
                         f"0..{top} (0 is the embedding output, l + 1 the output of block l)")
    lake = Path(lake)
    lake.mkdir(parents=True, exist_ok=True)
    writer = LakeWriter(lake, run, {"vlatlas.model": model, "vlatlas.capture": cfg.to_json(),
                                    "vlatlas.version": pipeline.__version__})
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
        "run": run, "model": model, "model_family": adapter.family, "revision": revision,
        "dtype": dtype, "attn_implementation": adapter.model.config._attn_implementation,
        "streams": json.dumps(adapter.streams()), "manifest": str(data), "n_examples": None,
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
    todo = [c for c in sorted(chunks) if c not in done]
    known_images = writer.known_image_ids()
    points = adapter.hook_points(hidden_layers)
    bar = tqdm(total=len(rows), initial=sum(len(chunks[c]) for c in chunks if c in done), unit="ex",
               desc=f"extract {run}", disable=not progress, dynamic_ncols=True)
    first = min(chunks)
    try:
        for c in todo:
            parts = _extract_chunk(adapter, chunks[c], c, batch_size, policy, points, known_images, device, bar)
            if c == first:
                parts["errors"].extend(manifest_errors)
            summary.extracted += parts.pop("_n_ok")
            summary.truncated += parts.pop("_n_truncated")
            summary.skipped += sum(1 for e in parts["errors"] if e[1] not in ("text",))
            summary.errors.extend(e for e in parts["errors"] if e not in manifest_errors)
            _write_chunk(writer, c, parts)
    finally:
        bar.close()
    if summary.resumed_chunks:
        summary.extracted = _count_examples(lake, run)
    run_row.update(status="complete", n_examples=_count_examples(lake, run))
    writer.write_run_row(run_row)
    summary.seconds = time.perf_counter() - t0
    return summary


def _count_examples(lake: Path, run: str) -> int:
    import pyarrow.parquet as pq

    base = lake / EXAMPLES.name / f"run={run}"
    return sum(pq.ParquetFile(p).metadata.num_rows for p in base.glob("*.parquet")) if base.exists() else 0


def _extract_chunk(adapter, rows: list[Row], chunk: int, batch_size: int, policy: KeepPolicy,
                   points: list[HookPoint], known_images: set[str], device: str, bar) -> dict:
    errors: list[tuple[str, str, str]] = []
    ok: list[tuple[Row, LoadedImage]] = []
    check = getattr(adapter, "check_image", None)  # model-specific limits (optional in the protocol)
    for r in rows:
        try:
            li = load_image(r.image_path)
            if check is not None:
                check(li.image)
            ok.append((r, li))
        except BadInput as e:
            errors.append((r.source_id, e.stage, e.message))
            bar.update(1)
    examples, tokens, stats, images = [], [], [], []
    attention: list[tuple[dict, pa.Table]] = []
    hidden: list[tuple[dict, pa.Table]] = []
    n_truncated = 0
    chunk_images: set[str] = set()
    for bi in range(0, len(ok), batch_size):
        batch = ok[bi:bi + batch_size]
        texts = [r.text for r, _ in batch]
        pics = [li.image for _, li in batch]
        ids = [r.example_id for r, _ in batch]
        inputs, notes = adapter.encode(texts, pics)
        if hasattr(adapter, "prepare"):  # e.g. a decoder LVLM generates its answer first, uncaptured
            inputs = adapter.prepare(inputs)
        sink = _BatchSink(adapter, inputs, pics, [r.boxes for r, _ in batch], ids, policy, device)
        torch.manual_seed(chunk * 1_000_003 + bi)  # ViLT samples patches: same rows on every run
        with capture(points, sink):
            outputs = adapter.forward(inputs)
        layout = sink.layout or adapter.layout(inputs, pics, [r.boxes for r, _ in batch])
        preds = adapter.predict(outputs, [r.answer for r, _ in batch])
        for j, ((r, li), note, pred, tok, grid) in enumerate(zip(batch, notes, preds, layout.tokens, layout.grid)):
            meta = dict(r.meta)
            if li.mode != "RGB":
                meta["image_mode"] = li.mode
            for stage, msg in note:
                errors.append((r.source_id, stage, msg))
                meta["truncated"] = True
                n_truncated += 1
            meta.update(pred.meta)
            examples.append({
                "example_id": r.example_id, "source_id": r.source_id, "split": r.split, "text": r.text,
                "answer": r.answer, "prediction": pred.prediction, "correct": pred.correct,
                "image_id": li.image_id, "image_width": li.width, "image_height": li.height,
                "grid_h": grid[0], "grid_w": grid[1], "n_tokens": tok.num_rows,
                "boxes": json.dumps(r.boxes) if r.boxes is not None else None,
                "meta": json.dumps(meta, default=str),
            })
            tokens.append(tok.add_column(0, "example_id", pa.array([r.example_id] * tok.num_rows, pa.int64())))
            if li.image_id not in known_images and li.image_id not in chunk_images:
                chunk_images.add(li.image_id)
                images.append({"image_id": li.image_id, "png": thumbnail_png(li.image),
                               "width": li.width, "height": li.height})
        stats.extend(sink.stats)
        attention.extend(sink.attention)
        hidden.extend(sink.hidden)
        bar.update(len(batch))
    return {
        "examples": examples, "tokens": tokens, "head_stats": stats, "attention": attention,
        "hidden_states": hidden, "images": images, "errors": errors,
        "_n_ok": len(examples), "_n_truncated": n_truncated,
    }


def _write_chunk(writer: LakeWriter, chunk: int, parts: dict) -> None:
    def one(tables):
        return [({}, pa.concat_tables(tables))] if tables else []

    out = {
        "examples": [({}, pa.Table.from_pylist(parts["examples"], schema=EXAMPLES.schema))],
        "tokens": one(parts["tokens"]),
        "head_stats": one(parts["head_stats"]),
        "attention": _merge(parts["attention"]),
        "hidden_states": _merge(parts["hidden_states"]),
        "errors": [({}, pa.Table.from_pylist(
            [{"source_id": s, "stage": st, "message": m} for s, st, m in parts["errors"]], schema=ERRORS.schema))],
    }
    if parts["images"]:
        out["images"] = [({}, pa.Table.from_pylist(parts["images"], schema=IMAGES.schema))]
    writer.write_chunk(chunk, out)
