"""The Probes page on a copy of the small demo lake (its two demo probes, built by `vlatlas demo`):
what it says of each layer against the stored rows read straight from Parquet, the confusion matrix
against the stored counts, and a new probe run from the page's form (stored, or only shown when the
app serves the lake read-only)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow.dataset as ds
import pytest

from tests.app.test_app import chart, open_app

PAGE = "app_pages/probes.py"


@pytest.fixture()
def lake(small_demo_lake, tmp_path):
    return shutil.copytree(small_demo_lake, tmp_path / "lake")


def stored(lake) -> pd.DataFrame:
    return ds.dataset(lake / "probes", partitioning="hive").to_table().to_pandas()


def test_the_page_says_what_the_stored_rows_say(lake, monkeypatch):
    rows = stored(lake)
    assert set(rows.target) == {"box_color", "box_shape"}  # `vlatlas demo` probes both
    at = open_app(lake, monkeypatch, PAGE)
    box = at.selectbox(key="w_probe")
    labels = {f"{t} · tokens {sel} · {src}" for t, sel, src in zip(rows.target, rows.selector, rows.source)}
    assert sorted(box.options) == sorted(labels) and box.value in set(rows.probe)
    for key in sorted(rows.probe.unique()):
        at = open_app(lake, monkeypatch, PAGE, probe=key)
        mine = rows[rows.probe == key].sort_values("layer")
        # the curve holds the stored score and control at every layer
        _, (data,) = chart(at, "probe-curve")
        probe = data[data.series == "probe"].sort_values("layer")
        assert probe.layer.tolist() == mine.layer.tolist()
        assert probe.score.tolist() == pytest.approx(mine.value.tolist())
        control = data[data.series == "control"].sort_values("layer")
        assert control.score.tolist() == pytest.approx(mine.control.tolist())
        # the summary names the first layer above its control at p < 0.05, computed here from the rows
        above = mine[(mine.p_value < 0.05) & (mine.value > mine.control)]
        text = " ".join(m.value for m in at.markdown)
        if len(above):
            assert f"first above its control at **layer {int(above.layer.iloc[0])}**" in text
        else:
            assert "at no layer above its control" in text
        # the confusion matrix opens on the best layer and shows its stored counts
        best = mine.loc[mine.value.idxmax()]
        assert at.selectbox(key="w_player").value == int(best.layer)
        _, (cells,) = chart(at, "probe-confusion")
        conf = json.loads(best.confusion)
        for i, t in enumerate(conf["labels"]):
            for j, p in enumerate(conf["labels"]):
                got = cells[(cells["true"] == t) & (cells.predicted == p)]["count"].item()
                assert got == conf["counts"][i][j]
        assert cells["count"].sum() == best.n_vectors
        # accuracy is the diagonal's share, as stored
        diag = sum(conf["counts"][i][i] for i in range(len(conf["labels"])))
        assert diag / best.n_vectors == pytest.approx(best.value)


def _run_form(at, target: str, selector: str, permutations: int):
    at.selectbox[[s.label for s in at.selectbox].index("Target")].select(target)
    at.selectbox[[s.label for s in at.selectbox].index("Tokens")].select(selector)
    at.number_input[[n.label for n in at.number_input].index("Folds")].set_value(3)
    at.number_input[[n.label for n in at.number_input].index("Permutations (control task)")].set_value(permutations)
    at.button[[b.label for b in at.button].index("Run the probe")].click()
    return at.run()


def test_a_probe_run_from_the_page_is_stored_and_shown(lake, monkeypatch):
    from lake.catalog import Catalog
    from pipeline.probe import ProbeSpec, run_probe

    at = open_app(lake, monkeypatch, PAGE)
    at = _run_form(at, "box_shape", "mean-image", 3)
    assert not at.exception, [e.value for e in at.exception]
    spec = ProbeSpec("box_shape", "mean-image", "hidden", folds=3, permutations=3)
    rows = stored(lake)
    new = rows[rows.probe == spec.key].sort_values(["stream", "layer"])
    assert len(new) and at.selectbox(key="w_probe").value == spec.key
    # what the page stored is what the probe computes on these vectors
    want = run_probe(Catalog(lake), "demo", spec).sort_values(["stream", "layer"])
    assert new.value.tolist() == pytest.approx(want.value.tolist())
    assert new.p_value.tolist() == pytest.approx(want.p_value.tolist())


def test_read_only_shows_a_new_probe_without_storing_it(lake, monkeypatch):
    monkeypatch.setenv("VLATLAS_READ_ONLY", "1")
    before = sorted(p.name for p in (lake / "probes").rglob("*.parquet"))
    at = open_app(lake, monkeypatch, PAGE)
    at = _run_form(at, "box_color", "mean-image", 2)
    assert not at.exception
    assert any("read-only" in i.value for i in at.info)
    assert len(at.dataframe) >= 1
    assert sorted(p.name for p in (lake / "probes").rglob("*.parquet")) == before
