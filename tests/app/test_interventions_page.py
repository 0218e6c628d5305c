"""The Interventions page on a copy of the tiny ViLT lake with every kind run by the real engine
(``pipeline.intervene.run.intervene``: exact head ablation, attribution patching, knockout, ranked and
box regions) and one synthetic intervention written here (zero ablation on two streams, answers changed
on chosen rows). Every number the page shows is recomputed here with numpy / scipy from the Parquet
files, never through the page's queries."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from lake.queries import NEEDS
from tests.app.test_app import chart, open_app

PAGE = "app_pages/interventions.py"
RUN = "tiny"
SYNTH = "heads zero synthetic"  # the intervention written by hand
CHANGED_EX = 2  # the example whose answer the synthetic rows change


@pytest.fixture(scope="module")
def iv_lake(tiny_lake, tmp_path_factory):
    """A copy of the session's tiny lake (never written to) with every kind of intervention."""
    from pipeline.intervene.run import intervene

    lake = shutil.copytree(tiny_lake, tmp_path_factory.mktemp("iv") / "lake")
    for kind, opts in (("heads", {}), ("heads", {"estimate": True}),
                       ("knockout", {"sets": "text->image,image->text"}),
                       ("regions", {"methods": "attention,random", "fractions": "0,0.25,0.5,0.75,1"}),
                       ("regions", {"regions": "boxes"})):
        intervene(lake, RUN, kind, progress=False, **opts)
    _write_synthetic(lake)
    return lake


def _write_synthetic(lake) -> None:
    """Zero ablation of every head of ``self`` (2 x 2) and of a second stream ``cross`` (1 x 3) on three
    examples, with known effects; example CHANGED_EX's answer changes for three of them."""
    from lake.schema import INTERVENTIONS

    rng = np.random.default_rng(7)
    rows = []
    for ex in (0, 1, CHANGED_EX):
        for stream, layers, heads in (("self", 2, 2), ("cross", 1, 3)):
            for layer in range(layers):
                for head in range(heads):
                    after = float(rng.normal(0.0, 1.0))
                    changed = ex == CHANGED_EX and (stream, layer, head) in {("self", 1, 0), ("cross", 0, 2), ("self", 0, 1)}
                    rows.append(dict(intervention=SYNTH, example_id=ex, kind="heads", method="zero", stream=stream,
                                     layer=layer, head=head, spec=json.dumps({"ablate": "zero"}), fraction=None,
                                     metric="class_logit", metric_before=0.5, metric_after=after,
                                     answer_after="other" if changed else "same", changed=changed, estimated=False))
    table = pa.Table.from_pylist(rows, schema=INTERVENTIONS.schema)
    folder = lake / "interventions" / f"run={RUN}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "iv-synthetic-0.parquet")


def stored(lake, table: str = "interventions") -> pd.DataFrame:
    return ds.dataset(lake / table, partitioning="hive").to_table().to_pandas()


def keys_of(rows: pd.DataFrame, kind: str, *, estimated: bool | None = None, method: str | None = None) -> str:
    d = rows[rows.kind == kind]
    if estimated is not None:
        d = d[d.groupby("intervention").estimated.transform("any") == estimated]
    if method is not None:
        d = d[d.method == method]
    (key,) = d.intervention.unique()
    return key


def markdown(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def frame(at, column: str) -> pd.DataFrame:
    """The page's table that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def cells(at, description: str) -> pd.DataFrame:
    _, data = chart(at, description)
    d = next(x for x in data if "col" in x.columns)
    return d[d.col != "mean"]


def test_no_interventions_says_how_to_make_them(tiny_lake, monkeypatch):
    at = open_app(tiny_lake, monkeypatch, PAGE, run=RUN, ex=0)
    (info,) = [i.value for i in at.info]
    assert info.startswith(f"Run **{RUN}** has no interventions yet. Make them with `vlatlas intervene --lake ")
    assert f"--run {RUN} --kind heads`" in info and not at.get("vega_lite_chart")


def test_heads_effect_beside_the_statistic_and_their_rank_correlation(iv_lake, monkeypatch):
    rows = stored(iv_lake)
    stats = stored(iv_lake, "head_stats")
    exact_key = keys_of(rows, "heads", estimated=False, method="mean")
    est_key = keys_of(rows, "heads", estimated=True)
    at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=0, intervention=exact_key)
    box = at.selectbox(key="w_intervention")
    assert box.value == exact_key and len(box.options) == rows.intervention.nunique() == 6
    kinds = [o.split(" — ")[0] for o in box.options]  # "kind — the rest of the key · n examples"
    assert kinds == sorted(kinds) and set(kinds) == {"heads", "knockout", "regions"}  # grouped by kind
    assert at.selectbox(key="w_ivstat").value == "grounding"  # the run has boxes
    # every head's cell: the mean over examples of after - before, from the stored rows
    ex = rows[(rows.intervention == exact_key) & ~rows.estimated]
    want = (ex.metric_after - ex.metric_before).groupby([ex.layer, ex["head"]]).mean()
    got = cells(at, "iv-heads-effect").set_index(["layer", "head"]).value
    assert len(got) == len(want) == 4
    for (layer, head), v in want.items():
        assert got[(layer, head)] == pytest.approx(v, rel=1e-6, abs=1e-12)
    # the statistic beside it: the mean grounding of each head over the examples
    g = stats[(stats.run == RUN) & (stats.stat == "grounding") & (stats.stream == "self")].dropna(subset=["value"])
    gmean = g.groupby(["layer", "head"]).value.mean()
    got_s = cells(at, "iv-heads-stat").set_index(["layer", "head"]).value
    for k, v in gmean.items():
        assert got_s[k] == pytest.approx(v, rel=1e-6)
    # the scatter holds both, and the printed Spearman is scipy's over the heads
    sc = next(d for d in chart(at, "iv-heads-scatter")[1] if "effect" in d.columns).set_index(["layer", "head"])
    assert len(sc) == 4
    for k, v in want.items():
        assert (sc.loc[k, "effect"], sc.loc[k, "stat"]) == pytest.approx((v, gmean[k]), rel=1e-6, abs=1e-12)
    rho = spearmanr([gmean[k] for k in want.index], want.values).statistic
    assert f"**grounding** and the mean effect (exact ablation): **ρ = {rho:+.3f}** over 4 heads" in markdown(at)
    # the estimates: their own heatmap, and their rank correlation with the exact effects
    es = rows[(rows.intervention == est_key) & rows.estimated]
    want_e = (es.metric_after - es.metric_before).groupby([es.layer, es["head"]]).mean()
    got_e = cells(at, "iv-heads-estimate").set_index(["layer", "head"]).value
    for k, v in want_e.items():
        assert got_e[k] == pytest.approx(v, rel=1e-6, abs=1e-12)
    rho_e = spearmanr(want_e[want.index].values, want.values).statistic
    assert f"estimate and the exact effect: **ρ = {rho_e:+.3f}** over 4 heads" in markdown(at)


def test_a_second_stream_and_a_statistic_picked(iv_lake, monkeypatch):
    rows = stored(iv_lake)
    at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=0, intervention=SYNTH, ivstream="cross", ivstat="t2i")
    box = at.selectbox(key="w_ivstream")
    assert sorted(box.options) == ["cross", "self"] and box.value == "cross" and not box.disabled
    s = rows[(rows.intervention == SYNTH) & (rows.stream == "cross")]
    want = (s.metric_after - s.metric_before).groupby(s["head"]).mean()
    got = cells(at, "iv-heads-effect").set_index("head").value
    assert sorted(got.index) == [0, 1, 2]
    for h, v in want.items():
        assert got[h] == pytest.approx(v, rel=1e-9)
    assert any("No head statistics are stored for stream `cross`" in i.value for i in at.info)
    # on self, the t2i statistic and the Spearman of the synthetic effects against it
    at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=0, intervention=SYNTH, ivstream="self", ivstat="t2i")
    stats = stored(iv_lake, "head_stats")
    t = stats[(stats.run == RUN) & (stats.stat == "t2i") & (stats.stream == "self")].groupby(["layer", "head"]).value.mean()
    s = rows[(rows.intervention == SYNTH) & (rows.stream == "self")]
    eff = (s.metric_after - s.metric_before).groupby([s.layer, s["head"]]).mean()
    rho = spearmanr(t[eff.index].values, eff.values).statistic
    assert f"**t2i** and the mean effect (exact ablation): **ρ = {rho:+.3f}** over 4 heads" in markdown(at)


def test_knockout_effect_by_window(iv_lake, monkeypatch):
    rows = stored(iv_lake)
    key = keys_of(rows, "knockout")
    at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=0)
    at.selectbox(key="w_intervention").select(key).run()  # picked on the page: the URL follows
    assert not at.exception and at.query_params["intervention"] == key
    _, data = chart(at, "iv-knockout")
    d = data[0]
    k = rows[rows.intervention == key]
    assert sorted(set(d.method)) == ["image->text", "text->image"] and sorted(set(d.layer)) == [0, 1]
    for (method, layer), g in k.groupby(["method", "layer"]):
        r = d[(d.method == method) & (d.layer == layer)].iloc[0]
        assert r.effect == pytest.approx((g.metric_after - g.metric_before).mean(), rel=1e-6, abs=1e-12)
        assert r.changed == pytest.approx(g.changed.astype(float).mean())
        assert r.n == len(g) == 6
    for method, g in k.groupby("method"):
        eff = (g.metric_after - g.metric_before).groupby(g.layer).mean()
        worst = int(eff.idxmin())
        assert re.search(rf"`{re.escape(method)}` \(self\): [^\n]* with layers \[{worst}\] blocked, mean Δ class_logit "
                         rf"{re.escape(f'{eff.min():+.4g}')}", markdown(at)), markdown(at)


def _trapezoid(x, y) -> float:
    return sum((x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2 for i in range(1, len(x)))


def test_region_curves_and_their_areas(iv_lake, monkeypatch):
    rows = stored(iv_lake)
    key = keys_of(rows, "regions", method="random")
    r = rows[rows.intervention == key].copy()
    r["curve"] = [json.loads(s)["curve"] for s in r.spec]
    for norm, value in (("score", r.metric_after), ("relative", r.metric_after / r.metric_before)):
        at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=0, intervention=key, ivnorm=norm)
        _, (d,) = chart(at, "iv-curves")
        table = frame(at, "deletion area").set_index("method")
        assert sorted(table.index) == ["attention", "random"]
        for (method, curve), g in r.assign(v=value).groupby(["method", "curve"]):
            mean = g.groupby("fraction").v.mean()
            assert mean.index.tolist() == [0, 0.25, 0.5, 0.75, 1]
            mine = d[(d.method == method) & (d.curve == curve)].sort_values("fraction")
            assert mine[norm].tolist() == pytest.approx(mean.tolist(), rel=1e-9)
            assert table.loc[method, f"{curve} area"] == pytest.approx(
                _trapezoid(mean.index.tolist(), mean.tolist()), rel=1e-9)


def test_box_regions_by_label(iv_lake, monkeypatch):
    rows = stored(iv_lake)
    key = keys_of(rows, "regions", method="box")
    at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=0, intervention=key)
    _, (d,) = chart(at, "iv-boxes")
    b = rows[rows.intervention == key]
    assert d.label.tolist() == ["circle"]  # every scene has one boxed circle
    assert d.effect.iloc[0] == pytest.approx((b.metric_after - b.metric_before).mean(), rel=1e-6, abs=1e-12)
    assert d.boxes.iloc[0] == len(b) == 6
    assert frame(at, "boxes").effect.iloc[0] == pytest.approx(d.effect.iloc[0])


def test_what_changes_one_examples_answer(iv_lake, monkeypatch):
    rows = stored(iv_lake)
    at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=CHANGED_EX, intervention=SYNTH)
    table = frame(at, "answer after")
    want = rows[(rows.example_id == CHANGED_EX) & rows.changed.fillna(False).astype(bool)]
    want = want.assign(effect=want.metric_after - want.metric_before).sort_values("effect")
    assert len(table) == len(want) >= 3
    assert table.effect.tolist() == pytest.approx(want.effect.tolist())
    synth = want[want.intervention == SYNTH]
    assert len(synth) == 3
    for _, r in synth.iterrows():  # each one named, beside its own effect
        i = table.removed.tolist().index(f"head {r.stream} L{int(r.layer)}.H{int(r['head'])} (zero ablation)")
        assert table.effect.iloc[i] == pytest.approx(r.effect) and table["answer after"].iloc[i] == "other"
    assert set(table["answer after"]) == set(want.answer_after)
    # an example whose answer nothing changed: a note, with how many interventions with an answer ran on it
    at = open_app(iv_lake, monkeypatch, PAGE, run=RUN, ex=4, intervention=SYNTH)
    n = int(rows[(rows.example_id == 4) & (rows.changed.notna()) & ~rows.changed.fillna(False).astype(bool)].shape[0])
    assert any(f"No intervention changed the answer of example #4 ({n} with an answer" in i.value for i in at.info)


def test_sql_worked_examples_on_the_table(iv_lake, monkeypatch):
    """Offered on a run with interventions, and their results are the stored rows' (the areas recomputed)."""
    rows = stored(iv_lake)
    titles = [t for t, need in NEEDS.items() if need == "interventions"]
    at = open_app(iv_lake, monkeypatch, "app_pages/sql.py", run=RUN, ex=CHANGED_EX)
    offered = {b.label: b for b in at.button if (b.key or "").startswith("sql_example_")}
    assert set(titles) <= set(offered)
    assert not any("worked examples on the `interventions` table appear" in str(c.value) for c in at.caption)
    offered["What changes an answer (vlatlas intervene)"].click().run()
    got = at.dataframe[0].value
    assert len(got) == int(rows[(rows.example_id == CHANGED_EX) & rows.changed.fillna(False).astype(bool)].shape[0])
    {b.label: b for b in at.button}["Deletion and insertion areas (vlatlas intervene)"].click().run()
    got = at.dataframe[0].value
    r = rows[(rows.kind == "regions") & (rows.method != "box")].copy()
    r["curve"] = [json.loads(s)["curve"] for s in r.spec]
    for (method, curve), g in r.groupby(["method", "curve"]):
        mean = g.groupby("fraction").metric_after.mean()
        row = got[(got.method == method) & (got.curve == curve)]
        assert row.area.item() == pytest.approx(_trapezoid(mean.index.tolist(), mean.tolist()), rel=1e-9)
    {b.label: b for b in at.button}["Heads that matter (vlatlas intervene)"].click().run()
    got = at.dataframe[0].value
    assert not at.exception
    exact = rows[(rows.kind == "heads") & ~rows.estimated]
    eff = (exact.metric_after - exact.metric_before).groupby([exact.stream, exact.layer, exact["head"], exact.method]).mean()
    assert got.effect.iloc[0] == pytest.approx(eff.min())


@pytest.mark.browser
def test_every_kind_draws_in_the_browser(iv_lake, browser):
    """Each kind's charts reach the browser and vega draws them, with no exception and no JavaScript
    error (one server, one tab)."""
    from urllib.parse import quote

    from tests.browser import open_page, require_chromium, serve

    require_chromium()
    rows = stored(iv_lake)
    want = {keys_of(rows, "heads", estimated=False, method="mean"): 5, keys_of(rows, "knockout"): 1,
            keys_of(rows, "regions", method="random"): 1, keys_of(rows, "regions", method="box"): 1}
    n_changed = int((rows.changed.fillna(False).astype(bool) & (rows.example_id == CHANGED_EX)).sum())
    with serve(iv_lake) as url:
        for key, n in want.items():
            page, problems = open_page(browser, f"{url}/interventions?run={RUN}&ex={CHANGED_EX}&"
                                                f"intervention={quote(key)}", viewport={"width": 1400, "height": 900})
            drawn = page.locator('[data-testid="stVegaLiteChart"]')
            assert drawn.count() == n, (key, drawn.count())
            assert page.locator('[data-testid="stVegaLiteChart"] canvas, '
                                '[data-testid="stVegaLiteChart"] svg').count() >= n
            text = page.inner_text('[data-testid="stMainBlockContainer"]')
            assert f"What changes the answer of example #{CHANGED_EX}" in text and f"{n_changed} interventions change it" in text
            assert not problems, problems
            page.close()
