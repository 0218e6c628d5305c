"""The README's "What the demo model shows" against a freshly built demo lake.

Builds the demo lake the way `make demo` does (committed model, held-out scenes) and recomputes
every number of pipeline/demo/findings.json; the README section must be the rendering of that file.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest
from scipy.stats import spearmanr

from pipeline.demo.build import MODEL_DIR, build_demo_lake
from pipeline.demo.findings import FINDINGS, README, compute, render

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").exists() or not FINDINGS.exists(),
                                reason="the demo model or its findings are not committed yet")
MARGIN = 0.02
LOGIT_MARGIN = 0.05  # effects and areas are in logits (the demo's answers score about 7)


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(FINDINGS.read_text())


@pytest.fixture(scope="module")
def lake(tmp_path_factory, committed):
    return build_demo_lake(tmp_path_factory.mktemp("demo") / "lake", n=committed["n_examples"], progress=False,
                           embed_maps=False)


@pytest.fixture(scope="module")
def fresh(lake) -> dict:
    return compute(lake)


def test_readme_section_is_the_rendering_of_the_findings(committed):
    assert render(committed) in README.read_text()


def test_accuracy_matches(fresh, committed):
    assert fresh["n_examples"] == committed["n_examples"]
    for q, v in committed["accuracy"].items():
        assert fresh["accuracy"][q] == pytest.approx(v, abs=MARGIN), q


def test_grounding_heads_match(fresh, committed):
    assert fresh["pointing_chance"] == pytest.approx(committed["pointing_chance"], abs=MARGIN)
    by_head = {(h["layer"], h["head"]): h for h in fresh["top_pointing_heads"]}
    best = committed["top_pointing_heads"][0]
    assert fresh["top_pointing_heads"][0]["pointing"] == pytest.approx(best["pointing"], abs=MARGIN)
    if (best["layer"], best["head"]) in by_head:
        for k in ("grounding", "boxed_img_mass"):
            assert by_head[(best["layer"], best["head"])][k] == pytest.approx(best[k], abs=MARGIN), k
    # the best head really points far above chance: the README's central claim
    assert fresh["top_pointing_heads"][0]["pointing"] > 2 * fresh["pointing_chance"]
    for a, b in zip(fresh["layers"], committed["layers"]):
        assert a["layer"] == b["layer"]
        for k in ("t2i", "grounding", "pointing", "boxed_img_mass"):
            assert a[k] == pytest.approx(b[k], abs=MARGIN), (a["layer"], k)


def test_correct_versus_wrong_matches(fresh, committed):
    g, cg = fresh["grounding_correct_vs_wrong"], committed["grounding_correct_vs_wrong"]
    assert abs(g["diff"]) == pytest.approx(abs(cg["diff"]), abs=MARGIN)
    for k in ("correct", "wrong"):
        assert fresh["t2i_correct_vs_wrong_mean"][k] == pytest.approx(committed["t2i_correct_vs_wrong_mean"][k],
                                                                      abs=MARGIN)


def test_wrong_answers_by_type_match(fresh, committed):
    for q, v in committed["wrong_share"].items():
        assert fresh["wrong_share"][q] == pytest.approx(v, abs=MARGIN), q


def test_probes_match(fresh, committed):
    for target, p in committed["probes"].items():
        f = fresh["probes"][target]
        assert (f["n"], f["n_vectors"], f["folds"], f["permutations"]) == (p["n"], p["n_vectors"], p["folds"],
                                                                        p["permutations"]), target
        assert f["first_layer"] == p["first_layer"], target
        for a, b in zip(f["layers"], p["layers"]):
            assert a["layer"] == b["layer"]
            for k in ("value", "control"):
                assert a[k] == pytest.approx(b[k], abs=MARGIN), (target, a["layer"], k)


def test_ablation_matches(fresh, committed):
    f, c = fresh["ablation"], committed["ablation"]
    assert f["keys"] == c["keys"]
    for k in ("n_heads_examples", "n_knockout_examples", "n_regions_examples", "attention_head"):
        assert f[k] == c[k], k
    for a, b in zip(f["heads"], c["heads"]):
        assert (a["layer"], a["head"]) == (b["layer"], b["head"])
        assert a["effect"] == pytest.approx(b["effect"], abs=LOGIT_MARGIN), (a["layer"], a["head"])
        assert a["changed"] == pytest.approx(b["changed"], abs=MARGIN), (a["layer"], a["head"])
    for k in ("best_head", "median_head", "largest_head"):
        assert f[k]["effect"] == pytest.approx(c[k]["effect"], abs=LOGIT_MARGIN), k
        assert f[k]["changed"] == pytest.approx(c[k]["changed"], abs=MARGIN), k
    assert f["estimate_spearman"] == pytest.approx(c["estimate_spearman"], abs=0.1)
    for sets, rows in c["knockout"].items():
        for a, b in zip(f["knockout"][sets], rows):
            assert a["layer"] == b["layer"]
            assert a["effect"] == pytest.approx(b["effect"], abs=LOGIT_MARGIN), (sets, a["layer"])
            assert a["changed"] == pytest.approx(b["changed"], abs=MARGIN), (sets, a["layer"])
    for method, curves in c["areas"].items():
        for curve, v in curves.items():
            assert f["areas"][method][curve] == pytest.approx(v, abs=LOGIT_MARGIN), (method, curve)
    assert f["boxes"]["changed"] == pytest.approx(c["boxes"]["changed"], abs=MARGIN)


def _trapezoid(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())


def test_ablation_numbers_from_the_rows(lake, fresh, committed):
    """Every number of the README's ablation paragraphs, recomputed with pandas straight from the
    interventions table's Parquet files (rows told apart by kind, method and estimated, not by key)."""
    f = fresh["ablation"]
    iv = ds.dataset(lake / "interventions", partitioning="hive").to_table().to_pandas()
    iv = iv[iv.run == "demo"]
    assert set(iv.intervention) == set(f["keys"].values())
    iv["effect"] = iv.metric_after - iv.metric_before
    n = committed["n_examples"]

    heads = iv[(iv.kind == "heads") & ~iv.estimated.astype(bool)]
    assert heads.example_id.nunique() == min(n, int(f["keys"]["heads"].rsplit("=", 1)[1])) == f["n_heads_examples"]
    per = heads.groupby(["layer", "head"]).agg(effect=("effect", "mean"),
                                               changed=("changed", lambda c: c.astype(float).mean()))
    assert len(per) == 16 and (heads.groupby(["layer", "head"]).size() == f["n_heads_examples"]).all()
    for h in f["heads"]:
        assert h["effect"] == pytest.approx(per.effect.loc[(h["layer"], h["head"])], abs=1e-3)
        assert h["changed"] == pytest.approx(per.changed.loc[(h["layer"], h["head"])], abs=1e-3)
    best = (committed["best_head"]["layer"], committed["best_head"]["head"])
    b = f["best_head"]
    assert (b["layer"], b["head"]) == best
    assert b["effect"] == pytest.approx(per.effect.loc[best], abs=1e-3)
    assert b["changed"] == pytest.approx(per.changed.loc[best], abs=1e-3)
    assert b["rank"] == 1 + int((per.effect < per.effect.loc[best]).sum())
    assert f["median_head"]["effect"] == pytest.approx(float(np.median(per.effect)), abs=1e-3)
    assert f["median_head"]["changed"] == pytest.approx(float(np.median(per.changed)), abs=1e-3)
    top = per.effect.idxmin()
    assert (f["largest_head"]["layer"], f["largest_head"]["head"]) == top

    est = iv[(iv.kind == "heads") & iv.estimated.astype(bool)]
    assert est.answer_after.isna().all() and est.changed.isna().all()
    e = est.groupby(["layer", "head"]).effect.mean().loc[per.index]
    assert f["estimate_spearman"] == pytest.approx(spearmanr(per.effect, e).statistic, abs=1e-3)
    assert f["estimate_rank_of_largest"] == 1 + int((e < e.loc[top]).sum())

    ko = iv[iv.kind == "knockout"]
    assert ko.example_id.nunique() == f["n_knockout_examples"]
    assert set(ko.method) == set(f["knockout"]) == {"text->image", "last->image"}
    for sets, rows in f["knockout"].items():
        g = ko[ko.method == sets]
        for r in rows:
            at = g[g.layer == r["layer"]]
            assert at.spec.map(lambda s: json.loads(s)["layers"]).map(len).eq(1).all()  # --window 1
            assert r["effect"] == pytest.approx(at.effect.mean(), abs=1e-3), (sets, r["layer"])
            assert r["changed"] == pytest.approx(at.changed.astype(float).mean(), abs=1e-3), (sets, r["layer"])
        assert [r["layer"] for r in rows] == sorted(g.layer.unique())

    reg = iv[(iv.kind == "regions") & (iv.method != "box")].copy()
    assert reg.example_id.nunique() == f["n_regions_examples"]
    reg["curve"] = reg.spec.map(lambda s: json.loads(s)["curve"])
    assert set(reg.method) == set(f["areas"]) == {"attention", "rollout", "random"}
    for (method, curve), g in reg.groupby(["method", "curve"]):
        mean = g.groupby("fraction").metric_after.mean().sort_index()
        assert list(mean.index) == pytest.approx([i / 10 for i in range(11)])
        assert f["areas"][method][curve] == pytest.approx(_trapezoid(mean.index, mean.values), abs=1e-3)
    dele = reg[reg.curve == "deletion"]
    assert f["score_before"] == pytest.approx(dele.metric_before.mean(), abs=1e-3)
    assert f["score_all_removed"] == pytest.approx(dele[dele.fraction == 1].metric_after.mean(), abs=1e-3)

    box = iv[iv.method == "box"]
    assert f["boxes"]["boxes"] == len(box) and f["boxes"]["n"] == box.example_id.nunique()
    assert f["boxes"]["effect"] == pytest.approx(box.effect.mean(), abs=1e-3)
    assert f["boxes"]["changed"] == pytest.approx(box.changed.astype(float).mean(), abs=1e-3)
