"""Bytes of the lake's attention weights and hidden vectors under each Parquet type and encoding.

``python bench/bench_lake_types.py [LAKE]`` reads every ``part-*.parquet`` file of the
``attention`` and ``hidden_states`` tables of LAKE and writes each again, in memory, with the
writer's compression (zstd), statistics and row-group size, under several physical types and
encodings side by side:

* ``float16, schema 1``: Parquet FLOAT16 as schema version 1 stored it (dictionary encoding for
  every column, except hidden states' ``norm`` and ``vec``, written plain);
* ``float16, BYTE_STREAM_SPLIT``: FLOAT16 with the byte-split encoding (for reference only: Spark
  still cannot read it, polars still sums it in float16);
* ``float32, dictionary``: float32 with dictionary encoding for every column;
* ``float32, plain``: float32, no dictionary for the value columns (``weight``; ``norm`` and ``vec``);
* ``float32, BYTE_STREAM_SPLIT``: float32, byte-split value columns;
* ``writer``: what ``lake.writer.write_table`` writes now (``lake.writer.ENCODINGS``).

The values are the same in every variant: float16-rounded (as the extractor stores them), held in
float16 or float32. Each rewritten file is read back and checked equal to the original values.
It prints a markdown table of total bytes per table and the ratio to ``float16, schema 1``, and
the seconds each variant took to write (figures only, nothing is asserted).

Without LAKE it first builds one: ``python bench/bench_extract.py --lake-size --n 64 --out DIR
--keep`` (a default-capture lake of a base-size random ViLT over 64 scenes, under
``DIR/lake-vilt-default``; DIR is ``--out``, or a temporary folder deleted at the end). A lake
written before schema version 2 (Parquet FLOAT16) works as well.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from lake.schema import ATTENTION, HIDDEN_STATES, Table  # noqa: E402
from lake.store import write_parquet_to  # noqa: E402
from lake.writer import ENCODINGS, arrange, conform  # noqa: E402

ROW_GROUP = 256 * 1024  # lake.store.Store.write_parquet's rows per row group
# the value columns of each table: (column names, Parquet leaf paths)
VALUES = {"attention": (("weight",), ("weight",)),
          "hidden_states": (("norm", "vec"), ("norm", "vec.list.element"))}
BASELINE = "float16, schema 1"


def _cast(data: pa.Table, half: bool) -> pa.Table:
    """``data`` with weights / vector elements as float16 (``half``) or float32."""
    t = pa.float16() if half else pa.float32()
    if "weight" in data.column_names:
        return data.set_column(data.schema.get_field_index("weight"), "weight", data["weight"].cast(t))
    if "vec" in data.column_names:
        return data.set_column(data.schema.get_field_index("vec"), "vec", data["vec"].cast(pa.list_(t)))
    return data


def variants(table: Table) -> dict[str, tuple[bool, dict]]:
    """``{name: (float16?, ParquetWriter options)}``."""
    cols, leaves = VALUES[table.name]
    others = [f.name for f in table.schema if f.name not in cols]
    old_dict = others if table.name == "hidden_states" else True  # schema 1 wrote hidden values plain
    return {
        BASELINE: (True, {"use_dictionary": old_dict}),
        "float16, BYTE_STREAM_SPLIT": (True, {"use_dictionary": others,
                                              "column_encoding": {p: "BYTE_STREAM_SPLIT" for p in leaves}}),
        "float32, dictionary": (False, {"use_dictionary": True}),
        "float32, plain": (False, {"use_dictionary": others}),
        "float32, BYTE_STREAM_SPLIT": (False, {"use_dictionary": others,
                                               "column_encoding": {p: "BYTE_STREAM_SPLIT" for p in leaves}}),
        "writer (lake.writer.ENCODINGS)": (False, dict(ENCODINGS.get(table.name, {}))),
    }


def write(data: pa.Table, groups: list[int] | None, options: dict) -> bytes:
    """``data`` as Parquet bytes, as lake.store.Store.write_parquet writes a file."""
    buf = io.BytesIO()
    write_parquet_to(buf, data, groups, ROW_GROUP, **options)
    return buf.getvalue()


def values_of(data: pa.Table) -> np.ndarray:
    """Every weight or vector element as float32 (the vector's nulls dropped)."""
    if "weight" in data.column_names:
        return data["weight"].to_numpy().astype(np.float32)
    return data["vec"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)


def measure(lake: Path, table: Table) -> tuple[dict[str, int], dict[str, float], int, int]:
    """``({variant: bytes}, {variant: write seconds}, bytes on disk now, rows)`` over every file."""
    files = sorted(p for p in (lake / table.name).rglob("part-*.parquet"))
    if not files:
        raise SystemExit(f"{lake / table.name}: no part-*.parquet files")
    vs = variants(table)
    size = dict.fromkeys(vs, 0)
    secs = dict.fromkeys(vs, 0.0)
    disk = rows = 0
    for path in files:
        disk += path.stat().st_size
        raw = pq.read_table(path)
        rows += raw.num_rows
        half = _cast(raw, True)
        if not np.array_equal(values_of(half), values_of(raw), equal_nan=True):
            print(f"note: {path} holds values that float16 does not represent exactly", file=sys.stderr)
        base = conform(table, _cast(raw, False))  # the float32 schema, the writer's column order
        base, groups = arrange(table, base)
        want = values_of(base)
        for name, (is_half, options) in vs.items():
            data = _cast(base, is_half)
            t0 = time.perf_counter()
            blob = write(data, groups, options)
            secs[name] += time.perf_counter() - t0
            size[name] += len(blob)
            back = pq.read_table(io.BytesIO(blob))
            if not np.array_equal(values_of(back), values_of(data), equal_nan=True) or back.num_rows != data.num_rows:
                raise SystemExit(f"{name}: {path} did not read back")
            if not is_half and not np.array_equal(values_of(back), want, equal_nan=True):
                raise SystemExit(f"{name}: {path} changed its values")
    return size, secs, disk, rows


def build(out: Path, n: int) -> Path:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_extract.py"), "--lake-size", "--n", str(n),
           "--out", str(out), "--keep"]
    print("building a lake:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "lake-vilt-default"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lake", nargs="?", type=Path, default=None,
                    help="an existing lake (default: build a default-capture ViLT-B lake, see above)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to build the lake when none is given (default: a temporary folder, deleted)")
    ap.add_argument("--n", type=int, default=64, help="examples of the lake built when none is given")
    a = ap.parse_args(argv)

    tmp = None
    if a.lake is None:
        work = a.out or Path(tempfile.mkdtemp(prefix="vlatlas-lake-types-"))
        tmp = None if a.out else work
        lake = build(work, a.n)
    else:
        lake = a.lake
    try:
        results = {t.name: measure(lake, t) for t in (ATTENTION, HIDDEN_STATES)}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    mb = 1e6
    print(f"\nlake: {lake}")
    for name, (_, _, disk, rows) in results.items():
        print(f"  {name}: {rows:,} rows, {disk / mb:.2f} MB on disk as written")
    print("\nBytes per table when the same values are written with each physical type and encoding "
          "(zstd, the writer's row groups); ratio = bytes / float16 schema 1's; write s = seconds to "
          "encode and compress, this machine, one run (not asserted).\n")
    names = list(variants(ATTENTION))
    print("| type, encoding | attention MB | × float16 | write s | hidden_states MB | × float16 | write s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in names:
        cells = [v]
        for t in ("attention", "hidden_states"):
            size, secs, _, _ = results[t]
            cells += [f"{size[v] / mb:.2f}", f"{size[v] / size[BASELINE]:.3f}", f"{secs[v]:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nwriter (lake.writer.ENCODINGS):", {t: ENCODINGS.get(t, "defaults: dictionary for every column")
                                              for t in results})


if __name__ == "__main__":
    main()
