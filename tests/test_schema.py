"""The lake's contract, pinned: a change to any table or column is a visible diff here."""

import pyarrow as pa

from lake.schema import STATS, TABLES

EXPECTED = {
    "runs": ([], "run model model_family revision dtype attn_implementation streams manifest n_examples "
                 "capture status created_at software_version"),
    "examples": (["run"], "example_id source_id split text answer prediction correct image_id image_width "
                          "image_height grid_h grid_w n_tokens boxes meta"),
    "tokens": (["run"], "example_id token_idx stream modality role token seq_pos text_pos patch_row patch_col "
                        "x0 y0 x1 y1"),
    "attention": (["run", "stream", "layer"], "example_id head query_idx key_idx weight"),
    "head_stats": (["run"], "example_id stream layer head stat value"),
    "hidden_states": (["run", "stream", "layer"], "example_id token_idx norm vec"),
    "embeddings": (["run"], "stream layer example_id token_idx method x y"),
    "images": ([], "image_id png width height"),
    "errors": (["run"], "source_id stage message"),
}


def test_tables_and_columns_are_the_contract():
    assert set(TABLES) == set(EXPECTED)
    for name, (partition, cols) in EXPECTED.items():
        t = TABLES[name]
        assert list(t.partition) == partition, name
        assert [f.name for f in t.schema] == cols.split(), name
        assert t.columns == partition + cols.split()


def test_storage_types_that_matter():
    assert TABLES["attention"].schema.field("weight").type == pa.float16()
    assert TABLES["hidden_states"].schema.field("vec").type == pa.list_(pa.float16())
    assert TABLES["examples"].schema.field("example_id").type == pa.int64()


def test_statistic_names():
    assert STATS == ("t2i", "t2t", "i2t", "i2i", "i2i_noself", "entropy", "sink", "max", "img_entropy",
                     "grounding", "pointing", "kept_mass")
