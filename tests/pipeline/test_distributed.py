"""Beyond one machine: extraction on a real Ray cluster, and a lake on an S3-compatible store.

The cluster is a real one: ``ray start --head`` on the loopback interface with two CPU slots
(two actor processes), started and stopped by this module. The object store is moto's
standalone S3 server on 127.0.0.1 (no real S3 server is packaged for this machine); the lake is
written through pyarrow's S3 filesystem and read back by DuckDB through that filesystem. Every
comparison is against a single-process run into a local folder, table by table, row for row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lake import queries
from lake.catalog import Catalog
from lake.schema import TABLES
from lake.writer import LakeWriter
from pipeline.extraction.run import extract
from tests.objstore import moto_s3
from tests.raycluster import ray_head
from tests.tiny import free_port, make_manifest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
COMPARED = ("examples", "tokens", "attention", "head_stats", "hidden_states", "errors", "images")
N = 20


# -- servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, with the AWS settings every process here inherits."""
    with moto_s3() as s:
        yield s["uri"]


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """``ray start --head`` on 127.0.0.1 with two CPUs; its workers inherit the S3 settings."""
    with ray_head(2) as address:
        yield address


# -- helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("data"), n=N)


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


def extract_args(model, manifest, lake, run, *more) -> list[str]:
    return ["extract", "--model", str(model), "--data", str(manifest), "--lake", str(lake), "--run", run,
            "--chunk-size", "4", "--batch-size", "3", *more]


def rows(cat: Catalog, table: str, run: str) -> pd.DataFrame:
    """Every row of one run's table (without ``run``), in a fixed order, lists as tuples."""
    cols = [c for c in TABLES[table].columns if c != "run"]
    if table == "images":  # the run's images (the table is shared by the runs of a lake)
        where = "image_id IN (SELECT image_id FROM examples WHERE run = ?)"
    else:
        where = "run = ?"
    df = cat.df(f"SELECT {', '.join(cols)} FROM {table} WHERE {where} ORDER BY ALL", [run])
    for c in df.columns:
        if df[c].dtype == object:
            df[c] = df[c].map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else v)
    return df


def assert_same_lake(cat_a: Catalog, run_a: str, cat_b: Catalog, run_b: str) -> None:
    for t in COMPARED:
        a, b = rows(cat_a, t, run_a), rows(cat_b, t, run_b)
        assert len(a) == len(b), (t, len(a), len(b))
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=t)
    ra = queries.run_info(cat_a, run_a).iloc[0]
    rb = queries.run_info(cat_b, run_b).iloc[0]
    for k in ("model_family", "capture", "streams", "n_examples", "status"):
        assert ra[k] == rb[k], k


def no_duplicates(cat: Catalog, run: str) -> None:
    for t, key in (("attention", "stream, layer, example_id, head, query_idx, key_idx"),
                   ("hidden_states", "stream, layer, example_id, token_idx"), ("examples", "example_id"),
                   ("tokens", "example_id, token_idx"), ("head_stats", "example_id, stream, layer, head, stat")):
        d = cat.df(f"SELECT count(*) - count(DISTINCT ({key})) AS d FROM {t} WHERE run = ?", [run]).d[0]
        assert d == 0, (t, d)


@pytest.fixture(scope="module")
def single(tiny_vilt, manifest, tmp_path_factory):
    """The reference: a single-process run into a local folder (default capture, and `all`)."""
    lake = tmp_path_factory.mktemp("single")
    # (ViLT's kept patches depend on the batch, through its padding, so each reference uses the
    # chunk and batch sizes of the runs it is compared with)
    extract(str(tiny_vilt), manifest, lake, "single", chunk_size=4, batch_size=3, workers=0, progress=False)
    extract(str(tiny_vilt), manifest, lake, "single-all", chunk_size=2, batch_size=1, workers=0, progress=False,
            keep_attention="all", keep_hidden="all")
    return Catalog(lake)


def slow_args(cluster, model, manifest, lake, run, actors: int) -> list[str]:
    """A Ray run with many small chunks and everything stored: slow enough to interrupt; compared
    with the ``single-all`` reference."""
    return extract_args(model, manifest, lake, run, "--ray", cluster, "--ray-actors", str(actors),
                        "--keep-attention", "all", "--keep-hidden", "all", "--chunk-size", "2", "--batch-size", "1")


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def markers(lake: Path, run: str) -> int:
    return len(list((lake / "_state" / run).glob("chunk-*.done")))


def ray_procs(title: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if title in line]


# -- Ray --------------------------------------------------------------------------------------
def test_cluster_listens_on_loopback_only(ray_cluster):
    """Every socket a process of the test cluster listens on is bound to 127.0.0.1 (read with ss)."""
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = {line.split(None, 1)[0] for line in out.splitlines()
            if re.search(r"gcs_server|raylet|ray::|ray/_private|ray/dashboard|ray/autoscaler", line)}
    assert pids, "no Ray process found"
    listening = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        owners = set(re.findall(r"pid=(\d+)", line))
        if owners & pids:
            listening.append(line.split()[3])  # local address:port
    assert listening, "found no listening Ray process"
    outside = [a for a in listening if not re.match(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+$", a)]
    assert not outside, outside


def test_ray_run_equals_single_process(ray_cluster, tiny_vilt, manifest, single, tmp_path):
    lake = tmp_path / "lake"
    r = cli(*extract_args(tiny_vilt, manifest, lake, "viaray", "--ray", ray_cluster, "--ray-actors", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"extracted {N} examples" in r.stdout and "on 2 Ray actors" in r.stdout, r.stdout
    assert re.search(rf"extract viaray: 100%.*{N}/{N}", r.stderr), r.stderr[-2000:]  # the progress bar
    assert "Traceback" not in r.stderr
    cat = Catalog(lake)
    assert_same_lake(cat, "viaray", single, "single")
    no_duplicates(cat, "viaray")


def test_ray_run_carries_the_capture_modules(ray_cluster, tiny_vilt, manifest, tmp_path):
    """The actors capture the run's --capture-modules as one process does: the same activations rows."""
    lake, pattern = tmp_path / "lake", "vilt.encoder.layer.*.output"
    extract(str(tiny_vilt), manifest, lake, "one", chunk_size=4, batch_size=3, workers=0, progress=False,
            capture_modules=pattern)
    r = cli(*extract_args(tiny_vilt, manifest, lake, "many", "--ray", ray_cluster, "--ray-actors", "2",
                          "--capture-modules", pattern))
    assert r.returncode == 0, r.stderr[-3000:]
    cat = Catalog(lake)
    a, b = rows(cat, "activations", "many"), rows(cat, "activations", "one")
    assert len(a) == len(b) > 0 and set(a.module) == {"vilt.encoder.layer.0.output", "vilt.encoder.layer.1.output"}
    pd.testing.assert_frame_equal(a, b, check_exact=True, obj="activations")
    assert queries.run_info(cat, "many").capture.iloc[0] == queries.run_info(cat, "one").capture.iloc[0]


def test_killed_actor_is_retried_without_duplicates(ray_cluster, tiny_vilt, manifest, single, tmp_path):
    """SIGKILL an actor process while it runs a chunk: Ray restarts it and runs the chunk again."""
    lake = tmp_path / "lake"
    proc = start_cli(slow_args(ray_cluster, tiny_vilt, manifest, lake, "killed", actors=2))
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        busy = ray_procs("ray::ChunkWorker.run_chunk")
        if busy and markers(lake, "killed"):
            os.kill(busy[0], signal.SIGKILL)  # mid-run: at least one chunk is committed, one is running
            killed = busy[0]
        time.sleep(0.01)
    out, err = proc.communicate(timeout=600)
    assert killed is not None, "no chunk was seen running: " + err[-2000:]
    assert proc.returncode == 0, err[-3000:]
    assert f"extracted {N} examples" in out, out
    cat = Catalog(lake)
    assert_same_lake(cat, "killed", single, "single-all")
    no_duplicates(cat, "killed")


def test_stopped_run_resumes_on_the_cluster(ray_cluster, tiny_vilt, manifest, single, tmp_path):
    lake = tmp_path / "lake"
    args = slow_args(ray_cluster, tiny_vilt, manifest, lake, "resumed", actors=1)
    proc = start_cli(args)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if markers(lake, "resumed") >= 2:
            proc.send_signal(signal.SIGINT)  # Ctrl-C on the driver
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "run the same command again to resume" in err and "Traceback" not in err, err[-2000:]
    cat = Catalog(lake)
    n_done = markers(lake, "resumed")
    assert 2 <= n_done < N // 2
    assert queries.count_examples(cat, "resumed") == 2 * n_done  # only committed chunks are visible
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed after" in r.stdout, r.stdout
    cat.refresh()
    assert_same_lake(cat, "resumed", single, "single-all")
    no_duplicates(cat, "resumed")


def test_ray_errors_are_one_sentence(tiny_vilt, manifest, tmp_path):
    r = cli(*extract_args(tiny_vilt, manifest, tmp_path / "lake", "nowhere", "--ray", f"127.0.0.1:{free_port()}"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("vlatlas: error: cannot reach the Ray cluster at 127.0.0.1:"), r.stderr


# -- the lake on an object store --------------------------------------------------------------
def test_s3_lake_end_to_end(s3, ray_cluster, tiny_vilt, manifest, single, tmp_path):
    """Extract into s3:// (one process, then on the cluster), read it through the catalog, the app's
    queries and `vlatlas sql`: the same rows as the local lake."""
    uri = f"{s3}/lakes/one"
    extract(str(tiny_vilt), manifest, uri, "single", chunk_size=4, batch_size=3, workers=0, progress=False)
    r = cli(*extract_args(tiny_vilt, manifest, uri, "viaray", "--ray", ray_cluster, "--ray-actors", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (Path.cwd() / "s3:").exists()
    cat = Catalog(uri)
    assert str(cat.root) == uri
    assert sorted(queries.list_runs(cat).run) == ["single", "viaray"]
    assert_same_lake(cat, "single", single, "single")
    assert_same_lake(cat, "viaray", single, "single")
    # the app's queries, on both lakes
    ex = int(queries.examples(cat, "single").example_id.iloc[3])
    for q, args in ((queries.example_tokens, ("single", ex)), (queries.attention_block, ("single", ex, "self", 1)),
                    (queries.head_stat_matrix, ("single", "self", "t2i")), (queries.run_streams, ("single",)),
                    (queries.hidden_norms, ("single", "self", ex)), (queries.top_examples, ("single", "self", 1, 0, "t2i"))):
        pd.testing.assert_frame_equal(q(cat, *args), q(single, *args), obj=q.__name__)
    img = queries.examples(cat, "single").image_id.iloc[0]
    assert queries.image_png(cat, img).png[0] == queries.image_png(single, img).png[0]
    # the CLI's SQL, and its sandbox, on the object store
    r = cli("sql", "--lake", uri, "--format", "csv",
            "SELECT count(*) AS n, sum(weight) AS w FROM attention WHERE run = 'single'")
    assert r.returncode == 0, r.stderr
    want = single.df("SELECT count(*) AS n, sum(weight) AS w FROM attention WHERE run = 'single'")
    n, w = r.stdout.strip().splitlines()[1].split(",")
    assert int(n) == want.n[0] and float(w) == pytest.approx(float(want.w[0]), rel=1e-9)
    r = cli("sql", "--lake", uri, f"SELECT * FROM read_parquet('{single.root}/examples/**/*.parquet')")
    assert r.returncode == 1 and "refused" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # embed writes its maps into the object store, and the catalog shows them
    from pipeline.embed import embed

    embed(uri, "single", n_tokens=40, progress=False)
    cat.refresh()
    assert len(queries.embedding_layers(cat, "single")) > 0


def test_app_on_an_s3_lake(s3, tiny_vilt, manifest, single, monkeypatch):
    """Every page of the app runs on an object-store lake and shows the same figures as on the local one."""
    from tests.app.test_app import chart, open_app

    uri = f"{s3}/lakes/app"
    extract(str(tiny_vilt), manifest, uri, "single", chunk_size=4, batch_size=3, workers=0, progress=False)
    for page in (None, "app_pages/head_summary.py", "app_pages/attention.py", "app_pages/examples.py",
                 "app_pages/hidden_states.py", "app_pages/compare.py", "app_pages/sql.py"):
        at = open_app(uri, monkeypatch, page=page, run="single", ex=3)  # asserts no exception
        assert "Could not read the lake" not in " ".join(str(e.value) for e in at.get("error")), page
        if page == "app_pages/head_summary.py":
            remote = [json.loads(el.proto.spec).get("description") for el in at.get("vega_lite_chart")]
            local = open_app(single.root, monkeypatch, page=page, run="single", ex=3)
            assert remote and remote == [json.loads(el.proto.spec).get("description")
                                         for el in local.get("vega_lite_chart")]
            for d in remote:
                for a, b in zip(chart(at, d)[1], chart(local, d)[1]):
                    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_readers_see_only_committed_chunks(where, s3, tmp_path):
    """A chunk's files without its done marker (being written, or left by a crash) are invisible."""
    import pyarrow as pa

    root = str(tmp_path / "lake") if where == "local" else f"{s3}/lakes/commit-{os.getpid()}"
    w = LakeWriter(root, "r1")
    w.write_run_row({"run": "r1", "model": "m", "model_family": "vilt", "status": "running", "capture": "{}",
                     "streams": "{}", "manifest": "x", "created_at": pd.Timestamp("2025-01-01", tz="UTC")})

    def errors(chunk):
        return {"errors": [({}, pa.table({"source_id": [f"s{chunk}"], "stage": ["image"], "message": ["bad"]}))]}

    w.write_chunk(0, errors(0))
    w.write_chunk(1, errors(1))
    w.store.delete(f"_state/r1/chunk-{1:06d}.done")  # chunk 1's file is there, its commit is not
    cat = Catalog(root)
    assert cat.df("SELECT source_id FROM errors").source_id.tolist() == ["s0"]
    assert queries.run_errors(cat, "r1").source_id.tolist() == ["s0"]
    w.write_chunk(1, errors(1))  # committed now
    cat.refresh()  # (a local catalog notices by itself; an object-store one within STALE_CHECK_S)
    assert sorted(cat.df("SELECT source_id FROM errors").source_id) == ["s0", "s1"]
    row = w.read_run_row()
    w.write_run_row({**row, "status": "complete"})
    cat.refresh()
    assert sorted(cat.df("SELECT source_id FROM errors").source_id) == ["s0", "s1"]


def test_local_catalog_sees_new_chunks_without_refresh(tmp_path):
    import pyarrow as pa

    w = LakeWriter(tmp_path, "r1")
    w.write_run_row({"run": "r1", "model": "m", "status": "running", "created_at": pd.Timestamp("2025-01-01", tz="UTC")})
    cat = Catalog(tmp_path)
    assert cat.df("SELECT count(*) AS n FROM errors").n[0] == 0
    w.write_chunk(0, {"errors": [({}, pa.table({"source_id": ["a"], "stage": ["image"], "message": ["m"]}))]})
    assert cat.df("SELECT count(*) AS n FROM errors").n[0] == 1


def test_bad_lake_uri_is_one_sentence(tmp_path):
    r = cli("sql", "--lake", "nosuchscheme://bucket/x", "SELECT 1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("vlatlas: error: cannot open the lake at nosuchscheme://bucket/x"), r.stderr
