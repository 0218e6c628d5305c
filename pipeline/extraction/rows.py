"""Host arrays -> Arrow rows of every lake table, in one place. No I/O, no torch.

Each table's rows are built by one builder, found by the table's declaration in ``lake/schema.py``:
the device sink's results (:mod:`pipeline.extraction.outputs`) each name their table, and
:data:`BUILDERS` maps a table to the function that turns such a result into its rows. The other
tables' rows (``runs``, ``examples``, ``tokens``, ``images``, ``errors``) are built here too, from
the batch's host data. :class:`ChunkRows` gathers one chunk's rows, grouped by each table's
partition values, in the form ``lake.writer.LakeWriter.write_chunk`` takes.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import pyarrow as pa

from lake.schema import (ACTIVATIONS, ATTENTION, ERRORS, EXAMPLES, HEAD_STATS, HIDDEN_STATES, IMAGES, LENS, RELEVANCY,
                         SINKS, TABLES, VALUE_NORMS, Table)
from pipeline.extraction.outputs import (ActivationOut, BatchRows, HiddenOut, Kept, KeptOut, LensOut, Out, RelevancyOut,
                                         SinksOut, StatsOut, ValueOut)

Rows = tuple[dict, pa.Table]  # (partition values without run, rows)


def _np(t) -> np.ndarray:
    """A tensor (any device) or array as a numpy array."""
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


# ---------------------------------------------------------------------------- attention, head_stats
def kept_rows(kept: Kept, example_ids, token_offset, key_offset) -> dict[str, np.ndarray]:
    """Host side: the ``attention`` rows of one layer as numpy columns, sorted by example, head,
    query, key. ``kept`` holds numpy arrays; offsets as in :func:`attention_table`."""
    off = np.asarray(token_offset, np.int64)
    koff = np.asarray(key_offset, np.int64)
    if kept.sparse:
        b, h, q, j = np.nonzero(kept.keep)
        k = kept.index[b, h, q, j]
        w = kept.weight[b, h, q, j]
    else:
        b, h, q, k = np.nonzero(kept.keep)
        w = kept.weight[b, h, q, k]
    return {
        "example_id": np.asarray(example_ids, np.int64)[b],
        "head": h.astype(np.int16),
        "query_idx": (q + off[b]).astype(np.int32),
        "key_idx": (k + koff[b]).astype(np.int32),
        "weight": w.astype(np.float16).astype(np.float32),  # float16 precision, stored as float32
    }


def attention_arrow(cols: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({k: pa.array(v) for k, v in cols.items()}, schema=ATTENTION.schema)


def head_stats_arrow(names: list[str], vals: np.ndarray, example_ids: list[int], stream: str,
                     layer: int) -> pa.Table:
    """Rows of ``head_stats`` from ``vals`` ``[stat, batch, head]`` (numpy); NaN becomes null."""
    n_stat, n_b, n_h = vals.shape
    s_idx, b_idx, h_idx = np.meshgrid(np.arange(n_stat), np.arange(n_b), np.arange(n_h), indexing="ij")
    v = vals.reshape(-1).astype(np.float32)
    return pa.table(
        {
            "example_id": pa.array(np.asarray(example_ids, np.int64)[b_idx.reshape(-1)], pa.int64()),
            "stream": pa.array(np.full(v.size, stream, dtype=object), pa.string()),
            "layer": pa.array(np.full(v.size, layer, np.int32), pa.int32()),
            "head": pa.array(h_idx.reshape(-1).astype(np.int16), pa.int16()),
            "stat": pa.array(np.asarray(names, dtype=object)[s_idx.reshape(-1)], pa.string()),
            "value": pa.array(v, pa.float32(), mask=np.isnan(v)),
        },
        schema=HEAD_STATS.schema,
    )


def attention_table(attn, keep, example_ids: list[int], token_offset: list[int] | None = None,
                    key_offset: list[int] | None = None) -> pa.Table:
    """Long-format rows of the ``attention`` table (one layer, one stream) from a dense keep mask.

    ``token_offset[b]`` (default 0) is the ``token_idx`` of the stream's first token in
    example ``b``'s token table: slot ``j`` of the stream is token ``token_offset[b] + j``.
    ``key_offset`` (default ``token_offset``) is the same for the keys, when they are another
    stream's tokens (cross attention).
    Rows come out sorted by example, head, query, key.
    """
    off = [0] * len(example_ids) if token_offset is None else token_offset
    kept = Kept(_np(attn.float()).astype(np.float16), _np(keep), None)
    return attention_arrow(kept_rows(kept, example_ids, off, off if key_offset is None else key_offset))


def head_stats_table(stats: dict, example_ids: list[int], stream: str, layer: int) -> pa.Table:
    """Rows of ``head_stats`` from ``{stat: [batch, head]}``; NaN becomes null."""
    names = sorted(stats)
    vals = np.stack([_np(stats[s].float()) for s in names], 0)  # [stat, batch, head]
    return head_stats_arrow(names, vals, example_ids, stream, layer)


# ---------------------------------------------------------------------------- hidden_states
def hidden_arrow(o: HiddenOut, b: BatchRows) -> pa.Table:
    """Rows of ``hidden_states`` for one layer (host side).

    ``o.norm`` ``[batch, token]`` float32 L2 norms over the stream's valid tokens (``b.valid``);
    ``o.vectors`` ``[n, token, dim]`` float16 vectors of the examples flagged in ``b.with_vec``
    (``[batch]`` bool, in batch order), or None when none has them; the other rows' ``vec`` is null.
    """
    return pa.table(_token_vectors(o.norm, o.vectors, b.valid[o.stream], o.stream, b), schema=HIDDEN_STATES.schema)


def _token_vectors(norm, vectors, mask, stream: str, b: BatchRows) -> dict:
    """The columns example_id, token_idx, norm, vec of the tokens in ``mask`` ``[batch, token]``
    (see :func:`hidden_arrow`)."""
    bi, t = np.nonzero(mask)
    off = np.asarray(b.offsets[stream], np.int64)
    has = b.with_vec[bi]
    if vectors is not None and has.any():
        slot = np.cumsum(b.with_vec) - 1  # batch index -> row of ``vectors``
        flat = vectors[slot[bi[has]], t[has]].reshape(-1)
        dim = vectors.shape[-1]
    else:
        flat, dim = np.zeros(0, np.float16), 0
    lengths = np.where(has, dim, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    # float16 precision (the vectors cross from the device as float16), stored as float32: see lake/schema.py
    flat = flat.astype(np.float16).astype(np.float32)
    vecs = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float32()),
                                    mask=pa.array(~has))
    return {
        "example_id": pa.array(np.asarray(b.example_ids, np.int64)[bi], pa.int64()),
        "token_idx": pa.array((t + off[bi]).astype(np.int32), pa.int32()),
        "norm": pa.array(norm[bi, t].astype(np.float32), pa.float32()),
        "vec": vecs,
    }


def activation_arrow(o: ActivationOut, b: BatchRows) -> pa.Table:
    """Rows of ``activations`` for one module: as :func:`hidden_arrow`, over the tokens the module's
    output covers (``o.mask``), with the module's layer (null outside the blocks)."""
    cols = _token_vectors(o.norm, o.vectors, o.mask, o.stream, b)
    n = len(cols["norm"])
    layer = pa.nulls(n, pa.int32()) if o.layer < 0 else pa.array(np.full(n, o.layer, np.int32))
    return pa.table({"example_id": cols["example_id"], "token_idx": cols["token_idx"], "layer": layer,
                     "norm": cols["norm"], "vec": cols["vec"]}, schema=ACTIVATIONS.schema)


def hidden_table(hidden, valid, example_ids: list[int], token_offset: list[int] | None = None) -> pa.Table:
    """Rows of ``hidden_states`` from ``[batch, token, dim]`` in the stream's token order, every
    vector kept; ``token_offset`` as in :func:`attention_table`."""
    vec = _np(hidden.float())
    off = [0] * len(example_ids) if token_offset is None else token_offset
    o = HiddenOut("", 0, np.linalg.norm(vec, axis=-1), vec.astype(np.float16))
    b = BatchRows(list(example_ids), valid={"": _np(valid)}, offsets={"": list(off)},
                  with_vec=np.ones(len(example_ids), bool))
    return hidden_arrow(o, b)


# ---------------------------------------------------------------------------- each result's rows
def _head_stats(o: StatsOut, b: BatchRows) -> pa.Table:
    return head_stats_arrow(b.stat_order, o.stats, b.example_ids, o.stream, o.layer)


def _attention(o: KeptOut, b: BatchRows) -> pa.Table:
    koff = b.offsets[o.key_stream or o.stream]
    return attention_arrow(kept_rows(o.kept, b.example_ids, b.offsets[o.stream], koff))


def _value_norms(o: ValueOut, b: BatchRows) -> pa.Table:
    """``o.norm`` ``[batch, head, token]`` over the key stream's tokens."""
    ids = np.asarray(b.example_ids, np.int64)
    off = np.asarray(b.offsets[o.key_stream], np.int64)
    bi, h, t = np.nonzero(np.broadcast_to(b.valid[o.key_stream][:, None, :], o.norm.shape))
    return pa.table({
        "example_id": ids[bi], "head": h.astype(np.int16), "token_idx": (t + off[bi]).astype(np.int32),
        "norm": o.norm[bi, h, t].astype(np.float32)}, schema=VALUE_NORMS.schema)


def _sinks(o: SinksOut, b: BatchRows) -> pa.Table | None:
    ids = np.asarray(b.example_ids, np.int64)
    off = np.asarray(b.offsets[o.stream], np.int64)
    bi, t = np.nonzero(o.flag)
    if not len(bi):
        return None
    return pa.table({
        "example_id": ids[bi], "token_idx": (t + off[bi]).astype(np.int32),
        "dim": o.dim[bi, t].astype(np.int32), "ratio": o.ratio[bi, t].astype(np.float32)}, schema=SINKS.schema)


def _lens(o: LensOut, b: BatchRows) -> pa.Table:
    """``o.prob``/``o.ids`` ``[batch, token, k]`` of the valid tokens (``o.mask``)."""
    ids = np.asarray(b.example_ids, np.int64)
    off = np.asarray(b.offsets[o.stream], np.int64)
    bi, t = np.nonzero(o.mask)
    k = o.prob.shape[-1]
    ids_k = o.ids[bi, t].reshape(-1)
    return pa.table({
        "example_id": np.repeat(ids[bi], k), "layer": np.full(len(bi) * k, o.layer, np.int32),
        "token_idx": np.repeat((t + off[bi]).astype(np.int32), k),
        "rank": np.tile(np.arange(k, dtype=np.int16), len(bi)), "vocab_id": ids_k.astype(np.int32),
        "piece": pa.array([b.pieces.get(int(i)) for i in ids_k], pa.string()),
        "prob": o.prob[bi, t].reshape(-1).astype(np.float32)}, schema=LENS.schema)


def _relevancy(o: RelevancyOut, b: BatchRows) -> pa.Table:
    """``o.values`` ``[batch, target, token]`` where ``o.mask``: rollout (every query a target, a
    layer each) and gradient relevancy (one target per example: a generated token, or the
    prediction when ``o.target`` is None)."""
    ids = np.asarray(b.example_ids, np.int64)
    off = np.asarray(b.offsets[o.stream], np.int64)
    bi, q, t = np.nonzero(o.mask)
    n = len(bi)
    target = (pa.nulls(n, pa.int32()) if o.target is None
              else pa.array((o.target[bi, q] + off[bi]).astype(np.int32)))
    return pa.table({
        "example_id": ids[bi], "target": target,
        "method": pa.array(np.full(n, o.method, dtype=object), pa.string()),
        "stream": pa.array(np.full(n, o.stream, dtype=object), pa.string()),
        "layer": pa.nulls(n, pa.int32()) if o.layer < 0 else pa.array(np.full(n, o.layer, np.int32)),
        "token_idx": (t + off[bi]).astype(np.int32),
        "value": o.values[bi, q, t].astype(np.float32)}, schema=RELEVANCY.schema)


# a device result's rows, by the table it names
BUILDERS: dict[str, Callable[[Out, BatchRows], pa.Table | None]] = {
    HEAD_STATS.name: _head_stats,
    ATTENTION.name: _attention,
    HIDDEN_STATES.name: hidden_arrow,
    VALUE_NORMS.name: _value_norms,
    SINKS.name: _sinks,
    LENS.name: _lens,
    RELEVANCY.name: _relevancy,
    ACTIVATIONS.name: activation_arrow,
}


# ---------------------------------------------------------------------------- runs, examples, tokens, images, errors
def runs_row(spec, info: dict, created, status: str = "running") -> dict:
    """The ``runs`` row of a run (``spec``: a :class:`pipeline.extraction.spec.RunSpec`; ``info``:
    what the model says of itself, :func:`pipeline.extraction.chunk.describe`); the capture is
    serialised here, once."""
    capture = spec.capture_of(info)
    return {
        "run": spec.run, "model": spec.model, "model_family": info["family"], "revision": spec.revision,
        "dtype": spec.dtype, "attn_implementation": info["attn_implementation"],
        "streams": json.dumps(info["streams"]), "manifest": str(spec.data), "n_examples": None,
        "capture": capture.to_json(), "status": status, "created_at": created,
        "software_version": info["version"],
    }


def example_rows(item: dict, preds, layout, seen_images: set[str]) -> BatchRows:
    """The ``examples``, ``tokens``, ``images`` and ``errors`` rows of one encoded batch (``item``:
    :func:`pipeline.extraction.inputs.prepare_batch`'s output), with the model's predictions and
    token tables. An image is stored once per lake: ``seen_images`` (the lake's and the chunk's so
    far) is updated with the images this batch stores."""
    out = BatchRows(example_ids=[r.example_id for r in item["rows"]])
    for r, info, note, pred, tok, grid in zip(item["rows"], item["image_info"], item["notes"], preds, layout.tokens,
                                              layout.grid):
        image_id, width, height, mode, png = info
        meta = dict(r.meta)
        if mode != "RGB":
            meta["image_mode"] = mode
        for stage_name, msg in note:
            out.errors.append((r.source_id, stage_name, msg))
            meta["truncated"] = True
        meta.update(pred.meta)
        out.examples.append({
            "example_id": r.example_id, "source_id": r.source_id, "split": r.split, "text": r.text,
            "answer": r.answer, "prediction": pred.prediction, "correct": pred.correct,
            "image_id": image_id, "image_width": width, "image_height": height,
            "grid_h": grid[0], "grid_w": grid[1], "n_tokens": tok.num_rows,
            "boxes": json.dumps(r.boxes) if r.boxes is not None else None,
            "meta": json.dumps(meta, default=str),
        })
        out.tokens.append(tok.add_column(0, "example_id", pa.array(np.full(tok.num_rows, r.example_id), pa.int64())))
        if png is not None and image_id not in seen_images:
            seen_images.add(image_id)
            out.images.append({"image_id": image_id, "png": png, "width": width, "height": height})
    return out


def errors_table(errors: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"source_id": s, "stage": st, "message": m} for s, st, m in errors],
                                schema=ERRORS.schema)


class ChunkRows:
    """One chunk's rows of every table, grouped by partition values (without ``run``)."""

    ALWAYS = (EXAMPLES, ERRORS)  # a file even when empty: a chunk's examples and errors are known

    def __init__(self):
        self.parts: dict[str, dict[tuple, list[pa.Table]]] = {}

    def add(self, table: Table, values: dict, rows: pa.Table) -> None:
        key = tuple(values[k] for k in table.partition if k != "run")
        self.parts.setdefault(table.name, {}).setdefault(key, []).append(rows)

    def add_out(self, o: Out, b: BatchRows) -> None:
        """A device result's rows, by its table's builder."""
        rows = BUILDERS[o.table.name](o, b)
        if rows is not None:
            self.add(o.table, {"stream": o.stream, "layer": o.layer, "module": getattr(o, "module", None)}, rows)

    def add_batch(self, b: BatchRows) -> None:
        if b.examples:
            self.add(EXAMPLES, {}, pa.Table.from_pylist(b.examples, schema=EXAMPLES.schema))
        for t in b.tokens:
            self.add(TABLES["tokens"], {}, t)
        if b.images:
            self.add(IMAGES, {}, pa.Table.from_pylist(b.images, schema=IMAGES.schema))
        if b.errors:
            self.add(ERRORS, {}, errors_table(b.errors))
        for o in b.outs:
            self.add_out(o, b)

    def tables(self) -> dict[str, list[Rows]]:
        """``{table name: [(partition values, rows), ...]}`` in the lake's table order."""
        for t in self.ALWAYS:
            self.parts.setdefault(t.name, {(): [t.schema.empty_table()]})
        out = {}
        for name, t in TABLES.items():
            groups = self.parts.get(name)
            if groups:
                keys = [k for k in t.partition if k != "run"]
                out[name] = [(dict(zip(keys, v)), pa.concat_tables(g)) for v, g in groups.items()]
        return out
