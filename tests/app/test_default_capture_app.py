"""The default, bounded capture end to end: ``vlatlas embed`` and every app page on a lake built by
the real pipeline with the default ``keep_attention`` (``budget:8:0.9:2``: pruned weights) and
``keep_hidden="sample:2"`` (norms of every token, vectors of 2 of the 5 examples).

Expected values are computed here straight from the lake's Parquet files (pyarrow, or DuckDB SQL
over ``read_parquet``), never through ``lake/queries.py`` or the app's code.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pytest

from tests.app.test_app import chart, chart_data, open_app, read_table, texts

RUN, NOVEC, N_EX, N_VEC = "dflt", "novec", 5, 2
HIDDEN, ATTENTION = "app_pages/hidden_states.py", "app_pages/attention.py"
PAGES = [None, "app_pages/head_summary.py", ATTENTION, HIDDEN, "app_pages/compare.py", "app_pages/sql.py"]


@pytest.fixture(scope="module")
def lake(tiny_vilt, tmp_path_factory):
    """Run ``dflt``: 5 examples, default attention pruning, vectors of 2 examples, t-SNE maps;
    run ``novec``: 2 examples extracted with ``keep_hidden="sample:0"`` (norms only, no maps)."""
    from pipeline.embed import TSNEConfig, embed
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest

    root = tmp_path_factory.mktemp("default_capture") / "lake"
    manifest = make_manifest(root.parent / "data", n=N_EX)
    extract(str(tiny_vilt), manifest, root, RUN, batch_size=3, keep_hidden="sample:2", progress=False)
    extract(str(tiny_vilt), manifest, root, NOVEC, batch_size=3, keep_hidden="sample:0", limit=2, progress=False)
    embed(root, RUN, n_tokens=40, seed=0, progress=False,
          config=TSNEConfig(early_exaggeration_iter=60, n_iter=80, n_iter_aligned=60))
    return root


def sql(root, query: str, params=None) -> pd.DataFrame:
    """DuckDB SQL over the lake's Parquet files, not the app's views: ``{attention}`` in ``query``
    stands for the files of table ``attention`` (any table likewise)."""
    tables = {t: f"read_parquet('{root}/{t}/**/*.parquet', hive_partitioning = true)"
              for t in ("attention", "head_stats")}
    con = duckdb.connect()
    try:
        return con.execute(query.format(**tables), params or []).df()
    finally:
        con.close()


@pytest.fixture(scope="module")
def vector_ids(lake) -> list[int]:
    """The examples of run ``dflt`` whose hidden vectors are stored, from the Parquet files."""
    h = read_table(lake, "hidden_states", run=RUN)
    return sorted(int(i) for i in h[h.vec.notna()].example_id.unique())


@pytest.fixture(scope="module")
def no_vector_id(lake, vector_ids) -> int:
    ids = sorted(int(i) for i in read_table(lake, "examples", run=RUN).example_id)
    return next(i for i in ids if i not in vector_ids)


# -- the lake, as the default capture writes it ---------------------------------------------------
def test_lake_has_norms_for_all_vectors_for_a_sample(lake, vector_ids):
    h = read_table(lake, "hidden_states", run=RUN)
    assert h.example_id.nunique() == N_EX and h.norm.notna().all()
    assert len(vector_ids) == N_VEC
    assert json.loads(read_table(lake, "runs").set_index("run").capture[RUN])["keep_attention"] != "all"


# -- vlatlas embed -----------------------------------------------------------------------------------
def test_embed_samples_only_tokens_with_vectors(lake, vector_ids):
    emb = read_table(lake, "embeddings", run=RUN)
    assert len(emb) and set(emb.example_id.astype(int)) <= set(vector_ids)
    assert set(emb.example_id.astype(int)) == set(vector_ids)  # 40 tokens of 2 examples: both are drawn from
    h = read_table(lake, "hidden_states", run=RUN)
    with_vec = set(zip(h[h.vec.notna()].layer, h[h.vec.notna()].example_id, h[h.vec.notna()].token_idx))
    assert all((int(l), int(e), int(t)) in with_vec for l, e, t in zip(emb.layer, emb.example_id, emb.token_idx))
    n_layers = h.layer.nunique()
    assert emb.groupby("layer").size().tolist() == [40] * n_layers


def test_embed_of_a_run_without_vectors_is_a_clear_error(lake, capsys):
    from pipeline.embed import EmbedError, embed
    from tests.pipeline.test_embed import _one_line_error

    with pytest.raises(EmbedError, match="no hidden vectors") as e:
        embed(lake, NOVEC, progress=False)
    assert "sample:0" in str(e.value) and "\n" not in str(e.value)
    msg = _one_line_error(capsys, ["embed", "--lake", str(lake), "--run", NOVEC, "--quiet"])
    assert "no hidden vectors" in msg


def test_place_an_example_without_vectors_is_a_clear_error(lake, vector_ids, no_vector_id, capsys):
    from pipeline.embed import EmbedError, place
    from tests.pipeline.test_embed import _one_line_error

    with pytest.raises(EmbedError) as e:
        place(lake, RUN, "self", 1, [no_vector_id])
    msg = str(e.value)
    assert f"example(s) {no_vector_id}" in msg and all(str(i) in msg for i in vector_ids)
    msg = _one_line_error(capsys, ["embed", "--lake", str(lake), "--run", RUN, "--place", str(no_vector_id)])
    assert "no hidden vectors" in msg
    p = place(lake, RUN, "self", 1, [vector_ids[0]])  # an example with vectors is placed as before
    n_tok = len(read_table(lake, "hidden_states", run=RUN, layer=1, example_id=vector_ids[0]))
    assert len(p) == n_tok and p[["x", "y"]].notna().all().all()


# -- every page -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_and_without_vectors(lake, monkeypatch, vector_ids, no_vector_id, page):
    for ex in (no_vector_id, vector_ids[0]):
        params = {"a_correct": "true", "b_correct": "false"} if page and "compare" in page else {}
        if page and "sql" in page:
            params = {"sql": "SELECT layer, head, avg(value) AS v FROM head_stats GROUP BY ALL"}
        at = open_app(lake, monkeypatch, page=page, run=RUN, ex=ex, **params)
        assert not at.exception and not at.error, [e.value for e in at.error]
    at = open_app(lake, monkeypatch, page=page, run=NOVEC)  # no vectors at all
    assert not at.exception and not at.error, [e.value for e in at.error]


def test_examples_page_marks_examples_with_vectors(lake, monkeypatch, vector_ids):
    at = open_app(lake, monkeypatch, run=RUN)
    t = at.dataframe[0].value
    assert dict(zip(t.example_id.astype(int), t.vectors)) == {int(i): int(i) in vector_ids for i in t.example_id}
    assert "vectors" in " ".join(c.value for c in at.caption)


# -- the Hidden states page -----------------------------------------------------------------------------
def hidden_charts(at) -> list[str]:
    return [json.loads(e.proto.spec).get("description") for e in at.get("vega_lite_chart")]


def test_hidden_page_without_vectors_shows_norms_and_a_note(lake, monkeypatch, vector_ids, no_vector_id):
    at = open_app(lake, monkeypatch, page=HIDDEN, run=RUN, ex=no_vector_id, hlayer=1)
    note = texts(at)
    assert f"Example #{no_vector_id} has no stored hidden vectors" in note and "sample of 2 examples" in note
    assert "hidden-map" not in hidden_charts(at)
    assert not [d for d in at.dataframe if "cosine" in d.value.columns]  # no nearest tokens
    # the per-layer norms of the example: straight from the stored norms
    h = read_table(lake, "hidden_states", run=RUN, example_id=no_vector_id)
    tok = read_table(lake, "tokens", run=RUN, example_id=no_vector_id)[["token_idx", "modality"]]
    want = h.merge(tok, on="token_idx").groupby(["layer", "modality"]).norm.mean().sort_index()
    norms = chart_data(at, "hidden-norms", "norm")
    got = norms[norms.scope == f"example #{no_vector_id}"].set_index(["layer", "modality"]).norm.sort_index()
    assert got.index.tolist() == want.index.tolist()
    np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-5)
    # the text-image similarity: only the mean over the examples that have vectors
    cos = chart_data(at, "text-image-cosine", "cosine")
    assert set(cos.scope) == {f"mean of {N_VEC} examples"}
    # the picker offers the examples with vectors; picking one shows its map
    pick = at.selectbox(key="w_vec_ex")
    assert [int(o.split(" ")[0].lstrip("#")) for o in pick.options] == vector_ids
    pick.set_value(vector_ids[1]).run()
    assert not at.exception and at.session_state["ex"] == vector_ids[1]
    assert at.query_params["ex"] == str(vector_ids[1])
    assert "hidden-map" in hidden_charts(at) and "no stored hidden vectors" not in texts(at)


def test_hidden_page_with_vectors_shows_the_map(lake, monkeypatch, vector_ids):
    ex = vector_ids[0]
    at = open_app(lake, monkeypatch, page=HIDDEN, run=RUN, ex=ex, hlayer=1)
    assert "no stored hidden vectors" not in texts(at)
    p = chart_data(at, "hidden-map", "group")
    mine = p[p.group != "sample"]
    assert sorted(mine.token_idx.astype(int)) == sorted(read_table(lake, "tokens", run=RUN, example_id=ex).token_idx)
    emb = read_table(lake, "embeddings", run=RUN, layer=1)
    assert set(zip(p[p.group == "sample"].example_id, p[p.group == "sample"].token_idx)) == \
        set((e, t) for e, t in zip(emb.example_id, emb.token_idx) if e != ex)
    assert [d for d in at.dataframe if "cosine" in d.value.columns]  # nearest tokens


def test_hidden_page_of_a_run_without_any_vectors(lake, monkeypatch):
    at = open_app(lake, monkeypatch, page=HIDDEN, run=NOVEC)
    assert "no stored hidden vectors" in texts(at) and "sample of 0 examples" in texts(at)
    assert "hidden-norms" in hidden_charts(at) and "text-image-cosine" not in hidden_charts(at)
    assert "w_vec_ex" not in [s.key for s in at.selectbox]  # nothing to pick


# -- the Attention page ------------------------------------------------------------------------------------
def stored_mass(lake, ex: int, layer: int, head: int | None) -> pd.Series:
    """query_idx -> the sum of the row's stored weights (mean over heads for ``head=None``), from Parquet."""
    heads = sql(lake, "SELECT max(head) + 1 AS n FROM {attention} WHERE run = ?", [RUN]).n.iloc[0]
    if head is None:
        d = sql(lake, "SELECT query_idx, sum(CAST(weight AS DOUBLE)) / ? AS mass FROM {attention} "
                      "WHERE run = ? AND stream = 'self' AND layer = ? AND example_id = ? GROUP BY query_idx",
                [float(heads), RUN, layer, ex])
    else:
        d = sql(lake, "SELECT query_idx, sum(CAST(weight AS DOUBLE)) AS mass FROM {attention} "
                      "WHERE run = ? AND stream = 'self' AND layer = ? AND example_id = ? AND head = ? "
                      "GROUP BY query_idx", [RUN, layer, ex, head])
    return d.set_index("query_idx").mass


def kept_mass_stat(lake, ex: int, layer: int) -> pd.Series:
    d = sql(lake, "SELECT head, value FROM {head_stats} WHERE run = ? AND stream = 'self' AND layer = ? "
                  "AND example_id = ? AND stat = 'kept_mass'", [RUN, layer, ex])
    return d.set_index("head").value


def mass_table(at) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if "stored mass" in d.value.columns)


@pytest.mark.parametrize("head", [1, "mean"])
def test_attention_says_pruned_and_shows_the_stored_mass(lake, monkeypatch, head):
    from pipeline.capture_config import AttentionPolicy as KeepPolicy

    ex, layer = 1, 1
    tok = read_table(lake, "tokens", run=RUN, example_id=ex)
    words = tok[tok.role == "word"].sort_values("text_pos")
    pos = [int(p) for p in words.text_pos.iloc[:2]]
    patch = tok[tok.role == "patch"].iloc[2]
    pkey = f"r{int(patch.patch_row)}c{int(patch.patch_col)}"
    at = open_app(lake, monkeypatch, page=ATTENTION, run=RUN, ex=ex, layer=layer, head=head,
                  tokens=",".join(map(str, pos)), patches=pkey)
    keep = json.loads(read_table(lake, "runs").set_index("run").capture[RUN])["keep_attention"]
    shown = texts(at) + " " + " ".join(str(m.value) for m in at.markdown)  # the policy is told in an expander
    assert KeepPolicy.parse(keep).describe() in shown and "pruned" in shown
    t = mass_table(at)
    want_q = sorted([*words.token_idx.iloc[:2].astype(int), int(patch.token_idx)])
    assert sorted(t.token_idx.astype(int)) == want_q
    want = stored_mass(lake, ex, layer, None if head == "mean" else int(head))
    got = t.set_index("token_idx")["stored mass"]
    np.testing.assert_allclose(got.to_numpy(float), want.reindex(got.index).to_numpy(float), atol=1e-9)
    assert (got < 0.999).any(), "the check needs a row whose mass was not all stored"
    stat = kept_mass_stat(lake, ex, layer)
    want_stat = stat.mean() if head == "mean" else stat[int(head)]
    metric = next(m for m in at.metric if "kept_mass" in m.label)
    assert metric.value == f"{want_stat:.3f}"
    assert "pruned" in " ".join(c.value for c in at.caption)


def test_sql_page_says_weights_are_pruned(lake, monkeypatch):
    at = open_app(lake, monkeypatch, page="app_pages/sql.py", run=RUN,
                  sql=f"SELECT count(*) AS n FROM attention WHERE run = '{RUN}'")
    assert "pruned weights" in " ".join(c.value for c in at.caption)


# -- the hidden-state queries skip the examples without vectors -------------------------------------------
def test_text_image_cosine_draws_from_the_examples_with_vectors(lake, vector_ids, no_vector_id):
    """With room for only 2 examples, the run-wide similarity still averages 2 examples with vectors
    (a draw among all 5 would mostly land on examples without them)."""
    from lake import queries
    from lake.catalog import open_catalog

    h = read_table(lake, "hidden_states", run=RUN)
    h = h[h.vec.notna()].merge(read_table(lake, "tokens", run=RUN)[["example_id", "token_idx", "modality"]],
                               on=["example_id", "token_idx"])
    per = {}
    for (e, layer), g in h.groupby(["example_id", "layer"]):
        t = np.stack([np.asarray(v, np.float64) for v in g[g.modality == "text"].vec])
        i = np.stack([np.asarray(v, np.float64) for v in g[g.modality == "image"].vec])
        t, i = t / np.linalg.norm(t, axis=1, keepdims=True), i / np.linalg.norm(i, axis=1, keepdims=True)
        per[(int(e), int(layer))] = float((t @ i.T).mean())
    want = pd.Series(per).groupby(level=1).mean()
    cat = open_catalog(lake)
    try:
        got = queries.text_image_cosine(cat, RUN, "self", max_examples=N_VEC)
        none = queries.text_image_cosine(cat, RUN, "self", example_id=no_vector_id)
        keys = queries.hidden_token_keys(cat, RUN, "self", h.layer.nunique())
    finally:
        cat.close()
    assert (got.n_examples == N_VEC).all()
    np.testing.assert_allclose(got.set_index("layer").cosine.sort_index().to_numpy(), want.sort_index(), atol=1e-5)
    assert none.empty
    assert sorted(keys.example_id.unique()) == vector_ids
