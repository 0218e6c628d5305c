"""The Attention page's texts under every method, its exports' names and titles, its captions' masses,
legends and first token (issue 24, section 2).

The lake: a tiny ViLT with one massive [CLS] activation (``tests.tiny.make_sink_vilt``) run with
``--explain relevancy,rollout,value`` and every weight stored; its sink makes some panels' masses
exactly 0 under value weighting and, at layer 1 head 1, rows whose float16-rounded weights on the
text sum to more than 1. Every number a caption shows is recomputed here with DuckDB straight over
the lake's Parquet files (``raw_df``) and numpy, never through ``lake/queries`` or the app's views.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from streamlit_app import charts, export
from tests.app.test_app import chart, open_app

RUN, EX = "ex", 1
PAGE = "app_pages/attention.py"


@pytest.fixture(scope="module")
def lake(methods_lake):
    return methods_lake  # run "ex" (RUN)


@pytest.fixture(scope="module")
def lake_np(lake, raw_df):
    """The example's tokens and, per (layer, head), its dense attention and value-weighted shares
    ``V[q, k] = A[q, k] n(k) / Σ_k A[q, k] n(k)``, from the Parquet files."""
    tok = raw_df(lake, "SELECT * FROM {tokens} WHERE run = ? AND example_id = ? ORDER BY token_idx", [RUN, EX])
    att = raw_df(lake, "SELECT layer, head, query_idx, key_idx, CAST(weight AS DOUBLE) AS weight FROM {attention} "
                       "WHERE run = ? AND example_id = ?", [RUN, EX])
    vn = pd.read_parquet(lake / "value_norms")
    vn = vn[(vn.run.astype(str) == RUN) & (vn.example_id == EX)]
    n = len(tok)
    a, v = {}, {}
    for (layer, head), s in att.groupby(["layer", "head"]):
        m = np.zeros((n, n))
        m[s.query_idx.to_numpy(), s.key_idx.to_numpy()] = s.weight.to_numpy()
        norms = vn[(vn.layer == layer) & (vn["head"] == head)].set_index("token_idx").norm.reindex(range(n)).to_numpy()
        c = m * norms
        a[(int(layer), int(head))] = m
        v[(int(layer), int(head))] = c / c.sum(1, keepdims=True)
    return {"tok": tok, "A": a, "V": v}


def _ids(tok, mask) -> np.ndarray:
    return tok[mask].token_idx.to_numpy()


def _captions(at) -> list[str]:
    return [str(c.value) for c in at.caption]


def _caption(at, start: str) -> str:
    return next(c for c in _captions(at) if c.startswith(start))


def _infos(at) -> list[str]:
    return [str(i.value) for i in at.info]


def _mass(caption: str, what: str) -> str:
    return re.search(rf"{what} mass ([0-9.]+)", caption).group(1)


def _legend_title(at, description: str) -> str:
    spec, _ = chart(at, description)
    found = []

    def walk(node):
        if isinstance(node, dict):
            col = node.get("encoding", {}).get("color") if isinstance(node.get("encoding"), dict) else None
            if isinstance(col, dict) and col.get("field") == "weight":
                found.append(col.get("title"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert found, description
    return found[0]


def _svg_text(downloads, chart_key: str) -> str:
    data = downloads[f"dl_svg_{chart_key}"]
    svg = data() if callable(data) else data
    root = ET.fromstring(svg.encode() if isinstance(svg, str) else svg)
    return " ".join(" ".join(t.itertext()) for t in root.iter() if t.tag.split("}")[-1] == "text")


def _first_word(tok) -> pd.Series:
    return tok[tok.role == "word"].sort_values("text_pos").iloc[0]


def _patch(tok, token_idx: int) -> str:
    p = tok[tok.token_idx == token_idx].iloc[0]
    return f"r{int(p.patch_row)}c{int(p.patch_col)}"


# -- value-weighted: every text names the method's quantity ------------------------------------------------
def test_value_weighted_panels_name_their_quantity(lake, lake_np, monkeypatch):
    tok = lake_np["tok"]
    text, patches = _ids(tok, tok.text_pos.notna()), _ids(tok, tok.role == "patch")
    V = lake_np["V"][(1, 1)]
    assert V[text][:, text].sum(1).mean() < 0.01  # the sink takes the text's value-weighted attention here
    q = int(patches[0])
    at = open_app(lake, monkeypatch, PAGE, run=RUN, ex=EX, layer=1, head=1, method="value",
                  tokens=int(_first_word(tok).text_pos), patches=_patch(tok, q))
    for description in ("text-image", "image-image", "image-text", "text-text"):
        assert _legend_title(at, description) == "value-weighted share", description
    caps = _captions(at)
    assert not any("colour = `A[query, key]`" in c for c in caps), caps
    assert "value-weighted attention read query → key, `V[query, key]" in _caption(at, "Example **#")
    it = _caption(at, "**image → text**")
    assert "coloured by the value-weighted attention the selected" in it
    assert _mass(it, "image → text") == f"{min(V[q, text].sum(), 1.0):.4f}"
    tt = _caption(at, "**text → text**")
    assert "colour = `V[query, key] = A[query, key]·‖f(key)‖" in tt
    assert _mass(tt, "text → text") == f"{V[text][:, text].sum(1).mean():.4f}"
    assert f"the {len(text)} rows" in tt and "largest cell" in tt
    ti = _caption(at, "**text → image**")
    assert ti.startswith("**text → image**: value-weighted attention from the selected text token(s)")
    # the text → text panel's negligible note, in the method's words
    want = (f"The selected queries put only {V[text][:, text].sum(1).mean():.4f} of their value-weighted attention "
            "on the text (Text → text, every text query): negligible.")
    assert any(i.startswith(want) for i in _infos(at)), _infos(at)
    assert not any("value-weighted on" in i for i in _infos(at))


def test_text_to_text_caption_gives_mass_and_negligible_note(lake, lake_np, monkeypatch):
    """Plain attention: the text → text caption gives its mass (each row's sum over the text keys, averaged
    over the rows) and its largest cell like the other panels."""
    tok = lake_np["tok"]
    text = _ids(tok, tok.text_pos.notna())
    seen = set()
    for layer, head in ((0, 1), (1, 1)):
        A = lake_np["A"][(layer, head)]
        at = open_app(lake, monkeypatch, PAGE, run=RUN, ex=EX, layer=layer, head=head,
                      tokens=int(_first_word(tok).text_pos))
        tt = _caption(at, "**text → text**")
        mass = A[text][:, text].sum(1).mean()
        assert _mass(tt, "text → text") == f"{min(mass, 1.0):.4f}", (tt, mass)
        assert f"largest cell {A[text][:, text].max():.4f}" in tt
        assert "colour on the absolute scale 0 to 1" in tt
        note = f"The selected queries put only {mass:.4f} of their attention on the text (Text → text, every text query)"
        assert any(i.startswith(note) for i in _infos(at)) == (mass < 0.01), (layer, head, mass, _infos(at))
        seen.add(bool(mass < 0.01))
    assert seen == {True, False}, "the check needs a negligible and a non-negligible text → text panel"


def patches_of(tok) -> np.ndarray:
    return _ids(tok, tok.role == "patch")


# -- a mass is at most 1 --------------------------------------------------------------------------------------
def test_a_mass_over_one_from_float16_rounding_shows_as_one(lake, lake_np, raw_df, monkeypatch):
    tok = lake_np["tok"]
    text = _ids(tok, tok.text_pos.notna())
    sums = raw_df(lake, "SELECT query_idx, sum(CAST(weight AS DOUBLE)) AS s FROM {attention} WHERE run = ? AND "
                        "example_id = ? AND layer = 1 AND head = 1 AND key_idx IN (SELECT unnest(?)) AND query_idx IN "
                        "(SELECT unnest(?)) GROUP BY query_idx ORDER BY s DESC, query_idx",
                  [RUN, EX, [int(t) for t in text], [int(p) for p in patches_of(tok)]])
    q, stored = int(sums.query_idx.iloc[0]), float(sums.s.iloc[0])
    assert stored > 1.0 and f"{stored:.4f}" != "1.0000"  # the lake's rounded weights sum past 1
    at = open_app(lake, monkeypatch, PAGE, run=RUN, ex=EX, layer=1, head=1, patches=_patch(tok, q))
    it = _caption(at, "**image → text**")
    assert "**image → text mass 1.0000**" in it
    assert f"(the stored weights, rounded to float16 precision, sum to {stored:.4f}; a mass is at most 1)" in it
    for c in _captions(at):  # no caption shows a mass above 1
        assert all(float(m) <= 1.0 for m in re.findall(r"mass \*?\*?([0-9]+\.[0-9]+)", c)), c


# -- rollout and relevancy: what they combine, and notes that point at the panels' real titles ------------------
def test_rollout_says_what_it_combines(lake, monkeypatch, downloads, raw_df):
    tok = raw_df(lake, "SELECT * FROM {tokens} WHERE run = ? AND example_id = ?", [RUN, EX])
    at = open_app(lake, monkeypatch, PAGE, run=RUN, ex=EX, layer=1, head=1, method="rollout",
                  tokens=int(_first_word(tok).text_pos))
    heads = [s.value for s in at.subheader]
    assert "Text → image" in heads
    infos = _infos(at)
    assert "Rollout is stored for text queries over image patches: see **Text → image**." in infos
    header = _caption(at, "Example **#")
    assert "**rollout through layer 1** of 2 (the 2 heads combined, layers 0 to 1)" in header
    assert "head 1" not in header and "`A[query, key]`" not in header
    assert _legend_title(at, "text-image") == "rollout"
    title = _svg_text(downloads, "ti_chart")
    assert "rollout through layer 1 (heads combined)" in title and "head 1" not in title, title
    assert downloads.names["dl_png_ti_chart"] == f"rollout-{RUN}-ex{EX}-self-L1-text-image.png"


def test_relevancy_notes_point_at_the_prediction_panels(lake, monkeypatch, downloads):
    at = open_app(lake, monkeypatch, PAGE, run=RUN, ex=EX, layer=1, head=1, method="relevancy")
    heads = [s.value for s in at.subheader]
    assert "Prediction → image" in heads and "Prediction → text" in heads
    assert "Text → image" not in heads and "Image → text" not in heads
    infos = _infos(at)
    assert ("Relevancy explains the model's output, not a patch or word query: see **Prediction → image** and "
            "**Prediction → text**.") in infos
    assert not any("**Text → image**" in i or "**Image → text**" in i for i in infos), infos
    header = _caption(at, "Example **#")
    assert "**relevancy** over all 2 layers and 2 heads" in header and "head 1" not in header
    for key in ("ti_chart", "it_chart"):
        title = _svg_text(downloads, key)
        assert "relevancy (all layers and heads)" in title and "layer 1" not in title and "head 1" not in title
    assert downloads.names["dl_png_ti_chart"] == f"relevancy-{RUN}-ex{EX}-self-prediction-image.png"
    assert downloads.names["dl_png_it_chart"] == f"relevancy-{RUN}-ex{EX}-self-prediction-text.png"


# -- exports: the method is in the file name -------------------------------------------------------------
def test_each_method_downloads_under_its_own_name(lake, monkeypatch, downloads, raw_df):
    tok = raw_df(lake, "SELECT * FROM {tokens} WHERE run = ? AND example_id = ?", [RUN, EX])
    names = {}
    for method in ("attention", "value", "rollout", "relevancy"):
        at = open_app(lake, monkeypatch, PAGE, run=RUN, ex=EX, layer=1, head=1, method=method,
                      tokens=int(_first_word(tok).text_pos))
        assert at.session_state["method"] == method
        files = dict(downloads.names)
        for kind, ext in (("png", "png"), ("svg", "svg"), ("csv", "csv")):
            assert files[f"dl_{kind}_ti_chart"].endswith(f".{ext}")
        names[method] = files["dl_png_ti_chart"]
        downloads.clear()
        downloads.names.clear()
    assert len(set(names.values())) == 4, names
    assert names["attention"] == f"attention-{RUN}-ex{EX}-self-L1-H1-text-image.png"
    assert names["value"] == f"value-weighted-{RUN}-ex{EX}-self-L1-H1-text-image.png"
    assert names["rollout"].startswith("rollout-") and names["relevancy"].startswith("relevancy-")


# -- legends -------------------------------------------------------------------------------------------------
def _legend_labels(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return [t.text for t in root.iter() if t.tag.split("}")[-1] == "text" and t.text
            and re.fullmatch(r"[-0-9.e]+", t.text)]


def short_number(label: str) -> bool:
    """Whether a legend label is a number written as d3's ``.3~g`` writes one: at most 3 significant
    digits and no trailing zeros ("0", "0.25", "0.0001", "4e-8"; not "0.0", "0.00000004" with its "0.00000000")."""
    if not re.fullmatch(r"-?(0|[1-9]\d*(\.\d*[1-9])?|0\.\d*[1-9])(e-?\d+)?", label):
        return False
    mantissa = label.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa) <= 3


def test_legends_of_tiny_values_read_as_numbers():
    """A stretched panel of weights around 4e-8: its legend reads 0 … 4e-8, not 0.00000000 … 0.00000004."""
    t = pd.DataFrame({"token_idx": [0, 1, 2], "token": ["a", "b", "c"], "role": ["word"] * 3,
                      "text_pos": [0, 1, 2], "weight": [0.0, 2e-8, 4e-8]})
    strip = charts.token_strip(t, weight_title="weight")
    m = pd.DataFrame({"query": ["a", "a"], "key": ["a", "b"], "query_order": [0, 0], "key_order": [0, 1],
                      "query_idx": [0, 0], "key_idx": [0, 1], "weight": [0.0, 4e-8]})
    matrix = charts.token_matrix(m)
    for c in (strip, matrix):
        labels = _legend_labels(export.chart_svg(c))
        assert labels and labels[0] == "0" and labels[-1] == "4e-8", labels
        assert not any(lb.startswith("0.0000") for lb in labels), labels
        # each label is its value to 3 significant digits
        for lb in labels:
            assert lb == f"{float(lb):.3g}".replace("e-0", "e-"), lb


def test_page_legends_use_three_significant_digits(lake, lake_np, monkeypatch, downloads):
    """On the page, stretched: every legend label of every panel is its value to 3 significant digits
    (d3's ``.3~g``), so the text → text panel of layer 1, head 1, whose largest weight is about 1e-4,
    reads "0 … 0.0001" or "5e-5", never "0.00000 0.00005"."""
    tok = lake_np["tok"]
    text = _ids(tok, tok.text_pos.notna())
    assert lake_np["A"][(1, 1)][text][:, text].max() < 1e-3
    at = open_app(lake, monkeypatch, PAGE, run=RUN, ex=EX, layer=1, head=1, stretch="true",
                  tokens=int(_first_word(tok).text_pos), patches=_patch(tok, int(patches_of(tok)[0])))
    assert at.session_state["stretch"] is True
    for key in ("ti_chart", "ii_chart", "it_chart", "tt_chart"):
        data = downloads[f"dl_svg_{key}"]
        labels = _legend_labels(data() if callable(data) else data)
        assert len(labels) >= 2, (key, labels)
        for lb in labels:
            assert short_number(lb), (key, lb, labels)


# -- the first token of an example without boxes --------------------------------------------------------------
def test_without_boxes_the_first_token_is_the_content_word_that_looks_at_the_image(synth_lake, monkeypatch):
    stop = {"is", "the", "how", "many", "are", "there", "what", "of"}
    for ex in (0, 1, 3):
        at = open_app(synth_lake.root, monkeypatch, PAGE, run="synth", ex=ex)
        layer, head = at.session_state["layer"], at.session_state["head"]
        tok = synth_lake.tokens_of(ex)
        words = tok[(tok.role == "word") & ~tok.token.str.lower().isin(stop)]
        patches = tok[tok.role == "patch"].token_idx.to_numpy()
        a = synth_lake.stored[(ex, "self", layer)]
        a = a.mean(0) if head == "mean" else a[int(head)]
        mass = {int(w.text_pos): a[int(w.token_idx)][patches].sum() for w in words.itertuples()}
        want = max(mass, key=lambda p: (mass[p], -p))
        assert at.session_state["tokens"] == [want], (ex, at.session_state["tokens"], mass)
        chosen = tok[tok.text_pos == want].token.iloc[0]
        assert chosen.lower() not in stop
        cap = _caption(at, "**text → image**")
        assert _mass(cap, "text → image") == f"{mass[want]:.4f}"
