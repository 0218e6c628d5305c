"""Speed of the app's queries on a lake shaped like ViLT-B at dataset scale.

``make bench`` (or ``python bench/bench_queries.py``) builds a synthetic lake
with the project's own writer (:class:`lake.writer.LakeWriter`, one chunk of
``--chunk-size`` examples at a time, as ``vlatlas extract`` writes it), then
times the app's own query functions (``lake/queries.py`` through a
:class:`lake.catalog.Catalog`) against their targets:

1. the head summary of a slice (mean of a statistic per layer × head over the
   examples with ``correct = false`` and one question type)   target 200 ms
2. one example's attention at one (stream, layer, head)         target  50 ms
3. the 20 examples with the largest statistic at one head        target 200 ms

and prints the lake's size on disk per example, table by table.

Shape (ViLT-B/32 on 384 × 384 images): 12 layers × 12 heads, 40 text tokens
(``[CLS]``, words, ``[SEP]``, padding) + 145 image tokens (an image ``[CLS]``
and 12 × 12 patches, stored in a shuffled sequence order) = 185 tokens; full
attention rounded to float16 and stored as float32 (as the extractor writes it), every
query row a softmax (sums to 1); every head statistic for every example; examples carry
``meta.qtype`` and ``correct``.

Disk: full attention of ONE example is 12 × 12 × 185² ≈ 4.9 M weights (≈ 10 MB:
about 2 bytes a weight as dictionary-encoded float16-rounded float32, and random weights
hardly compress), so 10,000 examples would need ~100 GB. ``--examples`` (default
10,000) sets how many examples get examples, tokens and head_stats rows;
``--attention-examples`` (default 500) how many of the first ones get their full
attention; ``--hidden-examples`` (default 64) how many get hidden states. The sizes printed per example are
measured; the 10,000-example attention size is extrapolated from them.

The lake goes to ``--out`` (default: a folder under /tmp, deleted at the end
unless ``--keep``; ``--reuse`` times an existing bench lake again without
rebuilding it). It must not be inside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_queries.py` from the repo root
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from lake import queries  # noqa: E402
import lake.catalog as lake_catalog  # noqa: E402
from lake.catalog import Catalog  # noqa: E402
from lake.queries import ExampleFilter  # noqa: E402
from lake.schema import ATTENTION, EXAMPLES, HEAD_STATS, HIDDEN_STATES, STATS, TOKENS  # noqa: E402
from lake.writer import LakeWriter  # noqa: E402

RUN = "vilt-b"
STREAM = "self"
LAYERS, HEADS = 12, 12
N_TEXT, GRID = 40, 12  # text positions; patches per image side
N_IMAGE = 1 + GRID * GRID  # image [CLS] + patches
N_TOK = N_TEXT + N_IMAGE  # 185
HIDDEN = 768
PATCH_PX = 32
IMAGE_PX = GRID * PATCH_PX  # 384
BATCH = 8  # the pipeline's default batch: head_stats rows come out batch by batch
QTYPES = ("color", "shape", "count", "exists", "spatial")
ACCURACY = {"color": 0.9, "shape": 0.85, "count": 0.55, "exists": 0.8, "spatial": 0.6}
WORDS = ("what", "color", "is", "the", "circle", "square", "triangle", "how", "many", "are", "there",
         "left", "of", "above", "red", "blue", "green", "yellow", "a", "shape", "any")
TARGETS_MS = {"head summary of a slice": 200.0, "one example's attention, one head": 50.0,
              "top 20 examples for a head": 200.0}


# -- building the lake -------------------------------------------------------------------
def examples_table(ids: np.ndarray, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    """Rows of ``examples`` for ``ids`` and each example's number of words."""
    n = len(ids)
    n_words = rng.integers(4, 12, size=n)  # [example]
    qtype = rng.choice(len(QTYPES), size=n)
    correct = rng.random(n) < np.array([ACCURACY[q] for q in QTYPES])[qtype]
    words = rng.choice(len(WORDS), size=(n, 12))
    texts = [" ".join(WORDS[w] for w in words[i, : n_words[i]]) for i in range(n)]
    answers = rng.choice(["yes", "no", "2", "3", "red", "circle"], size=n)
    preds = np.where(correct, answers, "no")
    preds = np.where(~correct & (answers == "no"), "yes", preds)
    meta = [json.dumps({"qtype": QTYPES[q], "difficulty": "hard" if i % 2 else "easy"})
            for i, q in zip(ids, qtype)]
    t = pa.table({
        "example_id": ids.astype(np.int64), "source_id": [f"q{i:06d}" for i in ids],
        "split": np.where(ids % 5 == 0, "val", "train"), "text": texts, "answer": answers, "prediction": preds,
        "correct": correct, "image_id": [f"{i:064x}" for i in ids],
        "image_width": np.full(n, IMAGE_PX, np.int32), "image_height": np.full(n, IMAGE_PX, np.int32),
        "grid_h": np.full(n, GRID, np.int32), "grid_w": np.full(n, GRID, np.int32),
        "n_tokens": np.full(n, N_TOK, np.int32), "boxes": pa.nulls(n, pa.string()), "meta": meta,
    }, schema=EXAMPLES.schema)
    return t, n_words


def tokens_table(ids: np.ndarray, n_words: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """The token table of every example: 40 text positions then the image [CLS] and 144 patches."""
    n = len(ids)
    pos = np.arange(N_TEXT)[None, :]  # [1, text]
    nw = n_words[:, None]  # [example, 1]
    role_t = np.where(pos == 0, "cls", np.where(pos <= nw, "word", np.where(pos == nw + 1, "sep", "pad")))
    word_ids = rng.choice(len(WORDS), size=(n, N_TEXT))
    tok_t = np.where(role_t == "word", np.asarray(WORDS, dtype=object)[word_ids],
                     np.where(role_t == "cls", "[CLS]", np.where(role_t == "sep", "[SEP]", "[PAD]")))
    # ViLT samples and permutes patches: sequence order != raster order.
    perm = np.argsort(rng.random((n, GRID * GRID)), axis=1)  # [example, patch] raster index
    prow, pcol = perm // GRID, perm % GRID
    role = np.concatenate([role_t, np.full((n, 1), "image_cls"), np.full((n, GRID * GRID), "patch")], 1)
    token = np.concatenate([tok_t, np.full((n, N_IMAGE), None, dtype=object)], 1)
    is_text = np.arange(N_TOK)[None, :] < N_TEXT
    nan_img = np.full((n, 1), np.nan)
    prow_f = np.concatenate([np.full((n, N_TEXT), np.nan), nan_img, prow], 1)  # [example, token]
    pcol_f = np.concatenate([np.full((n, N_TEXT), np.nan), nan_img, pcol], 1)
    null_img = ~np.isfinite(prow_f)
    flat = lambda a: a.reshape(-1)  # noqa: E731
    idx = np.broadcast_to(np.arange(N_TOK, dtype=np.int32), (n, N_TOK))
    text_pos = np.where(is_text, idx, 0)
    return pa.table({
        "example_id": np.repeat(ids.astype(np.int64), N_TOK), "token_idx": flat(idx).copy(),
        "stream": pa.array(np.full(n * N_TOK, STREAM)), "modality": flat(np.where(is_text, "text", "image").repeat(n, 0)),
        "role": flat(role), "token": pa.array(flat(token), pa.string()), "seq_pos": flat(idx).copy(),
        "text_pos": pa.array(flat(text_pos).astype(np.int32), mask=flat(np.broadcast_to(~is_text, (n, N_TOK)))),
        "patch_row": pa.array(np.nan_to_num(flat(prow_f)).astype(np.int32), mask=flat(null_img)),
        "patch_col": pa.array(np.nan_to_num(flat(pcol_f)).astype(np.int32), mask=flat(null_img)),
        "x0": pa.array((np.nan_to_num(flat(pcol_f)) * PATCH_PX).astype(np.float32), mask=flat(null_img)),
        "y0": pa.array((np.nan_to_num(flat(prow_f)) * PATCH_PX).astype(np.float32), mask=flat(null_img)),
        "x1": pa.array(((np.nan_to_num(flat(pcol_f)) + 1) * PATCH_PX).astype(np.float32), mask=flat(null_img)),
        "y1": pa.array(((np.nan_to_num(flat(prow_f)) + 1) * PATCH_PX).astype(np.float32), mask=flat(null_img)),
        "tile": pa.array(np.zeros(n * N_TOK, np.int16), mask=flat(np.broadcast_to(is_text, (n, N_TOK)))),
    }, schema=TOKENS.schema)


def head_stats_table(ids: np.ndarray, base: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """Every statistic of every head, around a per-head mean ``base`` [layer, stat, head].

    Rows come in the pipeline's order: batch, layer, stat (sorted by name), example, head.
    """
    n, stats = len(ids), sorted(STATS)
    v = base[None] + rng.normal(scale=0.08, size=(n, LAYERS, len(stats), HEADS))  # [example, layer, stat, head]
    v = np.clip(v, 0.0, 1.0).astype(np.float32)
    no_box = rng.random(n) < 0.3  # grounding / pointing are null without boxed words
    for s in ("grounding", "pointing"):
        v[no_box, :, stats.index(s), :] = np.nan
    e, l, s, h = np.meshgrid(np.arange(n), np.arange(LAYERS), np.arange(len(stats)), np.arange(HEADS),
                             indexing="ij")
    order = np.lexsort((h.ravel(), e.ravel(), s.ravel(), l.ravel(), (e // BATCH).ravel()))
    e, l, s, h, val = (x.ravel()[order] for x in (e, l, s, h, v))
    return pa.table({
        "example_id": ids.astype(np.int64)[e], "stream": pa.array(np.full(len(e), STREAM)),
        "layer": l.astype(np.int32), "head": h.astype(np.int16),
        "stat": pa.array(np.asarray(stats, dtype=object)[s], pa.string()),
        "value": pa.array(val, pa.float32(), mask=np.isnan(val)),
    }, schema=HEAD_STATS.schema)


class AttentionMaker:
    """One (stream, layer) table of full attention for a chunk, rows sorted by example, head, query, key.

    Rows are drawn from a pool of softmax rows made once (a chunk-layer's worth, each row summing
    to 1, rounded to float16 precision and held as float32 as the lake stores them), in a fresh
    random order for every table: as incompressible as fresh random rows, at a fraction of the
    cost of drawing them.
    """

    def __init__(self, max_examples: int, rng: np.random.Generator):
        per_ex = HEADS * N_TOK * N_TOK
        self.head = np.tile(np.repeat(np.arange(HEADS, dtype=np.int16), N_TOK * N_TOK), max_examples)
        self.query = np.tile(np.repeat(np.arange(N_TOK, dtype=np.int32), N_TOK), max_examples * HEADS)
        self.key = np.tile(np.arange(N_TOK, dtype=np.int32), max_examples * HEADS * N_TOK)
        self.per_ex = per_ex
        logits = rng.standard_normal((max_examples * HEADS * N_TOK, N_TOK), dtype=np.float32)  # [row, key]
        logits *= 2.0
        np.exp(logits, out=logits)
        logits /= logits.sum(-1, keepdims=True)  # each query row sums to 1
        self.pool = logits.astype(np.float16).astype(np.float32)  # [row, key], float16-rounded

    def table(self, ids: np.ndarray, seed: int) -> pa.Table:
        rows = len(ids) * HEADS * N_TOK
        order = np.random.default_rng(seed).permutation(len(self.pool))[:rows]
        weight = self.pool[order].reshape(-1)  # [example * head * query * key]
        n = len(weight)
        return pa.table({
            "example_id": np.repeat(ids.astype(np.int64), self.per_ex), "head": self.head[:n],
            "query_idx": self.query[:n], "key_idx": self.key[:n],
            "weight": pa.array(weight, pa.float32()),
        }, schema=ATTENTION.schema)


def hidden_table(ids: np.ndarray, layer: int, rng: np.random.Generator) -> pa.Table:
    vec = rng.standard_normal((len(ids) * N_TOK, HIDDEN), dtype=np.float32) * (1 + layer / 4)  # [row, dim]
    offsets = np.arange(0, (len(vec) + 1) * HIDDEN, HIDDEN, dtype=np.int32)
    return pa.table({
        "example_id": np.repeat(ids.astype(np.int64), N_TOK),
        "token_idx": np.tile(np.arange(N_TOK, dtype=np.int32), len(ids)),
        "norm": np.linalg.norm(vec, axis=1).astype(np.float32),
        "vec": pa.ListArray.from_arrays(  # float16-rounded, stored as float32
            pa.array(offsets), pa.array(vec.astype(np.float16).astype(np.float32).reshape(-1))),
    }, schema=HIDDEN_STATES.schema)


def build(out: Path, n_examples: int, n_attention: int, n_hidden: int, chunk_size: int, jobs: int = 2,
          seed: int = 0) -> None:
    """Write the run chunk by chunk with LakeWriter.write_chunk; ``jobs`` chunks at a time (Parquet
    writing and zstd release the GIL; every chunk has its own files and done marker)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    w = LakeWriter(out, RUN, metadata={"vlatlas.synthetic": "bench"})
    capture = {"keep_attention": "all", "keep_hidden": "all", "random_weights": True, "dtype": "float32",
               "chunk_size": chunk_size,
               "bench": {"examples": n_examples, "attention_examples": n_attention, "hidden_examples": n_hidden}}
    w.write_run_row(dict(
        run=RUN, model="synthetic/vilt-b32-shaped", model_family="vilt", revision="bench", dtype="float32",
        attn_implementation="eager",
        streams=json.dumps({STREAM: {"layers": LAYERS, "heads": HEADS, "hidden_size": HIDDEN}}),
        manifest="synthetic.jsonl", n_examples=n_examples, capture=json.dumps(capture), status="running",
        created_at=datetime.now(timezone.utc), software_version="bench"))
    sorted_stats = sorted(STATS)
    base = rng.beta(2, 5, size=(LAYERS, len(sorted_stats), HEADS))  # [layer, stat, head]: each head's own level
    att = AttentionMaker(min(chunk_size, n_attention), rng) if n_attention else None
    n_chunks = -(-n_examples // chunk_size)
    t0 = time.perf_counter()

    def one(c: int) -> None:
        crng = np.random.default_rng([seed, c])
        ids = np.arange(c * chunk_size, min(n_examples, (c + 1) * chunk_size))
        ex, n_words = examples_table(ids, crng)
        parts: dict[str, object] = {
            "examples": [({}, ex)],
            "tokens": [({}, tokens_table(ids, n_words, crng))],
            "head_stats": [({}, head_stats_table(ids, base, crng))],
        }
        a_ids = ids[ids < n_attention]
        if len(a_ids):  # a generator: one layer's table in memory at a time
            parts["attention"] = (({"stream": STREAM, "layer": l}, att.table(a_ids, seed=c * 1000 + l))
                                  for l in range(LAYERS))
        h_ids = ids[ids < n_hidden]
        if len(h_ids):
            parts["hidden_states"] = (({"stream": STREAM, "layer": l}, hidden_table(h_ids, l, crng))
                                      for l in range(LAYERS + 1))
        w.write_chunk(c, parts)
        if c == 0 or (c + 1) % 20 == 0 or c + 1 == n_chunks or len(a_ids):
            print(f"  chunk {c + 1}/{n_chunks} written ({time.perf_counter() - t0:.0f} s)", flush=True)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, range(n_chunks)))
    row = w.read_run_row()
    row["status"] = "complete"
    w.write_run_row(row)


# -- measuring ------------------------------------------------------------------------------
def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.parquet")) if p.exists() else 0


class Recorder:
    """A catalog stand-in that remembers the last SQL a query function ran (for EXPLAIN ANALYZE)."""

    def __init__(self, cat: Catalog):
        self.cat, self.last = cat, None

    def df(self, sql, params=None):
        self.last = (sql, params)
        return self.cat.df(sql, params)

    def chunk_file(self, table, values, chunk):
        return self.cat.chunk_file(table, values, chunk)


class ViewsOnly(Recorder):
    """The same without ``chunk_file``: queries fall back to scanning the views."""

    chunk_file = None

    def __getattribute__(self, name):
        if name == "chunk_file":
            raise AttributeError(name)
        return super().__getattribute__(name)


def timed(fn, calls: list[tuple], cpu: list[float] | None = None) -> list[float]:
    """Wall-clock ms of each call (and, into ``cpu``, this process's CPU ms: DuckDB's threads included)."""
    out = []
    for args in calls:
        t, c = time.perf_counter(), time.process_time()
        fn(*args)
        out.append((time.perf_counter() - t) * 1000)
        if cpu is not None:
            cpu.append((time.process_time() - c) * 1000)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vlatlas-bench-lake"),
                    help="where the synthetic lake goes (not inside the repository)")
    ap.add_argument("--examples", type=int, default=10_000, help="examples (examples, tokens, head_stats rows)")
    ap.add_argument("--attention-examples", type=int, default=500,
                    help="how many of them get their full attention (≈ 10 MB each)")
    ap.add_argument("--hidden-examples", type=int, default=64, help="how many get hidden states (≈ 3.7 MB each)")
    ap.add_argument("--chunk-size", type=int, default=64, help="examples per writer chunk (vlatlas extract's default)")
    ap.add_argument("--jobs", type=int, default=2, help="chunks written at a time while building")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per query, after the warm-up")
    ap.add_argument("--reuse", action="store_true", help="time the lake already at --out, do not rebuild it")
    ap.add_argument("--keep", action="store_true", help="keep the lake at the end")
    ap.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of each timed query")
    a = ap.parse_args(argv)

    out = a.out.expanduser().resolve()
    if out == ROOT or ROOT in out.parents:
        ap.error(f"--out {out} is inside the repository; put the bench lake elsewhere (e.g. /tmp)")
    n_att = min(a.attention_examples, a.examples)
    n_hid = min(a.hidden_examples, a.examples)
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"VL-Atlas query bench: ViLT-B shape, {LAYERS} layers x {HEADS} heads, {N_TOK} tokens "
          f"({N_TEXT} text + {N_IMAGE} image), lake {out}")
    if a.reuse and (out / "runs" / f"{RUN}.parquet").exists():
        from lake.commit import read_run_row

        cap = json.loads(read_run_row(out, RUN)["capture"])["bench"]
        a.examples, n_att, n_hid = cap["examples"], cap["attention_examples"], cap["hidden_examples"]
        print(f"reusing the lake at {out}")
    else:
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path("/")).free
        need = n_att * 10e6 + n_hid * 3.8e6 + a.examples * 0.1e6
        if need > 0.8 * free:
            ap.error(f"about {need / 1e9:.1f} GB needed but only {free / 1e9:.1f} GB free under {out.parent}: "
                     "lower --attention-examples / --hidden-examples")
        if out.exists():
            shutil.rmtree(out)
        print(f"building: {a.examples:,} examples; full attention for {n_att:,}; hidden states for {n_hid:,}; "
              f"chunks of {a.chunk_size}")
        t = time.perf_counter()
        build(out, a.examples, n_att, n_hid, a.chunk_size, a.jobs)
        print(f"built in {time.perf_counter() - t:.0f} s")

    try:
        report_sizes(out, a.examples, n_att, n_hid)
        report_timings(out, a.examples, n_att, a.repeats, a.explain)
        if n_att:
            report_file_scaling(out, a.examples, a.chunk_size, a.repeats)
        print(f"\nload average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} on "
              f"{os.cpu_count()} cores")
    finally:
        if not a.keep and not a.reuse:
            shutil.rmtree(out, ignore_errors=True)
            print(f"(deleted {out}; --keep keeps it)")
    return 0


def report_sizes(out: Path, n_examples: int, n_att: int, n_hid: int) -> None:
    mb = 1e6
    att, hs = dir_bytes(out / "attention"), dir_bytes(out / "head_stats")
    hid, exs, tok = dir_bytes(out / "hidden_states"), dir_bytes(out / "examples"), dir_bytes(out / "tokens")
    per = {
        "attention": att / n_att if n_att else 0.0,
        "head_stats": hs / n_examples,
        "hidden_states": hid / n_hid if n_hid else 0.0,
        "examples + tokens": (exs + tok) / n_examples,
    }
    total = sum(per.values())
    print(f"\nsize on disk (zstd Parquet), measured per example:")
    print(f"  attention       {per['attention'] / mb:8.2f} MB  (written for {n_att:,} examples: "
          f"{att / 1e9:.2f} GB; {LAYERS * HEADS * N_TOK ** 2 / 1e6:.2f} M weights each, "
          f"{att / max(1, n_att * LAYERS * HEADS * N_TOK ** 2):.2f} bytes/weight)")
    print(f"  head_stats      {per['head_stats'] / 1e3:8.1f} kB  ({n_examples:,} examples: {hs / mb:.0f} MB)")
    if n_hid:
        print(f"  hidden_states   {per['hidden_states'] / mb:8.2f} MB  (written for {n_hid:,} examples, "
              f"{LAYERS + 1} layers x {N_TOK} tokens x {HIDDEN} float16-rounded float32)")
    else:
        print("  hidden_states        —     (none written: --hidden-examples 0)")
    print(f"  examples+tokens {per['examples + tokens'] / 1e3:8.1f} kB")
    print(f"  total           {total / mb:8.2f} MB per example with everything kept")
    print(f"  extrapolated to 10,000 examples: attention {per['attention'] * 1e4 / 1e9:.0f} GB, "
          f"hidden {per['hidden_states'] * 1e4 / 1e9:.0f} GB, head_stats {per['head_stats'] * 1e4 / 1e9:.2f} GB, "
          f"total {total * 1e4 / 1e9:.0f} GB "
          f"(free here: {shutil.disk_usage(out).free / 1e9:.0f} GB)")


def time_cases(root: Path, cases: list, repeats: int, explain: bool) -> None:
    """Time each case: ``(name, fn(cat, *args), make_args(), note, views_only)``; print one line each."""
    print(f"  {'query':50s} {'first':>7s} {'median':>7s} {'p95':>7s} {'cpu':>7s} {'target':>7s}  verdict")
    for name, fn, make_args, note, views_only in cases:
        cat = Catalog(root, timeout_s=120)
        rec = (ViewsOnly if views_only else Recorder)(cat)
        call = lambda *args: fn(rec, *args)  # noqa: E731
        first = timed(call, [make_args()])[0]
        timed(call, [make_args() for _ in range(2)])
        cpu: list[float] = []
        xs = timed(call, [make_args() for _ in range(repeats)], cpu)
        med, p95 = statistics.median(xs), pct(xs, 95)
        target = TARGETS_MS.get(name)
        verdict = "" if target is None else ("ok" if med <= target else "MISSED")
        tgt = f"{target:.0f}" if target else "—"
        print(f"  {name:50s} {first:7.1f} {med:7.1f} {p95:7.1f} {statistics.median(cpu):7.1f} {tgt:>7s}  "
              f"{verdict:6s} ({note})", flush=True)
        if explain and rec.last:
            sql, params = rec.last
            plan = cat.df("EXPLAIN ANALYZE " + sql, params)
            print("\n".join("      " + line for line in str(plan.iloc[0, -1]).splitlines()))
        cat.close()


def report_timings(out: Path, n_examples: int, n_att: int, repeats: int, explain: bool) -> None:
    rng = np.random.default_rng(1)
    stats = ("t2i", "i2t", "entropy", "sink", "grounding", "max")
    stat = lambda: str(rng.choice(stats))  # noqa: E731
    qtype = lambda: str(rng.choice(QTYPES))  # noqa: E731
    layer, head = (lambda: int(rng.integers(LAYERS))), (lambda: int(rng.integers(HEADS)))
    example = lambda: int(rng.integers(n_att))  # noqa: E731

    def slice_(q):
        return ExampleFilter(correct=False, meta_key="qtype", meta_value=q)

    cases = [
        ("head summary of a slice",
         lambda c, s, q: queries.head_stat_matrix(c, RUN, STREAM, s, flt=slice_(q)), lambda: (stat(), qtype()),
         f"mean per layer x head over correct=false and meta.qtype=X, of {n_examples:,} examples", False),
        ("head summary, whole run, z_dataset",
         lambda c, s: queries.head_stat_matrix(c, RUN, STREAM, s, norm="z_dataset"), lambda: (stat(),),
         "no target; the Head summary page's heaviest form", False),
        ("one example's attention, one head",
         lambda c, e, l, h: queries.attention_block(c, RUN, e, STREAM, l, h), lambda: (example(), layer(), head()),
         f"{N_TOK}x{N_TOK} weights of one of {n_att:,} examples", False),
        ("one example's attention, one head, via the view",
         lambda c, e, l, h: queries.attention_block(c, RUN, e, STREAM, l, h), lambda: (example(), layer(), head()),
         "no target; without the chunk-file shortcut", True),
        ("one example's attention, mean over heads",
         lambda c, e, l: queries.attention_block(c, RUN, e, STREAM, l, None, HEADS), lambda: (example(), layer()),
         "no target; the Attention page's `mean`", False),
        ("top 20 examples for a head",
         lambda c, l, h, s: queries.top_examples(c, RUN, STREAM, l, h, s, n=20), lambda: (layer(), head(), stat()),
         f"by a statistic, of {n_examples:,} examples", False),
        ("top 20 examples for a head, in a slice",
         lambda c, l, h, s, q: queries.top_examples(c, RUN, STREAM, l, h, s, n=20, flt=slice_(q)),
         lambda: (layer(), head(), stat(), qtype()), "no target; correct=false and meta.qtype=X", False),
    ]
    if not n_att:
        cases = [c for c in cases if "attention" not in c[0]]
    print(f"\nquery times (ms), the app's own query functions (lake/queries.py) through a Catalog: the first "
          f"call on a fresh catalog (OS file cache not dropped), then median and p95 of {repeats} calls with "
          f"random parameters after 2 warm-up calls, and the median CPU time of this process (all DuckDB "
          f"threads; less sensitive than wall time to other work on the machine); "
          f"DuckDB threads: {lake_catalog.THREADS}")
    time_cases(out, cases, repeats, explain)


def report_file_scaling(out: Path, n_examples: int, chunk_size: int, repeats: int) -> None:
    """One example's attention when a layer has as many chunk files as ``n_examples`` need.

    Full attention for all examples does not fit on this disk, so this side lake holds one
    layer of ``ceil(n_examples / chunk_size)`` chunk files whose footers are the real ones' size
    (~100 row groups each, as a 64-example ViLT-B chunk-layer has at the writer's 256K rows per
    row group) but whose row groups are tiny: what is measured is the cost of many files.
    """
    from lake.store import Store
    from lake.commit import chunk_rel, read_run_row
    from lake.writer import write_parquet_atomic
    from lake.schema import ATTENTION as ATT, RUNS

    n_chunks = -(-n_examples // chunk_size)
    side = out.with_name(out.name + "-files")
    if side.exists():
        shutil.rmtree(side)
    row = read_run_row(out, RUN)
    write_parquet_atomic(side / RUNS.name / f"{RUN}.parquet", pa.Table.from_pylist([row], schema=RUNS.schema))
    real_groups = -(-chunk_size * HEADS * N_TOK * N_TOK // (256 * 1024))  # row groups of a real file
    keys = 8  # keys per (example, head) row kept in this footer-only lake
    for c in range(n_chunks):
        ids = np.arange(c * chunk_size, min(n_examples, (c + 1) * chunk_size))
        n = len(ids) * HEADS * keys
        t = pa.table({
            "example_id": np.repeat(ids.astype(np.int64), HEADS * keys),
            "head": np.tile(np.repeat(np.arange(HEADS, dtype=np.int16), keys), len(ids)),
            "query_idx": np.zeros(n, np.int32), "key_idx": np.tile(np.arange(keys, dtype=np.int32), len(ids) * HEADS),
            "weight": pa.array(np.full(n, 1 / keys, np.float32)),
        }, schema=ATT.schema)
        Store(side).write_parquet(chunk_rel(ATT, {"run": RUN, "stream": STREAM, "layer": 0}, c), t,
                                  row_group_size=max(1, -(-n // real_groups)))
    rng = np.random.default_rng(2)
    args = lambda: (int(rng.integers(n_examples)), int(rng.integers(HEADS)))  # noqa: E731
    print(f"\nfile count: one layer with {n_chunks} chunk files ({n_examples:,} examples' worth), each with a "
          f"real-sized footer of {real_groups} row groups but tiny row groups")
    fn = lambda c, e, h: queries.attention_block(c, RUN, e, STREAM, 0, h)  # noqa: E731
    time_cases(side, [
        ("one example's attention, one head", fn, args, "reads the example's chunk file", False),
        ("one example's attention, one head, via the view", fn, args, "DuckDB opens every chunk file's footer", True),
    ], repeats, explain=False)
    shutil.rmtree(side, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
