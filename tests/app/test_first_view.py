"""First views open on something meaningful (issue 13, point 2).

On a run with boxes the Attention page opens on the best grounding head and a word naming a boxed
object; on a run without boxes on the head with the largest text -> image mass. The Head summary and
the SQL page's worked examples follow the same head. Expected heads are computed here with pyarrow
and pandas straight from the Parquet files, never through lake/queries.
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.dataset as ds
import pytest

from tests.app.test_app import open_app


def _stats(root, run: str) -> pd.DataFrame:
    d = ds.dataset(root / "head_stats", partitioning="hive").to_table().to_pandas()
    return d[d.run.astype(str) == run]


def _best(stats: pd.DataFrame, stat: str, stream: str) -> tuple[int, int]:
    s = stats[(stats.stat == stat) & (stats.stream == stream)].dropna(subset=["value"])
    m = s.groupby(["layer", "head"]).value.mean().reset_index()
    top = m.sort_values(["value", "layer", "head"], ascending=[False, True, True]).iloc[0]
    return int(top.layer), int(top["head"])


def test_attention_opens_on_the_best_grounding_head_and_an_object_word(small_demo_lake, monkeypatch):
    stats = _stats(small_demo_lake, "demo")
    want = _best(stats, "grounding", "self")
    assert want != (0, 0)  # the demo model's grounding head is not the old default
    at = open_app(small_demo_lake, monkeypatch, "app_pages/attention.py")
    assert (at.session_state["layer"], at.session_state["head"]) == want
    ex = ds.dataset(small_demo_lake / "examples", partitioning="hive").to_table().to_pandas()
    boxes = json.loads(ex[ex.example_id == 0].boxes.iloc[0])
    labels = {b["label"].split()[0].lower() for b in boxes}
    tok = ds.dataset(small_demo_lake / "tokens", partitioning="hive").to_table().to_pandas()
    tok = tok[(tok.example_id == 0) & (tok.modality == "text")]
    chosen = tok[tok.text_pos.isin(at.session_state["tokens"])].token.str.lower().tolist()
    assert chosen and chosen[0] in labels, (chosen, labels)
    # the text -> image caption states a mass that is not negligible for that word and head
    cap = next(c.value for c in at.caption if c.value.startswith("**text → image**"))
    assert float(cap.split("text → image mass ")[1].split("**")[0]) > 0.05


def test_head_summary_and_sql_follow_the_first_view_head(small_demo_lake, monkeypatch, lake_df):
    want = _best(_stats(small_demo_lake, "demo"), "grounding", "self")
    at = open_app(small_demo_lake, monkeypatch, "app_pages/head_summary.py")
    assert (at.session_state["layer"], at.session_state["head"]) == want
    at = open_app(small_demo_lake, monkeypatch, "app_pages/sql.py")
    button = next(b for b in at.button if b.label == "Where a word looks")
    button.click().run()
    sql = at.session_state["sql"]
    assert f"layer = {want[0]}" in sql and f"head = {want[1]}" in sql
    res = lake_df(small_demo_lake, sql)
    assert 1 <= len(res) <= 16 and res.weight.max() > 0.01  # not the zeros of layer 0, head 0 and "what"
    # the weights are the lake's own rows for that word, read straight from the Parquet files
    att = ds.dataset(small_demo_lake / "attention", partitioning="hive").to_table(
        filter=(ds.field("layer") == want[0]) & (ds.field("example_id") == 0) & (ds.field("head") == want[1])
    ).to_pandas()
    tok = ds.dataset(small_demo_lake / "tokens", partitioning="hive").to_table().to_pandas()
    tok = tok[tok.example_id == 0]
    q = tok[tok.token == res["query"].iloc[0]].token_idx.iloc[0]
    patches = set(tok[tok.role == "patch"].token_idx)
    rows = att[(att.query_idx == q) & att.key_idx.isin(patches)].sort_values("weight", ascending=False)
    assert res.weight.tolist() == pytest.approx(rows.weight.head(16).round(5).tolist(), abs=1e-5)


def test_without_boxes_the_first_view_is_the_largest_text_to_image_head(synth_lake, monkeypatch):
    stats = _stats(synth_lake.root, "synth")
    assert stats[stats.stat == "grounding"].value.isna().all()
    want = _best(stats, "t2i", "self")
    at = open_app(synth_lake.root, monkeypatch, "app_pages/attention.py", run="synth")
    assert (at.session_state["layer"], at.session_state["head"]) == want
    at = open_app(synth_lake.root, monkeypatch, "app_pages/attention.py", run="synth", layer=1, head=0)
    assert (at.session_state["layer"], at.session_state["head"]) == (1, 0)  # a shared view is kept


def test_back_to_the_first_view_resets_only_the_attention_page(small_demo_lake, monkeypatch):
    want = _best(_stats(small_demo_lake, "demo"), "grounding", "self")
    at = open_app(small_demo_lake, monkeypatch, "app_pages/attention.py", layer=0, head=1, tokens="1",
                  stretch="true", cmp_stat="entropy", norm="z_example")
    assert (at.session_state["layer"], at.session_state["head"], at.session_state["tokens"]) == (0, 1, [1])
    next(b for b in at.button if b.label == "Back to the first view").click().run()
    assert (at.session_state["layer"], at.session_state["head"]) == want
    assert at.session_state["tokens"] != [1] and at.session_state["stretch"] is False
    # other pages' selections are theirs: untouched
    assert at.session_state["cmp_stat"] == "entropy" and at.session_state["norm"] == "z_example"


def test_reset_the_comparison_resets_only_the_compare_page(small_demo_lake, monkeypatch):
    at = open_app(small_demo_lake, monkeypatch, "app_pages/compare.py", cmp_stat="entropy", cmp_rank="effect",
                  a_q="circle", norm="z_example")
    assert at.session_state["cmp_stat"] == "entropy" and at.session_state["a_q"] == "circle"
    next(b for b in at.button if b.label == "Reset the comparison").click().run()
    assert not at.exception
    assert (at.session_state["cmp_stat"], at.session_state["cmp_rank"], at.session_state["a_q"]) == ("t2i", "diff", None)
    assert at.session_state["norm"] == "z_example"
