"""lake/queries.py against the synthetic lake, checked with numpy on what the generator wrote."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lake import queries as Q
from lake.catalog import open_catalog
from lake.queries import ExampleFilter
from lake.commit import read_run_row
from lake.writer import LakeWriter
from tests.lakegen import make_synthetic_lake


@pytest.fixture(scope="module")
def cat(synth_lake):
    return open_catalog(synth_lake.root)


def stat_matrix(lake, example_id, stat, stream="self"):
    s = lake.stats
    s = s[(s.example_id == example_id) & (s.stream == stream) & (s.stat == stat)].sort_values(["layer", "head"])
    return s.value.to_numpy(dtype=float).reshape(lake.n_layers, lake.n_heads)


def test_runs_and_streams(cat):
    runs = Q.list_runs(cat)
    assert runs.run.tolist()[0] == "synth"  # newest first
    assert set(runs.run) == {"synth", "pruned", "empty"}
    assert Q.run_info(cat, "nope").empty
    s = Q.run_streams(cat, "pruned")
    assert s[["stream", "layers", "heads", "hidden_size"]].values.tolist() == [["vision", 2, 2, 8], ["text", 2, 2, 8]]
    assert Q.run_capture(cat, "pruned")["random_weights"] is True
    assert Q.n_heads(cat, "synth", "self") == 2


def test_streams_fall_back_to_the_data(tmp_path):
    make_synthetic_lake(tmp_path, "r", n_examples=2, n_layers=3, n_heads=4)
    row = read_run_row(tmp_path, "r")
    LakeWriter(tmp_path, "r").write_run_row({**row, "streams": "not json"})
    s = Q.run_streams(open_catalog(tmp_path), "r")
    assert s[["stream", "layers", "heads"]].values.tolist() == [["self", 3, 4]]


@pytest.mark.parametrize("flt, keep", [
    (ExampleFilter(), lambda e: e.example_id >= 0),
    (ExampleFilter(text="Circle"), lambda e: e.text.str.contains("circle")),
    (ExampleFilter(correct=False), lambda e: ~e.correct),
    (ExampleFilter(correct=True, split="train"), lambda e: e.correct & (e.split == "train")),
    (ExampleFilter(answer="no", prediction="no"), lambda e: (e.answer == "no") & (e.prediction == "no")),
    (ExampleFilter(meta_key="qtype", meta_value="count"),
     lambda e: e.meta.map(lambda m: json.loads(m)["qtype"] == "count")),
    (ExampleFilter(meta_key="qtype"), lambda e: e.example_id >= 0),  # a key without a value filters nothing
])
def test_example_filters(cat, synth_lake, flt, keep):
    e = synth_lake.examples
    want = e[keep(e)].example_id.tolist()
    assert Q.examples(cat, "synth", flt).example_id.tolist() == want
    assert Q.count_examples(cat, "synth", flt) == len(want)


@pytest.mark.parametrize("text", ["%", "_", "' OR 1=1 --", "\\", "circle%red"])
def test_text_search_is_literal_and_bound(cat, text):
    assert Q.examples(cat, "synth", ExampleFilter(text=text)).empty


def test_meta_keys_are_values_not_sql(cat):
    assert Q.meta_keys(cat, "synth").key.tolist() == ["difficulty", "qtype"]
    assert Q.meta_values(cat, "synth", "qtype").value.tolist()[0] == "color"
    for key in ("q'type", "a/b", "x~y", '"qtype"'):
        assert Q.examples(cat, "synth", ExampleFilter(meta_key=key, meta_value="color")).empty
    with pytest.raises(ValueError):
        Q.distinct_values(cat, "synth", "text; DROP VIEW runs")


def test_paging(cat):
    assert Q.examples(cat, "synth", limit=2, offset=3).example_id.tolist() == [3, 4]


def test_example_and_images(cat, synth_lake):
    ex = Q.example(cat, "synth", 5).iloc[0]
    assert not ex.has_image and Q.image_png(cat, ex.image_id).empty
    ex = Q.example(cat, "synth", 1).iloc[0]
    assert ex.has_image and ex.text == synth_lake.examples.text[1]
    png = Q.image_png(cat, ex.image_id)
    assert Image.open(io.BytesIO(png.png.iloc[0])).size == (160, 120)
    ids = synth_lake.examples.image_id.tolist()
    assert set(Q.images_png(cat, ids).image_id) == set(ids[:5])


def test_tokens_keep_the_lake_order(cat, synth_lake):
    t = Q.example_tokens(cat, "synth", 0)
    assert t.token_idx.tolist() == list(range(len(t)))
    patches = t[t.role == "patch"]
    raster = (patches.patch_row * 4 + patches.patch_col).tolist()
    assert sorted(raster) == list(range(12)) and raster != sorted(raster)  # shuffled, positions kept
    assert set(Q.example_tokens(cat, "pruned", 0, stream="text").stream) == {"text"}


def test_stats_available(cat):
    s = Q.stats_available(cat, "synth").set_index("stat")
    assert s.loc["grounding", "n_values"] == 0 and s.loc["t2i", "n_values"] == 6 * 2 * 2


def test_head_stat_matrix(cat, synth_lake):
    m = Q.head_stat_matrix(cat, "synth", "self", "entropy", example_id=3)
    got = m.value.to_numpy().reshape(2, 2)
    np.testing.assert_allclose(got, stat_matrix(synth_lake, 3, "entropy"), atol=1e-6)
    flt = ExampleFilter(split="train")
    ids = synth_lake.examples[synth_lake.examples.split == "train"].example_id
    m = Q.head_stat_matrix(cat, "synth", "self", "entropy", flt=flt)
    want = np.mean([stat_matrix(synth_lake, i, "entropy") for i in ids], axis=0)
    np.testing.assert_allclose(m.value.to_numpy().reshape(2, 2), want, atol=1e-6)
    assert (m.n == len(ids)).all()


def test_z_scores(cat, synth_lake):
    v = stat_matrix(synth_lake, 2, "sink")
    z = Q.head_stat_matrix(cat, "synth", "self", "sink", example_id=2, norm="z_example")
    np.testing.assert_allclose(z.value.to_numpy().reshape(2, 2), (v - v.mean()) / v.std(), atol=1e-4)
    np.testing.assert_allclose(z.raw.to_numpy().reshape(2, 2), v, atol=1e-6)
    every = np.stack([stat_matrix(synth_lake, i, "sink") for i in range(6)])
    d = Q.head_stat_dataset(cat, "synth", "self", "sink")
    np.testing.assert_allclose(d["mean"].to_numpy().reshape(2, 2), every.mean(0), atol=1e-6)
    np.testing.assert_allclose(d["std"].to_numpy().reshape(2, 2), every.std(0), atol=1e-6)
    z = Q.head_stat_matrix(cat, "synth", "self", "sink", example_id=2, norm="z_dataset")
    np.testing.assert_allclose(z.value.to_numpy().reshape(2, 2), (v - every.mean(0)) / every.std(0), atol=1e-4)
    # kept_mass is 1 everywhere when every weight is kept: std 0 gives null, not inf
    z = Q.head_stat_matrix(cat, "synth", "self", "kept_mass", example_id=2, norm="z_dataset")
    assert z.value.isna().all()
    with pytest.raises(ValueError):
        Q.head_stat_matrix(cat, "synth", "self", "sink", example_id=2, norm="zz")


def test_attention_block_one_head(cat, synth_lake):
    b = Q.attention_block(cat, "synth", 4, "self", 1, head=1)
    a = synth_lake.attention[(4, "self", 1)][1]
    assert len(b) == a.size
    np.testing.assert_allclose(b.weight.to_numpy(), a[b.query_idx, b.key_idx], atol=1e-3)
    rows = b.groupby("query_idx").weight.sum().to_numpy()
    np.testing.assert_allclose(rows, 1.0, atol=1e-2)  # every query row sums to 1 (float16 storage)


def test_attention_mean_over_heads_counts_pruned_as_zero(cat, synth_lake):
    lake = synth_lake.pruned
    off = lake.offset["text"]
    b = Q.attention_block(cat, "pruned", 1, "text", 0)
    stored = lake.stored[(1, "text", 0)]  # [head, query, key], 0 where pruned
    want = stored.mean(0)  # sum over heads / number of heads
    np.testing.assert_allclose(b.weight.to_numpy(), want[b.query_idx - off, b.key_idx - off], atol=1e-4)
    assert ((stored > 0).sum(0) == 1).any(), "some pairs must be kept by one head only"
    assert len(b) == int((stored.sum(0) > 0).sum())
    assert Q.attention_layers(cat, "pruned", "text").layer.tolist() == [0, 1]
