"""tokens.tile (issue 9): null for text, 0 the base image, 1.. crops or tiles; lakes written before the
column still open; the Attention page shows the tiles of a tiled image.

The lakes are written by tests/lakegen.py (the project's own writer): example 1 of run ``tiled`` is a
tiled image, its base image (tile 0) a 3 x 4 grid of 40 px patches over the whole 160 x 120 image,
tile 1 the left half and tile 2 the right half, each a 6 x 4 grid of 20 px patches. Expected values
come from what the generator wrote (its token rows and full attention), never from lake/queries.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lake import views as catalog_mod
from lake import queries
from lake.catalog import open_catalog
from lake.views import view_sources
from lake.store import open_store
from tests.lakegen import make_synthetic_lake
from tests.app.test_app import chart, chart_data, open_app, select_on_chart

ATT = "app_pages/attention.py"
TILED = 1  # the tiled example of run "tiled"


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles") / "lake"
    return make_synthetic_lake(root, "tiled", n_examples=4, tiles=(TILED,), chunk_size=2)


def drop_tile(files) -> None:
    """Rewrite token files as software before the tile column wrote them."""
    for f in files:
        t = pq.ParquetFile(f).read()
        pq.write_table(t.drop_columns(["tile"]), f)


@pytest.fixture(scope="module")
def older(tmp_path_factory):
    """A lake written before tiles: run ``old`` has no tile column in any file; run ``mixed`` is an
    older run that newer software added a chunk to (a resumed run, a live example): its chunk 0 has
    no tile column, its chunk 1 (with a tiled example, 3) has."""
    root = tmp_path_factory.mktemp("older") / "lake"
    old = make_synthetic_lake(root, "old", n_examples=4, chunk_size=2)
    mixed = make_synthetic_lake(root, "mixed", n_examples=4, chunk_size=2, tiles=(3,), seed=2)
    drop_tile((root / "tokens" / "run=old").rglob("*.parquet"))
    drop_tile((root / "tokens" / "run=mixed").glob("part-000000.parquet"))
    return root, old, mixed


def parquet_tokens(root: Path, run: str) -> pd.DataFrame:
    files = sorted((Path(root) / "tokens" / f"run={run}").rglob("*.parquet"))
    return pa.concat_tables([pq.ParquetFile(f).read() for f in files], promote_options="default").to_pandas()


def union_boxes(tok: pd.DataFrame) -> pd.DataFrame:
    """Each tile's outline, computed here: the smallest box holding its patches' boxes."""
    p = tok[tok.role == "patch"]
    rows = []
    for t, g in p.groupby("tile"):
        rows.append(dict(tile=int(t), x0=g.x0.min(), y0=g.y0.min(), x1=g.x1.max(), y1=g.y1.max()))
    return pd.DataFrame(rows).sort_values("tile").reset_index(drop=True)


# -- the column --------------------------------------------------------------------------------
def test_tile_column_in_the_parquet_files(tiled):
    files = sorted((tiled.root / "tokens").rglob("*.parquet"))
    assert files and all(pq.read_schema(f).field("tile").type == pa.int16() for f in files)
    t = parquet_tokens(tiled.root, "tiled")
    assert t[t.modality == "text"].tile.isna().all()
    img = t[t.modality == "image"]
    assert img.tile.notna().all()
    assert (img[img.example_id != TILED].tile == 0).all()
    ex = img[img.example_id == TILED]
    assert ex.groupby("tile").size().to_dict() == {0: 1 + 12, 1: 24, 2: 24}  # [IMG] and 3 x 4, then 6 x 4 twice
    assert ex[ex.role == "image_cls"].tile.tolist() == [0]
    one, two = ex[ex.tile == 1], ex[ex.tile == 2]
    assert (one.x1 <= 80).all() and (two.x0 >= 80).all()  # the left and the right half
    base = ex[(ex.tile == 0) & (ex.role == "patch")]
    assert ((one.x1 - one.x0) == 20).all() and ((base.x1 - base.x0) == 40).all()  # the base image's patches coarser


def test_queries_return_the_tile(tiled):
    with open_catalog(tiled.root) as cat:
        tok = queries.example_tokens(cat, "tiled", TILED)
        types = cat.df("SELECT column_name, column_type FROM (DESCRIBE tokens)")
    want = tiled.tokens_of(TILED).reset_index(drop=True)
    assert tok.token_idx.tolist() == want.token_idx.tolist()
    assert [None if pd.isna(x) else int(x) for x in tok.tile] == [None if x is None or pd.isna(x) else int(x)
                                                                    for x in want.tile]
    assert dict(zip(types.column_name, types.column_type))["tile"] == "SMALLINT"


def test_pipeline_token_tables_default_to_the_base_image():
    from pipeline.models.tokens import token_rows, token_table

    cols = dict(token_idx=[0, 1, 2], stream=["s"] * 3, modality=["text", "image", "image"],
                role=["cls", "image_cls", "patch"], token=["[CLS]", None, None], seq_pos=[0, 1, 2],
                text_pos=[0, None, None], patch_row=[None, None, 0], patch_col=[None, None, 0],
                x0=[None, 0.0, 0.0], y0=[None, 0.0, 0.0], x1=[None, 8.0, 8.0], y1=[None, 8.0, 8.0])
    assert token_rows(**cols).column("tile").to_pylist() == [None, 0, 0]
    assert token_rows(**cols, tile=[None, 0, 2]).column("tile").to_pylist() == [None, 0, 2]
    kw = dict(n_text=1, n_image=3, stream="self", roles_text=["cls"], roles_image=["image_cls", "patch", "patch"],
              pieces=["[CLS]"], seq=[0, 1, 2, 3], patch_row=[-1, 0, 0], patch_col=[-1, 0, 1],
              x0=[0, 0, 4], y0=[0, 0, 0], x1=[8, 4, 8], y1=[8, 8, 8])
    assert token_table(**kw).column("tile").to_pylist() == [None, 0, 0, 0]
    assert token_table(**kw, tile=[0, 1, 2]).column("tile").to_pylist() == [None, 0, 1, 2]
    assert token_table(**kw).schema.field("tile").type == pa.int16()


# -- older lakes ---------------------------------------------------------------------------------
def test_older_lake_reads_image_tokens_as_the_base_image(older):
    root, old, mixed = older
    assert "tile" not in pq.read_schema(next((root / "tokens" / "run=old").rglob("*.parquet"))).names
    with open_catalog(root) as cat:
        for lake in (old, mixed):
            t = cat.df("SELECT example_id, token_idx, modality, tile FROM tokens WHERE run = ? "
                       "ORDER BY example_id, token_idx", [lake.run])
            want = lake.tokens.sort_values(["example_id", "token_idx"])
            assert len(t) == len(want)
            assert t[t.modality == "text"].tile.isna().all()
            np.testing.assert_array_equal(t[t.modality == "image"].tile.to_numpy(int),
                                          want[want.modality == "image"].tile.to_numpy(int))
        # the newer chunk of the mixed run keeps its tiles
        assert set(queries.example_tokens(cat, "mixed", 3).tile.dropna().astype(int)) == {0, 1, 2}
        assert set(queries.example_tokens(cat, "old", 1).tile.dropna().astype(int)) == {0}
    sources, lacking = view_sources(open_store(root))
    old_glob = [s for s in sources["tokens"] if "run=old" in s]
    assert len(old_glob) == 1 and old_glob[0].endswith("**/*.parquet") and lacking["tokens"][old_glob[0]] == ("tile",)
    mixed_files = [s for s in sources["tokens"] if "run=mixed" in s]
    assert len(mixed_files) == 2  # read file by file: one lacks the column, one has it
    assert sorted(lacking["tokens"].get(s, ()) for s in mixed_files) == [(), ("tile",)]


def test_a_new_run_reads_one_footer_and_one_scan(tiled, monkeypatch):
    calls = []
    real = catalog_mod.pq.read_schema
    monkeypatch.setattr(catalog_mod.pq, "read_schema", lambda *a, **k: calls.append(a) or real(*a, **k))
    sources, lacking = view_sources(open_store(tiled.root))
    assert len(calls) == 1  # the run's first chunk has the column: so do the others
    assert lacking["tokens"] == {} and all(not v for v in lacking.values())
    assert "UNION" not in catalog_mod.view_sql(catalog_mod.TABLES["tokens"], sources["tokens"], lacking["tokens"])


def test_older_lake_pages_render(older, monkeypatch):
    root, _, _ = older
    for run, ex in (("old", 1), ("mixed", 0), ("mixed", 3)):
        for page, want in [(None, []), ("app_pages/head_summary.py", ["head-summary"]),
                           (ATT, ["text-image", "image-image", "image-text", "text-text"]),
                           ("app_pages/hidden_states.py", [])]:
            at = open_app(root, monkeypatch, page=page, run=run, ex=ex)
            assert not at.error, [e.value for e in at.error]
            for d in want:
                chart(at, d)
        at = open_app(root, monkeypatch, page=ATT, run=run, ex=ex)
        assert bool([s for s in at.selectbox if s.key == "w_tile"]) == (ex == 3)


# -- the Attention page ------------------------------------------------------------------------
def has_tile_selector(at) -> bool:
    return any(s.key == "w_tile" for s in at.selectbox)


def text_query(lake, ex: int, pos: int) -> int:
    tok = lake.tokens_of(ex)
    return int(tok[tok.text_pos == pos].token_idx.iloc[0])


def test_tile_selector_only_for_a_tiled_example(tiled, monkeypatch):
    for ex in range(4):
        at = open_app(tiled.root, monkeypatch, page=ATT, run="tiled", ex=ex)
        assert has_tile_selector(at) == (ex == TILED), ex
        _, data = chart(at, "text-image")
        assert not any("outline" in d.columns for d in data) or ex == TILED  # a single image: no outlines
    at = open_app(tiled.root, monkeypatch, page=ATT, run="tiled", ex=TILED)
    sb = at.selectbox(key="w_tile")
    assert sb.options == ["all tiles on the original image", "base image", "tile 1", "tile 2"]
    assert sb.value == "all" and at.session_state["tile"] == "all"
    sb.set_value(2).run()
    assert not at.exception and at.session_state["tile"] == 2 and at.query_params["tile"] == "2"
    p = chart_data(at, "text-image", "weight")
    assert set(p.tile.astype(int)) == {2}


def test_tile_outlines_are_the_union_of_each_tiles_patches(tiled, monkeypatch):
    want = union_boxes(tiled.tokens_of(TILED))
    assert want[["x0", "y0", "x1", "y1"]].values.tolist() == [[0, 0, 160, 120], [0, 0, 80, 120], [80, 0, 160, 120]]
    for tile in ("all", 0, 1, 2):
        at = open_app(tiled.root, monkeypatch, page=ATT, run="tiled", ex=TILED, tile=tile)
        for d in ("text-image", "image-image"):
            o = chart_data(at, d, "outline").sort_values("tile").reset_index(drop=True)
            assert o.tile.astype(int).tolist() == want.tile.tolist()
            np.testing.assert_allclose(o[["x0", "y0", "x1", "y1"]].to_numpy(float),
                                       want[["x0", "y0", "x1", "y1"]].to_numpy(float))
            assert o.outline.tolist() == ["base image", "tile 1", "tile 2"]
            assert o.selected.tolist() == ([True] * 3 if tile == "all" else [t == tile for t in range(3)])


@pytest.mark.parametrize("tile", [0, 1, 2, "all"])
def test_text_to_image_of_a_tile_is_the_attention_row(tiled, monkeypatch, tile):
    layer, head, pos = 1, 0, 2
    at = open_app(tiled.root, monkeypatch, page=ATT, run="tiled", ex=TILED, layer=layer, head=head, tokens=pos,
                  tile=tile)
    tok = tiled.tokens_of(TILED)
    patches = tok[tok.role == "patch"]
    if tile != "all":
        patches = patches[patches.tile == tile]
    row = tiled.attention[(TILED, "self", layer)][head, text_query(tiled, TILED, pos)]  # [key]
    p = chart_data(at, "text-image", "weight").sort_values("token_idx")
    assert p.token_idx.tolist() == sorted(patches.token_idx.astype(int))
    np.testing.assert_allclose(p.weight.to_numpy(), row[p.token_idx.to_numpy()], atol=2e-3)
    caption = " ".join(c.value for c in at.caption)
    if tile == "all":
        assert "All tiles on the original image" in caption and "**sum**" in caption
    else:
        assert f"Image tokens of the **{'base image' if tile == 0 else f'tile {tile}'}** only" in caption
        np.testing.assert_allclose(float(caption.split("text → image mass ")[1].split("**")[0]),
                                   row[patches.token_idx.astype(int).to_numpy()].sum(), atol=2e-3)


def test_image_to_image_within_a_tile(tiled, monkeypatch):
    layer, head = 0, 1
    at = open_app(tiled.root, monkeypatch, page=ATT, run="tiled", ex=TILED, layer=layer, head=head, tile=1,
                  patches="t1r2c3")
    tok = tiled.tokens_of(TILED)
    one = tok[(tok.role == "patch") & (tok.tile == 1)]
    q = int(one[(one.patch_row == 2) & (one.patch_col == 3)].token_idx.iloc[0])
    assert at.session_state["patches"] == ["t1r2c3"]
    ii = chart_data(at, "image-image", "weight").sort_values("token_idx")
    assert ii.token_idx.tolist() == sorted(one.token_idx.astype(int))
    row = tiled.attention[(TILED, "self", layer)][head, q]
    np.testing.assert_allclose(ii.weight.to_numpy(), row[ii.token_idx.to_numpy()], atol=2e-3)
    assert ii[ii.selected].token_idx.tolist() == [q]
    assert set(ii.patch) == {f"t1r{r}c{c}" for r in range(6) for c in range(4)}  # the tooltip names the tile
    # a click on a patch of tile 1 picks it by its tile-qualified name
    q2 = int(one[(one.patch_row == 0) & (one.patch_col == 1)].token_idx.iloc[0])
    select_on_chart(at, "ii_chart", {"patch": [{"token_idx": q2}], "box": {}})
    assert at.session_state["patches"] == ["t1r0c1"]


def test_all_tiles_heat_sums_where_tiles_overlap():
    from streamlit_app import views

    # base image: 3 x 4 patches of 40 px, weight b; tiles 1 and 2: the halves at 20 px, weights a1, a2
    b, a1, a2 = 0.01, 0.2, 0.05
    rows = [dict(tile=0, patch_row=r, patch_col=c, x0=40 * c, y0=40 * r, x1=40 * (c + 1), y1=40 * (r + 1), weight=b)
            for r in range(3) for c in range(4)]
    for tile, left, a in ((1, 0, a1), (2, 80, a2)):
        rows += [dict(tile=tile, patch_row=r, patch_col=c, x0=left + 20 * c, y0=20 * r, x1=left + 20 * (c + 1),
                      y1=20 * (r + 1), weight=a) for r in range(6) for c in range(4)]
    p = pd.DataFrame(rows)
    h = views.heat(p, 160, 120, (160, 120))  # one display pixel per image pixel
    assert h.shape == (120, 160)
    np.testing.assert_allclose(h[30:90, 10:70], a1 + b, rtol=1e-5)  # inside the left half: base + tile 1
    np.testing.assert_allclose(h[30:90, 90:150], a2 + b, rtol=1e-5)
    only = views.heat(views.of_tile(p, 1), 160, 120, (160, 120))  # one tile alone: its own weights, 0 elsewhere
    np.testing.assert_allclose(only[30:90, 10:70], a1, rtol=1e-5)
    assert (only[:, 81:] == 0).all()
    boxes = views.tile_boxes(p, 1)
    assert boxes[["tile", "x0", "y0", "x1", "y1", "selected"]].values.tolist() == [
        [0, 0, 0, 160, 120, False], [1, 0, 0, 80, 120, True], [2, 80, 0, 160, 120, False]]
    # a single image draws exactly as before tiles: the tile column changes nothing
    single = p[p.tile == 0]
    assert views.overlay(None, single, 160, 120, 160)[0] == views.overlay(None, single.drop(columns="tile"), 160, 120,
                                                                         160)[0]


def test_hidden_states_page_names_a_tiles_patches_with_their_tile(tiled, monkeypatch):
    """The Hidden states page names a patch of tile k > 0 ``patch tKrRcC`` (as the Attention page does), so
    the base image's patch r0c0 and tile 1's are told apart; every patch label is unique."""
    at = open_app(tiled.root, monkeypatch, page="app_pages/hidden_states.py", run="tiled", ex=TILED)
    opts = at.selectbox(key="w_tok").options
    tok = tiled.tokens_of(TILED)
    patches = tok[tok.role == "patch"]
    want = [f"patch {'t%d' % t if t else ''}r{int(r)}c{int(c)}"
            for t, r, c in zip(patches.tile.astype(int), patches.patch_row, patches.patch_col)]
    got = [o.split(" · ", 1)[1].rsplit(" (", 1)[0] for o in opts]  # "12 · patch t1r0c2 (patch)"
    got = [o for o in got if o.startswith("patch ")]
    assert sorted(got) == sorted(want) and len(set(got)) == len(got)
    assert any(o.startswith("patch t1r") for o in got) and any(o.startswith("patch t2r") for o in got)


def test_sql_worked_examples_give_each_patch_its_tile(tiled):
    """The SQL page's "Where a word looks" and "Tokens of an example" name each image token's tile and box,
    equal to the token table the lake was written from: tile 1's patch r0c0 is not the base image's."""
    sqls = queries.example_sql("tiled", layer=1, head=0, example_id=TILED)
    tok = tiled.tokens_of(TILED).set_index(["patch_row", "patch_col", "tile"], drop=False)
    with open_catalog(tiled.root) as cat:
        looks = cat.user_sql(sqls["Where a word looks"]).df
        table = cat.user_sql(sqls["Tokens of an example"]).df
    assert len(looks) == 16 and set(looks.tile.astype(int)) <= {0, 1, 2} and looks.tile.nunique() > 1
    for r in looks.itertuples():
        want = tok.loc[(r.patch_row, r.patch_col, r.tile)]
        assert (r.x0, r.y0, r.x1, r.y1) == pytest.approx((want.x0, want.y0, want.x1, want.y1))
    files = tiled.tokens_of(TILED).sort_values("token_idx")
    table = table.sort_values("token_idx")
    assert [None if pd.isna(t) else int(t) for t in table.tile] == [None if t is None or pd.isna(t) else int(t)
                                                                      for t in files.tile]
