"""``vlatlas probe``: linear probes with a control task, on real Parquet lakes read through DuckDB.

The lake here is written by :class:`lake.writer.LakeWriter` with a planted signal: the image tokens
inside each example's box carry its colour (a class mean plus noise) in the hidden state at layer
:data:`SIGNAL`, and pure noise at the other layers. The probe must find it there and not at the noise
layer, and its score, control and p-value must equal the permutation test recomputed here with
scikit-learn directly (the folds the module used, the permutations its docstring defines).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lake.catalog import Catalog
from lake.schema import ACTIVATIONS, EXAMPLES, HIDDEN_STATES, PROBES, TOKENS
from lake.writer import LakeWriter
from pipeline.probe import (SELECTORS, ProbeError, ProbeSpec, probe_file, probe_targets, run_probe, select_tokens,
                            write_probes)

ROOT = Path(__file__).resolve().parents[2]
RUN = "probe-run"
N = 60  # examples
DIM = 8
LAYERS = (0, 1, 2)
SIGNAL, NOISE = 1, 2
COLORS = ("red", "green", "blue")
GRID = 3  # 3 x 3 patches of PX pixels
PX = 10
WORDS = ["what", "color", "is", "the", "Ġcircle", "?"]


def _box(i: int) -> tuple[int, int, int, int]:
    """Example i's box: two horizontally adjacent patches of row i % 3 (centres inside, edges shared)."""
    r, c = i % GRID, (i // GRID) % (GRID - 1)
    return c * PX, r * PX, (c + 2) * PX, (r + 1) * PX


def _tokens(i: int) -> list[dict]:
    rows = [dict(token_idx=k, modality="text", role="cls" if k == 0 else "word", token=w, seq_pos=k)
            for k, w in enumerate(["[CLS]", *WORDS])]
    rows.append(dict(token_idx=len(rows), modality="text", role="sep", token="[SEP]", seq_pos=len(rows)))
    rows.append(dict(token_idx=len(rows), modality="image", role="image_cls", token=None, seq_pos=len(rows)))
    for r in range(GRID):
        for c in range(GRID):
            rows.append(dict(token_idx=len(rows), modality="image", role="patch", token=None, seq_pos=len(rows),
                             patch_row=r, patch_col=c, x0=c * PX, y0=r * PX, x1=(c + 1) * PX, y1=(r + 1) * PX))
    for row in rows:
        row.update(example_id=i, stream="self", tile=0 if row["modality"] == "image" else None)
        for k in ("text_pos", "patch_row", "patch_col", "x0", "y0", "x1", "y1"):
            row.setdefault(k, None)
    return rows


def _in_box(t: dict, box) -> bool:
    if t["x0"] is None:
        return False
    cx, cy = (t["x0"] + t["x1"]) / 2, (t["y0"] + t["y1"]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def write_probe_lake(root: Path, run: str = RUN, n: int = N, seed: int = 0) -> dict:
    """A run whose boxed image tokens carry the colour at layer SIGNAL; returns {(example, token, layer): vec}."""
    rng = np.random.default_rng(seed)
    w = LakeWriter(root, run)
    w.write_run_row(dict(
        run=run, model="synthetic/probe", model_family="vilt", revision="synthetic", dtype="float32",
        attn_implementation="eager", streams=json.dumps({"self": {"layers": 2, "heads": 1, "hidden_size": DIM}}),
        manifest="synthetic.jsonl", n_examples=n, capture=json.dumps({"keep_hidden": "all"}), status="complete",
        created_at=datetime(2025, 1, 1, tzinfo=timezone.utc), software_version="0.1.0"))
    ex, tok, vecs = [], [], {}
    means = 3.0 * np.eye(len(COLORS), DIM)  # [class, dim]
    for i in range(n):
        color = COLORS[i % 3]
        meta = {"color": color, "size": float(i % 7), "const": "same", "rare": "a" if i < 3 else "b"}
        if i == n - 1:
            meta.pop("color")  # a missing value: the example takes no part
        box = _box(i)
        ex.append(dict(example_id=i, source_id=f"s{i}", split="val", text="what color is the circle ?",
                       answer=color, prediction=color, correct=True, image_id=f"img{i}", image_width=GRID * PX,
                       image_height=GRID * PX, grid_h=GRID, grid_w=GRID, n_tokens=len(_tokens(i)),
                       boxes=json.dumps([{"label": "circle", "box": list(box)}]), meta=json.dumps(meta)))
        for t in _tokens(i):
            tok.append(t)
            for layer in LAYERS:
                v = rng.normal(size=DIM)
                if layer == SIGNAL and _in_box(t, box):
                    v = v + means[i % 3]
                vecs[(i, t["token_idx"], layer)] = v.astype(np.float16).astype(np.float32)  # stored precision
    parts = {"examples": [({}, pa.Table.from_pylist(ex, schema=EXAMPLES.schema))],
             "tokens": [({}, pa.Table.from_pylist([{k: r[k] for k in TOKENS.schema.names} for r in tok],
                                                  schema=TOKENS.schema))],
             "hidden_states": [({"stream": "self", "layer": layer}, pa.Table.from_pylist(
                 [dict(example_id=e, token_idx=k, norm=float(np.linalg.norm(v)), vec=v.tolist())
                  for (e, k, lay), v in vecs.items() if lay == layer], schema=HIDDEN_STATES.schema))
                 for layer in LAYERS]}
    w.write_chunk(0, parts)
    return vecs


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("probe") / "lake"
    return root, write_probe_lake(root)


# -- the planted signal, against a hand computation ---------------------------------------------


def _hand_permutation_test(x: np.ndarray, y: np.ndarray, groups: np.ndarray, fold: np.ndarray, permutations: int,
                           seed: int) -> tuple[float, list[float]]:
    """Accuracy of out-of-fold predictions, on the true and on permuted labels, straight from sklearn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import PredefinedSplit, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def accuracy(labels):
        model = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg", max_iter=1000))
        pred = cross_val_predict(model, x, labels, cv=PredefinedSplit(fold))
        return float(np.mean(pred == labels))

    ids = np.unique(groups)  # example_id order
    first = {e: lab for e, lab in zip(groups[::-1], y[::-1])}  # each example has one label
    per_example = np.array([first[e] for e in ids])
    rng = np.random.default_rng(seed)
    permuted = []
    for _ in range(permutations):
        lab = dict(zip(ids, per_example[rng.permutation(len(ids))]))
        permuted.append(accuracy(np.array([lab[g] for g in groups])))
    return accuracy(y), permuted


def test_planted_signal_found_at_its_layer_not_at_noise(lake):
    root, vecs = lake
    spec = ProbeSpec(target="color", selector="image-in-box", folds=4, permutations=9, seed=3)
    fits: dict = {}
    seen = []
    rows = run_probe(root, RUN, spec, progress=lambda d, t, w: seen.append((d, t, w)), fits=fits)
    assert list(rows.columns) == PROBES.schema.names
    assert sorted(rows.layer.tolist()) == list(LAYERS) and set(rows.stream) == {"self"}
    assert seen == [(k + 1, len(LAYERS), f"self layer {layer}") for k, layer in enumerate(LAYERS)]
    r = rows.set_index("layer")
    assert (rows.probe == "color image-in-box hidden").all() and (rows.metric == "accuracy").all()
    assert (rows.n == N - 1).all() and (rows.n_vectors == 2 * (N - 1)).all()  # two boxed patches each
    assert r.loc[SIGNAL, "value"] > 0.9 and r.loc[SIGNAL, "selectivity"] > 0.4 and r.loc[SIGNAL, "p_value"] == 0.1
    assert abs(r.loc[NOISE, "value"] - 1 / 3) < 0.2 and r.loc[NOISE, "p_value"] > 0.1

    for layer in (SIGNAL, NOISE):
        # the features, read from what was written (not from the lake through the module)
        keys = [(e, k) for (e, k, lay) in vecs if lay == layer and e < N - 1
                and _in_box(next(t for t in _tokens(e) if t["token_idx"] == k), _box(e))]
        keys.sort()
        x = np.stack([vecs[(e, k, layer)] for e, k in keys])  # float32, as stored
        groups = np.array([e for e, _ in keys])
        y = np.array([COLORS[e % 3] for e in groups])
        fold = fits[("self", layer, "hidden")].fold
        value, permuted = _hand_permutation_test(x, y, groups, fold, spec.permutations, spec.seed)
        p = (1 + sum(m >= value for m in permuted)) / (1 + spec.permutations)
        assert r.loc[layer, "value"] == pytest.approx(value, abs=1e-12)
        assert r.loc[layer, "control"] == pytest.approx(np.mean(permuted), abs=1e-12)
        assert r.loc[layer, "selectivity"] == pytest.approx(value - np.mean(permuted), abs=1e-12)
        assert r.loc[layer, "p_value"] == pytest.approx(p, abs=1e-12)
    conf = json.loads(r.loc[SIGNAL, "confusion"])
    assert conf["labels"] == sorted(COLORS)
    counts = np.array(conf["counts"])
    # rows = truth: blue (example 59 has no colour), green, red
    assert counts.sum() == 2 * (N - 1) and counts.sum(1).tolist() == [2 * 19, 2 * 20, 2 * 20]
    assert np.trace(counts) / counts.sum() == pytest.approx(r.loc[SIGNAL, "value"])


def test_grouping_keeps_every_example_in_one_fold(lake):
    root, _ = lake
    fits: dict = {}
    run_probe(root, RUN, ProbeSpec(target="color", selector="image-in-box", folds=5, permutations=1), fits=fits)
    for (stream, layer, source), fit in fits.items():
        # the samples are the boxed tokens by (example_id, token_idx): two per example
        groups = np.repeat(np.arange(N - 1), 2)
        assert len(fit.fold) == len(groups) and set(fit.fold.tolist()) == set(range(5))
        for e in range(N - 1):
            assert len(set(fit.fold[groups == e].tolist())) == 1, (layer, e)
    # a numeric target (ridge, r2) is grouped the same way
    fits.clear()
    rows = run_probe(root, RUN, ProbeSpec(target="size", selector="image-in-box", folds=3, permutations=2), fits=fits)
    assert (rows.metric == "r2").all() and rows.confusion.isna().all() and (rows.n == N).all()
    for fit in fits.values():
        groups = np.repeat(np.arange(N), 2)
        assert all(len(set(fit.fold[groups == e].tolist())) == 1 for e in range(N))


# -- a module source -----------------------------------------------------------------------------


def test_module_source_probes_the_matching_captured_modules(tmp_path):
    root = tmp_path / "lake"
    vecs = write_probe_lake(root, n=30)
    # activations of two MLPs (the signal layer's vectors in layers.1's) and a projector outside the blocks
    mods = {"enc.layers.0.mlp": (0, NOISE), "enc.layers.1.mlp": (1, SIGNAL), "proj": (None, NOISE)}
    w = LakeWriter(root, RUN)
    w.write_chunk(1, {"activations": [({"stream": "self", "module": m}, pa.Table.from_pylist(
        [dict(example_id=e, token_idx=k, layer=layer, norm=1.0, vec=v.tolist())
         for (e, k, lay), v in vecs.items() if lay == src], schema=ACTIVATIONS.schema))
        for m, (layer, src) in mods.items()]})
    rows = run_probe(root, RUN, ProbeSpec(target="color", source="enc.layers.*.mlp", folds=3, permutations=4))
    assert rows.source.tolist() == ["enc.layers.0.mlp", "enc.layers.1.mlp"] and rows.layer.tolist() == [0, 1]
    assert (rows.probe == "color image-in-box enc.layers.*.mlp").all()
    # the modules hold the hidden vectors of layers SIGNAL and NOISE: the same scores, row for row
    hidden = run_probe(root, RUN, ProbeSpec(target="color", folds=3, permutations=4)).set_index("layer")
    for col in ("value", "control", "p_value", "n_vectors"):
        assert rows[col].tolist() == [hidden.loc[NOISE, col], hidden.loc[SIGNAL, col]], col
    assert rows.value.iloc[1] > 0.8 > 0.5 > rows.value.iloc[0]
    proj = run_probe(root, RUN, ProbeSpec(target="color", source="proj", folds=3, permutations=2))
    assert proj.source.tolist() == ["proj"] and proj.layer.isna().all()
    with pytest.raises(ProbeError, match=r"matches no module stored .*: enc.layers.0.mlp, enc.layers.1.mlp, proj$"):
        run_probe(root, RUN, ProbeSpec(target="color", source="enc.layers.*"))


def test_a_stream_without_selected_tokens_is_skipped(tmp_path):
    """A text tower (a dual encoder's) has no image token for image-in-box: its stream gives no rows,
    and asked for by name it is refused in one sentence."""
    root = tmp_path / "lake"
    write_probe_lake(root, n=30)
    rng = np.random.default_rng(1)
    text = [dict(t, stream="text", token_idx=t["token_idx"] + 100) for e in range(30) for t in _tokens(e)
            if t["modality"] == "text"]
    LakeWriter(root, RUN).write_chunk(1, {
        "tokens": [({}, pa.Table.from_pylist([{k: r[k] for k in TOKENS.schema.names} for r in text],
                                             schema=TOKENS.schema))],
        "hidden_states": [({"stream": "text", "layer": 0}, pa.Table.from_pylist(
            [dict(example_id=t["example_id"], token_idx=t["token_idx"], norm=1.0,
                  vec=rng.normal(size=DIM).astype(np.float16).astype(np.float32).tolist()) for t in text],
            schema=HIDDEN_STATES.schema))]})
    rows = run_probe(root, RUN, ProbeSpec(target="color", folds=3, permutations=2))
    assert set(rows.stream) == {"self"} and len(rows) == len(LAYERS)
    last = run_probe(root, RUN, ProbeSpec(target="color", selector="last", folds=3, permutations=2))
    assert sorted(set(last.stream)) == ["self", "text"]
    with pytest.raises(ProbeError, match=r"^the image-in-box selector picks no token .* in stream 'text'"):
        run_probe(root, RUN, ProbeSpec(target="color", folds=3, permutations=2, streams=("text",)))


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, says", [
    (ProbeSpec(target="colour"), "has no target column 'colour': use one of answer, color, const, rare, size"),
    (ProbeSpec(target="const"), "has one value ('same') among the 60 examples"),
    (ProbeSpec(target="rare", folds=5), "too few examples for 5 folds: class 'a' of target 'rare'"),
    (ProbeSpec(target="color", folds=100), "too few examples for 100 folds"),
    (ProbeSpec(target="color", selector="nouns"), "unknown token selector 'nouns'"),
    (ProbeSpec(target="color", source="vilt.encoder.layer.*.output"), "stores no module activations"),
    (ProbeSpec(target="color", streams=("vision",)), "has no stored vectors of stream(s) vision"),
])
def test_bad_probes_refused_with_one_line(lake, spec, says):
    root, _ = lake
    with pytest.raises(ProbeError) as e:
        run_probe(root, RUN, spec)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_cli_refusals_one_stderr_line(lake, capsys):
    from pipeline.cli import main

    root, _ = lake
    for args, says in [(["--target", "nope"], "no target column 'nope'"),
                       (["--target", "const"], "has one value"),
                       (["--target", "rare", "--folds", "5"], "too few examples for 5 folds")]:
        code = main(["probe", "--lake", str(root), "--run", RUN, "--quiet", *args])
        err = capsys.readouterr().err
        assert code != 0 and err.startswith("vlatlas: error: ") and says in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    # a real process, as a user runs it
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "probe", "--lake", str(root), "--run", RUN,
                        "--target", "colour"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "no target column 'colour'" in p.stderr


def test_run_without_vectors_refused(tmp_path):
    import pyarrow.parquet as pq

    root = tmp_path / "lake"
    write_probe_lake(root, n=6)
    for f in (root / "hidden_states").rglob("*.parquet"):  # norms only, as --keep-hidden none stores them
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("vec"), "vec", pa.nulls(t.num_rows, t.schema.field("vec").type))
        pq.write_table(t, f)
    with pytest.raises(ProbeError, match="stores no hidden vectors to probe .*--keep-hidden"):
        run_probe(root, RUN, ProbeSpec(target="color"))


# -- selectors ----------------------------------------------------------------------------------


def _token_table() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two examples' tokens, in a shuffled order, with known boxes; and a third example without a box."""
    rows = []

    def add(e, idx, modality, role, token=None, seq=None, box=None):
        x0, y0, x1, y1 = box or (None,) * 4
        rows.append(dict(example_id=e, token_idx=idx, modality=modality, role=role, token=token,
                         seq_pos=idx if seq is None else seq, x0=x0, y0=y0, x1=x1, y1=y1))

    for e in (0, 1, 2):
        add(e, 0, "text", "bos", "<s>")
        add(e, 1, "text", "word", "▁Is")
        add(e, 2, "text", "word", "▁the" if e != 1 else "the")
        add(e, 3, "text", "word", "▁red" if e == 0 else "##squ")
        add(e, 4, "text", "word", "▁Cube" if e == 0 else "Ġsquare")  # example 0's word: "cube"
        add(e, 5, "text", "word", "?")
        add(e, 6, "image", "image_cls")
        for k, (x, y) in enumerate([(0, 0), (10, 0), (0, 10), (10, 10)]):  # 2 x 2 patches of 10 px
            add(e, 7 + k, "image", "patch", box=(x, y, x + 10, y + 10))
        add(e, 11, "text", "word", "cube", seq=20)  # after the image in the sequence: not the last-but-one
        add(e, 12, "text", "pad", "[PAD]", seq=21)
        add(e, 13, "text", "generated", "cube", seq=22)
    tokens = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)
    examples = pd.DataFrame({"example_id": [0, 1, 2], "boxes": [
        json.dumps([{"label": "Cube", "box": [0, 0, 20, 10]}, {"label": "square", "box": [0, 0, 20, 20]}]),
        json.dumps([{"label": "square thing", "box": [8, 8, 16, 16]}]),
        None]})
    return tokens, examples


def test_each_selector_picks_the_right_tokens():
    tokens, examples = _token_table()

    def pick(selector):
        d = select_tokens(tokens, examples, selector)
        assert list(d.columns) == ["example_id", "token_idx"]
        return list(zip(d.example_id.tolist(), d.token_idx.tolist()))

    # patch centres (5,5) (15,5) (5,15) (15,15): the first box of 0 holds the top row (edges count);
    # 1's box [8,16] x [8,16] holds only (15,15); 2 has no box
    assert pick("image-in-box") == [(0, 7), (0, 8), (1, 10)]
    # the first box's label's first word: 0 "cube" (token 4, '▁Cube'), 1 "square" (token 4, 'Ġsquare', not '##squ');
    # never a generated token
    assert pick("word") == [(0, 4), (1, 4)]
    # the last prompt text token (by sequence position), not pad nor generated; every example
    assert pick("last") == [(0, 11), (1, 11), (2, 11)]
    # every image token of every example
    assert pick("mean-image") == [(e, k) for e in (0, 1, 2) for k in range(6, 11)]
    assert SELECTORS == ("image-in-box", "word", "last", "mean-image")


def test_mean_image_and_word_probe_through_the_lake(lake):
    root, vecs = lake
    fits: dict = {}
    rows = run_probe(root, RUN, ProbeSpec(target="color", selector="mean-image", folds=3, permutations=2), fits=fits)
    assert (rows.n == N - 1).all() and (rows.n_vectors == N - 1).all()  # one mean per example
    words = run_probe(root, RUN, ProbeSpec(target="color", selector="word", folds=3, permutations=2))
    assert (words.n_vectors == N - 1).all()  # 'Ġcircle' names the box "circle"
    last = run_probe(root, RUN, ProbeSpec(target="color", selector="last", folds=3, permutations=2))
    assert (last.n_vectors == N - 1).all()


# -- the probes table ---------------------------------------------------------------------------


def test_rows_in_the_probes_table_and_rerun_replaces(tmp_path):
    root = tmp_path / "lake"
    write_probe_lake(root, n=30)
    cat = Catalog(root)
    try:
        assert cat.df("SELECT count(*) AS n FROM probes")["n"].item() == 0
        assert probe_targets(root, RUN) == ["answer", "color", "rare", "size"]
        spec = ProbeSpec(target="color", folds=3, permutations=4)
        rows = run_probe(cat, RUN, spec)
        path = write_probes(root, RUN, rows)
        assert path.endswith(f"probes/run={RUN}/{probe_file(spec.key)}")
        got = cat.df("SELECT * FROM probes ORDER BY layer")  # the same catalog notices the new file
        assert got.run.unique().tolist() == [RUN] and got.layer.tolist() == list(LAYERS)
        assert got.value.tolist() == rows.sort_values("layer").value.tolist()
        assert (got.permutations == 4).all() and (got.folds == 3).all() and (got.probe == spec.key).all()

        other = ProbeSpec(target="size", folds=3, permutations=2)  # another key: its own file, beside
        write_probes(cat, RUN, run_probe(cat, RUN, other))
        again = ProbeSpec(target="color", folds=3, permutations=6, seed=1)  # same key: replaces
        write_probes(root, RUN, run_probe(root, RUN, again))
        got = cat.df("SELECT probe, permutations, count(*) AS n FROM probes GROUP BY ALL ORDER BY probe")
        assert got.to_dict("records") == [
            {"probe": "color image-in-box hidden", "permutations": 6, "n": 3},
            {"probe": "size image-in-box hidden", "permutations": 2, "n": 3}]
        assert len(list((root / "probes").rglob("*.parquet"))) == 2
    finally:
        cat.close()
