"""The ``interventions`` table's commit rule: a chunk file is committed by appearing, whatever the run's status,
and the catalog's view shows it without a restart; another intervention's files and temp files are apart."""

from __future__ import annotations

import pyarrow as pa

from lake.catalog import Catalog
from lake.schema import INTERVENTIONS
from lake.store import Store
from lake.writer import write_table
from pipeline.intervene.spec import InterventionSpec, chunk_file, chunk_of_file
from tests.lakegen import make_synthetic_lake


def _rows(key: str, ids: list[int]) -> pa.Table:
    n = len(ids)
    return pa.table({
        "intervention": [key] * n, "example_id": ids, "kind": ["heads"] * n, "method": ["mean"] * n,
        "stream": ["self"] * n, "layer": [0] * n, "head": [1] * n, "spec": ["{}"] * n, "fraction": [None] * n,
        "metric": ["class_logit"] * n, "metric_before": [1.0] * n, "metric_after": [0.5] * n,
        "answer_after": ["red"] * n, "changed": [False] * n, "estimated": [False] * n})


def test_chunk_files_show_as_they_appear_in_running_and_complete_runs(tmp_path):
    root = tmp_path / "lake"
    make_synthetic_lake(root, "done", n_examples=4)
    make_synthetic_lake(root, "going", n_examples=4, status="running")
    store = Store(root)
    spec = InterventionSpec.from_options("heads", layers="0")
    other = InterventionSpec.from_options("heads", ablate="zero")
    assert spec.digest != other.digest
    cat = Catalog(root)
    try:
        assert int(cat.df("SELECT count(*) AS n FROM interventions").n[0]) == 0
        for run in ("done", "going"):
            write_table(store, f"interventions/run={run}/{chunk_file(spec.digest, 0)}", INTERVENTIONS,
                        _rows(spec.key, [0, 1]))
        # a writer's temp file (Store writes aside, then renames) is never read
        (root / "interventions" / "run=going" / f".{chunk_file(spec.digest, 1)}.x1.tmp").write_bytes(b"partial")
        d = cat.df("SELECT run, count(*) AS n FROM interventions GROUP BY run ORDER BY run")
        assert d.to_dict("list") == {"run": ["done", "going"], "n": [2, 2]}
        write_table(store, f"interventions/run=going/{chunk_file(other.digest, 0)}", INTERVENTIONS,
                    _rows(other.key, [0, 1, 2]))
        d = cat.df("SELECT intervention, count(*) AS n FROM interventions WHERE run = 'going' GROUP BY ALL ORDER BY n")
        assert d.to_dict("list") == {"intervention": [spec.key, other.key], "n": [2, 3]}
    finally:
        cat.close()
    names = [p.name for p in (root / "interventions" / "run=going").iterdir()]
    assert sorted(c for c in (chunk_of_file(n, spec.digest) for n in names) if c is not None) == [0]
    assert chunk_of_file(chunk_file(other.digest, 7), other.digest) == 7


def test_the_key_names_what_changes_the_rows():
    a = InterventionSpec.from_options("regions", methods="attention,random", fractions="0,0.5,1")
    assert a.key == "regions ranked methods=attention,random fractions=0,0.5,1 replace=pixels limit=all"
    assert InterventionSpec.from_options("knockout", sets="text->image", window=2).key == \
        "knockout text->image window=2 streams=all limit=all"
    assert InterventionSpec.from_options("heads", heads="3.1,2.0", estimate=True).key == \
        "heads mean streams=all heads=2.0,3.1 estimate limit=all"
