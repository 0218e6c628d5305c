"""``pipeline/embed.py`` and ``vlatlas embed``: seeded, stratified samples; aligned, reproducible
t-SNE maps written to ``embeddings``; placing new tokens on a finished map; one-line errors.

The lake here is the synthetic one (tests/lakegen.py) with its hidden states replaced by
vectors that have structure (clusters by word, by patch column, by special token) and drift
slowly from layer to layer, so that a map has something to show and adjacent layers are alike.
Expected values are computed here from what was written, never through ``lake/queries.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lake.schema import HIDDEN_STATES, TOKENS
from lake.writer import LakeWriter, write_parquet_atomic
from pipeline.cli import main
from pipeline.embed import EmbedError, TSNEConfig, embed, fit_info, place, sample_tokens
from tests.lakegen import make_synthetic_lake

FAST = TSNEConfig(early_exaggeration_iter=100, n_iter=150, n_iter_aligned=120)  # small maps, quick fits
RUN, N_EX, N_LAYERS, DIM, SAMPLE = "st", 24, 3, 16, 200  # hidden-state layers 0..3


def _read(root: Path, table: str, **eq) -> pd.DataFrame:
    import pyarrow.dataset as ds

    d = ds.dataset(Path(root) / table, format="parquet", partitioning="hive")
    expr = None
    for k, v in eq.items():
        e = ds.field(k) == v
        expr = e if expr is None else expr & e
    return d.to_table(filter=expr).to_pandas()


def structured_hidden(tokens: pd.DataFrame, n_layers: int, dim: int, seed: int = 0) -> dict[int, np.ndarray]:
    """``{layer: [token row, dim]}`` for the rows of ``tokens``: a cluster centre (by word, patch
    column or special role) plus noise at layer 0, then a small random step per layer."""
    rng = np.random.default_rng(seed)
    keys = [f"w:{t}" if r == "word" else f"c:{int(c)}" if r == "patch" else f"r:{r}"
            for t, r, c in zip(tokens.token, tokens.role, tokens.patch_col.fillna(-1))]
    centres = {k: 2.0 * rng.normal(size=dim) for k in sorted(set(keys))}
    h = np.stack([centres[k] for k in keys]) + 0.6 * rng.normal(size=(len(keys), dim))  # [token, dim]
    out = {0: h}
    for layer in range(1, n_layers + 1):
        h = h + 0.3 * rng.normal(size=h.shape)
        out[layer] = h
    return out


def write_hidden(root: Path, run: str, tokens: pd.DataFrame, vecs: dict[int, np.ndarray], name: str) -> None:
    """Write hidden-state rows of ``tokens`` (one file per layer, named ``name``)."""
    for layer, h in vecs.items():
        h32 = h.astype(np.float32)
        rows = pa.table({
            "example_id": pa.array(tokens.example_id.to_numpy(np.int64)),
            "token_idx": pa.array(tokens.token_idx.to_numpy(np.int32)),
            "norm": pa.array(np.linalg.norm(h32, axis=1).astype(np.float32)),
            "vec": pa.array([v.astype(np.float16).astype(np.float32) for v in h32], pa.list_(pa.float32())),
        }, schema=HIDDEN_STATES.schema)
        write_parquet_atomic(root / "hidden_states" / f"run={run}" / "stream=self" / f"layer={layer}" / name, rows)


def make_structured_lake(root: Path, run: str = RUN) -> tuple[Path, pd.DataFrame, dict[int, np.ndarray]]:
    lake = make_synthetic_lake(root, run, n_examples=N_EX, n_layers=N_LAYERS, hidden_size=DIM, chunk_size=12)
    shutil.rmtree(root / "hidden_states" / f"run={run}")
    tok = lake.tokens.sort_values(["example_id", "token_idx"]).reset_index(drop=True)
    vecs = structured_hidden(tok, N_LAYERS, DIM)
    write_hidden(root, run, tok, vecs, "part-000000.parquet")
    return root, tok, vecs


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """A structured lake with maps of seed 0: (root, tokens, vectors, embeddings table)."""
    root, tok, vecs = make_structured_lake(tmp_path_factory.mktemp("embed"))
    s = embed(root, RUN, n_tokens=SAMPLE, seed=0, progress=False, config=FAST)
    assert s.streams["self"]["n_tokens"] == SAMPLE
    return root, tok, vecs, _read(root, "embeddings", run=RUN)


def normalised(xy: np.ndarray) -> np.ndarray:
    """A map centred and scaled to unit RMS radius (t-SNE's scale is arbitrary)."""
    xy = xy - xy.mean(0)
    return xy / np.sqrt((xy ** 2).sum(1).mean())


def layer_xy(emb: pd.DataFrame, layer: int) -> np.ndarray:
    m = emb[emb.layer == layer].sort_values(["example_id", "token_idx"])
    return m[["x", "y"]].to_numpy(np.float64)


# -- the sample -----------------------------------------------------------------------------------
def test_sample_is_seeded_and_stratified():
    keys = pd.DataFrame({"example_id": np.repeat(np.arange(100), 11), "token_idx": np.tile(np.arange(11), 100)})
    keys["modality"] = np.where(keys.token_idx == 0, "text", "image")  # 100 text, 1000 image tokens
    s = sample_tokens(keys, 300, seed=0)
    assert len(s) == 300 and (s.modality == "text").sum() == 100  # all of the rare modality, the rest image
    assert s.equals(sample_tokens(keys, 300, seed=0))
    assert not s.equals(sample_tokens(keys, 300, seed=1))
    assert list(s.itertuples(index=False)) == sorted(s.itertuples(index=False))  # sorted by (example, token)
    s = sample_tokens(keys, 500, seed=3)
    assert (s.modality == "text").sum() == 100 and len(s) == 500
    s = sample_tokens(keys, 120, seed=3)
    assert (s.modality == "text").sum() == 60 and (s.modality == "image").sum() == 60  # equal shares
    assert s.example_id.nunique() > 50  # drawn from all examples
    assert len(sample_tokens(keys, 5000, seed=0)) == len(keys)


# -- the maps ---------------------------------------------------------------------------------------
def test_maps_in_the_lake(mapped):
    root, tok, _, emb = mapped
    assert set(emb.columns) >= {"run", "stream", "layer", "example_id", "token_idx", "method", "x", "y"}
    assert (emb.method == "tsne").all() and (emb.stream == "self").all()
    assert sorted(emb.layer.unique()) == list(range(N_LAYERS + 1))
    keys = [set(zip(g.example_id, g.token_idx)) for _, g in emb.groupby("layer")]
    assert all(k == keys[0] for k in keys) and len(keys[0]) == SAMPLE  # one sample for every layer
    mod = tok.set_index(["example_id", "token_idx"]).modality
    sampled = mod.reindex(pd.MultiIndex.from_tuples(sorted(keys[0])))
    assert (sampled == "text").sum() >= 50 and (sampled == "image").sum() >= 50  # both modalities
    assert emb[["x", "y"]].notna().all().all()
    info = fit_info(root, RUN)
    assert info["seed"] == 0 and info["streams"]["self"]["n_tokens"] == SAMPLE
    assert info["config"]["perplexity"] == FAST.perplexity


def test_same_seed_same_maps_other_seed_other_maps(mapped, tmp_path):
    root, _, _, emb0 = mapped
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    embed(copy, RUN, n_tokens=SAMPLE, seed=0, progress=False, config=FAST)
    again = _read(copy, "embeddings", run=RUN)
    key = ["layer", "example_id", "token_idx"]
    a, b = emb0.sort_values(key).reset_index(drop=True), again.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key])
    np.testing.assert_array_equal(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())  # identical, not close
    embed(copy, RUN, n_tokens=SAMPLE, seed=1, progress=False, config=FAST)
    other = _read(copy, "embeddings", run=RUN)
    assert len(other) == len(emb0)  # replaced, not appended
    assert set(zip(other.example_id, other.token_idx)) != set(zip(emb0.example_id, emb0.token_idx))


def test_adjacent_layers_are_aligned(mapped):
    """A token's median displacement between adjacent layers (maps normalised to unit RMS radius)
    is far below that of maps fitted independently per layer (openTSNE from random starts)."""
    from openTSNE import TSNE

    _, tok, vecs, emb = mapped
    sample = emb[emb.layer == 0].sort_values(["example_id", "token_idx"])
    row = pd.Series(np.arange(len(tok)), index=pd.MultiIndex.from_frame(tok[["example_id", "token_idx"]]))
    rows = row.reindex(pd.MultiIndex.from_frame(sample[["example_id", "token_idx"]])).to_numpy()
    aligned, independent = [], []
    prev_a = prev_i = None
    for layer in range(N_LAYERS + 1):
        a = normalised(layer_xy(emb, layer))
        x = vecs[layer][rows].astype(np.float16).astype(np.float32)  # as stored
        i = normalised(np.asarray(TSNE(perplexity=FAST.perplexity, metric="cosine", initialization="random",
                                       random_state=100 + layer, n_iter=FAST.n_iter, n_jobs=1).fit(x)))
        if prev_a is not None:
            aligned.append(np.median(np.linalg.norm(a - prev_a, axis=1)))
            independent.append(np.median(np.linalg.norm(i - prev_i, axis=1)))
        prev_a, prev_i = a, i
    assert np.median(aligned) < 0.5 * np.median(independent), (aligned, independent)


# -- placing new tokens -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_new_example(mapped, tmp_path_factory):
    """A copy of the mapped lake where example 99, written after the maps were fitted, is an exact
    copy of example 0 (tokens and hidden states): none of its tokens is in any map's sample."""
    root, tok, vecs, emb = mapped
    copy = tmp_path_factory.mktemp("placed") / "lake"
    shutil.copytree(root, copy)
    ex0 = tok[tok.example_id == 0]
    new = ex0.assign(example_id=99)
    write_parquet_atomic(copy / "tokens" / f"run={RUN}" / "part-new.parquet",
                         pa.Table.from_pandas(new[[f.name for f in TOKENS.schema]], schema=TOKENS.schema,
                                              preserve_index=False))
    write_hidden(copy, RUN, new, {layer: v[ex0.index.to_numpy()] for layer, v in vecs.items()}, "part-new.parquet")
    return copy, ex0, emb


def test_place_puts_new_tokens_next_to_their_identical_twins(with_new_example):
    copy, ex0, emb = with_new_example
    n_near = 0
    for layer in range(N_LAYERS + 1):
        p = place(copy, RUN, "self", layer, [99])
        assert sorted(p.token_idx) == sorted(ex0.token_idx) and p.placed.all()
        m = emb[emb.layer == layer]
        xy = m[["x", "y"]].to_numpy(np.float64)
        rms = np.sqrt(((xy - xy.mean(0)) ** 2).sum(1).mean())
        lo, hi = xy.min(0) - 0.25 * rms, xy.max(0) + 0.25 * rms
        assert ((p[["x", "y"]].to_numpy() >= lo) & (p[["x", "y"]].to_numpy() <= hi)).all()  # on the map
        twins = m[m.example_id == 0].set_index("token_idx")
        assert len(twins), "example 0 should have sampled tokens"
        got = p.set_index("token_idx").loc[twins.index]
        d = np.hypot(got.x - twins.x, got.y - twins.y)
        # a random pair of sampled tokens is ~1.4 rms apart; a placed twin lands next to its original
        assert np.median(d) < 0.1 * rms, (layer, d.tolist(), rms)
        n_near += int((d < 0.2 * rms).sum())
    assert n_near >= 0.9 * len(emb[emb.example_id == 0])


def test_place_keeps_sampled_tokens_where_they_are(mapped):
    root, tok, _, emb = mapped
    m = emb[emb.layer == 2]
    ex = int(m.example_id.value_counts().index[0])  # an example with sampled tokens (and unsampled ones)
    p = place(root, RUN, "self", 2, [ex])
    assert sorted(p.token_idx) == sorted(tok[tok.example_id == ex].token_idx)
    stored = m[m.example_id == ex].set_index("token_idx")
    kept = p[~p.placed].set_index("token_idx")
    assert sorted(kept.index) == sorted(stored.index) and p.placed.any()
    np.testing.assert_allclose(kept.loc[stored.index, ["x", "y"]].to_numpy(), stored[["x", "y"]].to_numpy())
    assert p[p.placed][["x", "y"]].notna().all().all()


# -- the lake's bookkeeping -----------------------------------------------------------------------------
def test_resume_keeps_maps_and_delete_run_removes_them(mapped, tmp_path):
    root, *_ = mapped
    copy = tmp_path / "lake"
    shutil.copytree(root, copy)
    maps = copy / "embeddings" / f"run={RUN}" / "part-tsne.parquet"
    assert maps.exists()
    w = LakeWriter(copy, RUN)
    assert w.purge_incomplete() == 0  # a resumed extraction does not take the maps for a leftover
    assert maps.exists()
    w.delete_run()  # --overwrite
    assert not (copy / "embeddings" / f"run={RUN}").exists()


# -- the command ----------------------------------------------------------------------------------------
def test_cli_embed(mapped, tmp_path, capsys):
    root, *_ = mapped
    copy = tmp_path / "lake"
    shutil.copytree(root, copy)
    rc = main(["embed", "--lake", str(copy), "--run", RUN, "--sample", "60", "--seed", "3", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith(f"mapped run '{RUN}'") and "60 tokens" in out and "4 layers" in out
    emb = _read(copy, "embeddings", run=RUN)
    assert len(emb) == 60 * (N_LAYERS + 1)
    assert fit_info(copy, RUN)["seed"] == 3
    # --place: the examples' tokens on every layer's map, as CSV
    rc = main(["embed", "--lake", str(copy), "--run", RUN, "--place", "0,5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    import io

    placed = pd.read_csv(io.StringIO(out))
    assert list(placed.columns) == ["stream", "layer", "example_id", "token_idx", "x", "y", "placed"]
    tok = _read(copy, "tokens", run=RUN)
    n = int(tok.example_id.isin([0, 5]).sum())
    assert len(placed) == n * (N_LAYERS + 1) and placed[["x", "y"]].notna().all().all()
    stored = placed[~placed.placed].merge(emb, on=["layer", "example_id", "token_idx"], suffixes=("", "_lake"))
    assert len(stored) == (~placed.placed).sum()
    np.testing.assert_allclose(stored[["x", "y"]].to_numpy(), stored[["x_lake", "y_lake"]].to_numpy(), rtol=1e-6)


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and "torchvision" not in ln]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("vlatlas: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_errors(mapped, capsys, tmp_path):
    root, *_ = mapped
    msg = _one_line_error(capsys, ["embed", "--lake", str(root), "--run", "nope", "--quiet"])
    assert "'nope' is not in the lake" in msg and RUN in msg
    msg = _one_line_error(capsys, ["embed", "--lake", str(tmp_path / "nolake"), "--run", RUN, "--quiet"])
    assert "not a VL-Atlas lake" in msg
    msg = _one_line_error(capsys, ["embed", "--lake", str(root), "--run", RUN, "--sample", "2", "--quiet"])
    assert "--sample" in msg
    msg = _one_line_error(capsys, ["embed", "--lake", str(root), "--run", RUN, "--place", "0,9999"])
    assert "no example(s) 9999" in msg
    msg = _one_line_error(capsys, ["embed", "--lake", str(root), "--run", RUN, "--place", "zero"])
    assert "--place" in msg


def test_run_without_hidden_states(tiny_vilt, tmp_path, capsys):
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest

    manifest = make_manifest(tmp_path / "data", n=2)
    extract(str(tiny_vilt), manifest, tmp_path / "lake", "slim", keep_attention="none", keep_hidden="none",
            progress=False)
    msg = _one_line_error(capsys, ["embed", "--lake", str(tmp_path / "lake"), "--run", "slim", "--quiet"])
    assert "no hidden states" in msg and "--keep-hidden none" in msg
    with pytest.raises(EmbedError, match="no t-SNE map"):
        place(tmp_path / "lake", "slim", "self", 0, [0])
