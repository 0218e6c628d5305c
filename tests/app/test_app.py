"""The Streamlit app under AppTest, against a lake (the synthetic one; see tests/lakegen.py).

Charts are found by their Vega-Lite ``description`` (set by ``streamlit_app/charts.py``);
their data come back from the Arrow datasets Streamlit attaches to the chart proto.
Expected values are computed here, in numpy, from the attention the lake
generator wrote, never through ``lake/queries.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.proto.WidgetStates_pb2 import WidgetStates
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "streamlit_app" / "app.py"
TIMEOUT = 60


# -- helpers ------------------------------------------------------------------------------
def open_app(root, monkeypatch, page: str | None = None, **params) -> AppTest:
    """Run the app on the lake at ``root`` (via $VLATLAS_LAKE) with URL query ``params``."""
    monkeypatch.setenv("VLATLAS_LAKE", str(root))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart(at: AppTest, description: str) -> tuple[dict, list[pd.DataFrame]]:
    """(spec, datasets) of the chart with this description."""
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        if spec.get("description") == description:
            data = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in el.proto.datasets]
            return spec, data
    raise AssertionError(f"no chart {description!r}; charts: "
                         f"{[json.loads(e.proto.spec).get('description') for e in at.get('vega_lite_chart')]}")


def chart_data(at: AppTest, description: str, column: str) -> pd.DataFrame:
    """The dataset of a chart that has ``column``."""
    _, data = chart(at, description)
    return next(d for d in data if column in d.columns)


def select_on_chart(at: AppTest, key: str, selection: dict) -> AppTest:
    """Simulate a selection on the chart drawn with ``key`` (what the browser sends), and rerun.

    AppTest has no API for chart selections; this sends the widget state the
    frontend would, so the chart's on_select callback runs as in the browser.
    """
    send_selection(at, next(e for e in at.get("vega_lite_chart") if e.key == key), selection)
    assert not at.exception, [e.value for e in at.exception]
    return at


def send_selection(at: AppTest, el, selection: dict) -> None:
    """Send the widget state the frontend would for ``selection`` on the element ``el`` (a chart or a
    dataframe), and rerun."""
    states: WidgetStates = at._tree.get_widget_states()
    ws = states.widgets.add()
    ws.id = el.proto.id
    ws.string_value = json.dumps({"selection": selection})
    at._run(states)


def click_row(at: AppTest, el, row: int) -> None:
    """A click on row ``row`` of the dataframe ``el`` (as the browser sends it), and rerun."""
    send_selection(at, el, {"rows": [row], "columns": [], "cells": []})


def texts(at: AppTest) -> str:
    return " ".join(str(e.value) for kind in ("info", "error", "warning") for e in at.get(kind))


def check_every_page(lake, monkeypatch, run: str, ex: int, att_streams: list[str], hid_streams: list[str],
                     examples: pd.DataFrame, column: str = "text") -> None:
    """Every page renders on ``run``'s lake; the pages with a stream selector offer exactly the streams
    given (read by the caller from the Parquet files), and the Examples table shows ``examples``'
    ids and ``column``."""
    for page, streams in (("app_pages/examples.py", None), ("app_pages/head_summary.py", att_streams),
                          ("app_pages/attention.py", att_streams), ("app_pages/hidden_states.py", hid_streams),
                          ("app_pages/sql.py", None), ("app_pages/compare.py", att_streams),
                          ("app_pages/probes.py", None), ("app_pages/interventions.py", None)):
        at = open_app(lake, monkeypatch, page=page, run=run, ex=ex)
        assert not at.exception, (page, at.exception)
        if streams is not None:
            box = at.selectbox(key="w_stream")
            assert sorted(box.options) == streams and len(box.options) == len(streams), (page, box.options)
            assert not box.disabled
        if page == "app_pages/probes.py":  # no run here has probes yet: the page says how to make one
            assert any(f"Run **{run}** has no probes yet" in i.value for i in at.info), [i.value for i in at.info]
        if page == "app_pages/interventions.py":  # nor interventions: the page says how to make them
            assert any(f"Run **{run}** has no interventions yet" in i.value and "vlatlas intervene" in i.value
                       for i in at.info), [i.value for i in at.info]
        if page == "app_pages/examples.py":
            table = at.dataframe[0].value
            assert table.example_id.tolist() == examples.example_id.tolist()
            assert table[column].tolist() == examples[column].tolist()


# -- independent expectations ---------------------------------------------------------------
def t2i(lake, example_id: int, stream: str, layer: int) -> np.ndarray:
    """[head] mean over text queries of the mass on image keys, from the full attention."""
    a = lake.attention[(example_id, stream, layer)]  # [head, query, key]
    tok = lake.tokens_of(example_id, stream)
    text = (tok.modality == "text").to_numpy()
    image = (tok.modality == "image").to_numpy()
    return a[:, text][:, :, image].sum(-1).mean(-1)


def t2i_matrix(lake, example_id: int, stream: str = "self") -> np.ndarray:
    return np.stack([t2i(lake, example_id, stream, l) for l in range(lake.n_layers)])  # [layer, head]


def heatmap(at: AppTest) -> pd.DataFrame:
    d = chart_data(at, "head-summary", "layer")
    return d[d.col != "mean"].sort_values(["layer", "head"])


def as_matrix(d: pd.DataFrame, lake) -> np.ndarray:
    return d.value.to_numpy(dtype=float).reshape(lake.n_layers, lake.n_heads)


# -- sidebar, URL, errors ---------------------------------------------------------------------
def test_bad_lake_path_is_an_error_not_an_exception(tmp_path, monkeypatch):
    at = open_app(tmp_path / "nowhere", monkeypatch)
    assert at.error and "not a VL-Atlas lake" in at.error[0].value
    at = open_app(tmp_path, monkeypatch, lake=str(tmp_path / "also-nowhere"))
    assert at.error and "also-nowhere" in at.error[0].value


def test_no_lake_configured_says_what_to_do(monkeypatch):
    monkeypatch.delenv("VLATLAS_LAKE", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "VLATLAS_LAKE" in texts(at)


def test_url_restores_run_example_layer_head(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py",
                  run="synth", ex=3, layer=1, head=1, tokens="2", patches="r1c2")
    assert at.session_state["run"] == "synth" and at.session_state["ex"] == 3
    assert at.session_state["layer"] == 1 and at.session_state["head"] == 1
    assert at.sidebar.selectbox(key="w_ex").value == 3
    assert at.slider(key="w_layer").value == 1
    assert at.selectbox(key="w_head").value == 1
    assert {k: at.query_params[k] for k in ("run", "ex", "layer", "head", "tokens", "patches")} == {
        "run": "synth", "ex": "3", "layer": "1", "head": "1", "tokens": "2", "patches": "r1c2"}


def test_widget_changes_go_to_the_url(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth")
    at.sidebar.selectbox(key="w_ex").set_value(4).run()
    at.slider(key="w_layer").set_value(1).run()
    at.selectbox(key="w_head").set_value("mean").run()
    assert not at.exception
    assert at.query_params["ex"] == "4" and at.query_params["layer"] == "1" and at.query_params["head"] == "mean"


def test_empty_run_shows_info_on_every_page(synth_lake, monkeypatch):
    for page in (None, "app_pages/head_summary.py", "app_pages/attention.py"):
        at = open_app(synth_lake.root, monkeypatch, page=page, run="empty")
        assert "no examples" in texts(at)


def test_random_weights_banner_on_every_page(synth_lake, monkeypatch):
    for page in (None, "app_pages/head_summary.py", "app_pages/attention.py"):
        at = open_app(synth_lake.root, monkeypatch, page=page, run="pruned")
        assert any("random weights" in w.value for w in at.warning), page
    at = open_app(synth_lake.root, monkeypatch, run="synth")
    assert not any("random weights" in w.value for w in at.warning)


# -- examples page ----------------------------------------------------------------------------
def test_examples_table_with_thumbnails(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, run="synth")
    table = at.dataframe[0].value
    assert table.example_id.tolist() == list(range(6))
    assert table.text.tolist() == synth_lake.examples.text.tolist()
    assert table.image[:5].str.startswith("data:image/").all()
    assert pd.isna(table.image[5])  # example 5's image is not in the lake
    assert table["meta.qtype"].tolist() == [json.loads(m)["qtype"] for m in synth_lake.examples.meta]


@pytest.mark.parametrize("params, keep", [
    ({"q": "CIRCLE"}, lambda e: e.text.str.contains("circle")),
    ({"correct": "false"}, lambda e: ~e.correct),
    ({"split": "val", "answer": "no"}, lambda e: (e.split == "val") & (e.answer == "no")),
    ({"mkey": "qtype", "mval": "color"}, lambda e: e.meta.map(lambda m: json.loads(m)["qtype"] == "color")),
])
def test_examples_filters(synth_lake, monkeypatch, params, keep):
    at = open_app(synth_lake.root, monkeypatch, run="synth", **params)
    e = synth_lake.examples
    want = e[keep(e)].example_id.tolist()
    assert want, "the filter should keep something"
    assert at.dataframe[0].value.example_id.tolist() == want


def test_picking_a_row_selects_the_example_everywhere(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, run="synth")
    click_row(at, at.dataframe[0], 2)
    assert not at.exception
    assert at.session_state["ex"] == 2 and at.sidebar.selectbox(key="w_ex").value == 2
    at.switch_page("app_pages/attention.py").run()
    assert "#2" in " ".join(c.value for c in at.caption)


def test_example_without_image(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, run="synth", ex=5)
    assert "not in the lake" in texts(at)
    at.switch_page("app_pages/attention.py").run()
    assert not at.exception
    assert "not in the lake" in texts(at)
    chart(at, "text-image")  # the heatmap is still drawn, on a grey canvas


# -- head summary ---------------------------------------------------------------------------
def test_head_summary_of_one_example(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth", ex=2, scope="example")
    assert at.session_state["stat"] == "t2i"
    d = heatmap(at)
    np.testing.assert_allclose(as_matrix(d, synth_lake), t2i_matrix(synth_lake, 2), atol=1e-6)
    full = chart_data(at, "head-summary", "layer")
    means = full[full.col == "mean"].sort_values("layer").value.to_numpy()
    np.testing.assert_allclose(means, t2i_matrix(synth_lake, 2).mean(1), atol=1e-6)
    spec, _ = chart(at, "head-summary")
    assert "viridis" in json.dumps(spec)


def test_head_summary_other_stat(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth", ex=1, stat="max", scope="example")
    want = np.stack([synth_lake.attention[(1, "self", l)].max(-1).mean(-1) for l in range(2)])
    np.testing.assert_allclose(as_matrix(heatmap(at), synth_lake), want, atol=1e-6)


def test_head_summary_mean_over_filtered_examples(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth",
                  scope="filtered", split="train")
    ids = synth_lake.examples[synth_lake.examples.split == "train"].example_id.tolist()
    want = np.mean([t2i_matrix(synth_lake, i) for i in ids], axis=0)
    d = heatmap(at)
    np.testing.assert_allclose(as_matrix(d, synth_lake), want, atol=1e-6)
    assert (d.n == len(ids)).all()


@pytest.mark.parametrize("norm", ["z_example", "z_dataset"])
def test_head_summary_z_scores(synth_lake, monkeypatch, norm):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth", ex=4, norm=norm, scope="example")
    v = t2i_matrix(synth_lake, 4)
    if norm == "z_example":
        want = (v - v.mean()) / v.std()
    else:
        every = np.stack([t2i_matrix(synth_lake, i) for i in range(6)])  # [example, layer, head]
        want = (v - every.mean(0)) / every.std(0)
    np.testing.assert_allclose(as_matrix(heatmap(at), synth_lake), want, atol=1e-4)
    spec, _ = chart(at, "head-summary")
    assert "redblue" in json.dumps(spec)  # diverging scale for z-scores


def test_head_summary_stat_without_values(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth", stat="grounding")
    assert "has no values" in texts(at)


def test_head_summary_several_streams(synth_lake, monkeypatch):
    lake = synth_lake.pruned
    at = open_app(lake.root, monkeypatch, page="app_pages/head_summary.py", run="pruned", ex=1, scope="example")
    assert at.selectbox(key="w_stream").options == ["vision", "text"]
    np.testing.assert_allclose(as_matrix(heatmap(at), lake), t2i_matrix(lake, 1, "vision"), atol=1e-6)
    at.selectbox(key="w_stream").set_value("text").run()
    assert not at.exception
    np.testing.assert_allclose(as_matrix(heatmap(at), lake), t2i_matrix(lake, 1, "text"), atol=1e-6)


def test_clicking_a_cell_selects_the_head(synth_lake, monkeypatch):
    """A click selects the head and opens it on the Attention page (as the README says); back on the
    Head summary the head is outlined."""
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth")
    select_on_chart(at, "hs_chart", {"cell": [{"layer": 1, "col": "1"}]})
    assert at.session_state["layer"] == 1 and at.session_state["head"] == 1
    assert at.title[0].value == "Attention"
    assert at.selectbox(key="w_head").value == 1 and at.slider(key="w_layer").value == 1
    at.switch_page("app_pages/head_summary.py").run()
    d = chart_data(at, "head-summary", "selected")
    assert d[d.selected][["layer", "col"]].values.tolist() == [[1, "1"]]
    select_on_chart(at, "hs_chart", {"cell": [{"layer": 0, "col": "mean"}]})
    assert at.session_state["head"] == "mean"
    assert at.title[0].value == "Attention"
    assert at.selectbox(key="w_head").value == "mean" and at.slider(key="w_layer").value == 0


# -- attention --------------------------------------------------------------------------------
def _patch_weights(at, description: str) -> pd.DataFrame:
    return chart_data(at, description, "weight")


def test_text_to_image_is_the_row_of_the_attention(synth_lake, monkeypatch):
    ex, layer, head, pos = 2, 1, 1, 3
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", ex=ex, layer=layer,
                  head=head, tokens=pos)
    tok = synth_lake.tokens_of(ex)
    q = int(tok[tok.text_pos == pos].token_idx.iloc[0])
    row = synth_lake.attention[(ex, "self", layer)][head, q]  # [key]
    p = _patch_weights(at, "text-image")
    assert len(p) == 12 and sorted(zip(p.patch_row, p.patch_col)) == [(r, c) for r in range(3) for c in range(4)]
    np.testing.assert_allclose(p.weight.to_numpy(), row[p.token_idx.to_numpy()], atol=2e-3)


def test_image_to_text_and_image_to_image(synth_lake, monkeypatch):
    ex, layer, head = 0, 0, 0
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", ex=ex, layer=layer,
                  head=head, patches="r2c3")
    tok = synth_lake.tokens_of(ex)
    q = int(tok[(tok.patch_row == 2) & (tok.patch_col == 3)].token_idx.iloc[0])
    row = synth_lake.attention[(ex, "self", layer)][head, q]
    ii = _patch_weights(at, "image-image")
    np.testing.assert_allclose(ii.weight.to_numpy(), row[ii.token_idx.to_numpy()], atol=2e-3)
    assert ii[ii.selected].token_idx.tolist() == [q]
    it = chart_data(at, "image-text", "weight")
    text = tok[tok.modality == "text"]
    assert it.token_idx.tolist() == text.token_idx.tolist()
    np.testing.assert_allclose(it.weight.to_numpy(), row[text.token_idx.to_numpy()], atol=2e-3)


def test_patch_click_and_box_select(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", ex=1, layer=0, head=0)
    tok = synth_lake.tokens_of(1)
    idx = {(int(r), int(c)): int(t) for r, c, t in zip(tok.patch_row, tok.patch_col, tok.token_idx) if r == r}
    select_on_chart(at, "ii_chart", {"patch": [{"token_idx": idx[(0, 1)]}], "box": {}})
    assert at.session_state["patches"] == ["r0c1"]
    # a box over the top-left 2 x 2 patches (pixels: patches are 40 x 40)
    select_on_chart(at, "ii_chart", {"patch": [], "box": {"x0": [0, 75], "y0": [0, 75]}})
    assert sorted(at.session_state["patches"]) == ["r0c0", "r0c1", "r1c0", "r1c1"]
    ii = _patch_weights(at, "image-image")
    a = synth_lake.attention[(1, "self", 0)][0]
    qs = [idx[k] for k in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    np.testing.assert_allclose(ii.weight.to_numpy(), a[qs][:, ii.token_idx.to_numpy()].mean(0), atol=2e-3)


def test_text_to_text_matrix(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", ex=3, layer=1, head=0)
    m = chart_data(at, "text-text", "weight")
    tok = synth_lake.tokens_of(3)
    n_text = int((tok.modality == "text").sum())
    assert len(m) == n_text * n_text
    a = synth_lake.attention[(3, "self", 1)][0]
    np.testing.assert_allclose(m.weight.to_numpy(), a[m.query_idx.to_numpy(), m.key_idx.to_numpy()], atol=2e-3)


def test_mean_over_heads_counts_pruned_weights_as_zero(synth_lake, monkeypatch):
    lake = synth_lake.pruned
    ex, layer, pos = 2, 1, 2
    at = open_app(lake.root, monkeypatch, page="app_pages/attention.py", run="pruned", ex=ex, layer=layer,
                  head="mean", tokens=pos, stream="vision")
    tok = lake.tokens_of(ex, "vision")
    q = int(tok[tok.text_pos == pos].token_idx.iloc[0]) - lake.offset["vision"]
    stored = lake.stored[(ex, "vision", layer)]  # [head, query, key], zeros where pruned
    want = stored.mean(0)[q]  # sum over heads / number of heads
    p = _patch_weights(at, "text-image")
    keys = p.token_idx.to_numpy() - lake.offset["vision"]
    np.testing.assert_allclose(p.weight.to_numpy(), want[keys], atol=1e-3)
    assert (stored[:, q, keys] == 0).any(), "the check needs some pruned weights"
    assert "pruned" in " ".join(c.value for c in at.caption)


def test_layer_play_steps_through_layers(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", layer=1)
    at.toggle(key="w_play").set_value(True).run()  # at the last layer: restart from 0, then step to the end
    assert not at.exception
    assert at.session_state["layer"] == 1 and at.session_state["play"] is False


def test_examples_paging(tmp_path, monkeypatch):
    from tests.lakegen import make_synthetic_lake

    make_synthetic_lake(tmp_path, "big", n_examples=55, n_layers=1, n_heads=1, chunk_size=32)
    at = open_app(tmp_path, monkeypatch)
    assert at.dataframe[0].value.example_id.tolist() == list(range(50))
    at.number_input(key="ex_page").set_value(2).run()
    assert not at.exception
    assert at.dataframe[0].value.example_id.tolist() == list(range(50, 55))
    at.text_input(key="w_q").input("circle").run()  # fewer matches: back to page 1
    assert not at.exception and at.dataframe[0].value.example_id.min() == 0


# -- any lake: the synthetic one, and the real pipeline's tiny lake when conftest has it ----------
@pytest.fixture(params=["synth_lake", "tiny_lake"])
def any_lake(request) -> Path:
    """The root of a lake from a fixture: ``synth_lake`` (tests/lakegen.py) or ``tiny_lake``
    (the ViLT pipeline), skipped when this checkout has no such fixture."""
    try:
        lake = request.getfixturevalue(request.param)
    except pytest.FixtureLookupError:
        pytest.skip(f"no {request.param} fixture in this checkout")
    if isinstance(lake, (str, os.PathLike)):
        return Path(lake)
    if isinstance(lake, dict):  # e.g. {"lake": root, ...}
        return Path(lake.get("root") or lake["lake"])
    return Path(lake.root)


def read_table(root: Path, name: str, **eq) -> pd.DataFrame:
    """A lake table read straight from its Parquet files (pyarrow, not the app's queries)."""
    import pyarrow.dataset as ds

    d = ds.dataset(root / name, format="parquet", partitioning="hive")
    expr = None
    for k, v in eq.items():
        e = ds.field(k) == v
        expr = e if expr is None else expr & e
    return d.to_table(filter=expr).to_pandas()


def a_run(root: Path) -> tuple[str, dict, dict]:
    """(run, streams, capture) of a run that has examples, preferring one with its full attention."""
    runs = read_table(root, "runs")
    runs = runs[runs.n_examples > 0].assign(
        pruned=lambda r: [json.loads(c or "{}").get("keep_attention", "all") != "all" for c in r.capture])
    r = runs.sort_values(["pruned", "run"]).iloc[0]  # full attention first
    return r.run, json.loads(r.streams), json.loads(r.capture or "{}")


def test_every_page_renders(any_lake, monkeypatch):
    run, streams, _ = a_run(any_lake)
    stream = next(iter(streams))
    for page, params, want in [
        (None, {}, []),
        ("app_pages/head_summary.py", {}, ["head-summary"]),
        ("app_pages/head_summary.py", {"scope": "filtered", "norm": "z_dataset"}, ["head-summary"]),
        ("app_pages/attention.py", {}, ["text-image", "image-image", "image-text", "text-text"]),
        ("app_pages/attention.py", {"head": "mean", "layer": streams[stream]["layers"] - 1}, ["text-image"]),
        ("app_pages/hidden_states.py", {}, []),
        ("app_pages/compare.py", {"a_correct": "true", "b_correct": "false"}, []),
        ("app_pages/sql.py", {"sql": "SELECT layer, head, avg(value) AS v FROM head_stats GROUP BY ALL"},
         ["sql-chart"]),
    ]:
        at = open_app(any_lake, monkeypatch, page=page, run=run, stream=stream, **params)
        assert not at.error, [e.value for e in at.error]
        for description in want:
            chart(at, description)


def test_head_summary_and_text_to_image_match_the_attention_table(any_lake, monkeypatch):
    """With the full attention stored the statistic equals the stored weights' sum; with pruned weights
    (the default capture) the statistic, computed from the full attention, is at least that sum. The
    text → image view shows the stored weights either way."""
    run, streams, capture = a_run(any_lake)
    pruned = capture.get("keep_attention", "all") != "all"
    stream = next(iter(streams))
    layer = streams[stream]["layers"] - 1
    ex = int(read_table(any_lake, "examples", run=run).example_id.min())
    tok = read_table(any_lake, "tokens", run=run, example_id=ex)
    tok = tok[tok.stream == stream] if (tok.stream == stream).any() else tok
    att = read_table(any_lake, "attention", run=run, stream=stream, layer=layer, example_id=ex)
    text = tok[(tok.modality == "text") & (tok.role != "pad")]  # the statistics' text queries
    image = set(tok[tok.modality == "image"].token_idx)
    a = att[att.query_idx.isin(text.token_idx)]
    want_t2i = (a[a.key_idx.isin(image)].groupby("head").weight.sum() / len(text)).sort_index().to_numpy()
    at = open_app(any_lake, monkeypatch, page="app_pages/head_summary.py", run=run, ex=ex, stream=stream, scope="example")
    d = heatmap(at)
    got = d[d.layer == layer].sort_values("head").value.to_numpy()
    if pruned:
        assert len(got) == len(want_t2i) and (got >= want_t2i - 5e-3).all(), (got, want_t2i)
    else:
        np.testing.assert_allclose(got, want_t2i, atol=5e-3)  # stats from the float32 attention, weights float16

    word = text[text.role == "word"].sort_values("text_pos").iloc[0]
    at = open_app(any_lake, monkeypatch, page="app_pages/attention.py", run=run, ex=ex, stream=stream,
                  layer=layer, head=0, tokens=int(word.text_pos))
    p = _patch_weights(at, "text-image")
    row = att[(att["head"] == 0) & (att.query_idx == word.token_idx)].set_index("key_idx").weight
    np.testing.assert_allclose(p.weight.to_numpy(), row.reindex(p.token_idx).fillna(0).to_numpy(), atol=1e-6)
    patches = tok[tok.role == "patch"]
    assert sorted(zip(p.patch_row, p.patch_col)) == sorted(zip(patches.patch_row, patches.patch_col))


def test_attention_colours_are_absolute_unless_stretched(synth_lake, monkeypatch):
    """Honest scales: a panel's colours run from 0 to 1 (a weight's share of its row) unless the user
    stretches them; the caption gives the panel's mass, equal to the lake's."""
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", ex=3, layer=1, head=1,
                  tokens="2")
    spec, _ = chart(at, "text-image")
    domains = [json.dumps(spec)]
    assert '"domain": [0, 1.0]' in domains[0] or '"domain": [0.0, 1.0]' in domains[0]
    d = chart_data(at, "text-image", "weight")
    mass = float(d.weight.sum())
    tok = synth_lake.tokens_of(3)
    q = int(tok[tok.text_pos == 2].token_idx.iloc[0])
    a = synth_lake.stored[(3, "self", 1)][1]  # [query, key] of head 1, as stored
    patches = tok[tok.role == "patch"].token_idx.to_numpy()
    assert mass == pytest.approx(float(a[q, patches].sum()), abs=1e-3)
    assert any(f"text → image mass {mass:.4f}" in str(c.value) for c in at.caption)
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", ex=3, layer=1, head=1,
                  tokens="2", stretch="true")
    spec, _ = chart(at, "text-image")
    top = float(chart_data(at, "text-image", "weight").weight.max())
    assert f'"domain": [0, {top}]' in json.dumps(spec) or f'"domain": [0.0, {top}]' in json.dumps(spec)
    assert any("stretched" in str(c.value) for c in at.caption)


def test_head_summary_opens_on_the_run_mean(synth_lake, monkeypatch):
    """The first view is the run: the mean over every example, not one example's matrix."""
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth")
    assert at.session_state["scope"] == "filtered"
    n = len(synth_lake.examples)
    want = np.mean([t2i_matrix(synth_lake, e) for e in range(n)], axis=0)  # [layer, head]
    np.testing.assert_allclose(as_matrix(heatmap(at), synth_lake), want, atol=1e-5)
