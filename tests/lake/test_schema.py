"""The lake's contract, pinned: a change to any table or column is a visible diff here."""

import pyarrow as pa
import pytest

from lake.schema import SCHEMA_VERSION, STATS, TABLES
from lake.writer import RESERVED_RUN_NAMES, check_run_name

EXPECTED = {
    "runs": ([], "run model model_family revision dtype attn_implementation streams manifest n_examples "
                 "capture status created_at software_version"),
    "examples": (["run"], "example_id source_id split text answer prediction correct image_id image_width "
                          "image_height grid_h grid_w n_tokens boxes meta"),
    "tokens": (["run"], "example_id token_idx stream modality role token seq_pos text_pos patch_row patch_col "
                        "x0 y0 x1 y1 tile"),
    "attention": (["run", "stream", "layer"], "example_id head query_idx key_idx weight"),
    "head_stats": (["run"], "example_id stream layer head stat value"),
    "hidden_states": (["run", "stream", "layer"], "example_id token_idx norm vec"),
    "embeddings": (["run"], "stream layer example_id token_idx method x y"),
    "images": ([], "image_id png width height"),
    "errors": (["run"], "source_id stage message"),
    "relevancy": (["run"], "example_id target method stream layer token_idx value"),
    "value_norms": (["run", "stream", "layer"], "example_id head token_idx norm"),
    "sinks": (["run", "stream", "layer"], "example_id token_idx dim ratio"),
    "lens": (["run", "stream"], "example_id layer token_idx rank vocab_id piece prob"),
    "activations": (["run", "stream", "module"], "example_id token_idx layer norm vec"),
    "probes": (["run"], "probe stream layer source target selector metric value control selectivity p_value "
                        "permutations folds n n_vectors confusion created_at"),
    "interventions": (["run"], "intervention example_id kind method stream layer head spec fraction metric "
                               "metric_before metric_after answer_after changed estimated"),
}


def test_tables_and_columns_are_the_contract():
    assert set(TABLES) == set(EXPECTED)
    for name, (partition, cols) in EXPECTED.items():
        t = TABLES[name]
        assert list(t.partition) == partition, name
        assert [f.name for f in t.schema] == cols.split(), name
        assert t.columns == partition + cols.split()


def test_storage_types_that_matter():
    # float32 holding float16-rounded values: Parquet FLOAT16 is unreadable by Spark, summed in
    # float16 by polars and not aggregatable in pyarrow (tests/lake/test_engines.py)
    assert SCHEMA_VERSION == 3
    assert TABLES["attention"].schema.field("weight").type == pa.float32()
    assert TABLES["hidden_states"].schema.field("vec").type == pa.list_(pa.float32())
    assert TABLES["hidden_states"].schema.field("norm").type == pa.float32()
    assert TABLES["examples"].schema.field("example_id").type == pa.int64()


def test_tile_column_and_what_older_files_read_as():
    # 3: tokens.tile (null for text; 0 the base image, 1.. crops or tiles); files written before
    # it lack the column and the catalog's view reads their image tokens as tile 0
    assert TABLES["tokens"].schema.field("tile").type == pa.int16()
    assert TABLES["tokens"].schema.field("tile").nullable
    assert TABLES["tokens"].added == (("tile", "CASE WHEN modality = 'image' THEN 0 END"),)
    assert all(not t.added for name, t in TABLES.items() if name != "tokens")


def test_no_half_float_column_anywhere():
    def half(t: pa.DataType) -> bool:
        if pa.types.is_float16(t):
            return True
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return half(t.value_type)
        return False

    for name, t in TABLES.items():
        assert not [f.name for f in t.schema if half(f.type)], name


# -- run names: also hive partition values (run=<name>) that every reader types from the path --


@pytest.mark.parametrize("name", ["vilt-001", "e5", "v001", "nan-run", "a", "Run_2024-06-01.b", "x" * 100,
                                  "infinity2", "trueish", "vilt.vqa"])
def test_run_names_allowed(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["001", "1", "2024-06-01", "1e5", "-x", "_x", ".x", "", "bad/name", "a b",
                                  "x" * 101, "it's", "run=x"])
def test_run_names_need_a_leading_letter_and_plain_characters(name):
    with pytest.raises(ValueError, match="starting with a letter"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["NaN", "nan", "TRUE", "true", "False", "Infinity", "inf", "INF", "null",
                                  "None", "NA", "NaT", "epoch", "Epoch", "now", "today", "Tomorrow",
                                  "yesterday", "allballs"])
def test_reserved_run_names_refused_in_any_case(name):
    with pytest.raises(ValueError) as e:
        check_run_name(name)
    msg = str(e.value)
    assert f"run name {name!r} is not allowed" in msg
    assert "number, a boolean, a date or a null" in msg  # says why


def test_reserved_words_listed():
    assert RESERVED_RUN_NAMES >= {"nan", "inf", "infinity", "true", "false", "null", "none", "na", "nat",
                                  "epoch", "now", "today", "tomorrow", "yesterday", "allballs"}
    assert all(w == w.lower() for w in RESERVED_RUN_NAMES)


def test_non_string_run_name_refused():
    with pytest.raises(ValueError):
        check_run_name(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        check_run_name(1)  # type: ignore[arg-type]


def test_explain_statistic_names():
    from lake.schema import EXPLAIN_STATS

    assert EXPLAIN_STATS == {
        "value": ("t2i_norm", "t2t_norm", "i2t_norm", "i2i_norm", "sink_norm"),
        "sinks": ("sink_mass", "t2i_nosink", "t2t_nosink", "i2t_nosink", "i2i_nosink", "entropy_nosink",
                  "grounding_nosink", "pointing_nosink"),
    }
    assert not set(STATS) & {s for v in EXPLAIN_STATS.values() for s in v}


def test_statistic_names():
    assert STATS == ("t2i", "t2t", "i2t", "i2i", "i2i_noself", "entropy", "sink", "max", "img_entropy",
                     "grounding", "pointing", "boxed_img_mass", "kept_mass")
