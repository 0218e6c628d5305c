"""The layout choices that keep queries fast at dataset scale (bench/bench_queries.py measures them).

- ``head_stats`` files hold one row group per (stream, stat), sorted inside, so a query for one
  statistic skips the others by their min/max statistics; the rows are the ones written.
- One example's attention is read from its chunk file when the run records its chunk size, and
  gives exactly what the view gives; without a chunk size, or when that file lacks the example,
  the view is used.
- ``top_examples`` ranks the examples of a head by a statistic.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lake import queries
from lake.catalog import Catalog
from lake.queries import ExampleFilter
from tests.lakegen import make_synthetic_lake


def test_head_stats_one_row_group_per_statistic(synth_lake):
    files = sorted((synth_lake.root / "head_stats" / "run=synth").glob("*.parquet"))
    assert len(files) == 2  # 6 examples in chunks of 4
    written = []
    for f in files:
        pf = pq.ParquetFile(f)
        stat = pf.schema_arrow.get_field_index("stat")
        groups = [pf.metadata.row_group(i).column(stat).statistics for i in range(pf.num_row_groups)]
        assert all(g.min == g.max for g in groups)  # one statistic per row group
        assert [g.min for g in groups] == sorted({g.min for g in groups})
        t = pf.read().to_pandas()
        assert t.equals(t.sort_values(["stream", "stat", "layer", "head", "example_id"]))
        written.append(t)
    got = pd.concat(written).sort_values(["example_id", "stream", "layer", "head", "stat"]).reset_index(drop=True)
    want = synth_lake.stats.sort_values(["example_id", "stream", "layer", "head", "stat"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False, atol=1e-6)


class _Views:
    """A catalog without ``chunk_file``: queries read the views only."""

    def __init__(self, cat):
        self.cat = cat

    def df(self, sql, params=None):
        return self.cat.df(sql, params)


@pytest.mark.parametrize("run, stream", [("synth", "self"), ("pruned", "vision"), ("pruned", "text")])
def test_attention_from_the_chunk_file_equals_the_view(synth_lake, run, stream):
    lake = synth_lake if run == "synth" else synth_lake.pruned
    with Catalog(synth_lake.root) as cat:
        assert cat.chunk_file("attention", {"run": run, "stream": stream, "layer": 1}, 0).endswith(
            f"attention/run={run}/stream={stream}/layer=1/part-000000.parquet")
        assert cat.chunk_file("attention", {"run": run, "stream": stream, "layer": 1}, 99) is None
        for ex in range(len(lake.examples)):
            for head in (0, 1, None):
                fast = queries.attention_block(cat, run, ex, stream, 1, head)
                slow = queries.attention_block(_Views(cat), run, ex, stream, 1, head)
                assert len(fast) > 0
                pd.testing.assert_frame_equal(fast, slow)


def test_attention_falls_back_to_the_view(tmp_path):
    """A run whose capture has no chunk size (or a wrong one) still reads its attention."""
    lake = make_synthetic_lake(tmp_path, "r", n_examples=5, chunk_size=2)
    want = lake.stored[(3, "self", 0)][1]  # [query, key]
    runs = tmp_path / "runs" / "r.parquet"
    for chunk_size in (None, 4):  # none recorded; a wrong one (example 3 is in chunk 1, not 0)
        row = pq.read_table(runs).to_pylist()[0]
        cap = json.loads(row["capture"])
        cap.pop("chunk_size", None)
        if chunk_size:
            cap["chunk_size"] = chunk_size
        row["capture"] = json.dumps(cap)
        pq.write_table(pa.Table.from_pylist([row], schema=pq.read_schema(runs)), runs)
        with Catalog(tmp_path) as cat:
            d = queries.attention_block(cat, "r", 3, "self", 0, 1)
        m = np.zeros_like(want)
        m[d.query_idx, d.key_idx] = d.weight
        np.testing.assert_allclose(m, want, atol=1e-3)


def test_top_examples(synth_lake):
    s = synth_lake.stats
    s = s[(s.stat == "max") & (s.layer == 1) & (s.stream == "self")]
    with Catalog(synth_lake.root) as cat:
        top = queries.top_examples(cat, "synth", "self", 1, 0, "max", n=3)
        want = s[s["head"] == 0].sort_values(["value", "example_id"], ascending=[False, True]).head(3)
        assert top.example_id.tolist() == want.example_id.tolist()
        np.testing.assert_allclose(top.value, want.value, rtol=1e-6)
        assert top.text.tolist() == [synth_lake.examples.text[i] for i in want.example_id]
        low = queries.top_examples(cat, "synth", "self", 1, 0, "max", n=2, ascending=True)
        assert low.example_id.tolist() == s[s["head"] == 0].sort_values("value").example_id.head(2).tolist()
        mean = queries.top_examples(cat, "synth", "self", 1, None, "max", n=6)  # mean over heads
        m = s.groupby("example_id").value.mean().sort_values(ascending=False)
        assert mean.example_id.tolist() == m.index.tolist()
        wrong = queries.top_examples(cat, "synth", "self", 1, 0, "max", flt=ExampleFilter(correct=False))
        assert set(wrong.example_id) == set(synth_lake.examples[~synth_lake.examples.correct].example_id)
        assert queries.top_examples(cat, "synth", "self", 1, 0, "grounding").empty  # all null
