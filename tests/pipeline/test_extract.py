"""End to end: ``vlatlas extract`` on a tiny ViLT into a lake, read back through the catalog views.

Covers what a user sees (progress bar, summary line, one-line errors, exit
codes), what lands in each table, the pruning and hidden-state options,
resuming after ``kill -9`` and after Ctrl-C, and bad inputs that must be
skipped and recorded, never stop the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lake.schema import STATS
from pipeline.cli import main
from tests.tiny import make_manifest, noise_image, write_manifest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
_exe = shutil.which("vlatlas", path=str(Path(sys.executable).parent))
VLATLAS = [_exe] if _exe else [sys.executable, "-m", "pipeline.cli"]
N_LAYERS, N_HEADS, HIDDEN = 2, 2, 32  # make_tiny_vilt's defaults
N_STATS = len(STATS)


def extract_args(model, data, lake, run, *extra):
    return ["extract", "--model", str(model), "--data", str(data), "--lake", str(lake), "--run", run, *extra]


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``vlatlas`` in this process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    """stderr without the warnings third-party libraries print on import."""
    return [ln for ln in err.splitlines() if ln.strip() and "torchvision" not in ln and "Loading weights" not in ln]


# -- one full run through the real command ----------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("shapes"), n=6)


@pytest.fixture(scope="module")
def main_run(tiny_vilt, shapes, tmp_path_factory):
    """``vlatlas extract`` as a subprocess: 6 scenes, batches of 2, chunks of 4."""
    lake = tmp_path_factory.mktemp("lake_main")
    p = subprocess.run(VLATLAS + extract_args(tiny_vilt, shapes, lake, "main", "--batch-size", "2",
                                              "--chunk-size", "4", "--keep-attention", "all",
                                              "--keep-hidden", "all"),
                       capture_output=True, text=True, env=ENV, timeout=300)
    return {"lake": lake, "rc": p.returncode, "out": p.stdout, "err": p.stderr}


def test_command_output(main_run):
    assert main_run["rc"] == 0, main_run["err"]
    assert "Traceback" not in main_run["err"]
    # the progress bar goes to stderr and reaches the end
    assert "extract main" in main_run["err"] and "6/6" in main_run["err"]
    # one summary line on stdout
    lines = main_run["out"].strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("extracted 6 examples into") and "0 skipped" in lines[0]


def test_runs_row(main_run, lake_df, tiny_vilt, shapes):
    runs = lake_df(main_run["lake"], "SELECT * FROM runs")
    assert len(runs) == 1
    r = runs.iloc[0]
    assert r.run == "main" and r.status == "complete" and r.n_examples == 6
    assert r.model == str(tiny_vilt) and r.manifest == str(Path(shapes).resolve())
    assert r.model_family == "vilt" and r["dtype"] == "float32" and r.attn_implementation == "eager"
    assert json.loads(r.streams) == {"self": {"layers": N_LAYERS, "heads": N_HEADS, "hidden_size": HIDDEN}}
    cap = json.loads(r.capture)
    assert cap["keep_attention"] == "all" and cap["keep_hidden"] == "all" and cap["chunk_size"] == 4
    assert cap["random_weights"] is True
    assert r.software_version and pd.notna(r.created_at)


def test_tables_are_filled(main_run, lake_df, shapes):
    lake = main_run["lake"]
    rows = [json.loads(ln) for ln in Path(shapes).read_text().splitlines()]
    ex = lake_df(lake, "SELECT * FROM examples ORDER BY example_id")
    assert list(ex.example_id) == list(range(6))
    assert list(ex.source_id) == [r["id"] for r in rows]
    assert list(ex.text) == [r["text"] for r in rows] and list(ex.split) == [r["split"] for r in rows]
    assert list(ex.answer) == [r["answer"] for r in rows]
    assert [json.loads(b) for b in ex.boxes] == [
        [{"label": b["label"], "box": [float(v) for v in b["box"]]} for b in r["boxes"]] for r in rows]
    assert all(json.loads(m)["qtype"] == "color" for m in ex.meta)
    assert ex.prediction.notna().all() and ex.correct.notna().all()
    n_tok = int(ex.n_tokens.sum())

    tok = lake_df(lake, "SELECT example_id, count(*) AS n FROM tokens GROUP BY ALL ORDER BY example_id")
    assert list(tok.n) == list(ex.n_tokens)

    att = lake_df(lake, "SELECT stream, layer, count(*) AS n FROM attention GROUP BY ALL ORDER BY layer")
    assert list(att.stream) == ["self"] * N_LAYERS and list(att.layer) == list(range(N_LAYERS))
    assert list(att.n) == [int((ex.n_tokens ** 2).sum()) * N_HEADS] * N_LAYERS

    hs = lake_df(lake, "SELECT stat, count(*) AS n, count(value) AS nv, min(value) AS lo, max(value) AS hi "
                 "FROM head_stats GROUP BY stat")
    assert len(hs) == N_STATS and set(hs.n) == {6 * N_LAYERS * N_HEADS}
    assert set(hs.nv) == {6 * N_LAYERS * N_HEADS}  # every example has text, patches and a boxed word
    km = hs.set_index("stat").loc["kept_mass"]
    assert km.lo == pytest.approx(1.0, abs=1e-5) and km.hi == pytest.approx(1.0, abs=1e-5)

    hid = lake_df(lake, "SELECT layer, count(*) AS n, min(len(vec)) AS d0, max(len(vec)) AS d1 "
                  "FROM hidden_states GROUP BY layer ORDER BY layer")
    assert list(hid.layer) == list(range(N_LAYERS + 1))
    assert set(hid.n) == {n_tok} and set(hid.d0) == set(hid.d1) == {HIDDEN}

    img = lake_df(lake, "SELECT image_id, png, width, height FROM images")
    files = {hashlib.sha256((Path(shapes).parent / r["image"]).read_bytes()).hexdigest(): r for r in rows}
    assert set(img.image_id) == set(files) == set(ex.image_id)
    for i in img.itertuples():
        with Image.open(io.BytesIO(i.png)) as im:
            assert im.format == "PNG" and max(im.size) <= 512
            assert im.size == (i.width, i.height)
    assert len(lake_df(lake, "SELECT * FROM errors")) == 0
    done = sorted(p.name for p in (lake / "_state" / "main").glob("chunk-*.done"))
    assert done == ["chunk-000000.done", "chunk-000001.done"]


def test_running_again_says_nothing_to_do(main_run, tiny_vilt, shapes, capsys, lake_df):
    before = lake_df(main_run["lake"], "SELECT count(*) AS n FROM attention").n[0]
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, shapes, main_run["lake"], "main", "--batch-size", "2",
                                             "--chunk-size", "4", "--keep-attention", "all", "--keep-hidden", "all",
                                             "--quiet"))
    assert rc == 0 and "already complete; nothing to do" in out
    assert lake_df(main_run["lake"], "SELECT count(*) AS n FROM attention").n[0] == before


# -- capture options ---------------------------------------------------------------------------


def check_kept_mass_and_full_stats(lake_df, lake, full_lake, row_means, atol: float):
    """``kept_mass`` equals the mean over query rows of the stored row sums (``row_means``, indexed by
    example, layer, head), and every other statistic equals the unpruned run's: statistics are
    computed before pruning. Returns the kept_mass rows."""
    km = lake_df(lake, "SELECT example_id, layer, head, value FROM head_stats WHERE stat = 'kept_mass'")
    km = km.merge(row_means.rename("stored").reset_index(), on=["example_id", "layer", "head"])
    assert len(km) == 6 * N_LAYERS * N_HEADS
    np.testing.assert_allclose(km.value, km.stored, atol=atol)
    q = "SELECT example_id, layer, head, stat, value FROM head_stats WHERE stat <> 'kept_mass' ORDER BY ALL"
    a, b = lake_df(lake, q), lake_df(full_lake, q)
    assert (a.drop(columns="value") == b.drop(columns="value")).all().all()
    np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-5)
    return km


def test_keep_attention_topk(main_run, tiny_vilt, shapes, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, shapes, lake, "top3", "--batch-size", "2",
                                             "--chunk-size", "4", "--keep-attention", "topk:3", "--quiet"))
    assert rc == 0, err
    per_row = lake_df(lake, "SELECT example_id, layer, head, query_idx, count(*) AS n, sum(weight) AS s, "
                      "max(weight) AS top FROM attention GROUP BY ALL")
    n_tok = lake_df(lake, "SELECT sum(n_tokens) AS n FROM examples").n[0]
    assert len(per_row) == n_tok * N_LAYERS * N_HEADS  # every query row of every layer and head
    assert set(per_row.n) == {3}
    # the 3 kept are the 3 largest of the full row: compare with the unpruned run
    full = lake_df(main_run["lake"], "SELECT example_id, layer, head, query_idx, "
                   "sum(w) AS s3 FROM (SELECT *, row_number() OVER (PARTITION BY example_id, layer, head, query_idx "
                   "ORDER BY weight DESC) AS rk, weight AS w FROM attention) WHERE rk <= 3 GROUP BY ALL")
    m = per_row.merge(full, on=["example_id", "layer", "head", "query_idx"])
    assert len(m) == len(per_row)
    np.testing.assert_allclose(m.s, m.s3, atol=3e-3)
    # kept_mass is the mean over query rows of the stored row sums
    km = check_kept_mass_and_full_stats(lake_df, lake, main_run["lake"], per_row.groupby(
        ["example_id", "layer", "head"]).s.mean(), atol=2e-3)
    assert (km.value < 1).all()
    cap = json.loads(lake_df(lake, "SELECT capture FROM runs").capture[0])
    assert cap["keep_attention"] == "topk:3"


def test_keep_attention_none_and_keep_hidden(tiny_vilt, shapes, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, shapes, lake, "slim", "--keep-attention", "none",
                                             "--keep-hidden", "0,2", "--quiet"))
    assert rc == 0, err
    assert lake_df(lake, "SELECT count(*) AS n FROM attention").n[0] == 0
    km = lake_df(lake, "SELECT value FROM head_stats WHERE stat = 'kept_mass'")
    assert len(km) == 6 * N_LAYERS * N_HEADS and (km.value == 0).all()
    assert lake_df(lake, "SELECT count(value) AS n FROM head_stats WHERE stat = 't2i'").n[0] == 6 * N_LAYERS * N_HEADS
    layers = lake_df(lake, "SELECT DISTINCT layer FROM hidden_states ORDER BY layer")
    assert list(layers.layer) == [0, 2]
    cap = json.loads(lake_df(lake, "SELECT capture FROM runs").capture[0])
    assert cap["keep_attention"] == "none" and cap["keep_hidden"] == "0,2"


def test_limit(tiny_vilt, shapes, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, shapes, lake, "lim", "--limit", "3", "--quiet",
                                             "--keep-hidden", "none"))
    assert rc == 0, err
    assert "extracted 3 examples" in out
    assert list(lake_df(lake, "SELECT example_id FROM examples ORDER BY 1").example_id) == [0, 1, 2]
    assert lake_df(lake, "SELECT n_examples FROM runs").n_examples[0] == 3
    assert lake_df(lake, "SELECT count(*) AS n FROM hidden_states").n[0] == 0


def test_bfloat16(tiny_vilt, shapes, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, shapes, lake, "bf16", "--dtype", "bfloat16", "--quiet",
                                             "--limit", "2", "--keep-attention", "all"))
    assert rc == 0, err
    assert lake_df(lake, "SELECT dtype FROM runs")["dtype"][0] == "bfloat16"
    sums = lake_df(lake, "SELECT sum(weight) AS s FROM attention GROUP BY example_id, layer, head, query_idx")
    np.testing.assert_allclose(sums.s, 1.0, atol=2e-2)  # bfloat16 keeps 8 bits of mantissa
    assert lake_df(lake, "SELECT count(*) AS n FROM head_stats WHERE value IS NULL").n[0] == 0


def expected_budget(w: np.ndarray, other: np.ndarray, k: int, p: float, c: int) -> set[int]:
    """The keys ``budget:k:p:c`` keeps of one row, computed here from the spec: the largest weights
    in descending order until their mass reaches ``p`` (at most ``k``), plus the ``c`` largest
    positive weights on keys of the other modality (``other``)."""
    order = np.argsort(-w, kind="stable")
    kept, mass = set(), 0.0
    for j in order[:k]:
        if mass >= p - 1e-7:
            break
        kept.add(int(j))
        mass += w[j]
    cross = [j for j in order if other[j] and w[j] > 0][:c]
    return kept | {int(j) for j in cross}


def test_default_capture_keeps_a_bounded_budget(main_run, tiny_vilt, shapes, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, shapes, lake, "dflt", "--batch-size", "2", "--quiet"))
    assert rc == 0, err
    cap = json.loads(lake_df(lake, "SELECT capture FROM runs").capture[0])
    assert cap["keep_attention"] == "budget:8:0.9:2" and cap["keep_hidden"] == "sample:256"
    got = lake_df(lake, "SELECT example_id, layer, head, query_idx, key_idx, weight FROM attention")
    full = lake_df(main_run["lake"], "SELECT example_id, layer, head, query_idx, key_idx, weight FROM attention")
    tok = lake_df(lake, "SELECT example_id, token_idx, modality FROM tokens")
    image = {(r.example_id, r.token_idx): r.modality == "image" for r in tok.itertuples()}
    # stored weights are the true weights of those keys
    m = got.merge(full, on=["example_id", "layer", "head", "query_idx", "key_idx"], suffixes=("", "_full"))
    assert len(m) == len(got)
    np.testing.assert_allclose(m.weight, m.weight_full, atol=2e-3)
    sizes = got.groupby(["example_id", "layer", "head", "query_idx"]).size()
    assert sizes.max() <= 10 and len(sizes) == len(full.groupby(["example_id", "layer", "head", "query_idx"]))
    # the stored key set of every row is the spec's, computed from the full row
    stored = got.groupby(["example_id", "layer", "head", "query_idx"]).key_idx.apply(set)
    same = 0
    for key, row in full.groupby(["example_id", "layer", "head", "query_idx"]):
        ex, q = key[0], key[3]
        w = row.weight.to_numpy(np.float64)
        keys = row.key_idx.to_numpy()
        other = np.array([image[(ex, int(k))] != image[(ex, q)] for k in keys])
        want = {int(keys[j]) for j in expected_budget(w, other, 8, 0.9, 2)}
        same += want == stored[key]
    assert same >= 0.97 * len(stored), f"{same} of {len(stored)} rows keep the spec's keys"  # float16 near-ties
    # kept_mass is the mean over query rows of the stored row sums, and below 1 (something was pruned)
    km = check_kept_mass_and_full_stats(lake_df, lake, main_run["lake"], got.groupby(
        ["example_id", "layer", "head", "query_idx"]).weight.sum().groupby(level=["example_id", "layer", "head"]).mean(),
        atol=3e-3)
    assert (km.value < 0.999).any()


def test_hidden_sample_keeps_norms_for_all_and_vectors_for_a_seeded_sample(main_run, tiny_vilt, shapes, capsys,
                                                                            lake_df, tmp_path):
    runs = {}
    for run, extra in (("s2", ()), ("s2b", ("--batch-size", "4", "--workers", "0"))):
        rc, out, err = cli(capsys, *extract_args(tiny_vilt, shapes, tmp_path / "lake", run, "--keep-hidden",
                                                 "sample:2", "--keep-attention", "none", "--quiet", *extra))
        assert rc == 0, err
        runs[run] = lake_df(tmp_path / "lake", "SELECT layer, example_id, token_idx, norm, vec FROM hidden_states "
                            f"WHERE run = '{run}' ORDER BY layer, example_id, token_idx")
    h = runs["s2"]
    full = lake_df(main_run["lake"], "SELECT layer, example_id, token_idx, norm, vec FROM hidden_states "
                   "ORDER BY layer, example_id, token_idx")
    assert len(h) == len(full)  # a row (with its norm) for every token at every layer
    np.testing.assert_allclose(h.norm, full.norm, rtol=1e-4)
    with_vec = sorted(set(h.example_id[h.vec.notna()]))
    assert len(with_vec) == 2
    assert set(h.example_id[h.vec.isna()]) == set(range(6)) - set(with_vec)
    assert (h.groupby("example_id").vec.apply(lambda v: v.notna().all() or v.isna().all())).all()
    has = h.vec.notna().to_numpy()
    np.testing.assert_allclose(np.stack(h.vec[has].to_numpy()), np.stack(full.vec[has].to_numpy()), atol=2e-3)
    # the sample depends on the manifest alone, not on batches or workers
    assert runs["s2b"].vec.notna().equals(h.vec.notna())


@pytest.mark.parametrize("args, message", [
    (["--keep-attention", "topk:0"], "--keep-attention 'topk:0' is not understood"),
    (["--keep-hidden", "1,x"], "--keep-hidden '1,x' is not understood"),
    (["--run", "bad/name"], "run name 'bad/name' is not allowed"),
    (["--batch-size", "0"], "--batch-size and --chunk-size must be at least 1"),
    (["--keep-hidden", "0,7"], "layer(s) [7], but this model has hidden states 0..2"),  # 2 blocks
    (["--keep-attention", "budget:8:1.5:2"], "--keep-attention 'budget:8:1.5:2' is not understood"),
    (["--keep-hidden", "sample:x"], "sample:N needs a whole number of examples"),
    (["--workers", "-1"], "--workers must be 0"),
])
def test_bad_options_fail_with_one_line(tiny_vilt, shapes, capsys, tmp_path, args, message):
    argv = extract_args(tiny_vilt, shapes, tmp_path / "lake", "r", "--quiet") + args  # a later --run wins
    rc, out, err = cli(capsys, *argv)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and message in lines[0] and lines[0].startswith("vlatlas: error:")
    assert "Traceback" not in err and not (tmp_path / "lake").exists()


def test_same_run_other_capture_is_refused(tiny_vilt, shapes, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    base = extract_args(tiny_vilt, shapes, lake, "r", "--quiet", "--limit", "2")
    assert cli(capsys, *base)[0] == 0
    rc, out, err = cli(capsys, *base, "--keep-attention", "topk:2")
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1
    assert "run 'r' already exists" in lines[0] and "--overwrite" in lines[0]
    assert lake_df(lake, "SELECT count(*) AS n FROM attention GROUP BY example_id, layer, head, query_idx").n.min() > 2
    rc, out, err = cli(capsys, *base, "--keep-attention", "topk:2", "--overwrite")
    assert rc == 0, err
    per_row = lake_df(lake, "SELECT count(*) AS n FROM attention GROUP BY example_id, layer, head, query_idx")
    assert set(per_row.n) == {2}
    assert json.loads(lake_df(lake, "SELECT capture FROM runs").capture[0])["keep_attention"] == "topk:2"
    assert len(lake_df(lake, "SELECT * FROM examples")) == 2


# -- resuming ------------------------------------------------------------------------------------

RESUME = ("--batch-size", "2", "--chunk-size", "4", "--keep-hidden", "sample:10")  # the default attention budget
N_BIG = 40


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("big"), n=N_BIG, seed=1)


@pytest.fixture(scope="module")
def reference(tiny_vilt, big, tmp_path_factory):
    """The same run, uninterrupted."""
    lake = tmp_path_factory.mktemp("lake_ref")
    assert main(extract_args(tiny_vilt, big, lake, "res", *RESUME, "--quiet")) == 0
    return lake


def start_and_stop(tiny_vilt, big, lake, sig) -> subprocess.CompletedProcess:
    """Start ``vlatlas extract`` and send ``sig`` once its first chunk is done."""
    proc = subprocess.Popen(VLATLAS + extract_args(tiny_vilt, big, lake, "res", *RESUME),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    state = Path(lake) / "_state" / "res"
    deadline = time.monotonic() + 240
    try:
        while not list(state.glob("chunk-*.done")):
            assert proc.poll() is None, f"extract ended before its first chunk: {proc.communicate()}"
            assert time.monotonic() < deadline, "no chunk finished in time"
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    done = list(state.glob("chunk-*.done"))
    assert 1 <= len(done) < N_BIG // 4, "the run was not interrupted part-way; the test proves nothing"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def snapshot(lake_df, lake) -> dict[str, pd.DataFrame]:
    """Every table of run ``res``, sorted by its key."""
    q = {
        "examples": "SELECT * EXCLUDE (run) FROM examples ORDER BY example_id",
        "tokens": "SELECT * EXCLUDE (run) FROM tokens ORDER BY example_id, token_idx",
        "attention": "SELECT * EXCLUDE (run) FROM attention ORDER BY stream, layer, example_id, head, query_idx, key_idx",
        "head_stats": "SELECT * EXCLUDE (run) FROM head_stats ORDER BY example_id, stream, layer, head, stat",
        "hidden_states": "SELECT * EXCLUDE (run) FROM hidden_states ORDER BY stream, layer, example_id, token_idx",
        "errors": "SELECT * EXCLUDE (run) FROM errors ORDER BY ALL",
        "images": "SELECT image_id, width, height FROM images ORDER BY ALL",
    }
    return {k: lake_df(lake, v) for k, v in q.items()}


def assert_same_lake(lake_df, got_root, want_root):
    got, want = snapshot(lake_df, got_root), snapshot(lake_df, want_root)
    floats = {"weight", "value", "norm", "vec"}
    for name in want:
        g, w = got[name], want[name]
        assert len(g) == len(w), f"{name}: {len(g)} rows, want {len(w)}"
        assert list(g.columns) == list(w.columns)
        for c in w.columns:
            if c == "vec":
                has = w[c].notna().to_numpy()
                assert (g[c].notna().to_numpy() == has).all(), f"{name}: other rows carry vectors"
                np.testing.assert_allclose(np.stack(g[c][has].to_numpy()), np.stack(w[c][has].to_numpy()),
                                           atol=2e-3, err_msg=name)
            elif c in floats:
                np.testing.assert_allclose(g[c].to_numpy(float), w[c].to_numpy(float), atol=2e-3, rtol=1e-3,
                                           equal_nan=True, err_msg=f"{name}.{c}")
            elif c == "meta":  # holds the float score of the prediction
                assert [json.loads(m).keys() for m in g[c]] == [json.loads(m).keys() for m in w[c]]
            else:
                assert g[c].equals(w[c]), f"{name}.{c} differs"
    keys = {"attention": "example_id, stream, layer, head, query_idx, key_idx",
            "head_stats": "example_id, stream, layer, head, stat",
            "hidden_states": "example_id, stream, layer, token_idx",
            "tokens": "example_id, stream, token_idx", "examples": "example_id"}
    for table, key in keys.items():
        dup = lake_df(got_root, f"SELECT count(*) AS n FROM (SELECT {key}, count(*) AS c FROM {table} "
                      "GROUP BY ALL HAVING c > 1)")
        assert dup.n[0] == 0, f"duplicate keys in {table}"
    runs = lake_df(got_root, "SELECT status, n_examples FROM runs")
    assert runs.status[0] == "complete" and runs.n_examples[0] == N_BIG


def test_resume_after_kill_9(tiny_vilt, big, reference, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    p = start_and_stop(tiny_vilt, big, lake, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    assert lake_df(lake, "SELECT status FROM runs").status[0] == "running"
    n_done = len(list((lake / "_state" / "res").glob("chunk-*.done")))
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, big, lake, "res", *RESUME, "--quiet"))
    assert rc == 0, err
    assert f"resumed after {n_done} finished chunks" in out and f"extracted {N_BIG} examples" in out
    assert_same_lake(lake_df, lake, reference)


def test_resume_after_ctrl_c(tiny_vilt, big, reference, capsys, lake_df, tmp_path):
    lake = tmp_path / "lake"
    p = start_and_stop(tiny_vilt, big, lake, signal.SIGINT)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr
    assert "run the same command again to resume" in p.stderr
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, big, lake, "res", *RESUME, "--quiet"))
    assert rc == 0, err
    assert_same_lake(lake_df, lake, reference)
    rc, out, err = cli(capsys, *extract_args(tiny_vilt, big, lake, "res", *RESUME, "--quiet"))
    assert rc == 0 and "nothing to do" in out


# -- bad inputs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "images").mkdir()
    img = d / "images"
    noise_image((64, 64), 1).save(img / "ok.png")
    (img / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    noise_image((64, 64), 2).save(buf, format="JPEG", quality=90)
    (img / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (img / "text.png").write_text("this is not a picture\n")
    Image.new("RGB", (1000, 10), "red").save(img / "wide.png")
    Image.new("RGB", (300, 20), "red").save(img / "long15.png")  # passes load_image, too thin for 16 px patches
    Image.new("CMYK", (64, 48), (0, 200, 200, 0)).save(img / "cmyk.jpg")
    Image.new("L", (48, 64), 120).save(img / "gray.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 100)).save(img / "rgba.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(img / "deep.png")
    long_text = " ".join(["what color is the circle"] * 6)  # 32 tokens with [CLS]/[SEP]; the model takes 16
    rows = [
        {"id": "ok", "image": "images/ok.png", "text": "what color is the circle ?"},
        {"id": "missing", "image": "images/nowhere.png", "text": "is there a circle ?"},
        {"id": "empty", "image": "images/empty.png", "text": "is there a circle ?"},
        {"id": "cut", "image": "images/cut.jpg", "text": "is there a circle ?"},
        {"id": "text", "image": "images/text.png", "text": "is there a circle ?"},
        {"id": "wide", "image": "images/wide.png", "text": "is there a circle ?"},
        {"id": "long15", "image": "images/long15.png", "text": "is there a circle ?"},
        {"id": "notext", "image": "images/ok.png", "text": "   "},
        {"id": "ok", "image": "images/ok.png", "text": "a duplicate id"},
        {"id": "toolong", "image": "images/ok.png", "text": long_text},
        {"id": "cmyk", "image": "images/cmyk.jpg", "text": "what color is the square ?"},
        {"id": "gray", "image": "images/gray.png", "text": "what color is the square ?"},
        {"id": "rgba", "image": "images/rgba.png", "text": "what color is the square ?"},
        {"id": "deep", "image": "images/deep.png", "text": "what color is the square ?"},
    ]
    return write_manifest(d, rows)


SKIPPED = {  # source_id -> (stage, words the message must hold)
    "missing": ("image", ["not found"]),
    "empty": ("image", ["empty", "0 bytes"]),
    "cut": ("image", ["truncated"]),
    "text": ("image", ["not an image"]),
    "wide": ("image", ["aspect ratio", "1000x10"]),
    "long15": ("image", ["300x20", "aspect ratio", "patch"]),
    "notext": ("manifest", ["empty text"]),
    "ok": ("manifest", ["duplicate id 'ok'"]),
}
EXTRACTED = ["ok", "toolong", "cmyk", "gray", "rgba", "deep"]


@pytest.fixture(scope="module")
def bad_run(tiny_vilt, bad_manifest, tmp_path_factory):
    lake = tmp_path_factory.mktemp("lake_bad")
    p = subprocess.run(VLATLAS + extract_args(tiny_vilt, bad_manifest, lake, "bad", "--batch-size", "4",
                                              "--chunk-size", "5"),
                       capture_output=True, text=True, env=ENV, timeout=300)
    return {"lake": lake, "rc": p.returncode, "out": p.stdout, "err": p.stderr}


def test_bad_inputs_are_skipped_and_recorded(bad_run, lake_df):
    assert bad_run["rc"] == 0, bad_run["err"]
    assert "Traceback" not in bad_run["err"]
    line = bad_run["out"].strip().splitlines()[-1]
    assert f"extracted {len(EXTRACTED)} examples" in line
    assert f"{len(SKIPPED)} skipped" in line and "1 truncated" in line
    assert "SELECT * FROM errors" in line  # says where to look

    lake = bad_run["lake"]
    ex = lake_df(lake, "SELECT * FROM examples ORDER BY example_id")
    assert list(ex.source_id) == EXTRACTED
    assert list(ex.example_id) == [0, 9, 10, 11, 12, 13]  # manifest positions, rejected rows counted
    errors = lake_df(lake, "SELECT source_id, stage, message FROM errors")
    assert len(errors) == len(SKIPPED) + 1
    for sid, (stage, words) in SKIPPED.items():
        e = errors[(errors.source_id == sid) & (errors.stage == stage)]
        assert len(e) == 1, f"{sid}: {errors.to_dict('records')}"
        for w in words:
            assert w in e.message.iloc[0], f"{sid}: {e.message.iloc[0]!r} lacks {w!r}"
    assert lake_df(lake, "SELECT status FROM runs").status[0] == "complete"


def test_long_text_is_truncated_and_recorded(bad_run, lake_df):
    lake = bad_run["lake"]
    e = lake_df(lake, "SELECT * FROM errors WHERE source_id = 'toolong'")
    assert list(e.stage) == ["text"] and "truncated" in e.message[0] and "16" in e.message[0]
    ex = lake_df(lake, "SELECT * FROM examples WHERE source_id = 'toolong'").iloc[0]
    assert json.loads(ex.meta)["truncated"] is True
    tok = lake_df(lake, "SELECT * FROM tokens WHERE example_id = ? AND modality = 'text' ORDER BY token_idx",
                  [int(ex.example_id)])
    assert len(tok) == 16 and tok.role.iloc[0] == "cls" and tok.role.iloc[-1] == "sep"
    others = lake_df(lake, "SELECT meta FROM examples WHERE source_id <> 'toolong'")
    assert not any(json.loads(m).get("truncated") for m in others.meta)


def test_image_modes_are_converted(bad_run, lake_df):
    ex = lake_df(bad_run["lake"], "SELECT source_id, meta, image_width, image_height, grid_h, grid_w, n_tokens "
                 "FROM examples")
    modes = {r.source_id: json.loads(r.meta).get("image_mode") for r in ex.itertuples()}
    assert modes["ok"] is None and modes["toolong"] is None
    assert modes["cmyk"] == "CMYK" and modes["gray"] == "L" and modes["rgba"] == "RGBA"
    assert modes["deep"].startswith("I")  # 16-bit greyscale
    sizes = {r.source_id: (r.image_width, r.image_height) for r in ex.itertuples()}
    assert sizes["cmyk"] == (64, 48) and sizes["gray"] == (48, 64)
    assert (ex.n_tokens > ex.grid_h * ex.grid_w).all()
    stats = lake_df(bad_run["lake"], "SELECT count(*) AS n, count(value) AS nv FROM head_stats WHERE stat = 'i2i'")
    assert stats.n[0] == stats.nv[0] == len(EXTRACTED) * N_LAYERS * N_HEADS


def test_missing_column_fails_before_any_work(tiny_vilt, tmp_path):
    d = tmp_path / "m"
    noise_image((64, 64)).save(tmp_path / "a.png")
    manifest = tmp_path / "no_text.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": "a.png", "caption": "hello"}) + "\n")
    p = subprocess.run(VLATLAS + extract_args(tiny_vilt, manifest, d, "r"), capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = error_lines(p.stderr)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("vlatlas: error:") and "'text'" in lines[0]
    assert p.stdout == ""
    assert not d.exists()


def test_unknown_model_folder(shapes, capsys, tmp_path):
    rc, out, err = cli(capsys, *extract_args(tmp_path / "nope", shapes, tmp_path / "lake", "r"))
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert str(tmp_path / "nope") in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "lake").exists()
    (tmp_path / "empty").mkdir()
    rc, out, err = cli(capsys, *extract_args(tmp_path / "empty", shapes, tmp_path / "lake", "r"))
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "cannot load a model config" in lines[0]


def test_non_vilt_config(shapes, capsys, tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    rc, out, err = cli(capsys, *extract_args(tmp_path / "bert", shapes, tmp_path / "lake", "r"))
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert "'bert'" in lines[0] and "no adapter" in lines[0] and "vilt" in lines[0]
    assert not (tmp_path / "lake").exists()


def test_a_chunk_stopped_mid_write_is_purged_and_redone(tmp_path):
    """The write stage abandons a chunk between two files (Ctrl-C, an error, or a kill between
    files): the chunk has files but no done marker, so a resumed run deletes them and writes it anew."""
    import pyarrow as pa

    from lake.schema import ERRORS, EXAMPLES
    from lake.writer import LakeWriter

    ex = pa.Table.from_pylist([{"example_id": 0, "source_id": "a", "text": "t"}], schema=EXAMPLES.schema)
    err = pa.Table.from_pylist([{"source_id": "b", "stage": "image", "message": "m"}], schema=ERRORS.schema)
    parts = {"examples": [({}, ex)], "errors": [({}, err)]}
    w = LakeWriter(tmp_path, "r")
    checks = iter([False, True])  # go on before the first file, stop before the second
    assert w.write_chunk(0, parts, stop=lambda: next(checks)) is False
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet"))
    assert files == ["examples/run=r/part-000000.parquet"] and w.done_chunks() == set()
    (tmp_path / "errors" / "run=r").mkdir(parents=True)
    (tmp_path / "errors" / "run=r" / ".part-000000.parquet.tmp").write_bytes(b"half a file")  # killed mid-file
    assert LakeWriter(tmp_path, "r").purge_incomplete() == 2
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.tmp"))
    assert LakeWriter(tmp_path, "r").write_chunk(0, parts) is True
    assert w.done_chunks() == {0} and len(list(tmp_path.rglob("*.parquet"))) == 2
