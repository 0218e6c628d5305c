"""Shared pytest fixtures."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tests.lakegen import SynthLake, make_synthetic_lake


@pytest.fixture(scope="session")
def synth_lake(tmp_path_factory) -> SynthLake:
    """A synthetic lake (tests/lakegen.py) with three runs.

    - ``synth``: 6 examples, stream ``self``, 2 layers × 2 heads, all weights kept;
      example 5's image is missing from ``images``.
    - ``pruned``: 4 examples, streams ``vision`` and ``text``, weights pruned to the
      top 4 keys per row, model marked ``random_weights``.
    - ``empty``: the runs row only.

    Returns the ``synth`` run's :class:`SynthLake`; the others are attributes
    ``pruned`` and ``empty`` of it.
    """
    root = tmp_path_factory.mktemp("lake")
    lake = make_synthetic_lake(root, "synth", n_examples=6, images_missing=(5,),
                               created_at=datetime(2025, 2, 1, tzinfo=timezone.utc))
    lake.pruned = make_synthetic_lake(root, "pruned", n_examples=4, streams=("vision", "text"),
                                      keep_attention="topk:4", random_weights=True, seed=1)
    lake.empty = make_synthetic_lake(root, "empty", n_examples=0, status="running")
    return lake


# -- tiny ViLT models (tests/tiny.py) and reading a lake back --------------------------------


@pytest.fixture(scope="session")
def tiny_vilt(tmp_path_factory):
    """A random-weight ViLTForQuestionAnswering (2 layers, 2 heads, 64 px images, 16 px
    patches, 16 text positions) saved with its processor; nothing is downloaded."""
    from tests.tiny import make_tiny_vilt

    return make_tiny_vilt(tmp_path_factory.mktemp("models") / "vilt-vqa")


def _lake_df(root, sql: str, params=None):
    from lake.catalog import open_catalog

    cat = open_catalog(root)
    try:
        return cat.df(sql, params)
    finally:
        cat.close()


@pytest.fixture(scope="session")
def lake_df():
    """``lake_df(root, sql, params=None)``: run ``sql`` over the lake's DuckDB views (the
    ones the app uses, lake/catalog.py) and return a pandas DataFrame."""
    return _lake_df


@pytest.fixture(scope="session")
def tiny_lake(tmp_path_factory, tiny_vilt):
    """A lake built by the real pipeline: the tiny random ViLT over six scenes (run ``tiny``),
    with t-SNE maps of its hidden states. Page tests run against it as well as ``synth_lake``."""
    from pipeline.embed import embed
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest

    tmp = tmp_path_factory.mktemp("tiny_lake")
    manifest = make_manifest(tmp / "data", 6)
    extract(str(tiny_vilt), manifest, tmp / "lake", "tiny", batch_size=3, progress=False)
    embed(tmp / "lake", "tiny", n_tokens=120, progress=False)
    return tmp / "lake"


def _raw_df(root, sql: str, params=None):
    from pathlib import Path

    import duckdb

    tables = ("runs", "examples", "tokens", "attention", "head_stats", "hidden_states")
    files = {t: f"read_parquet('{(Path(root) / t).as_posix()}/**/*.parquet', hive_partitioning = true)"
             for t in tables}
    con = duckdb.connect()
    try:
        return con.execute(sql.format(**files), params or []).df()
    finally:
        con.close()


@pytest.fixture(scope="session")
def raw_df():
    """``raw_df(root, sql, params=None)``: run ``sql`` with DuckDB straight over the lake's Parquet files,
    not through lake/catalog.py or lake/queries.py: ``{attention}``, ``{tokens}``, ``{head_stats}`` …
    in ``sql`` become ``read_parquet('<root>/<table>/**/*.parquet', hive_partitioning = true)``."""
    return _raw_df


@pytest.fixture(scope="session")
def small_demo_lake(tmp_path_factory):
    """The committed demo model (pipeline/demo/model) over 48 held-out shapes scenes with boxes,
    built by the real pipeline with its t-SNE maps: a small copy of what `vlatlas demo` shows."""
    from pipeline.demo.build import build_demo_lake

    return build_demo_lake(tmp_path_factory.mktemp("demo") / "lake", n=48, progress=False)
