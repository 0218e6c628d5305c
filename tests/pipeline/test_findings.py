"""The README's "What the demo model shows" against a freshly built demo lake.

Builds the demo lake the way `make demo` does (committed model, held-out scenes) and recomputes
every number of pipeline/demo/findings.json; the README section must be the rendering of that file.
"""

from __future__ import annotations

import json

import pytest

from pipeline.demo.build import MODEL_DIR, build_demo_lake
from pipeline.demo.findings import FINDINGS, README, compute, render

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").exists() or not FINDINGS.exists(),
                                reason="the demo model or its findings are not committed yet")
MARGIN = 0.02


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(FINDINGS.read_text())


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, committed) -> dict:
    lake = build_demo_lake(tmp_path_factory.mktemp("demo") / "lake", n=committed["n_examples"], progress=False,
                           embed_maps=False)
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
