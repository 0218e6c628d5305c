"""The Compare page and its statistics (lake/compare.py, the compare queries of lake/queries.py).

Expected numbers are computed here by hand (arithmetic written out, or scipy's t
distribution applied to a t and df computed here) from head_stats values this
file chooses and writes itself; the app's charts are read as in test_app.py.
"""

from __future__ import annotations

import html
import json
import math
import re
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import integrate, stats as sps

from lake import compare as cmp
from lake import queries as Q
from lake.catalog import open_catalog
from lake.schema import EXAMPLES, HEAD_STATS
from lake.writer import LakeWriter
from streamlit_app import charts, export
from tests.app.test_app import chart, chart_data, click_row, open_app, read_table, select_on_chart, texts

PAGE = "app_pages/compare.py"


# -- a lake with chosen values ---------------------------------------------------------------
def write_run(root, run: str, manifest: str, examples: list[dict], values: dict) -> None:
    """One run with ``examples`` (dicts of examples columns) and head_stats ``values``:
    ``{(stat, layer, head): [value per example, None for null]}`` in stream ``self``."""
    w = LakeWriter(root, run)
    w.write_run_row(dict(
        run=run, model=f"hand/{run}", model_family="vilt", revision="x", dtype="float32",
        attn_implementation="eager", streams=json.dumps({"self": {"layers": 2, "heads": 2, "hidden_size": 8}}),
        manifest=manifest, n_examples=len(examples), capture=json.dumps({"keep_attention": "all"}),
        status="complete", created_at=datetime(2025, 1, 1, tzinfo=timezone.utc), software_version="0.1.0"))
    ex = [dict(source_id=f"s{e['example_id']}", image_id=None, **e) for e in examples]
    rows = [dict(example_id=e["example_id"], stream="self", layer=l, head=h, stat=s, value=v)
            for (s, l, h), vs in values.items() for e, v in zip(examples, vs)]
    w.write_chunk(0, {"examples": [({}, pa.Table.from_pylist(ex, schema=EXAMPLES.schema))],
                      "head_stats": [({}, pa.Table.from_pylist(rows, schema=HEAD_STATS.schema))]})


# Run "ind": examples 0-2 are split "a" (group A), 3-6 split "b" (group B).
IND_A = {(0, 0): [1, 2, 3], (0, 1): [2, 2, 2], (1, 0): [1, 3, 2], (1, 1): [5, None, None]}
IND_B = {(0, 0): [4, 5, 7, 9], (0, 1): [2, 2, 2, 2], (1, 0): [2, 2, 3, 4], (1, 1): [1, 2, 3, 4]}
# Runs "p0" (examples 0-3) and "p1" (0-4) over one manifest; example 4 is only in p1.
P0 = {(0, 0): [1, 2, 3, 4], (0, 1): [1, 1, 1, 1], (1, 0): [1, 2, 3, 4], (1, 1): [1, 2, 3, 4]}
P1 = {(0, 0): [2, 4, 3, 7, 100], (0, 1): [2, 2, 2, 2, 2], (1, 0): [1, 2, 3, 5, 100], (1, 1): [0, 2, 3, 4, 100]}


def _ex(i: int, split: str, correct: bool) -> dict:
    return dict(example_id=i, split=split, text=f"question {i}", answer=None if i == 6 else "yes",  # 6: none given
                prediction="yes" if correct else "no", correct=correct, meta=json.dumps({"qtype": "q" + split}))


@pytest.fixture(scope="module")
def hand_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    ex = [_ex(i, "a" if i < 3 else "b", i % 2 == 0) for i in range(7)]
    vals = {("t2i", l, h): IND_A[(l, h)] + IND_B[(l, h)] for (l, h) in IND_A}
    vals.update({("max", l, h): [None if v is None else 10 * v for v in vs] for (_, l, h), vs in vals.items()})
    write_run(root, "ind", "ind.jsonl", ex, vals)
    c0, c1 = [True, True, False, True], [True, False, True, True, True]
    write_run(root, "p0", "pair.jsonl", [_ex(i, "a", c) for i, c in enumerate(c0)],
              {("t2i", l, h): v for (l, h), v in P0.items()})
    write_run(root, "p1", "pair.jsonl", [_ex(i, "a", c) for i, c in enumerate(c1)],
              {("t2i", l, h): v for (l, h), v in P1.items()})
    return root


@pytest.fixture(scope="module")
def cat(hand_lake):
    c = open_catalog(hand_lake)
    yield c
    c.close()


# -- hand computations ---------------------------------------------------------------------
def mean(x):
    return sum(x) / len(x)


def var(x):  # sample variance, ddof 1
    m = mean(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)


def t_two_sided(t: float, df: float) -> float:
    """2 · P(T_df > |t|) by integrating the Student t density written out."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    tail, _ = integrate.quad(lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2), abs(t), np.inf)
    return 2 * tail


def hand_independent(a, b):
    """(diff, Hedges' g, Welch t, Welch df, p) written out."""
    na, nb, ma, mb, va, vb = len(a), len(b), mean(a), mean(b), var(a), var(b)
    sp = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    g = (1 - 3 / (4 * (na + nb) - 9)) * (mb - ma) / sp
    se2 = va / na + vb / nb
    t = (mb - ma) / math.sqrt(se2)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return mb - ma, g, t, df, t_two_sided(t, df)


def hand_paired(a, b):
    d = [y - x for x, y in zip(a, b)]
    sd = math.sqrt(var(d))
    t = mean(d) / (sd / math.sqrt(len(d)))
    return mean(d), mean(d) / sd, t, len(d) - 1, t_two_sided(t, len(d) - 1)


# -- the statistics ------------------------------------------------------------------------
def test_hand_values_themselves():
    # A = [1, 2, 3], B = [4, 5, 7, 9]: means 2 and 6.25, variances 1 and 14.75 / 3
    diff, g, t, df, p = hand_independent([1, 2, 3], [4, 5, 7, 9])
    assert diff == 4.25
    assert g == pytest.approx((1 - 3 / 19) * 4.25 / math.sqrt((2 * 1 + 14.75) / 5))
    assert t == pytest.approx(4.25 / 1.25)  # se² = 1/3 + 14.75/12 = 1.5625
    assert df == pytest.approx(1.5625 ** 2 / ((1 / 3) ** 2 / 2 + (14.75 / 12) ** 2 / 3))
    assert p == pytest.approx(2 * sps.t.sf(3.4, df), rel=1e-6)  # the written-out density agrees with scipy


def test_independent_groups_by_hand(cat):
    a, b = Q.ExampleFilter(split="a"), Q.ExampleFilter(split="b")
    mom = Q.compare_moments(cat, "ind", a, b, "self", "t2i")
    res = cmp.compare_independent(mom, correction="holm").set_index(["layer", "head"])
    for lh in [(0, 0), (1, 0)]:
        diff, g, t, df, p = hand_independent(IND_A[lh], IND_B[lh])
        r = res.loc[lh]
        assert (r.n_a, r.n_b) == (3, 4)
        assert r.mean_a == pytest.approx(mean(IND_A[lh])) and r.mean_b == pytest.approx(mean(IND_B[lh]))
        assert r["diff"] == pytest.approx(diff)
        assert r.effect == pytest.approx(g)
        assert r.t == pytest.approx(t) and r.df == pytest.approx(df)
        assert r.p == pytest.approx(p, rel=1e-6)
    # (0, 1) is constant in both groups and (1, 1) has one value in A: NaN, and not counted in m
    assert res.loc[(0, 1)][["effect", "p", "p_adj"]].isna().all()
    assert res.loc[(1, 1)][["effect", "p", "p_adj"]].isna().all() and res.loc[(1, 1)].n_a == 1
    p = [res.loc[(0, 0)].p, res.loc[(1, 0)].p]
    lo, hi = sorted(p)
    want = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), min(1, hi))}  # Holm with m = 2
    assert res.loc[(0, 0)].p_adj == pytest.approx(want[p[0]])
    assert res.loc[(1, 0)].p_adj == pytest.approx(want[p[1]])


def test_mann_whitney_exact_by_hand(cat):
    a, b = Q.ExampleFilter(split="a"), Q.ExampleFilter(split="b")
    mom = Q.compare_moments(cat, "ind", a, b, "self", "t2i")
    vals = Q.compare_values(cat, "ind", a, b, "self", "t2i")
    res = cmp.compare_independent(mom, vals, test="rank").set_index(["layer", "head"])
    # every B value exceeds every A value: U_B = 3 · 4 = 12, the largest of C(7, 3) = 35 equally likely
    # rank splits, so the exact two-sided p is 2 / 35
    assert res.loc[(0, 0)].t == 12
    assert res.loc[(0, 0)].p == pytest.approx(2 / 35)
    assert res.loc[(0, 0)].effect == pytest.approx(hand_independent(IND_A[(0, 0)], IND_B[(0, 0)])[1])


def test_paired_runs_by_hand(cat):
    mom = Q.paired_moments(cat, "p0", "p1", None, "self", "t2i")
    res = cmp.compare_paired(mom).set_index(["layer", "head"])
    for lh in [(0, 0), (1, 0), (1, 1)]:
        diff, dz, t, df, p = hand_paired(P0[lh], P1[lh][:4])  # example 4 is only in p1: left out
        r = res.loc[lh]
        assert r.n_a == r.n_b == 4
        assert r["diff"] == pytest.approx(diff) and r.effect == pytest.approx(dz)
        assert r.t == pytest.approx(t) and r.df == df and r.p == pytest.approx(p, rel=1e-6)
    assert res.loc[(0, 0)].effect == pytest.approx(1.5 / math.sqrt(5 / 3))  # d = [1, 2, 0, 3]
    assert res.loc[(0, 1)][["effect", "p"]].isna().all()  # d is constant: no SD
    # Wilcoxon signed-rank of d = [1, 2, 0, 3]: the zero dropped, all 3 ranks positive; exact p = 2 / 2³
    vals = Q.paired_values(cat, "p0", "p1", None, "self", "t2i")
    w = cmp.compare_paired(mom, vals, test="rank").set_index(["layer", "head"])
    assert w.loc[(0, 0)].p == pytest.approx(0.25)


def test_paired_filter_must_pass_in_both_runs(cat):
    s = Q.paired_sizes(cat, "p0", "p1", Q.ExampleFilter(correct=True)).iloc[0]
    assert (s.n_a, s.n_b, s.n_both) == (3, 4, 2)  # correct in both runs: examples 0 and 3
    v = Q.paired_values(cat, "p0", "p1", Q.ExampleFilter(correct=True), "self", "t2i", 0, 0)
    assert v.example_id.tolist() == [0, 3] and v.a.tolist() == [1, 4] and v.b.tolist() == [2, 7]
    assert Q.runs_same_manifest(cat, "p0").run.tolist() == ["p1"]
    assert Q.runs_same_manifest(cat, "ind").empty


@pytest.mark.parametrize("method, want", [
    ("holm", [0.04, 0.09, 0.09, 0.5]),  # sorted 0.01·4, 0.03·3, max(0.04·2, 0.09), 0.5·1
    ("bh", [0.04, 0.16 / 3, 0.16 / 3, 0.5]),  # from the top: 0.5·4/4, min(0.04·4/3, ·), min(0.03·4/2, ·), 0.01·4/1
])
def test_corrections_by_hand(method, want):
    np.testing.assert_allclose(cmp.adjust([0.01, 0.04, 0.03, 0.5], method), want)
    got = cmp.adjust([0.01, np.nan, 0.04], method)  # NaN is not a test: m = 2
    assert np.isnan(got[1])
    np.testing.assert_allclose(got[[0, 2]], [0.02, 0.04])


def test_overlapping_filters_leave_the_overlap_out(cat):
    a, b = Q.ExampleFilter(split="b"), Q.ExampleFilter(correct=True)  # overlap: examples 4 and 6
    s = Q.compare_sizes(cat, "ind", a, b).iloc[0]
    assert (s.n_a, s.n_b, s.n_both) == (4, 4, 2)
    v = Q.compare_values(cat, "ind", a, b, "self", "t2i", 0, 0)
    assert v[v.group == "A"].example_id.tolist() == [3, 5]
    assert v[v.group == "B"].example_id.tolist() == [0, 2]
    # no filter on B: B is every example not in A
    v = Q.compare_values(cat, "ind", a, None, "self", "t2i", 0, 0)
    assert v[v.group == "B"].example_id.tolist() == [0, 1, 2]


def test_drivers_shares_by_hand():
    v = pd.DataFrame({"example_id": range(7), "group": list("AAABBBB"), "value": [1, 3, 2, 2, 2, 3, 4]})
    d = cmp.drivers_independent(v)
    # D = 2.75 − 2 = 0.75; B's share of example 6 = (4 − 2) / (4 · 0.75); A's of example 0 = (2.75 − 1) / (3 · 0.75)
    top = d.groupby("group").head(1).set_index("group")
    assert top.loc["B"].example_id == 6 and top.loc["B"].share == pytest.approx(2 / 3)
    assert top.loc["A"].example_id == 0 and top.loc["A"].share == pytest.approx(1.75 / 2.25)
    assert d.groupby("group").share.sum().to_numpy() == pytest.approx([1, 1])
    p = cmp.drivers_paired(pd.DataFrame({"example_id": range(4), "a": [1, 2, 3, 4], "b": [2, 4, 3, 7]}))
    assert p.example_id.tolist()[:2] == [3, 1] and p.share.tolist()[:2] == pytest.approx([0.5, 1 / 3])


def test_help_quotes_the_docstring():
    doc = " ".join(cmp.__doc__.split())
    for name, text in cmp.HELP.items():
        assert text and f"``{name}``: {text}" in doc, name


# -- the page on the hand lake -------------------------------------------------------------------
def diff_map(at) -> pd.DataFrame:
    return chart_data(at, "compare-diff", "diff").set_index(["layer", "head"])


def ranked_table(at) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if "adjusted p" in d.value.columns)


def test_page_independent_map_list_and_drill(hand_lake, monkeypatch):
    at = open_app(hand_lake, monkeypatch, page=PAGE, run="ind", a_split="a", b_split="b")
    m = diff_map(at)
    diff, g, _, _, p = hand_independent(IND_A[(0, 0)], IND_B[(0, 0)])
    assert m.loc[(0, 0)]["diff"] == pytest.approx(diff) and m.loc[(0, 0)].value == pytest.approx(diff)
    assert m.loc[(0, 0)].effect == pytest.approx(g) and m.loc[(0, 0)].p == pytest.approx(p, rel=1e-6)
    spec, _ = chart(at, "compare-diff")
    scale = next(l for l in spec["layer"] if "color" in l.get("encoding", {}))["encoding"]["color"]["scale"]
    assert scale["scheme"] == "blueorange" and scale["domainMid"] == 0 and scale["domain"] == [-4.25, 4.25]
    t = ranked_table(at)
    # by |B − A| (the default): 4.25, |2.5 − 5| = 2.5 (one value in A: no effect size, still a difference), 0.75, 0
    assert list(zip(t.layer, t["head"])) == [(0, 0), (1, 1), (1, 0), (0, 1)]
    assert t["Hedges' g"].iloc[2] == pytest.approx(hand_independent(IND_A[(1, 0)], IND_B[(1, 0)])[1])
    at.radio(key="w_cmp_rank").set_value("effect").run()
    t = ranked_table(at)
    assert list(zip(t.layer, t["head"])) == [(0, 0), (1, 0), (0, 1), (1, 1)]  # by |g|, untestable last
    assert at.query_params["cmp_rank"] == "effect"
    at.radio(key="w_cmp_rank").set_value("diff").run()
    assert any("m = 2" in md.value for md in at.markdown)
    for k in ("hedges_g", "welch", "holm", "bh"):  # the help quotes the formulas
        assert any(cmp.HELP[k] in md.value for md in at.markdown), k
    # the drilled head defaults to the one that differs most; a click on the map picks another
    assert at.subheader[-1].value == "Layer 0, head 0"
    select_on_chart(at, "cmp_chart", {"cell": [{"layer": 1, "head": 0}]})
    assert at.session_state["cmp_head"] == [1, 0] and at.query_params["cmp_head"] == "1,0"
    assert at.subheader[-1].value == "Layer 1, head 0"
    vals = chart_data(at, "compare-values", "value")
    assert sorted(vals.value) == sorted(IND_A[(1, 0)] + IND_B[(1, 0)])
    drivers = " ".join(md.value for md in at.markdown)
    assert "#6 · question 6" in drivers and "share 67%" in drivers  # (4 − 2) / (4 · 0.75)
    assert "#6 · question 6 · no answer given · prediction **yes**" in drivers and "None" not in drivers
    assert "#0 · question 0" in drivers and "share 78%" in drivers  # (2.75 − 1) / (3 · 0.75)
    at.button(key="cmp_open_B_6").click().run()
    assert not at.exception
    assert at.title[0].value.endswith("Attention")
    ss = at.session_state
    assert (ss["run"], ss["ex"], ss["stream"], ss["layer"], ss["head"]) == ("ind", 6, "self", 1, 0)


def test_page_row_click_selects_head(hand_lake, monkeypatch):
    at = open_app(hand_lake, monkeypatch, page=PAGE, run="ind", a_split="a", b_split="b")
    el = next(d for d in at.dataframe if "adjusted p" in d.value.columns)
    click_row(at, el, 2)
    assert not at.exception
    assert at.session_state["cmp_head"] == [1, 0]  # the third row by |B − A|


def test_page_paired_runs(hand_lake, monkeypatch):
    at = open_app(hand_lake, monkeypatch, page=PAGE, run="p0", cmp_b_run="p1", cmp_head="0,0")
    assert at.radio(key="w_cmp_mode").value == "run" and at.selectbox(key="w_cmp_b_run").value == "p1"
    m = diff_map(at)
    diff, dz, _, _, p = hand_paired(P0[(0, 0)], P1[(0, 0)][:4])
    assert m.loc[(0, 0)]["diff"] == pytest.approx(diff) and m.loc[(0, 0)].effect == pytest.approx(dz)
    assert m.loc[(0, 0)].p == pytest.approx(p, rel=1e-6) and m.loc[(0, 0)].n_a == 4
    t = ranked_table(at)
    # by |d̄|: 1.5, 1, then 0.25 twice (by layer, head)
    assert list(zip(t.layer, t["head"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "d_z" in t.columns
    drivers = " ".join(md.value for md in at.markdown)
    assert "#3 · question 3" in drivers and "share 50%" in drivers  # d = 3 of Σd = 6
    assert at.button(key="cmp_open_b_3").label == "Open B"  # text, not an emoji a font may lack
    at.button(key="cmp_open_b_3").click().run()  # open example 3 in run B
    assert not at.exception and at.title[0].value.endswith("Attention")
    ss = at.session_state
    assert (ss["run"], ss["ex"], ss["layer"], ss["head"]) == ("p1", 3, 0, 0)
    assert ss["cmp_b_run"] == "p0"  # the comparison is kept, with the runs swapped


def test_url_restores_the_comparison(hand_lake, monkeypatch):
    params = dict(run="ind", a_split="a", b_split="b", cmp_stat="max", cmp_test="rank", cmp_corr="bh",
                  cmp_map="effect", cmp_head="1,0")
    at = open_app(hand_lake, monkeypatch, page=PAGE, **params)
    assert at.selectbox(key="w_cmp_stat").value == "max"
    assert at.radio(key="w_cmp_test").value == "rank" and at.radio(key="w_cmp_corr").value == "bh"
    assert at.selectbox(key="w_a_split").value == "a" and at.selectbox(key="w_b_split").value == "b"
    assert at.subheader[-1].value == "Layer 1, head 0"
    m = diff_map(at)
    g = hand_independent([10 * v for v in IND_A[(0, 0)]], [10 * v for v in IND_B[(0, 0)]])[1]
    assert m.loc[(0, 0)].value == pytest.approx(g)  # coloured by the effect size
    assert m.loc[(0, 0)].p == pytest.approx(2 / 35)  # Mann–Whitney
    assert {k: at.query_params[k] for k in params} == params
    at.radio(key="w_cmp_corr").set_value("holm").run()
    assert not at.exception and "cmp_corr" not in at.query_params  # the default leaves the URL


# -- the synthetic lake and a lake from the real pipeline --------------------------------------------
def test_page_on_synth_lake(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page=PAGE, run="synth")
    # a first visit compares right (A) and wrong (B) answers
    assert at.session_state["a_correct"] is True and at.session_state["b_correct"] is False
    e = synth_lake.examples
    s = synth_lake.stats
    s = s[(s.stat == "t2i") & (s.layer == 1) & (s["head"] == 0)].set_index("example_id").value
    a, b = s[e[e.correct].example_id].tolist(), s[e[~e.correct].example_id].tolist()
    m = diff_map(at)
    assert m.loc[(1, 0)]["diff"] == pytest.approx(mean(b) - mean(a), abs=1e-6)
    # run B = the other run over the same manifest, which has other streams: said, not raised
    at.radio(key="w_cmp_mode").set_value("run").run()
    assert not at.exception and at.session_state["cmp_b_run"] == "pruned"
    assert "No statistic has values" in texts(at)
    at = open_app(synth_lake.root, monkeypatch, page=PAGE, run="empty")
    assert "no examples" in texts(at)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two runs over one manifest by two tiny random ViLTs (seeds 0 and 1), through the real pipeline."""
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest, make_tiny_vilt

    tmp = tmp_path_factory.mktemp("tinypair")
    manifest = make_manifest(tmp / "data", n=8)
    for run, seed in (("r0", 0), ("r1", 1)):
        model = make_tiny_vilt(tmp / f"m{seed}", seed=seed)
        extract(str(model), manifest, tmp / "lake", run, batch_size=4, keep_hidden="none", progress=False)
    return tmp / "lake"


def test_page_on_pipeline_lake(tiny_pair, monkeypatch):
    root = tiny_pair
    hs = read_table(root, "head_stats", stat="t2i")
    ex = read_table(root, "examples", run="r0").set_index("example_id")

    def vals(run, layer, head):
        d = hs[(hs.run == run) & (hs.layer == layer) & (hs["head"] == head)]
        return d.set_index("example_id").value.astype(float).sort_index()

    # independent: split train (A) against val (B) in run r0
    at = open_app(root, monkeypatch, page=PAGE, run="r0", a_split="train", b_split="val")
    m = diff_map(at)
    want = {}
    for l in range(2):
        for h in range(2):
            v = vals("r0", l, h)
            a, b = v[ex.split == "train"].tolist(), v[ex.split == "val"].tolist()
            want[(l, h)] = hand_independent(a, b)
            diff, g, t, df, p = want[(l, h)]
            assert m.loc[(l, h)]["diff"] == pytest.approx(diff, abs=1e-6)
            assert m.loc[(l, h)].effect == pytest.approx(g, rel=1e-4)
            assert m.loc[(l, h)].p == pytest.approx(p, rel=1e-3)
    order = sorted(want, key=lambda k: (-abs(want[k][0]), k))  # by |B − A|, the default
    t = ranked_table(at)
    assert list(zip(t.layer, t["head"])) == order
    top = order[0]
    assert at.subheader[-1].value == f"Layer {top[0]}, head {top[1]}"
    at.radio(key="w_cmp_rank").set_value("effect").run()
    t = ranked_table(at)
    assert list(zip(t.layer, t["head"])) == sorted(want, key=lambda k: (-abs(want[k][1]), k))

    # paired: run r1 against r0 over the same manifest
    at = open_app(root, monkeypatch, page=PAGE, run="r0", cmp_b_run="r1")
    m = diff_map(at)
    for l in range(2):
        for h in range(2):
            diff, dz, t_, df, p = hand_paired(vals("r0", l, h).tolist(), vals("r1", l, h).tolist())
            assert m.loc[(l, h)]["diff"] == pytest.approx(diff, abs=1e-6)
            assert m.loc[(l, h)].effect == pytest.approx(dz, rel=1e-4)
            assert m.loc[(l, h)].n_a == 8
    t = ranked_table(at)
    lh = (int(t.layer.iloc[-1]), int(t["head"].iloc[-1]))  # not the default head: click it
    select_on_chart(at, "cmp_chart", {"cell": [{"layer": lh[0], "head": lh[1]}]})
    d = (vals("r1", *lh) - vals("r0", *lh))
    first = int((d * np.sign(d.sum())).idxmax())  # the example that moves most with the mean
    at.button(key=f"cmp_open_a_{first}").click().run()
    assert not at.exception and at.title[0].value.endswith("Attention")
    ss = at.session_state
    assert (ss["run"], ss["ex"], ss["stream"], ss["layer"], ss["head"]) == ("r0", first, "self", *lh)


# -- colours, legend, padded axis, shares and ranking on a larger lake ------------------------------
BIG_A, BIG_B = 600, 40  # group A (split "a") is large, so that an even share 1 / n_A is well under 1%


@pytest.fixture(scope="module")
def big_lake(tmp_path_factory):
    """Run "big": 600 examples of split "a" (A) and 40 of split "b" (B), t2i of 4 heads with spreads chosen so
    that ranking by |B − A| and by |Hedges' g| disagree; head (0, 0) holds values of exactly 0 and 1."""
    rng = np.random.default_rng(7)
    a = {(0, 0): rng.uniform(0, 1, BIG_A), (0, 1): rng.normal(0.3, 0.15, BIG_A),
         (1, 0): rng.normal(0.5, 0.005, BIG_A), (1, 1): rng.normal(0.6, 0.1, BIG_A)}
    b = {(0, 0): rng.uniform(0.3, 1, BIG_B), (0, 1): rng.normal(0.7, 0.15, BIG_B),
         (1, 0): rng.normal(0.53, 0.005, BIG_B), (1, 1): rng.normal(0.45, 0.1, BIG_B)}
    a[(0, 0)][:5], a[(0, 0)][5:10], b[(0, 0)][:5] = 0.0, 1.0, 1.0
    vals = {("t2i", l, h): np.clip(np.concatenate([a[(l, h)], b[(l, h)]]), 0, 1).tolist() for (l, h) in a}
    root = tmp_path_factory.mktemp("big")
    ex = [_ex(i, "a" if i < BIG_A else "b", i % 3 > 0) for i in range(BIG_A + BIG_B)]
    write_run(root, "big", "big.jsonl", ex, vals)
    return root


def big_values(root, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """(A's, B's) t2i values of one head, read from the lake's files with pandas."""
    hs = read_table(root, "head_stats", run="big", stat="t2i")
    ex = read_table(root, "examples", run="big")[["example_id", "split"]]
    d = hs[(hs.layer == layer) & (hs["head"] == head)].merge(ex, on="example_id")
    return (d[d.split == "a"].set_index("example_id").value.astype(float),
            d[d.split == "b"].set_index("example_id").value.astype(float))


def texts_of(at, kind: str) -> str:
    return " ".join(str(e.value) for e in at.get(kind))


def open_big(root, monkeypatch, **params):
    return open_app(root, monkeypatch, page=PAGE, run="big", a_split="a", b_split="b", **params)


def page_svg(at, description: str) -> str:
    """The page's chart with this description, drawn to SVG (vl-convert) with its datasets put back."""
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        if spec.get("description") == description:
            spec["datasets"] = {d.name: json.loads(pa.ipc.open_stream(d.data.data).read_all().to_pandas().to_json(
                orient="records")) for d in el.proto.datasets}
            return export.spec_svg(spec)
    raise AssertionError(f"no chart {description!r}")


def marks(svg: str, kind: str) -> list[dict]:
    """The SVG's marks of one kind (``circle``, ``rect mark``): their aria-label fields, fill and position."""
    out = []
    for m in re.finditer(r"<path ([^>]*)/>", svg):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))
        if attrs.get("aria-roledescription") != kind:
            continue
        fields = dict(kv.split(": ", 1) for kv in attrs.get("aria-label", "").split("; ") if ": " in kv)
        xy = re.match(r"translate\(([-\d.e]+),([-\d.e]+)\)", attrs.get("transform", ""))
        out.append({**fields, "fill": attrs.get("fill"), "x": float(xy.group(1)) if xy else None})
    return out


def hue(colour: str) -> float:
    """Hue in degrees of ``#rrggbb`` or ``rgb(r, g, b)``."""
    import colorsys

    if colour.startswith("#"):
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    else:
        rgb = [int(x) for x in re.findall(r"\d+", colour)[:3]]
    return 360 * colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def hue_gap(a: float, b: float) -> float:
    return min(abs(a - b), 360 - abs(a - b))


def test_groups_have_their_own_colours_and_a_legend_in_every_chart(big_lake, monkeypatch):
    at = open_big(big_lake, monkeypatch, cmp_head="0,0")
    name_a, name_b = "A: split = 'a'", "B: split = 'b'"
    # the dots: coloured by group with a legend naming each group, in two clearly different colours
    spec, _ = chart(at, "compare-values")
    color = next(l for l in spec["layer"] if l["mark"]["type"] == "circle")["encoding"]["color"]
    assert color["scale"]["domain"] == [name_a, name_b] and color.get("legend", {}) is not None
    svg = page_svg(at, "compare-values")
    assert {name_a, name_b} <= {html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)}
    dots = marks(svg, "circle")
    fill = {g: {d["fill"] for d in dots if d["group"] == g} for g in "AB"}
    assert len(fill["A"]) == len(fill["B"]) == 1 and fill["A"] != fill["B"]
    hue_a, hue_b = hue(fill["A"].pop()), hue(fill["B"].pop())
    assert hue_gap(hue_a, hue_b) > 90  # not two blues
    # the map: B − A from A's colour (higher in A) to B's (higher in B), its legend naming both groups
    spec, _ = chart(at, "compare-diff")
    title = " ".join(next(l for l in spec["layer"] if "color" in l.get("encoding", {}))["encoding"]["color"]["title"])
    assert "higher in A (split = 'a')" in title and "higher in B (split = 'b')" in title
    cells = [c for c in marks(page_svg(at, "compare-diff"), "rect mark") if "mean A" in c]
    assert len(cells) == 4
    for c in cells:
        d = float(c["mean B"]) - float(c["mean A"])
        if abs(d) > 0.05:  # a pale cell has no telling hue
            assert hue_gap(hue(c["fill"]), hue_b if d > 0 else hue_a) < 30, (c, hue_a, hue_b)


def test_values_axis_is_padded_so_points_at_0_and_1_are_whole(big_lake, monkeypatch):
    at = open_big(big_lake, monkeypatch, cmp_head="0,0")  # head (0, 0) has values of exactly 0 and 1
    spec, _ = chart(at, "compare-values")
    dots = next(l for l in spec["layer"] if l["mark"]["type"] == "circle")
    scale = dots["encoding"]["x"]["scale"]
    lo, hi = scale["domain"]
    assert lo < 0 < 1 < hi and hi - 1 >= 0.02 and 0 - lo >= 0.02 and scale.get("nice") is False
    assert not scale.get("clamp", False)
    # drawn: every dot lies wholly inside the plot, the ones at 0 and at 1 too
    svg = page_svg(at, "compare-values")
    r = math.sqrt(dots["mark"].get("size", 30) / math.pi)
    xs = [d["x"] for d in marks(svg, "circle")]
    assert len(xs) == BIG_A + BIG_B
    assert min(xs) - r >= 0 and max(xs) + r <= spec["width"]
    # the builder on its own: [0, 1] is padded on both sides
    c = charts.group_values(pd.DataFrame({"example_id": [0, 1, 2, 3], "group": list("AABB"),
                                          "value": [0.0, 1.0, 0.5, 1.0]}), value_title="t2i").to_dict()
    assert c["layer"][0]["encoding"]["x"]["scale"]["domain"] == pytest.approx([-0.04, 1.04])


def test_driver_shares_of_both_groups_against_numpy(big_lake, monkeypatch):
    at = open_big(big_lake, monkeypatch, cmp_head="0,0")
    a, b = big_values(big_lake, 0, 0)
    xa, xb = a.to_numpy(), b.to_numpy()
    d = xb.mean() - xa.mean()
    share = {("A", i): (xb.mean() - x) / (len(xa) * d) for i, x in a.items()}
    share |= {("B", i): (x - xa.mean()) / (len(xb) * d) for i, x in b.items()}
    for g in "AB":
        assert sum(v for (k, _), v in share.items() if k == g) == pytest.approx(1)  # each group's shares: 100%
    text = " ".join(md.value for md in at.markdown)
    got = re.findall(r"#(\d+) · [^—]*— t2i [\d.]+ \(share (-?[\d.e+-]+)% in ([AB]), (-?[\d.]+)× even\)", text)
    assert {g for _, _, g, _ in got} == {"A", "B"} and len(got) == 10, text[-2000:]
    for i, pct, g, even in got:
        want = share[(g, int(i))]
        p = 100 * want
        assert abs(float(pct) - p) <= (0.5 if abs(p) >= 10 else 0.05 * abs(p)) + 1e-12, (i, g, pct, p)
        assert float(pct) > 0  # a group's top examples pull with the difference; none reads 0%
        n = len(xa) if g == "A" else len(xb)
        assert float(even) == pytest.approx(want * n, abs=0.006)
    for g in "AB":  # the listed examples are the group's largest shares
        shown = sorted(share[(g, int(i))] for i, _, gg, _ in got if gg == g)
        top = sorted(v for (k, _), v in share.items() if k == g)[-5:]
        assert shown == pytest.approx(top)
    assert f"1/{BIG_A} = " in texts_of(at, "caption") and f"1/{BIG_B} = " in texts_of(at, "caption")
    assert "sum to 100%" in text  # the help says what a share is


def test_heads_ranked_by_difference_of_means_as_pandas_ranks_them(big_lake, monkeypatch):
    hs = read_table(big_lake, "head_stats", run="big", stat="t2i")
    ex = read_table(big_lake, "examples", run="big")[["example_id", "split"]]
    d = hs.merge(ex, on="example_id").assign(value=lambda x: x.value.astype(float))
    g = d.groupby(["layer", "head", "split"]).value.agg(["mean", "var", "count"]).unstack("split")
    diff = g[("mean", "b")] - g[("mean", "a")]
    na, nb = g[("count", "a")], g[("count", "b")]
    sp = np.sqrt(((na - 1) * g[("var", "a")] + (nb - 1) * g[("var", "b")]) / (na + nb - 2))
    hedges = (1 - 3 / (4 * (na + nb) - 9)) * diff / sp
    by_diff = sorted(diff.index, key=lambda k: (-abs(diff[k]), k))
    by_g = sorted(hedges.index, key=lambda k: (-abs(hedges[k]), k))
    assert by_diff != by_g  # the lake is built so that the two rankings disagree
    at = open_big(big_lake, monkeypatch)
    assert at.radio(key="w_cmp_rank").value == "diff"  # the default, as the README's findings rank heads
    t = ranked_table(at)
    assert [(int(l), int(h)) for l, h in zip(t.layer, t["head"])] == by_diff
    np.testing.assert_allclose(t["B − A"], [diff[k] for k in by_diff], rtol=1e-9)
    assert at.subheader[-1].value == f"Layer {by_diff[0][0]}, head {by_diff[0][1]}"  # the drilled head is the top
    assert "Ranked by difference of means |B − A|" in texts_of(at, "caption")
    at.radio(key="w_cmp_rank").set_value("effect").run()
    assert not at.exception
    t = ranked_table(at)
    assert [(int(l), int(h)) for l, h in zip(t.layer, t["head"])] == by_g
    assert "Ranked by effect size |Hedges' g|" in texts_of(at, "caption")
    assert at.query_params["cmp_rank"] == "effect"


# -- issue 24: what an untestable head and a p-value read ---------------------------------------------
def display_values(el) -> pd.DataFrame:
    """The text a dataframe element shows in its cells (its Styler's display values)."""
    return pa.ipc.open_stream(el.proto.arrow_data.styler.display_values).read_all().to_pandas()


def test_untestable_heads_read_a_dash_and_why_and_p_values_are_whole(hand_lake, monkeypatch):
    at = open_app(hand_lake, monkeypatch, page=PAGE, run="ind", a_split="a", b_split="b", cmp_head="1,1")
    el = next(d for d in at.dataframe if "adjusted p" in d.value.columns)
    t, shown = el.value, display_values(el)
    key = list(zip(t.layer, t["head"]))
    row = {k: i for i, k in enumerate(key)}
    # (1, 1): one value in A; (0, 1): 2, 2, 2 against 2, 2, 2, 2 — neither can be tested
    assert t["not tested"][row[(1, 1)]] == "fewer than 2 values in A"
    assert t["not tested"][row[(0, 1)]] == "no variance in either group"
    assert t["not tested"][row[(0, 0)]] == t["not tested"][row[(1, 0)]] == ""
    for k in ((1, 1), (0, 1)):
        assert [shown[c][row[k]] for c in ("Hedges' g", "p", "adjusted p")] == ["–", "–", "–"], k
    assert "None" not in shown.to_string() and "nan" not in shown.to_string().lower()
    # the tested heads' p-values in full, as computed by hand (Holm over m = 2)
    p00 = hand_independent(IND_A[(0, 0)], IND_B[(0, 0)])[4]
    p10 = hand_independent(IND_A[(1, 0)], IND_B[(1, 0)])[4]
    lo, hi = sorted([p00, p10])
    adj = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), min(1, hi))}  # Holm: 2 p(1), then max(that, 1 p(2))
    for k, p in (((0, 0), p00), ((1, 0), p10)):
        assert shown["p"][row[k]] == f"{p:.2e}" and shown["adjusted p"][row[k]] == f"{adj[p]:.2e}"
        assert re.fullmatch(r"\d\.\d\de-\d\d", shown["p"][row[k]])
    cfg = json.loads(el.proto.columns)
    assert cfg["p"]["width"] >= 90 and cfg["adjusted p"]["width"] >= 90  # "7.53e-05" whole, not "7.53e-…"
    # the drilled untestable head: "–" and the reason, never "None"
    metrics = {m.label: m for m in at.metric}
    assert metrics["p"].value == metrics["adjusted p"].value == metrics["Hedges' g"].value == "–"
    assert metrics["p"].help == "not tested: fewer than 2 values in A"
    assert "Layer 1, head 1 is not tested: fewer than 2 values in A." in texts_of(at, "caption")
    # paired, and the rank tests: their own reasons
    ind = cmp.compare_independent(pd.DataFrame({"layer": [0, 0], "head": [0, 0], "group": ["A", "B"], "n": [3, 3],
                                                "mean": [1.0, 1.0], "var": [0.0, 0.0]}))
    assert cmp.untested(ind, paired=False).tolist() == ["no variance in either group"]
    assert cmp.untested(ind.assign(n_b=1), paired=False).tolist() == ["fewer than 2 values in B"]
    assert cmp.untested(ind, paired=False, test="rank").tolist() == ["every value is the same"]
    pr = cmp.compare_paired(pd.DataFrame({"layer": [0, 0], "head": [0, 1], "n": [4, 1], "mean_a": [1.0, 1.0],
                                          "mean_b": [2.0, 2.0], "mean_d": [1.0, 1.0], "var_d": [0.0, 0.0]}))
    assert cmp.untested(pr, paired=True).tolist() == ["every B − A is the same (no variance)", "fewer than 2 pairs"]
    tested = ind.assign(p=0.01)
    assert cmp.untested(tested, paired=False).tolist() == [""]
