"""Downloads, the SQL page and shared URLs, under Streamlit's AppTest on the synthetic lake.

- Every chart any page draws renders to a valid PNG and SVG with ``streamlit_app/export.py``
  (vl-convert, no browser), both from the spec the browser receives and through the chart's own
  download buttons, and its CSV download holds exactly the rows the chart draws.
- The SQL page returns what ``vlatlas sql`` returns for the same query, refuses what the sandbox
  refuses (a message, never a traceback), runs every worked example, and its Parquet download
  reads back as the result.
- A URL holding every selection reopens the same view on every page.

Download buttons hand Streamlit a callable (the file is made on click); a fixture records what
each button was given, so the tests call exactly what a click would.
"""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lake import queries
from lake.catalog import Catalog
from streamlit_app import charts, export
from tests.app.test_app import APP, click_row, open_app

PAGES = re.findall(r'"app_pages" / "(\w+\.py)"', APP.read_text())
SQL_PAGE = "app_pages/sql.py"
HEAD_SQL = ("SELECT layer, head, avg(value) AS t2i, count(*) AS n FROM head_stats "
            "WHERE run = 'synth' AND stat = 't2i' GROUP BY layer, head ORDER BY layer, head")


# -- helpers ------------------------------------------------------------------------------------
def materialise(data) -> bytes:
    data = data() if callable(data) else data
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _walk(node):
    children = getattr(node, "children", None) or {}
    for i in sorted(children):
        yield children[i]
        yield from _walk(children[i])


def charts_with_downloads(at) -> list[tuple[dict, dict[str, pd.DataFrame], dict[str, str]]]:
    """Each chart of the main area in page order: (spec, {dataset name: rows}, {"png"|"svg"|"csv":
    download button key}) — the download buttons that follow the chart, before the next chart."""
    out = []
    for node in _walk(at.main):
        if node.type == "vega_lite_chart":
            spec = json.loads(node.proto.spec)
            data = {d.name: pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in node.proto.datasets}
            out.append((spec, data, {}))
        elif node.type == "download_button" and out and node.key:
            m = re.match(r"dl_(png|svg|csv)_", node.key)
            if m and m.group(1) not in out[-1][2]:
                out[-1][2][m.group(1)] = node.key
    return out


def full_spec(spec: dict, data: dict[str, pd.DataFrame]) -> dict:
    """The spec with its datasets inline again, as ``chart.to_dict()`` had them."""
    s = dict(spec)
    s["datasets"] = {name: json.loads(d.to_json(orient="records", date_format="iso")) for name, d in data.items()}
    return s


def drawn_data(spec: dict, data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The rows a chart draws: its top-level dataset, else its largest one (not an image's one row)."""
    name = (spec.get("data") or {}).get("name")
    return data[name] if name in data else max(data.values(), key=len)


def chart_rows(at, description: str) -> pd.DataFrame:
    """The rows the chart with this description draws."""
    for spec, data, _ in charts_with_downloads(at):
        if spec.get("description") == description:
            return drawn_data(spec, data)
    raise AssertionError(f"no chart {description!r}")


def check_png(png: bytes) -> None:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.width >= 100 and img.height >= 60, img.size
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 20, "the picture is blank"
    assert len(png) > 2_000


def check_svg(svg: bytes) -> None:
    root = ET.fromstring(svg)
    assert root.tag.split("}")[-1] == "svg"
    assert sum(1 for _ in root.iter()) > 10, "an empty drawing"


def assert_same_rows(csv: bytes, want: pd.DataFrame) -> None:
    """The CSV holds the chart's rows: the same rows in the same order, every CSV column one of the
    chart's with the same values (a page may leave out columns the chart derives for display, such
    as a selection flag, by handing ``show_chart`` its own table)."""
    got = pd.read_csv(io.BytesIO(csv))
    want = want.rename(columns=str)
    assert set(got.columns) <= set(want.columns), set(got.columns) - set(want.columns)
    assert len(got) == len(want)
    for col in got.columns:
        w, g = want[col], got[col]
        if pd.api.types.is_bool_dtype(w):
            assert g.astype(str).str.lower().tolist() == w.astype(str).str.lower().tolist(), col
        elif pd.api.types.is_numeric_dtype(w):
            np.testing.assert_allclose(g.to_numpy(float), w.to_numpy(float), rtol=1e-6, atol=1e-9, err_msg=col)
        else:
            norm = lambda s: s.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))  # noqa: E731
            assert norm(g).tolist() == norm(w).tolist(), col


# -- every chart: PNG, SVG, CSV ------------------------------------------------------------------
VIEWS = [
    ("app_pages/head_summary.py", {"ex": 2}),
    ("app_pages/head_summary.py", {"scope": "filtered", "norm": "z_dataset", "split": "train"}),
    ("app_pages/attention.py", {"ex": 1, "layer": 1, "head": 1, "tokens": "1,2", "patches": "r0c1"}),
    ("app_pages/attention.py", {"ex": 3, "head": "mean"}),
    ("app_pages/attention.py", {"run": "pruned", "stream": "text", "ex": 1}),
    (SQL_PAGE, {"sql": HEAD_SQL}),
]
VIEWS += [(f"app_pages/{p}", {}) for p in PAGES if f"app_pages/{p}" not in {v[0] for v in VIEWS}]


@pytest.mark.parametrize("page, params", VIEWS, ids=[f"{p.split('/')[-1][:-3]}-{i}" for i, (p, _) in enumerate(VIEWS)])
def test_every_chart_exports(synth_lake, monkeypatch, downloads, page, params):
    params = {"run": "synth", **params}
    at = open_app(synth_lake.root, monkeypatch, page=None if page.endswith("examples.py") else page, **params)
    assert not at.error, [e.value for e in at.error]
    found = charts_with_downloads(at)
    if page in ("app_pages/head_summary.py", "app_pages/attention.py", SQL_PAGE):
        assert found, f"{page} drew no chart"
    for spec, data, keys in found:
        name = spec.get("description")
        # rendered from the spec the browser got
        s = full_spec(spec, data)
        check_png(export.spec_png(s))
        check_svg(export.spec_svg(s).encode())
        # and through the chart's own buttons
        assert set(keys) == {"png", "svg", "csv"}, f"chart {name!r} lacks downloads: {keys}"
        check_png(materialise(downloads[keys["png"]]))
        check_svg(materialise(downloads[keys["svg"]]))
        assert_same_rows(materialise(downloads[keys["csv"]]), drawn_data(spec, data))


def test_image_overlay_png_holds_the_picture(synth_lake, monkeypatch, downloads):
    """The text → image chart's PNG shows the example's image under the heatmap (a data URI that
    vl-convert must load), not an empty frame with the patch grid."""
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/attention.py", run="synth", ex=0)
    spec, data, keys = next(c for c in charts_with_downloads(at) if c[0].get("description") == "text-image")
    img = Image.open(io.BytesIO(materialise(downloads[keys["png"]]))).convert("RGB")
    colours = img.resize((64, 64)).getcolors(64 * 64)
    assert colours is not None and len(colours) > 50, "the picture is missing from the PNG"


# -- the SQL page -----------------------------------------------------------------------------
def cli_csv(root, sql: str, capsys) -> str:
    from pipeline.cli import main

    capsys.readouterr()
    rc = main(["sql", "--lake", str(root), "--format", "csv", sql])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.mark.parametrize("sql", [
    HEAD_SQL,
    "SELECT example_id, text, correct, json_extract_string(meta, '$.qtype') AS qtype FROM examples "
    "WHERE run = 'synth' ORDER BY example_id",
    "FROM tokens WHERE run = 'synth' AND example_id = 2 ORDER BY token_idx",
])
def test_sql_page_returns_what_vlatlas_sql_returns(synth_lake, monkeypatch, downloads, capsys, sql):
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql=sql)
    assert not at.error, [e.value for e in at.error]
    want = cli_csv(synth_lake.root, sql, capsys)
    shown = at.dataframe[0].value
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), pd.read_csv(io.StringIO(want)),
                                  check_dtype=False)
    assert materialise(downloads["dl_tcsv_sql_result"]).decode() == want  # the CSV download, byte for byte
    caption = " ".join(c.value for c in at.caption)
    assert f"**{len(shown)}** row" in caption and " ms" in caption
    assert at.text_area(key="w_sql").value == sql


def test_sql_parquet_download_round_trips(synth_lake, monkeypatch, downloads):
    sql = ("SELECT example_id, text, correct, image_width, CAST(example_id AS DOUBLE) / 3 AS third, "
           "meta FROM examples WHERE run = 'synth' ORDER BY example_id")
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql=sql)
    back = pq.read_table(io.BytesIO(materialise(downloads["dl_tparquet_sql_result"]))).to_pandas()
    with Catalog(synth_lake.root) as cat:
        want = cat.user_sql(sql).df
    pd.testing.assert_frame_equal(back, want)
    pd.testing.assert_frame_equal(at.dataframe[0].value.reset_index(drop=True), want)


@pytest.mark.parametrize("sql, says", [
    ("SELECT * FROM read_csv('/etc/passwd')", "refused"),
    ("DROP VIEW runs", "refused"),
    ("SELECT 1; SELECT 2", "refused"),
    ("SELEC oops", "syntax"),
    ("SELECT nope FROM runs", "nope"),
])
def test_refused_or_broken_query_is_a_message(synth_lake, monkeypatch, sql, says):
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql=sql)
    assert not at.exception
    assert at.error and says in at.error[0].value.lower(), [e.value for e in at.error]
    assert not at.get("vega_lite_chart") and not at.dataframe
    with Catalog(synth_lake.root) as cat:  # the views are intact afterwards
        assert len(cat.user_sql("SELECT * FROM runs").df) == 3


def test_truncated_result_says_so(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql="SELECT range AS i FROM range(20000)")
    assert len(at.dataframe[0].value) == 10_000
    assert any("Truncated at 10,000 rows" in w.value for w in at.warning)


def test_worked_examples_run(synth_lake, monkeypatch):
    """Every worked example runs in the sandbox on every run of the lake, from its button too."""
    with Catalog(synth_lake.root) as cat:
        for run in ("synth", "pruned", "empty", "it's odd"):  # a run name with a quote stays one literal
            for title, sql in queries.example_sql(run, stream="self", layer=1, head=1, stat="max",
                                                  example_id=2).items():
                cat.user_sql(sql)
        top = cat.user_sql(queries.example_sql("synth", layer=1, head=1, stat="max")["Top examples for a head"]).df
        want = queries.top_examples(cat, "synth", "self", 1, 1, "max", n=20)
        assert top.example_id.tolist() == want.example_id.tolist()
        np.testing.assert_allclose(top["max"], want.value, rtol=1e-6)
        qt = cat.user_sql(queries.example_sql("synth")["Statistics per question type"]).df
        assert sorted(qt.qtype) == sorted(set(json.loads(m)["qtype"] for m in synth_lake.examples.meta))
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", ex=2)
    titles = list(queries.EXAMPLE_SQL)
    for i, title in enumerate(titles):
        if title in queries.NEEDS:  # --explain rows the synthetic run lacks: not offered (test_defects_pages.py)
            assert not [b for b in at.button if b.key == f"sql_example_{i}"], title
            continue
        at.button(key=f"sql_example_{i}").click().run()
        assert not at.exception and not at.error, (title, [e.value for e in at.error])
        assert at.text_area(key="w_sql").value.startswith("--")
        assert at.query_params["sql"] == at.text_area(key="w_sql").value
        if title == "Tokens of an example":
            assert at.dataframe[0].value.token_idx.tolist() == synth_lake.tokens_of(2).token_idx.tolist()


def test_quick_chart_defaults_and_choices(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql=HEAD_SQL)
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert spec["mark"]["type"] == "rect"  # layer × head: a heatmap coloured by the value
    assert (spec["encoding"]["x"]["field"], spec["encoding"]["y"]["field"], spec["encoding"]["color"]["field"]) \
        == ("head", "layer", "t2i")
    at.selectbox(key="w_sql_x").set_value("layer").run()
    at.selectbox(key="w_sql_y").set_value("n").run()
    at.selectbox(key="w_sql_color").set_value("(none)").run()
    at.selectbox(key="w_sql_mark").set_value("line").run()
    assert not at.exception
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert spec["mark"]["type"] == "line" and spec["encoding"]["y"]["field"] == "n" and "color" not in spec["encoding"]
    assert {k: at.query_params[k] for k in ("sql_x", "sql_y", "sql_mark")} == {"sql_x": "layer", "sql_y": "n",
                                                                             "sql_mark": "line"}
    # the URL brings the same chart back
    again = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql=HEAD_SQL, sql_x="layer",
                     sql_y="n", sql_color="(none)", sql_mark="line")
    assert json.loads(again.get("vega_lite_chart")[0].proto.spec)["mark"]["type"] == "line"


def test_dotted_column_names_chart(synth_lake, monkeypatch, downloads):
    sql = "SELECT layer AS \"a.b\", avg(value) AS \"v[0]\" FROM head_stats WHERE run = 'synth' GROUP BY 1 ORDER BY 1"
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql=sql)
    assert not at.error
    (spec, data, keys), = charts_with_downloads(at)
    check_png(materialise(downloads[keys["png"]]))
    assert_same_rows(materialise(downloads[keys["csv"]]), drawn_data(spec, data))


# -- a shared URL restores the view -------------------------------------------------------------
SHARED = dict(run="synth", ex=3, stream="self", layer=1, head=1, tokens="1,2", patches="r0c1,r2c3", stat="max",
              norm="z_example", scope="example", split="train", sql=HEAD_SQL, sql_mark="bar")


@pytest.mark.parametrize("page", [None, *[f"app_pages/{p}" for p in PAGES if p != "examples.py"]])
def test_shared_url_restores_the_view(synth_lake, monkeypatch, page):
    at = open_app(synth_lake.root, monkeypatch, page=page, **SHARED)
    assert not at.error, [e.value for e in at.error]
    ss = at.session_state
    assert (ss["run"], ss["ex"], ss["stream"], ss["layer"], ss["head"]) == ("synth", 3, "self", 1, 1)
    assert (ss["tokens"], ss["patches"], ss["stat"], ss["norm"], ss["scope"], ss["split"]) == \
        ([1, 2], ["r0c1", "r2c3"], "max", "z_example", "example", "train")
    assert at.sidebar.selectbox(key="w_run").value == "synth" and at.sidebar.selectbox(key="w_ex").value == 3
    assert "split = 'train'" in " ".join(c.value for c in at.sidebar.caption)
    # every selection is still in the URL after the page ran: pasting it elsewhere gives this view again
    for k, v in SHARED.items():
        assert at.query_params[k] == str(v), k
    if page is None:  # Examples: the filter's widget and the filtered table
        assert at.selectbox(key="w_split").value == "train"
        e = synth_lake.examples
        assert at.dataframe[0].value.example_id.tolist() == e[e.split == "train"].example_id.tolist()
    elif page.endswith("head_summary.py"):
        assert at.selectbox(key="w_stat").value == "max"
        assert at.radio(key="w_norm").value == "z_example" and at.radio(key="w_scope").value == "example"
        d = chart_rows(at, "head-summary")
        assert d[d.selected][["layer", "col"]].values.tolist() == [[1, "1"]]
        assert "Top examples for layer 1, head 1" in " ".join(m.value for m in at.markdown)
    elif page.endswith("attention.py"):
        assert at.slider(key="w_layer").value == 1 and at.selectbox(key="w_head").value == 1
        assert list(at.session_state["w_tokens"]) == [1, 2]  # the query-token pills
        p = chart_rows(at, "image-image")
        assert sorted(p[p.selected].patch.tolist()) == ["r0c1", "r2c3"]
    elif page.endswith("sql.py"):
        assert at.text_area(key="w_sql").value == HEAD_SQL
        assert at.selectbox(key="w_sql_mark").value == "bar"


def test_examples_table_page_is_in_the_url(tmp_path, monkeypatch):
    from tests.lakegen import make_synthetic_lake

    make_synthetic_lake(tmp_path, "big", n_examples=55, n_layers=1, n_heads=1, chunk_size=32)
    at = open_app(tmp_path, monkeypatch, expage=2)
    assert at.dataframe[0].value.example_id.tolist() == list(range(50, 55))
    assert at.number_input(key="ex_page").value == 2 and at.query_params["expage"] == "2"
    at.number_input(key="ex_page").set_value(1).run()
    assert "expage" not in at.query_params  # page 1 is the default


@pytest.mark.parametrize("sql", [
    "SELECT image_id, png, width FROM images ORDER BY image_id LIMIT 2",  # a BLOB
    "SELECT example_id, token_idx, vec FROM hidden_states WHERE run = 'synth' ORDER BY ALL LIMIT 3",  # a list
    "SELECT run, created_at, n_examples FROM runs ORDER BY run",  # a timestamp with time zone
    "SELECT {'a': 1, 'b': 'x'} AS s, 2 AS n",  # a struct
    "SELECT 1 AS x WHERE false",  # no rows
])
def test_sql_results_of_any_type(synth_lake, monkeypatch, downloads, sql):
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth", sql=sql)
    assert not at.error, [e.value for e in at.error]
    with Catalog(synth_lake.root) as cat:
        want = cat.user_sql(sql).df
    assert materialise(downloads["dl_tcsv_sql_result"]).decode() == want.to_csv(index=False)
    back = pq.read_table(io.BytesIO(materialise(downloads["dl_tparquet_sql_result"]))).to_pandas()
    assert list(back.columns) == list(want.columns) and len(back) == len(want)
    for spec, data, keys in charts_with_downloads(at):  # only scalar columns are offered to the chart
        check_png(materialise(downloads[keys["png"]]))
        assert_same_rows(materialise(downloads[keys["csv"]]), drawn_data(spec, data))


def test_head_summary_top_examples_for_the_selected_head(synth_lake, monkeypatch):
    at = open_app(synth_lake.root, monkeypatch, page="app_pages/head_summary.py", run="synth", stat="max",
                  layer=1, head=0)
    s = synth_lake.stats
    s = s[(s.stat == "max") & (s.layer == 1) & (s["head"] == 0)].sort_values("value", ascending=False)
    top = at.dataframe[0].value
    assert top.example_id.tolist() == s.example_id.tolist()
    np.testing.assert_allclose(top["max"], s.value, rtol=1e-6)
    click_row(at, at.dataframe[0], 1)
    assert not at.exception and at.session_state["ex"] == int(s.example_id.iloc[1])


def test_quick_chart_of_unaliased_aggregates_renders(synth_lake, monkeypatch):
    """DuckDB names an unaliased aggregate avg("value"): the quotes must not break Vega's field paths
    (the chart failed in the browser with "Access path missing closing bracket")."""
    import vl_convert as vlc

    with Catalog(synth_lake.root) as cat:
        df = cat.user_sql("SELECT stat, avg(value) FROM head_stats WHERE run = 'synth' GROUP BY stat ORDER BY stat").df
    assert 'avg("value")' in df.columns
    spec = charts.quick_chart(df, "stat", 'avg("value")').to_json()
    svg = vlc.vegalite_to_svg(spec)  # raised the Vega error before
    assert svg.count('aria-roledescription="bar"') == df['avg("value")'].notna().sum() > 0  # a bar per value
    at = open_app(synth_lake.root, monkeypatch, page=SQL_PAGE, run="synth",
                  sql="SELECT stat, avg(value) FROM head_stats WHERE run = 'synth' GROUP BY stat")
    assert at.session_state["sql_y"] == 'avg("value")'


# -- what an exported picture says it shows ------------------------------------------------------
def svg_texts(svg: bytes) -> str:
    """Every text of an SVG, one string (the title's lines, axis labels, legends)."""
    root = ET.fromstring(svg)
    return " ".join(" ".join(t.itertext()) for t in root.iter() if t.tag.split("}")[-1] == "text")


CONTEXTS = [  # (page, URL parameters, {chart description: words its PNG/SVG title must hold})
    ("app_pages/attention.py", {"ex": 1, "layer": 1, "head": 1, "tokens": "1,2", "patches": "r0c1"},
     {"text-image": ["Text → image", "run synth", "example #1", "stream self", "layer 1", "head 1", "query tokens"],
      "image-image": ["Image → image", "run synth", "example #1", "layer 1", "head 1", "query patches r0c1"],
      "image-text": ["Image → text", "run synth", "example #1", "layer 1", "head 1", "query patches r0c1"],
      "text-text": ["Text → text", "run synth", "example #1", "layer 1", "head 1"]}),
    ("app_pages/attention.py", {"ex": 3, "head": "mean", "layer": 0},
     {"text-image": ["run synth", "example #3", "layer 0", "mean over heads"]}),
    ("app_pages/head_summary.py", {"ex": 2, "scope": "example", "stat": "max"},
     {"head-summary": ["Head summary", "run synth", "stream self", "max", "example #2"]}),
    ("app_pages/compare.py", {"a_split": "train", "b_split": "val", "cmp_stat": "t2i", "cmp_head": "1,0"},
     {"compare-diff": ["Compare", "run synth", "A: split = 'train'", "B: split = 'val'", "t2i: B − A"],
      "compare-values": ["Compare", "run synth", "A: split = 'train'", "layer 1, head 0", "t2i per example"]}),
    (SQL_PAGE, {"sql": HEAD_SQL}, {"sql-chart": ["SQL · ", "colour t2i", "FROM head_stats WHERE run = 'synth'"]}),
]


@pytest.mark.parametrize("page, params, want", CONTEXTS, ids=[f"{p.split('/')[-1][:-3]}-{i}"
                                                              for i, (p, _, _) in enumerate(CONTEXTS)])
def test_exported_pictures_say_what_they_show(synth_lake, monkeypatch, downloads, page, params, want):
    at = open_app(synth_lake.root, monkeypatch, page=page, run="synth", **params)
    assert not at.error, [e.value for e in at.error]
    found = {spec.get("description"): (spec, data, keys) for spec, data, keys in charts_with_downloads(at)}
    assert set(want) <= set(found), set(want) - set(found)
    for name, words in want.items():
        spec, data, keys = found[name]
        text = svg_texts(materialise(downloads[keys["svg"]]))
        for w in words:
            assert w in text, (name, w, text[:300])
        # the PNG carries the same title above the chart: taller than the chart drawn without it
        titled = Image.open(io.BytesIO(materialise(downloads[keys["png"]])))
        bare = Image.open(io.BytesIO(export.spec_png(full_spec(spec, data))))
        assert titled.height > bare.height + 20, (name, titled.size, bare.size)


def test_title_lines_wrap_and_keep_a_chart_title():
    lines = export.title_lines("Text → image · attention · run synth · example #1 · stream self · layer 1 · "
                               "head 1 · query tokens " + ", ".join(f"w{i}" for i in range(30)), width=60)
    assert len(lines) > 1 and all(len(x) <= 60 for x in lines)
    long = export.title_lines("SQL · " + " ".join(f"column_{i}" for i in range(400)))
    assert len(long) == export.TITLE_LINES and long[-1].endswith("…")
    assert " · ".join(lines).startswith("Text → image · attention · run synth")
    s = export.with_title({"title": "own", "mark": "point"}, "run r · example #2")
    assert s["title"]["text"] == ["run r · example #2"] and s["title"]["subtitle"] == "own"
    assert export.with_title({"mark": "point"}, None) == {"mark": "point"}


# -- every control says what it does in words ---------------------------------------------------
LABELLED = ("button", "download_button", "link_button", "page_link", "form_submit_button", "toggle")


def needs_emoji_font(ch: str) -> bool:
    """A character drawn from an emoji font (an empty box where none is installed): pictographs, dingbats,
    the emoji arrows and play signs, variation selector 16 and the zero-width joiner."""
    cp = ord(ch)
    return (cp >= 0x1F000 or 0x2600 <= cp <= 0x27BF or 0x2B00 <= cp <= 0x2BFF or 0x2300 <= cp <= 0x23FF
            or cp in (0x25B6, 0x25C0, 0xFE0F, 0x200D) or 0x25FB <= cp <= 0x25FE or 0x2194 <= cp <= 0x2199)


BUTTON_VIEWS = [(None, {}), ("app_pages/head_summary.py", {"ex": 2}), ("app_pages/attention.py", {"ex": 1}),
                ("app_pages/hidden_states.py", {}), ("app_pages/compare.py", {"a_split": "train", "b_split": "val"}),
                (SQL_PAGE, {"sql": HEAD_SQL})]


@pytest.mark.parametrize("page, params", BUTTON_VIEWS, ids=[(p or "examples").split("/")[-1].replace(".py", "")
                                                            for p, _ in BUTTON_VIEWS])
def test_every_button_label_has_words(synth_lake, monkeypatch, page, params):
    at = open_app(synth_lake.root, monkeypatch, page=page, run="synth", **params)
    controls = [n for part in (at.main, at.sidebar) for n in _walk(part) if n.type in LABELLED]
    assert controls, "no button on the page"
    if page in (None, "app_pages/head_summary.py", "app_pages/attention.py", SQL_PAGE):
        assert any(n.type in ("page_link", "download_button") for n in controls)
    for n in controls:
        label = getattr(n, "label", None) or n.proto.label
        assert any(ch.isalpha() for ch in label), (n.type, label)
        assert not any(needs_emoji_font(ch) for ch in label), (n.type, label)
        icon = getattr(n.proto, "icon", "") if n.type == "page_link" else ""
        assert not icon or icon.startswith(":material/"), (n.type, label, icon)  # a font Streamlit ships
