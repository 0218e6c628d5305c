"""A lake every engine reads correctly: Spark, polars, pyarrow and DuckDB on one real lake.

The lake is written by the real extractor (a tiny random ViLT, tests/tiny.py) with everything kept,
then again with the default capture and with a small hidden-vector sample (so some vectors are
null), plus ``vlatlas embed`` maps, ``vlatlas probe`` rows and ``vlatlas intervene`` rows: every table of
:data:`lake.schema.TABLES` has rows. Each engine
reads each table straight from the files (hive partitioning, not the project's DuckDB views), and
its row counts, ``run`` values and aggregates must equal those of DuckDB's ``read_parquet``, itself
checked against what was extracted. The run names look like values (``e5``, ``v001``, ``x1e5``) but
are allowed, and must come back as strings.

Also: no file holds a Parquet FLOAT16 column (Spark cannot read one, polars sums it in float16,
pyarrow cannot aggregate it), and the README's engine snippets run and agree with DuckDB.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from lake.schema import ATTENTION, TABLES
from lake.store import Store
from lake.writer import ENCODINGS, check_run_name, write_table

ROOT = Path(__file__).resolve().parents[2]
SECTION = "### Reading the lake from Spark, polars, pyarrow and DuckDB"
RUN_ALL, RUN_DEFAULT, RUN_SAMPLE = "e5", "v001", "x1e5"  # everything kept / default capture / 2 vectors
RUN_EXPLAIN = "w512"  # --explain rollout,value,sinks on a model with a sink token
RUN_LENS = "llava-lens"  # a tiny LLaVA with --explain lens and --capture-modules
RUNS = (RUN_ALL, RUN_DEFAULT, RUN_SAMPLE, RUN_EXPLAIN, RUN_LENS)
N_EXAMPLES = 6  # good rows of the manifest (and one with a missing image)
REL = 1e-6  # float sums: same values, another summation order
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: PySpark needs a JRE (`make java` installs "
                                       "Debian's default-jre-headless)")

# {table: (group keys, measures)}; a measure is (kind, column): "sum" of a numeric column, "nonnull"
# values of any column, "true" count of a boolean, "vsum" / "vlen" sum / count of a list column's
# elements, "bytes" total length of a binary column. Every group also counts its rows ("n").
SPEC: dict[str, tuple[list[str], list[tuple[str, str]]]] = {
    "runs": (["run", "status", "model_family"], [("sum", "n_examples"), ("nonnull", "capture")]),
    "examples": (["run", "split"], [("sum", c) for c in ("example_id", "image_width", "image_height", "grid_h",
                                                          "grid_w", "n_tokens")]
                 + [("true", "correct"), ("nonnull", "prediction"), ("nonnull", "boxes")]),
    "tokens": (["run", "stream", "modality", "role"],
               [("sum", c) for c in ("example_id", "token_idx", "seq_pos", "text_pos", "patch_row", "patch_col",
                                      "x0", "y0", "x1", "y1", "tile")] + [("nonnull", "token"), ("nonnull", "patch_row")]),
    "attention": (["run", "stream", "layer", "head"],
                  [("sum", "weight"), ("sum", "query_idx"), ("sum", "key_idx"), ("sum", "example_id")]),
    "head_stats": (["run", "stream", "layer", "stat"], [("sum", "value"), ("nonnull", "value"), ("sum", "head")]),
    "hidden_states": (["run", "stream", "layer"],
                      [("sum", "norm"), ("vsum", "vec"), ("vlen", "vec"), ("nonnull", "vec"), ("sum", "token_idx")]),
    "embeddings": (["run", "stream", "layer", "method"], [("sum", "x"), ("sum", "y"), ("sum", "token_idx")]),
    "images": (["width", "height"], [("bytes", "png"), ("nonnull", "image_id")]),
    "errors": (["run", "stage"], [("nonnull", "message")]),
    "relevancy": (["run", "method", "stream", "layer"], [("sum", "value"), ("sum", "target"), ("sum", "token_idx")]),
    "value_norms": (["run", "stream", "layer", "head"], [("sum", "norm"), ("sum", "token_idx")]),
    "sinks": (["run", "stream", "layer", "dim"], [("sum", "ratio"), ("sum", "token_idx")]),
    "lens": (["run", "stream", "layer", "rank"], [("sum", "prob"), ("sum", "vocab_id"), ("nonnull", "piece")]),
    "activations": (["run", "stream", "module"],  # layer is null outside the blocks: a measure, not a key
                    [("sum", "layer"), ("nonnull", "layer"), ("sum", "norm"), ("vsum", "vec"), ("vlen", "vec"),
                     ("nonnull", "vec"), ("sum", "token_idx")]),
    "probes": (["run", "stream", "layer"], [("sum", "value"), ("sum", "control"), ("sum", "p_value"), ("sum", "n"),
                                            ("sum", "n_vectors"), ("nonnull", "confusion")]),
    "interventions": (["run", "kind", "method", "stream"],
                      [("sum", "metric_before"), ("sum", "metric_after"), ("sum", "layer"), ("sum", "head"),
                       ("sum", "example_id"), ("true", "changed"), ("nonnull", "answer_after"), ("true", "estimated")]),
}
STRING_KEYS = {"run", "kind", "stream", "status", "model_family", "split", "modality", "role", "stat", "method",
               "stage", "module"}


def test_spec_covers_every_table():
    assert set(SPEC) == set(TABLES)
    for name, (keys, measures) in SPEC.items():
        cols = set(TABLES[name].columns)
        assert set(keys) <= cols and {c for _, c in measures} <= cols, name
    for run in RUNS:
        assert check_run_name(run) == run


# -- the lake ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lake(tiny_vilt, tmp_path_factory) -> Path:
    from pipeline.embed import TSNEConfig, embed
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest

    tmp = tmp_path_factory.mktemp("engines")
    manifest = make_manifest(tmp / "data", N_EXAMPLES)
    with open(manifest, "a") as f:  # one bad row, so `errors` has rows too
        f.write(json.dumps({"id": "missing", "image": "images/nowhere.png", "text": "is there a circle ?"}) + "\n")
    root = tmp / "lake"
    common = dict(batch_size=3, chunk_size=4, progress=False, workers=0)  # two chunks: several files each
    extract(str(tiny_vilt), manifest, root, RUN_ALL, keep_attention="all", keep_hidden="all", **common)
    extract(str(tiny_vilt), manifest, root, RUN_DEFAULT, **common)
    extract(str(tiny_vilt), manifest, root, RUN_SAMPLE, keep_attention="topk:2", keep_hidden="sample:2", **common)
    from tests.tiny import make_sink_vilt

    extract(str(make_sink_vilt(tmp / "sink-vilt")), manifest, root, RUN_EXPLAIN, explain="rollout,value,sinks",
            **common)
    from tests.models.test_llava import make_tiny_llava

    extract(str(make_tiny_llava(tmp / "llava")), manifest, root, RUN_LENS, explain="lens",  # and activations
            capture_modules="model.language_model.layers.*.mlp,model.multi_modal_projector", **common)
    embed(root, RUN_ALL, n_tokens=60, progress=False,
          config=TSNEConfig(early_exaggeration_iter=50, n_iter=50, n_iter_aligned=30))
    from pipeline.probe import ProbeSpec, run_probe, write_probes

    probe = ProbeSpec(target="answer", selector="mean-image", folds=2, permutations=2)  # 2 examples per colour
    write_probes(root, RUN_ALL, run_probe(root, RUN_ALL, probe))
    from pipeline.intervene.run import intervene

    intervene(root, RUN_ALL, "heads", layers="0", progress=False)  # every head of layer 0, mean-ablated
    return root


@pytest.fixture(scope="module")
def duck():
    con = duckdb.connect()
    yield con
    con.close()


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: PySpark needs a JRE (`make java` installs Debian's default-jre-headless)")
    from pyspark.sql import SparkSession

    s = (SparkSession.builder.master("local[1]").appName("vlatlas-engines")
         .config("spark.ui.enabled", "false")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.sql.shuffle.partitions", "1")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


def glob(lake: Path, table: str) -> str:
    return f"{lake}/{table}/**/*.parquet"


def duck_df(duck, sql: str, params=None) -> pd.DataFrame:
    return duck.execute(sql, params or []).df()


# -- one aggregate query per engine ------------------------------------------------------------


def _name(kind: str, col: str) -> str:
    return f"{kind}_{col}"


def _is_int(table: str, col: str) -> bool:
    t = TABLES[table].schema
    return col in t.names and pa.types.is_integer(t.field(col).type)


def agg_duckdb(con, lake: Path, table: str) -> pd.DataFrame:
    keys, measures = SPEC[table]
    exprs = ["count(*) AS n"]
    for kind, c in measures:
        e = {"sum": f"sum({c})::{'BIGINT' if _is_int(table, c) else 'DOUBLE'}", "nonnull": f"count({c})",
             "true": f"count_if({c})", "vsum": f"sum(list_sum({c}::DOUBLE[]))", "vlen": f"sum(len({c}))",
             "bytes": f"sum(octet_length({c}))"}[kind]
        exprs.append(f"{e} AS {_name(kind, c)}")
    sql = (f"SELECT {', '.join(keys + exprs)} FROM read_parquet('{glob(lake, table)}', hive_partitioning = true) "
           f"GROUP BY {', '.join(keys)}")
    return con.execute(sql).df()


def agg_polars(lake: Path, table: str) -> pd.DataFrame:
    keys, measures = SPEC[table]
    lf = pl.scan_parquet(glob(lake, table), hive_partitioning=True)
    schema = lf.collect_schema()
    exprs = [pl.len().alias("n")]
    for kind, c in measures:
        col = pl.col(c)
        if kind == "sum":
            # polars' group-by sum adds Float32 in float32 (drifts on large groups): sum in float64
            e = col.cast(pl.Float64).sum() if schema[c].is_float() else col.sum()
        else:
            e = {"nonnull": col.count(), "true": col.sum(), "vsum": col.explode().cast(pl.Float64).sum(),
                 "vlen": col.list.len().sum(), "bytes": col.bin.size().sum()}[kind]
        exprs.append(e.alias(_name(kind, c)))
    return lf.group_by(keys).agg(exprs).collect().to_pandas()


def agg_pyarrow(lake: Path, table: str) -> pd.DataFrame:
    keys, measures = SPEC[table]
    t = ds.dataset(f"{lake}/{table}", format="parquet", partitioning="hive").to_table()
    cols = {k: t[k] for k in keys}
    aggs, names = [([], "count_all")], {"count_all": "n"}
    elem_aggs, elem_names = [], {}
    for kind, c in measures:
        name = _name(kind, c)
        if kind in ("vsum", "vlen"):
            if not elem_aggs:
                parents = pc.list_parent_indices(t[c])
                elem = pa.table({**{k: t[k].take(parents) for k in keys}, "v": pc.list_flatten(t[c])})
            fn = "sum" if kind == "vsum" else "count"
            elem_aggs.append(("v", fn))
            elem_names[f"v_{fn}"] = name
            continue
        cols[name] = {"true": lambda: pc.cast(t[c], pa.int64()),
                      "bytes": lambda: pc.binary_length(t[c])}.get(kind, lambda: t[c])()
        fn = "count" if kind == "nonnull" else "sum"
        aggs.append((name, fn))
        names[f"{name}_{fn}"] = name
    out = pa.table(cols).group_by(keys).aggregate(aggs)  # columns named <column>_<function>, and the keys
    out = out.rename_columns([names.get(c, c) for c in out.column_names])
    if elem_aggs:
        e = elem.group_by(keys).aggregate(elem_aggs)
        e = e.rename_columns([elem_names.get(c, c) for c in e.column_names])
        out = out.join(e, keys=keys, join_type="left outer")
    return out.to_pandas()


def agg_spark(spark, lake: Path, table: str) -> pd.DataFrame:
    from pyspark.sql import functions as F

    keys, measures = SPEC[table]
    df = spark.read.parquet(f"{lake}/{table}")
    exprs = [F.count(F.lit(1)).alias("n")]
    for kind, c in measures:
        col = F.col(c)
        e = {"sum": lambda: F.sum(col), "nonnull": lambda: F.count(col),
             "true": lambda: F.count(F.when(col, 1)),
             "vsum": lambda: F.sum(F.aggregate(col, F.lit(0.0).cast("double"), lambda a, x: a + x)),
             "vlen": lambda: F.sum(F.when(col.isNotNull(), F.size(col))),
             "bytes": lambda: F.sum(F.length(col))}[kind]()
        exprs.append(e.alias(_name(kind, c)))
    rows = df.groupBy(*keys).agg(*exprs).collect()
    return pd.DataFrame([r.asDict() for r in rows], columns=keys + ["n"] + [_name(k, c) for k, c in measures])


def normalised(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Rows sorted by the group keys; integer keys as int, a null sum (a group with no values)
    as 0 (engines differ: polars says 0, the others null)."""
    keys, measures = SPEC[table]
    df = df.copy()
    for k in keys:
        if k not in STRING_KEYS:
            df[k] = df[k].astype("int64")
    for kind, c in measures:
        df[_name(kind, c)] = df[_name(kind, c)].astype(object).where(df[_name(kind, c)].notna(), 0)
    return df.sort_values(keys).reset_index(drop=True)


def assert_same_aggregates(got: pd.DataFrame, want: pd.DataFrame, table: str, engine: str) -> None:
    keys, measures = SPEC[table]
    got, want = normalised(got, table), normalised(want, table)
    assert len(got) == len(want), f"{engine} {table}: {len(got)} groups, DuckDB {len(want)}"
    for k in keys:
        g, w = got[k].tolist(), want[k].tolist()
        if k in STRING_KEYS:  # a key (above all `run`) must come back as the string it was written as
            bad = [v for v in g if not isinstance(v, str)]
            assert not bad, f"{engine} {table}.{k}: not strings: {bad[:3]}"
        assert g == w, f"{engine} {table}.{k}"
    assert [int(x) for x in got["n"]] == [int(x) for x in want["n"]], f"{engine} {table}: row counts"
    for kind, c in measures:
        name = _name(kind, c)
        if kind != "vsum" and (kind != "sum" or _is_int(table, c)):
            assert [int(x) for x in got[name]] == [int(x) for x in want[name]], f"{engine} {table}.{name}"
        else:
            np.testing.assert_allclose(got[name].astype(float), want[name].astype(float), rtol=REL, atol=0,
                                       err_msg=f"{engine} {table}.{name}")


# -- DuckDB's reference, checked against what was extracted -------------------------------------


def test_duckdb_reference_matches_the_extraction(lake, duck):
    def q(sql):
        return duck_df(duck, sql)

    runs = q(f"SELECT run, status, n_examples FROM read_parquet('{glob(lake, 'runs')}') ORDER BY run")
    assert runs.run.tolist() == sorted(RUNS) and set(runs.status) == {"complete"}
    assert runs.n_examples.tolist() == [N_EXAMPLES] * len(RUNS)
    for table in ("examples", "errors", "tokens", "head_stats", "attention", "hidden_states"):
        got = q(f"SELECT DISTINCT run FROM read_parquet('{glob(lake, table)}', hive_partitioning = true) ORDER BY 1")
        assert got.run.tolist() == sorted(RUNS), table
    assert q(f"SELECT DISTINCT run FROM read_parquet('{glob(lake, 'embeddings')}', "
             "hive_partitioning = true)").run.tolist() == [RUN_ALL]
    pr = q(f"SELECT run, count(*) AS n, count(DISTINCT layer) AS layers, min(n) AS ex "
           f"FROM read_parquet('{glob(lake, 'probes')}', hive_partitioning = true) GROUP BY run")
    assert pr.run.tolist() == [RUN_ALL] and pr.n[0] == pr.layers[0] > 1 and pr.ex[0] == N_EXAMPLES
    ex = q(f"SELECT run, count(*) AS n FROM read_parquet('{glob(lake, 'examples')}', hive_partitioning = true) "
           "GROUP BY ALL")
    assert ex.n.tolist() == [N_EXAMPLES] * len(RUNS)
    err = q(f"SELECT run, source_id, stage FROM read_parquet('{glob(lake, 'errors')}', hive_partitioning = true)")
    assert sorted(err.run) == sorted(RUNS) and set(err.source_id) == {"missing"} and set(err.stage) == {"image"}
    assert len(q(f"SELECT * FROM read_parquet('{glob(lake, 'images')}')")) == N_EXAMPLES  # shared across runs
    # full attention: every query row of every head sums to 1 (float16-rounded weights)
    rows = q(f"SELECT sum(weight) AS s FROM read_parquet('{glob(lake, 'attention')}', hive_partitioning = true) "
             f"WHERE run = '{RUN_ALL}' GROUP BY layer, example_id, head, query_idx")
    np.testing.assert_allclose(rows.s, 1.0, atol=1e-2)
    # vectors: every one with keep_hidden=all, two examples' worth with sample:2
    vec = q(f"SELECT run, count(*) AS n, count(vec) AS v, "
            f"count(DISTINCT CASE WHEN vec IS NOT NULL THEN example_id END) AS ex "
            f"FROM read_parquet('{glob(lake, 'hidden_states')}', hive_partitioning = true) GROUP BY run ORDER BY run")
    by = vec.set_index("run")
    assert by.loc[RUN_ALL, "v"] == by.loc[RUN_ALL, "n"] > 0
    assert by.loc[RUN_SAMPLE, "ex"] == 2 and 0 < by.loc[RUN_SAMPLE, "v"] < by.loc[RUN_SAMPLE, "n"]
    # the --explain tables: filled by the explain run only (and the sink is the [CLS] built into its model)
    for table in ("relevancy", "value_norms", "sinks"):
        got = q(f"SELECT run, count(*) AS n FROM read_parquet('{glob(lake, table)}', hive_partitioning = true) "
                "GROUP BY run")
        assert got.run.tolist() == [RUN_EXPLAIN] and got.n[0] > 0, table
    got = q(f"SELECT run, count(*) AS n FROM read_parquet('{glob(lake, 'lens')}', hive_partitioning = true) GROUP BY run")
    assert got.run.tolist() == [RUN_LENS] and got.n[0] > 0
    act = q(f"SELECT run, stream, module, min(layer) AS layer, count(*) AS n, count(vec) AS v FROM "
            f"read_parquet('{glob(lake, 'activations')}', hive_partitioning = true) GROUP BY ALL ORDER BY module")
    assert set(act.run) == {RUN_LENS} and set(act.stream) == {"lm"} and (act.v == act.n).all()
    assert act.module.tolist() == ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp",
                                   "model.multi_modal_projector"]
    assert act.layer.iloc[:2].tolist() == [0, 1] and pd.isna(act.layer.iloc[2])  # the projector is in no block
    # the stored values are float16-rounded, in float32
    w = q(f"SELECT weight FROM read_parquet('{glob(lake, 'attention')}', hive_partitioning = true)").weight.to_numpy()
    assert w.dtype == np.float32 and np.array_equal(w, w.astype(np.float16).astype(np.float32))


# -- every engine, every table ------------------------------------------------------------------


@pytest.mark.parametrize("table", list(TABLES))
def test_polars_reads_every_table(lake, duck, table):
    want = agg_duckdb(duck, lake, table)
    lf = pl.scan_parquet(glob(lake, table), hive_partitioning=True)
    if "run" in TABLES[table].columns:
        assert lf.collect_schema()["run"] == pl.String
    assert lf.select(pl.len()).collect().item() == int(want.n.sum())
    assert_same_aggregates(agg_polars(lake, table), want, table, "polars")


@pytest.mark.parametrize("table", list(TABLES))
def test_pyarrow_reads_every_table(lake, duck, table):
    want = agg_duckdb(duck, lake, table)
    d = ds.dataset(f"{lake}/{table}", format="parquet", partitioning="hive")
    if "run" in TABLES[table].columns:
        assert pa.types.is_string(d.schema.field("run").type) or pa.types.is_large_string(d.schema.field("run").type)
    assert d.count_rows() == int(want.n.sum())
    assert_same_aggregates(agg_pyarrow(lake, table), want, table, "pyarrow")


@needs_java
@pytest.mark.slow
@pytest.mark.parametrize("table", list(TABLES))
def test_spark_reads_every_table(lake, duck, spark, table):
    want = agg_duckdb(duck, lake, table)
    df = spark.read.parquet(f"{lake}/{table}")
    if "run" in TABLES[table].columns:
        assert dict(df.dtypes)["run"] == "string"
    assert df.count() == int(want.n.sum())
    assert_same_aggregates(agg_spark(spark, lake, table), want, table, "spark")


def test_duckdb_types_run_as_string(lake, duck):
    for name, t in TABLES.items():
        if "run" in t.columns:
            types = duck_df(duck, f"DESCRIBE SELECT run FROM read_parquet('{glob(lake, name)}', "
                                  "hive_partitioning = true)")
            assert types.column_type.tolist() == ["VARCHAR"], name


# Allowed names that look like values to someone: each comes back as the same string from every engine.
RISKY_NAMES = ("e5", "E10", "d1", "x1e5", "v001", "t", "f", "yes", "no", "on", "off", "nan1", "NaN-1",
               "infinity2", "inf-run", "True2", "null1", "epoch2", "P1D", "Z")


def test_allowed_names_come_back_as_strings(tmp_path, duck, request):
    spark = request.getfixturevalue("spark") if shutil.which("java") else None
    bad = []
    for name in RISKY_NAMES:
        check_run_name(name)
        store = Store(tmp_path / name)
        write_table(store, f"errors/run={name}/part-000000.parquet", TABLES["errors"],
                    pa.table({"source_id": ["a"], "stage": ["s"], "message": ["m"]}))
        path = tmp_path / name / "errors"
        got = {
            "duckdb": duck.execute(f"SELECT run FROM read_parquet('{path}/**/*.parquet', hive_partitioning = true)"
                                   ).fetchone()[0],
            "polars": pl.scan_parquet(f"{path}/**/*.parquet", hive_partitioning=True).collect()["run"][0],
            "pyarrow": ds.dataset(path, format="parquet", partitioning="hive").to_table()["run"][0].as_py(),
        }
        if spark is not None:
            got["spark"] = spark.read.parquet(str(path)).collect()[0]["run"]
        bad += [(name, engine, v) for engine, v in got.items() if not (isinstance(v, str) and v == name)]
    assert not bad, f"run names an engine read back as something else: {bad}"


# -- no Parquet FLOAT16 anywhere ------------------------------------------------------------------


def _half(t: pa.DataType) -> bool:
    if pa.types.is_float16(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _half(t.value_type)
    if pa.types.is_struct(t):
        return any(_half(f.type) for f in t)
    return False


def test_no_float16_column_in_any_file(lake):
    files = sorted(lake.rglob("*.parquet"))
    assert {p.relative_to(lake).parts[0] for p in files} == set(TABLES)
    for path in files:
        pf = pq.ParquetFile(path)
        assert not [f.name for f in pf.schema_arrow if _half(f.type)], path
        for i in range(len(pf.schema)):
            col = pf.schema.column(i)
            assert col.logical_type.type != "FLOAT16", (path, col.path)
            if col.path in ("weight", "vec.list.element"):
                assert col.physical_type == "FLOAT", (path, col.path, col.physical_type)


def test_the_lake_uses_the_writers_encodings(lake):
    """So that the engine tests above read the encodings the writer chooses (BYTE_STREAM_SPLIT)."""
    want = ENCODINGS["hidden_states"]["column_encoding"]
    assert ENCODINGS["activations"]["column_encoding"] == want  # laid out alike
    for path in sorted([*(lake / "hidden_states").rglob("*.parquet"), *(lake / "activations").rglob("*.parquet")]):
        md = pq.ParquetFile(path).metadata
        for rg in range(md.num_row_groups):
            for i in range(md.num_columns):
                col = md.row_group(rg).column(i)
                if col.path_in_schema in want:
                    assert want[col.path_in_schema] in col.encodings, (path, col.path_in_schema, col.encodings)


# -- sums that float16 storage got wrong ------------------------------------------------------------


def _weights_lake(tmp_path: Path, n: int, weight: np.ndarray) -> str:
    data = pa.table({"example_id": np.zeros(n, np.int64), "head": np.zeros(n, np.int16),
                     "query_idx": np.zeros(n, np.int32), "key_idx": np.arange(n, dtype=np.int32), "weight": weight})
    write_table(Store(tmp_path), "attention/run=e5/stream=self/layer=0/part-000000.parquet", ATTENTION, data)
    return f"{tmp_path}/attention/**/*.parquet"


def test_polars_sums_100k_ones_exactly(tmp_path, duck):
    """Stored as float16, 100,000 weights of 1.0 summed to 2048 in polars (float16 accumulator)."""
    n = 100_000
    path = _weights_lake(tmp_path, n, np.ones(n, np.float32))
    lf = pl.scan_parquet(path, hive_partitioning=True)
    assert lf.collect_schema()["weight"] == pl.Float32
    got = lf.group_by("run", "stream", "layer", "head").agg(pl.col("weight").sum(), pl.len()).collect()
    assert got["run"].to_list() == ["e5"] and got["len"].to_list() == [n]
    assert got["weight"].to_list() == [float(n)]
    assert lf.select(pl.col("weight").sum()).collect().item() == float(n)
    assert ds.dataset(str(tmp_path / "attention"), partitioning="hive").to_table().group_by("head").aggregate(
        [("weight", "sum")])["weight_sum"].to_pylist() == [float(n)]
    assert duck.execute(f"SELECT sum(weight) FROM read_parquet('{path}', hive_partitioning = true)"
                        ).fetchone()[0] == float(n)


def test_polars_float64_sum_of_weights_is_exact(tmp_path):
    """The README's polars pattern (cast to Float64, then sum) on a million float16-rounded weights."""
    n = 1_000_000
    w = (np.random.default_rng(0).random(n, dtype=np.float32) / 100).astype(np.float16).astype(np.float32)
    path = _weights_lake(tmp_path, n, w)
    got = (pl.scan_parquet(path, hive_partitioning=True).group_by("run", "head")
           .agg(pl.col("weight").cast(pl.Float64).sum()).collect()["weight"].item())
    assert math.isclose(got, float(w.astype(np.float64).sum()), rel_tol=1e-12)


# -- the README's snippets --------------------------------------------------------------------------


def section_text() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "the README lost its section on other engines"
    body = text.split(SECTION, 1)[1]
    return re.split(r"\n##? ", body, maxsplit=1)[0]


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", section_text(), flags=re.S)


def test_section_says_what_matters():
    text = section_text()
    assert "float32" in text and "float16-rounded" in text
    assert "start with a letter" in text
    for word in ("nan", "inf", "infinity", "true", "false", "null", "epoch"):
        assert f"`{word}`" in text
    code = snippets()
    assert len(code) == 4
    for c, module in zip(code, ("duckdb", "polars", "pyarrow", "pyspark")):  # one per engine
        assert f"import {module}" in c or f"from {module}" in c, module


def _pandas(x) -> pd.DataFrame:
    if isinstance(x, pd.DataFrame):
        return x
    if isinstance(x, pl.DataFrame):
        return x.to_pandas()
    if isinstance(x, pa.Table):
        return x.to_pandas()
    if hasattr(x, "collect") and hasattr(x, "columns"):  # a Spark DataFrame
        return pd.DataFrame([r.asDict() for r in x.collect()], columns=x.columns)
    raise TypeError(type(x))


@pytest.mark.parametrize("i", range(4))
def test_readme_snippet_runs_and_agrees_with_duckdb(lake, duck, request, capsys, i):
    code = snippets()[i]
    if "pyspark" in code:
        if shutil.which("java") is None:
            pytest.skip("no `java` on PATH: PySpark needs a JRE (`make java`)")
        request.getfixturevalue("spark")  # the snippet's getOrCreate() joins the test session
    assert re.search(r'^LAKE = "path/to/lake"$', code, flags=re.M) and re.search(r'^RUN = ".+"$', code, flags=re.M)
    code = re.sub(r'^LAKE = ".*"$', f"LAKE = {str(lake)!r}", code, flags=re.M)
    code = re.sub(r'^RUN = ".*"$', f"RUN = {RUN_ALL!r}", code, flags=re.M)
    ns: dict = {}
    exec(compile(code, f"<README snippet {i + 1}>", "exec"), ns)
    assert capsys.readouterr().out.strip()  # it prints something

    def same_heads(name: str, table: str, agg: str) -> None:
        """``ns[name]`` has one row per (stream, layer, head) of the run, as DuckDB computes it."""
        want = duck_df(duck, f"SELECT stream, layer, head, {agg} AS {name} FROM read_parquet('{glob(lake, table)}', "
                             "hive_partitioning = true) WHERE run = ? GROUP BY ALL ORDER BY ALL", [RUN_ALL])
        got = _pandas(ns[name])
        assert got.columns.tolist() == ["stream", "layer", "head", name]
        assert got.stream.tolist() == want.stream.tolist()
        assert got.layer.astype(int).tolist() == want.layer.tolist()
        assert got["head"].astype(int).tolist() == want["head"].tolist()
        np.testing.assert_allclose(got[name].astype(float), want[name], rtol=REL)
        checked.append(name)

    checked = []
    if "t2i" in ns:
        same_heads("t2i", "head_stats", "avg(value) FILTER (WHERE stat = 't2i')")
    if "weight_sum" in ns:
        same_heads("weight_sum", "attention", "sum(weight)")
    if "vecs" in ns:
        want = duck_df(duck, f"SELECT vec FROM read_parquet('{glob(lake, 'hidden_states')}', "
                             "hive_partitioning = true) WHERE run = ? AND stream = 'self' AND layer = 1 "
                             "AND vec IS NOT NULL ORDER BY example_id, token_idx", [RUN_ALL])
        want = np.stack(want.vec.to_list()).astype(np.float32)
        got = ns["vecs"]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        checked.append("vecs")
    assert checked, "a snippet must define t2i, weight_sum or vecs"
