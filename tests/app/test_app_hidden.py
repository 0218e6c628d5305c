"""The Hidden states page under AppTest, on a lake built by the real pipeline: a tiny random ViLT
(tests/tiny.py) over a small manifest, ``pipeline.extraction.run.extract``, then ``pipeline.embed.embed``
with a small sample.

Charts are found by their Vega-Lite ``description``; expected values are computed here in numpy
from the lake's Parquet files (read with pyarrow), never through ``lake/queries.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.app.test_app import chart, chart_data, open_app, read_table, select_on_chart, texts

PAGE = "app_pages/hidden_states.py"
RUN, N_EX, SAMPLE = "tiny", 8, 100


@pytest.fixture(scope="module")
def lake(tiny_vilt, tmp_path_factory):
    """Runs ``tiny`` (8 examples, maps of hidden-state layers 0..2), ``nomaps`` (3 examples, no
    maps) and ``nohidden`` (2 examples extracted with --keep-hidden none)."""
    from pipeline.embed import TSNEConfig, embed
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest

    root = tmp_path_factory.mktemp("hidden") / "lake"
    manifest = make_manifest(root.parent / "data", n=N_EX)
    opts = dict(batch_size=4, keep_attention="none", progress=False)
    extract(str(tiny_vilt), manifest, root, RUN, **opts)
    extract(str(tiny_vilt), manifest, root, "nomaps", limit=3, **opts)
    extract(str(tiny_vilt), manifest, root, "nohidden", limit=2, keep_hidden="none", **opts)
    embed(root, RUN, n_tokens=SAMPLE, seed=0, progress=False,
          config=TSNEConfig(early_exaggeration_iter=100, n_iter=150, n_iter_aligned=120))
    return root


def hidden(root, run: str = RUN, **eq) -> pd.DataFrame:
    """hidden_states rows with the tokens' modality and role, vec as float64 arrays."""
    h = read_table(root, "hidden_states", run=run, **eq)
    t = read_table(root, "tokens", run=run)[["example_id", "token_idx", "modality", "role"]]
    h = h.merge(t, on=["example_id", "token_idx"], how="left")
    h["v"] = [np.asarray(v, dtype=np.float64) for v in h.vec]
    return h


def points(at) -> pd.DataFrame:
    return chart_data(at, "hidden-map", "group")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- the map --------------------------------------------------------------------------------------
def test_map_shows_the_chosen_layer(lake, monkeypatch):
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=1, hlayer=1)
    emb = read_table(lake, "embeddings", run=RUN)
    assert sorted(emb.layer.unique()) == [0, 1, 2]
    for layer in (1, 2):
        if layer == 2:
            at.select_slider(key="w_hlayer").set_value(2).run()
            assert not at.exception and at.query_params["hlayer"] == "2"
        p = points(at)
        want = emb[(emb.layer == layer) & (emb.example_id != 1)].sort_values(["example_id", "token_idx"])
        got = p[p.group == "sample"].sort_values(["example_id", "token_idx"])
        assert got[["example_id", "token_idx"]].values.tolist() == want[["example_id", "token_idx"]].values.tolist()
        np.testing.assert_allclose(got[["x", "y"]].to_numpy(float), want[["x", "y"]].to_numpy(float), rtol=1e-6)
        # example 1's tokens: every one with a hidden state, sampled ones where the lake has them
        mine = p[p.group != "sample"].set_index("token_idx")
        h = read_table(lake, "hidden_states", run=RUN, layer=layer, example_id=1)
        assert sorted(mine.index) == sorted(h.token_idx)
        stored = emb[(emb.layer == layer) & (emb.example_id == 1)].set_index("token_idx")
        assert (mine.loc[stored.index, "group"] == "this example (sampled)").all()
        np.testing.assert_allclose(mine.loc[stored.index, ["x", "y"]].to_numpy(float),
                                   stored[["x", "y"]].to_numpy(float), rtol=1e-6)
        assert mine[["x", "y"]].notna().all().all()
    # hovering a patch of the example shows its crop
    patches = p[(p.group != "sample") & (p.role == "patch")]
    assert len(patches) and patches.image.str.startswith("data:image/").all()
    assert p[p.modality == "text"].image.isna().all()


def test_url_restores_layer_colour_token(lake, monkeypatch):
    tok = read_table(lake, "tokens", run=RUN, example_id=2)
    patch = int(tok[tok.role == "patch"].token_idx.iloc[3])
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=2, hlayer=2, color="role", tok=patch, nn="sample")
    ss = at.session_state
    assert (ss["ex"], ss["hlayer"], ss["color"], ss["tok"], ss["nn"]) == (2, 2, "role", patch, "sample")
    assert at.select_slider(key="w_hlayer").value == 2
    assert at.selectbox(key="w_color").value == "role"
    assert at.selectbox(key="w_tok").value == patch
    assert {k: at.query_params[k] for k in ("ex", "hlayer", "color", "tok", "nn")} == {
        "ex": "2", "hlayer": "2", "color": "role", "tok": str(patch), "nn": "sample"}
    spec, _ = chart(at, "hidden-map")
    assert spec["layer"][0]["encoding"]["color"]["title"] == "role"
    p = points(at)
    assert set(p.color) <= set(tok.role) | set(read_table(lake, "tokens", run=RUN).role)
    # the selected token's path: one point per layer, the current one where the map shows the token
    path = chart_data(at, "hidden-map", "tag").sort_values("layer")
    assert path.layer.tolist() == [0, 1, 2]
    here = p[(p.example_id == 2) & (p.token_idx == patch)]
    np.testing.assert_allclose(path[path.layer == 2][["x", "y"]].to_numpy(float), here[["x", "y"]].to_numpy(float))


def test_click_on_the_map_selects_a_token(lake, monkeypatch):
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=0)
    emb = read_table(lake, "embeddings", run=RUN)
    e, t = emb[(emb.layer == 0) & (emb.example_id == 5)][["example_id", "token_idx"]].iloc[0]
    select_on_chart(at, "hmap_chart", {"tok": [{"example_id": int(e), "token_idx": int(t)}]})
    assert at.session_state["ex"] == 5 and at.session_state["tok"] == int(t)
    assert at.query_params["ex"] == "5" and at.query_params["tok"] == str(int(t))
    assert at.sidebar.selectbox(key="w_ex").value == 5


# -- nearest neighbours of the other modality, in the hidden space -----------------------------------
@pytest.mark.parametrize("scope", ["example", "sample"])
def test_nearest_neighbours_equal_brute_force(lake, monkeypatch, scope):
    ex, layer = 3, 1
    tok = read_table(lake, "tokens", run=RUN, example_id=ex)
    word = int(tok[(tok.role == "word") & (tok.token == "circle")].token_idx.iloc[0])
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=ex, hlayer=layer, tok=word, nn=scope)
    h = hidden(lake, layer=layer)
    q = h[(h.example_id == ex) & (h.token_idx == word)].v.iloc[0]
    if scope == "example":
        cands = h[h.example_id == ex]
    else:
        emb = read_table(lake, "embeddings", run=RUN, layer=layer)
        cands = h.merge(emb[["example_id", "token_idx"]], on=["example_id", "token_idx"])
    cands = cands[(cands.modality == "image") & ~((cands.example_id == ex) & (cands.token_idx == word))]
    cos = np.array([cosine(v, q) for v in cands.v])
    order = np.lexsort((cands.token_idx.to_numpy(), cands.example_id.to_numpy(), -cos))[:10]
    table = at.dataframe[0].value
    want = cands.iloc[order][["example_id", "token_idx"]].values.tolist()
    assert table[["example_id", "token_idx"]].values.tolist() == want
    np.testing.assert_allclose(table.cosine.to_numpy(float), cos[order], atol=1e-6)
    assert table["rank"].tolist() == list(range(1, len(order) + 1))


# -- per-layer norms and text-image similarity ----------------------------------------------------------
def test_norm_and_cosine_charts_equal_numpy(lake, monkeypatch):
    ex = 4
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=ex)
    h = hidden(lake)
    h["n"] = [np.linalg.norm(v) for v in h.v]
    norms = chart_data(at, "hidden-norms", "norm")
    for scope, rows in ((f"example #{ex}", h[h.example_id == ex]), ("all examples", h)):
        want = rows.groupby(["layer", "modality"]).n.mean()
        got = norms[norms.scope == scope].set_index(["layer", "modality"]).norm.sort_index()
        assert got.index.tolist() == want.index.tolist()
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=2e-3)  # norms of float16 vectors

    def mean_cos(g: pd.DataFrame) -> float:
        t, i = np.stack(g[g.modality == "text"].v), np.stack(g[g.modality == "image"].v)
        t, i = t / np.linalg.norm(t, axis=1, keepdims=True), i / np.linalg.norm(i, axis=1, keepdims=True)
        return float((t @ i.T).mean())

    cos = chart_data(at, "text-image-cosine", "cosine")
    per = h.groupby(["example_id", "layer"]).apply(mean_cos, include_groups=False).rename("c").reset_index()
    mine = cos[cos.scope == f"example #{ex}"].sort_values("layer")
    np.testing.assert_allclose(mine.cosine.to_numpy(), per[per.example_id == ex].sort_values("layer").c, atol=1e-5)
    every = cos[cos.scope != f"example #{ex}"].sort_values("layer")
    np.testing.assert_allclose(every.cosine.to_numpy(), per.groupby("layer").c.mean().to_numpy(), atol=1e-5)
    assert f"mean of {N_EX} examples" in every.scope.iloc[0]


# -- runs without maps, without hidden states -----------------------------------------------------------
def test_run_without_maps_shows_the_command(lake, monkeypatch):
    at = open_app(lake, monkeypatch, page=PAGE, run="nomaps")
    assert "no maps" in texts(at)
    assert any(f"vlatlas embed --lake {lake}" in c.value and "--run nomaps" in c.value for c in at.code)
    assert not [e for e in at.get("vega_lite_chart") if json.loads(e.proto.spec).get("description") == "hidden-map"]
    chart(at, "hidden-norms")  # the norms and similarities need no map
    chart(at, "text-image-cosine")
    assert len(at.dataframe[0].value) > 0  # neighbours within the example need no map either


def test_run_without_hidden_states(lake, monkeypatch):
    at = open_app(lake, monkeypatch, page=PAGE, run="nohidden")
    assert "stores no hidden states" in texts(at) and "--keep-hidden none" in texts(at)


def test_norm_chart_draws_the_example_solid_as_its_caption_says(lake, monkeypatch):
    """The caption says the selected example is solid and all examples dashed: the dash scale must say
    so too, whatever the labels' alphabetical order ("all examples" sorts before "example #4")."""
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=4)
    spec, _ = chart(at, "hidden-norms")
    dash = next(l["encoding"]["strokeDash"] for l in spec["layer"] if "strokeDash" in l.get("encoding", {}))
    assert dash["scale"]["domain"][:2] == ["example #4", "all examples"]
    assert dash["scale"]["range"][0] == [1, 0] and dash["scale"]["range"][1] != [1, 0]
    assert any("(solid)" in str(c.value) and "(dashed" in str(c.value) for c in at.caption)


def test_changing_the_example_keeps_the_word_not_the_index(lake, monkeypatch):
    """A token index names another token in another example: the page keeps the selected word (or
    starts from the new example's first word), never silently swaps "circle" for "triangle"."""
    toks = read_table(lake, "tokens")
    words = toks[toks.role == "word"]
    # a word of example 4 that example 5 also has, at another index
    pairs = words[words.example_id == 4].merge(words[words.example_id == 5], on="token", suffixes=("_a", "_b"))
    pairs = pairs[pairs.token_idx_a != pairs.token_idx_b]
    if pairs.empty:  # then any shared word at all
        pairs = words[words.example_id == 4].merge(words[words.example_id == 5], on="token", suffixes=("_a", "_b"))
    word = pairs.iloc[0]
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=4, tok=int(word.token_idx_a))
    at.sidebar.selectbox(key="w_ex").set_value(5).run()
    assert not at.exception
    assert at.session_state["tok"] == int(word.token_idx_b)


def test_nearest_neighbours_can_leave_special_tokens_out(lake, monkeypatch):
    ex, layer = 3, 1
    tok = read_table(lake, "tokens", run=RUN, example_id=ex)
    word = int(tok[(tok.role == "word") & (tok.token == "circle")].token_idx.iloc[0])
    at = open_app(lake, monkeypatch, page=PAGE, run=RUN, ex=ex, hlayer=layer, tok=word, nn="example",
                  nospecial="true")
    table = at.dataframe[0].value
    h = hidden(lake, layer=layer)
    cands = h[(h.example_id == ex) & (h.modality == "image") & (h.role == "patch")]
    q = h[(h.example_id == ex) & (h.token_idx == word)].v.iloc[0]
    cos = np.array([cosine(v, q) for v in cands.v])
    order = np.lexsort((cands.token_idx.to_numpy(), -cos))[:10]
    assert table.token_idx.tolist() == cands.iloc[order].token_idx.tolist()
    assert "image_cls" not in set(table.role)
