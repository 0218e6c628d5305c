"""Issue 24's defects on the Head summary, Hidden states and SQL pages, under AppTest.

A lake from the real pipeline: the tiny random ViLT over three scenes as run ``ex`` (``--explain
sinks,value,rollout``: a model 32 wide, where no token can be a sink, so ``sink_mass`` is 0
everywhere), as run ``plain`` (no ``--explain``), and the 512-wide ViLT whose [CLS] is a sink by
construction as run ``sinky`` (``--explain sinks``). Expected numbers are read with DuckDB straight
from the Parquet files, never through ``lake/queries.py``.
"""

from __future__ import annotations


import duckdb
import numpy as np
import pytest

from lake.queries import EXAMPLE_SQL, NEEDS
from tests.app.test_app import chart, heatmap, open_app, t2i_matrix

HEAD_SUMMARY, HIDDEN, SQL = "app_pages/head_summary.py", "app_pages/hidden_states.py", "app_pages/sql.py"


@pytest.fixture(scope="module")
def explain_lake(tmp_path_factory, tiny_vilt):
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest, make_sink_vilt

    tmp = tmp_path_factory.mktemp("defects")
    manifest = make_manifest(tmp / "data", 3)
    lake = tmp / "lake"
    opts = dict(batch_size=3, keep_attention="all", progress=False, workers=0)
    extract(str(tiny_vilt), manifest, lake, "ex", explain="sinks,value,rollout", **opts)
    extract(str(tiny_vilt), manifest, lake, "plain", **opts)
    extract(str(make_sink_vilt(tmp / "sink")), manifest, lake, "sinky", explain="sinks", keep_hidden="none", **opts)
    return lake


def parquet(lake, sql: str, params=None):
    """``sql`` over the Parquet files: ``{t}`` names table ``t`` (``{sinks}``, ``{value_norms}`` …)."""
    tables = ("attention", "head_stats", "tokens", "value_norms", "relevancy", "sinks")
    files = {t: f"read_parquet('{(lake / t).as_posix()}/**/*.parquet', hive_partitioning = true, union_by_name = true)"
             for t in tables if (lake / t).exists()}
    con = duckdb.connect()
    try:
        return con.execute(sql.format(**files), params or []).df()
    finally:
        con.close()


def infos(at) -> list[str]:
    return [str(i.value) for i in at.info]


# -- Head summary ------------------------------------------------------------------------------------
Z_RUN = "every z-score is 0 and the map is blank"


def test_whole_run_z_scored_against_itself_says_why_the_map_is_blank(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page=HEAD_SUMMARY, run="synth", scope="filtered", norm="z_dataset")
    assert [i for i in infos(at) if Z_RUN in i], infos(at)
    every = np.stack([t2i_matrix(synth_lake, i) for i in range(6)])  # [example, layer, head]
    z = (every.mean(0) - every.mean(0)) / every.std(0)  # the run's mean against the run: 0
    np.testing.assert_allclose(heatmap(at).value.to_numpy(dtype=float), z.ravel(), atol=1e-9)
    # the note is for that case only: one example, a filtered subset, raw values
    for params in (dict(scope="example", ex=2, norm="z_dataset"), dict(scope="filtered", norm="raw"),
                   dict(scope="filtered", norm="z_dataset", split="train"), dict(scope="filtered", norm="z_example")):
        at = open_app(synth_lake.root, monkeypatch, page=HEAD_SUMMARY, run="synth", **params)
        assert not [i for i in infos(at) if Z_RUN in i or "for every head" in i], (params, infos(at))
        assert np.ptp(heatmap(at).value.to_numpy(dtype=float)) > 1e-3, params  # and the map is not blank


def test_sink_mass_of_a_run_without_sinks_says_so_with_a_0_to_1_legend(explain_lake, monkeypatch):
    want = parquet(explain_lake, "SELECT count(*) AS n, min(value) AS lo, max(value) AS hi FROM {head_stats} "
                                 "WHERE run = 'ex' AND stat = 'sink_mass'")
    assert want.n[0] > 0 and want.lo[0] == want.hi[0] == 0  # the run has the statistic, 0 everywhere
    assert parquet(explain_lake, "SELECT count(*) AS n FROM {sinks} WHERE run = 'ex'").n[0] == 0
    for params in (dict(scope="filtered"), dict(scope="example", ex=1)):
        at = open_app(explain_lake, monkeypatch, page=HEAD_SUMMARY, run="ex", stat="sink_mass", **params)
        note = [i for i in infos(at) if "No sink tokens were found" in i]
        assert note and "**sink_mass** is 0 for every head" in note[0], infos(at)
        assert ("run **ex**" if params["scope"] == "filtered" else "example #1") in note[0]
        assert (heatmap(at).value == 0).all()
        spec, _ = chart(at, "head-summary")
        scale = spec["layer"][0]["encoding"]["color"]["scale"]
        assert scale["domain"] == [0.0, 1.0], scale  # not 0 … 0.000000001
    # a run with sinks: sink_mass varies, no note, and the map holds the lake's values
    at = open_app(explain_lake, monkeypatch, page=HEAD_SUMMARY, run="sinky", stat="sink_mass", scope="example", ex=0)
    assert not [i for i in infos(at) if "for every head" in i or "No sink tokens" in i], infos(at)
    got = heatmap(at)
    want = parquet(explain_lake, "SELECT layer, head, value FROM {head_stats} WHERE run = 'sinky' AND example_id = 0 "
                                 "AND stream = 'self' AND stat = 'sink_mass' ORDER BY layer, head")
    np.testing.assert_allclose(got.value.to_numpy(dtype=float), want.value.to_numpy(dtype=float), atol=1e-6)
    assert want.value.max() > 0


def test_a_statistic_with_one_value_everywhere_gets_a_sensible_legend():
    import pandas as pd

    from streamlit_app import charts

    for v, domain in ((0.0, [0.0, 1.0]), (0.25, [0.0, 0.25]), (-2.0, [-2.0, 0.0])):
        m = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "value": [v] * 4})
        spec = charts.head_heatmap(m, value_title="x", diverging=False).to_dict()
        assert spec["layer"][0]["encoding"]["color"]["scale"]["domain"] == domain


# -- Hidden states -------------------------------------------------------------------------------------
def test_an_encoder_run_says_why_it_has_no_logit_lens(tiny_lake, monkeypatch):
    at = open_app(tiny_lake, monkeypatch, page=HIDDEN, run="tiny", ex=1)
    lens = [str(c.value) for c in at.caption if "Logit lens" in str(c.value)]
    assert lens and "none for run **tiny**" in lens[0] and "no `lm` stream" in lens[0] \
        and "--explain lens" in lens[0], lens


def test_map_points_at_the_edge_are_drawn_whole(tiny_lake, monkeypatch):
    at = open_app(tiny_lake, monkeypatch, page=HIDDEN, run="tiny", ex=1)
    spec, data = chart(at, "hidden-map")
    pts = next(d for d in data if "token_idx" in d.columns and "x" in d.columns)
    path = [d for d in data if "tag" in d.columns]
    xs = np.concatenate([pts.x.to_numpy(float)] + [p.x.to_numpy(float) for p in path])
    ys = np.concatenate([pts.y.to_numpy(float)] + [p.y.to_numpy(float) for p in path])
    for axis, v, size in (("x", xs, spec["width"]), ("y", ys, spec["height"])):
        scale = spec["layer"][0]["encoding"][axis]["scale"]
        lo, hi = scale["domain"]
        assert scale["nice"] is False and scale["zero"] is False
        # the outermost points lie at least 3% of the span (about 15 px, past a point's radius) inside
        assert lo <= v.min() - 0.03 * np.ptp(v) and hi >= v.max() + 0.03 * np.ptp(v), (axis, lo, hi, v.min(), v.max())
        r = np.sqrt(90 / np.pi)  # the outlined points' radius in pixels (size 90)
        assert (v.min() - lo) / (hi - lo) * size >= r and (hi - v.max()) / (hi - lo) * size >= r


# -- SQL ------------------------------------------------------------------------------------------------
# the worked examples on the interventions table: offered only where the run has rows there
# (tests/app/test_interventions_page.py), so never on this lake
INTERVENTION_TITLES = {t for t, rows in NEEDS.items() if rows == "interventions"}


def _offered(at) -> dict[str, object]:
    return {b.label: b for b in at.button if (b.key or "").startswith("sql_example_")}


def test_explain_worked_examples_are_offered_only_where_the_run_has_their_rows(explain_lake, monkeypatch):
    explain_titles = set(NEEDS)
    # a run without --explain: none of them, and a note says why
    at = open_app(explain_lake, monkeypatch, page=SQL, run="plain", ex=0)
    assert set(_offered(at)) == set(EXAMPLE_SQL) - explain_titles
    note = next(str(c.value) for c in at.caption if "Not offered" in str(c.value))
    assert note == ("Not offered, as they would return no rows: the worked examples on contribution norms, rollout "
                    "and sink tokens (run `plain` was extracted without `--explain value`, `--explain rollout` and "
                    "`--explain sinks`).")
    # --explain sinks,value,rollout on a model too narrow for sinks: contribution norms and rollout, no sinks
    at = open_app(explain_lake, monkeypatch, page=SQL, run="ex", ex=1, layer=1, head=0)
    offered = _offered(at)
    assert set(offered) == set(EXAMPLE_SQL) - {"Sink tokens (--explain sinks)"} - INTERVENTION_TITLES
    assert next(str(c.value) for c in at.caption if "Not offered" in str(c.value)) == (
        "Not offered, as they would return no rows: the worked examples on sink tokens (`--explain sinks` found none "
        "in this run).")
    offered["Contribution norms (--explain value)"].click().run()
    got = at.dataframe[0].value
    want = parquet(explain_lake, "SELECT max(a.weight * v.norm) AS top, count(*) AS n FROM {attention} a JOIN "
                                 "{value_norms} v ON v.run = a.run AND v.stream = a.stream AND v.layer = a.layer AND "
                                 "v.example_id = a.example_id AND v.head = a.head AND v.token_idx = a.key_idx "
                                 "WHERE a.run = 'ex' AND a.layer = 1 AND a.head = 0 AND a.example_id = 1")
    assert len(got) == min(50, int(want.n[0])) > 0
    assert got.contribution.iloc[0] == pytest.approx(float(want.top[0]), rel=1e-5)
    _offered(at)["Rollout to the image (--explain rollout)"].click().run()
    got = at.dataframe[0].value
    want = parquet(explain_lake, "SELECT max(r.value) AS top FROM {relevancy} r JOIN {tokens} t ON t.run = r.run AND "
                                 "t.example_id = r.example_id AND t.token_idx = r.token_idx AND t.role = 'patch' "
                                 "WHERE r.run = 'ex' AND r.method = 'rollout' AND r.example_id = 1 AND r.layer = "
                                 "(SELECT max(layer) FROM {relevancy} WHERE run = 'ex' AND method = 'rollout')")
    assert len(got) > 0 and got.rollout.iloc[0] == pytest.approx(float(want.top[0]), rel=1e-5)
    # a run with sink tokens: the sinks example, and its rows count every sink the lake holds
    at = open_app(explain_lake, monkeypatch, page=SQL, run="sinky", ex=0)
    offered = _offered(at)
    assert "Sink tokens (--explain sinks)" in offered
    assert not {"Contribution norms (--explain value)", "Rollout to the image (--explain rollout)"} & set(offered)
    offered["Sink tokens (--explain sinks)"].click().run()
    got = at.dataframe[0].value
    n = parquet(explain_lake, "SELECT count(*) AS n FROM {sinks} WHERE run = 'sinky'").n[0]
    assert n > 0 and int(got.tokens.sum()) == int(n)
    assert set(got.role) == {"cls"}  # the sink the model was built with


# -- the same, in a browser ------------------------------------------------------------------------------
@pytest.mark.browser
def test_the_notes_reach_the_browser(explain_lake, browser):
    """What a user opening these pages by their links sees: each note, and no worked example that would
    return no rows (one server, one tab)."""
    from tests.browser import require_chromium, serve, settle

    require_chromium()
    with serve(explain_lake) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def body(path: str) -> str:
            page.goto(f"{url}/{path}")
            settle(page)
            assert page.locator('[data-testid="stException"]').count() == 0, path
            return page.inner_text('[data-testid="stMainBlockContainer"]')

        assert Z_RUN in body("head_summary?run=plain&scope=filtered&norm=z_dataset")
        text = body("head_summary?run=ex&scope=filtered&stat=sink_mass")
        assert "No sink tokens were found" in text and "sink_mass is 0 for every head" in text
        text = body("hidden_states?run=plain&ex=1")
        assert "Logit lens" in text and "no lm stream" in text
        text = body("sql?run=plain")
        assert "Not offered, as they would return no rows" in text
        buttons = {b.strip() for b in page.locator('[data-testid="stButton"] button').all_inner_texts()}
        assert not buttons & set(NEEDS) and set(EXAMPLE_SQL) - set(NEEDS) <= buttons, buttons
        body("sql?run=ex")
        buttons = {b.strip() for b in page.locator('[data-testid="stButton"] button').all_inner_texts()}
        assert set(EXAMPLE_SQL) - {"Sink tokens (--explain sinks)"} - INTERVENTION_TITLES <= buttons, buttons
        assert not buttons & INTERVENTION_TITLES, buttons  # no interventions in this lake
        assert not errors, errors
