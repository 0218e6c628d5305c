"""Live examples (pipeline/live.py): an uploaded image and text through a run's own model, appended to the
run as a new chunk, and the Examples page's form for it (AppTest).

Expected values come from the model run directly with transformers on the same processed input (as in
tests/models/test_vilt.py), from the runs row, and from the lake as it was before, never from pipeline code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lake.commit import read_run_row
from lake.writer import LakeWriter
from pipeline import live
from pipeline.extraction.run import extract
from tests.tiny import listing, make_manifest, make_tiny_vilt, noise_image, png

RUN, TOPK = "tiny", "topk"
TEXT = "what color is the square ?"
LAYERS, HEADS = 2, 2  # make_tiny_vilt's defaults
TABLES = ("examples", "tokens", "head_stats", "attention", "hidden_states", "relevancy")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny random ViLT and a lake with two runs of six scenes: ``tiny`` (all weights, hidden vectors
    of a sample of 2, rollout, chunks of 4) and ``topk`` (the top 3 keys per row, no hidden states)."""
    tmp = tmp_path_factory.mktemp("live")
    model = make_tiny_vilt(tmp / "model")
    manifest = make_manifest(tmp / "data", 6)
    lake = tmp / "lake"
    extract(str(model), manifest, lake, RUN, batch_size=3, chunk_size=4, keep_attention="all",
            keep_hidden="sample:2", explain="rollout", progress=False)
    extract(str(model), manifest, lake, TOPK, batch_size=6, keep_attention="topk:3", keep_hidden="none",
            progress=False)
    return {"model": model, "lake": lake, "tmp": tmp}


def fresh_lake(built, tmp_path) -> Path:
    """A copy of the built lake a test may change."""
    return Path(shutil.copytree(built["lake"], tmp_path / "lake"))


def dump(lake_df, root, run) -> dict:
    return {t: lake_df(root, f"SELECT * EXCLUDE (run) FROM {t} WHERE run = ? ORDER BY ALL", [run]) for t in TABLES}


@pytest.fixture(scope="module")
def added(built, lake_df, tmp_path_factory):
    """Two live examples added to a copy of the lake: bytes of a PNG, then a PIL image with an answer."""
    lake = Path(shutil.copytree(built["lake"], tmp_path_factory.mktemp("added") / "lake"))
    before = {"files": listing(lake), "tables": dump(lake_df, lake, RUN),
              "run": lake_df(lake, "SELECT * FROM runs WHERE run = ?", [RUN]).iloc[0].to_dict(),
              "images": lake_df(lake, "SELECT * FROM images ORDER BY image_id")}
    img1, img2 = noise_image((80, 64), seed=3), noise_image((64, 64), seed=4)
    r1 = live.add_live_example(lake, RUN, png(img1), "  " + TEXT + " ")
    r2 = live.add_live_example(lake, RUN, img2, "is there a red circle ?", answer="yes")
    r3 = live.add_live_example(lake, TOPK, png(img1), TEXT)
    return {"lake": lake, "before": before, "results": (r1, r2, r3), "images": (img1, img2)}


# -- the model, independently of the pipeline ----------------------------------------------------
def reference(model_dir, image: Image.Image, text: str):
    """The model's own attention for one example, and the sequence position of every token of the lake's
    token table (text tokens at their position, the image [CLS] after the text, each patch where
    ``visual_embed`` put it)."""
    from transformers import ViltForQuestionAnswering, ViltProcessor

    model = ViltForQuestionAnswering.from_pretrained(model_dir).eval()
    proc = ViltProcessor.from_pretrained(model_dir)
    enc = proc(images=[image], text=[text], return_tensors="pt", padding=True)
    emb = model.vilt.embeddings
    rec, original = {}, emb.visual_embed

    def recording(*a, **k):
        out = original(*a, **k)
        rec["index"] = out[2][0][0]  # [patches, 2] (row, col) in sequence order
        return out

    emb.visual_embed = recording
    try:
        with torch.no_grad():
            out = model(**enc, output_attentions=True)
    finally:
        del emb.visual_embed
    T = enc["input_ids"].shape[1]
    seq_of = {tuple(int(x) for x in rc): T + 1 + j for j, rc in enumerate(rec["index"])}
    label = model.config.id2label[int(out.logits[0].argmax())]
    return [a[0].numpy() for a in out.attentions], T, seq_of, label


def token_seq(tokens, T, seq_of) -> list[int]:
    return [int(t.seq_pos) if t.modality == "text" else T if t.role == "image_cls"
            else seq_of[(int(t.patch_row), int(t.patch_col))] for t in tokens.itertuples()]


# -- adding ------------------------------------------------------------------------------------------
def test_ids_chunks_and_rows(added, lake_df):
    lake = added["lake"]
    r1, r2, r3 = added["results"]
    assert (r1.example_id, r1.chunk) == (6, 2)  # chunks 0 and 1 hold ids 0-3, 4-5
    assert (r2.example_id, r2.chunk) == (7, 3)
    assert (r3.example_id, r3.chunk) == (6, 1)  # the topk run has one chunk of 64
    img1, img2 = added["images"]
    digest = lambda data, text: hashlib.sha256(data + b"\0" + text.encode()).hexdigest()[:8]  # noqa: E731
    assert r1.source_id == f"live-6-{digest(png(img1), TEXT)}"
    assert r2.source_id == f"live-7-{digest(png(img2), 'is there a red circle ?')}"
    assert r3.source_id == r1.source_id  # the same input in another run: Compare may pair them
    assert r1.device == "cpu" or r1.device.startswith("cuda")
    assert sorted(p.name for p in (lake / "_state" / RUN).glob("chunk-*.done")) == [
        f"chunk-{c:06d}.done" for c in range(4)]
    ex = lake_df(lake, "SELECT * FROM examples WHERE run = ? ORDER BY example_id", [RUN])
    assert list(ex.example_id) == list(range(8))
    new = ex.set_index("example_id").loc[[6, 7]]
    assert list(new.source_id) == [r1.source_id, r2.source_id] and set(new.split) == {"live"}
    assert list(new.text) == [TEXT, "is there a red circle ?"]  # stripped
    assert pd.isna(new.answer.iloc[0]) and new.answer.iloc[1] == "yes"
    assert new.boxes.isna().all()
    assert [json.loads(m)["live"] for m in new.meta] == [True, True]
    assert list(new.prediction) == [r1.prediction, r2.prediction]
    assert new.correct.iloc[1] == (r2.prediction == "yes")
    # the image is stored, keyed by the sha256 of the uploaded bytes (a PIL image: of its PNG)
    want = {hashlib.sha256(png(img1)).hexdigest(), hashlib.sha256(png(img2)).hexdigest()}
    assert set(new.image_id) == want
    imgs = lake_df(lake, "SELECT image_id, width, height, png FROM images")
    got = imgs[imgs.image_id.isin(want)]
    assert len(got) == 2 and sorted(zip(got.width, got.height)) == [(64, 64), (80, 64)]
    assert len(imgs) == len(added["before"]["images"]) + 2 and imgs.image_id.is_unique


def test_runs_row_and_capture_are_the_runs(added, lake_df):
    lake, before = added["lake"], added["before"]["run"]
    after = lake_df(lake, "SELECT * FROM runs WHERE run = ?", [RUN]).iloc[0].to_dict()
    assert after["status"] == "complete" and after["n_examples"] == 8
    assert {k: v for k, v in after.items() if k != "n_examples"} == {k: v for k, v in before.items()
                                                                     if k != "n_examples"}
    cap = after["capture"]
    assert json.loads(cap) == {"keep_attention": "all", "keep_hidden": "sample:2", "chunk_size": 4,
                               "random_weights": True, "explain": "rollout"}
    # every file of the new chunks records the run's model and capture configuration
    files = [p for p in lake.rglob("part-000002.parquet") if f"run={RUN}" in p.as_posix()]
    assert {p.relative_to(lake).parts[0] for p in files} >= {"examples", "tokens", "head_stats", "attention",
                                                              "hidden_states", "relevancy", "errors"}
    for p in files:
        meta = pq.read_schema(p).metadata
        assert meta[b"vlatlas.capture"].decode() == cap and meta[b"vlatlas.model"].decode() == after["model"]


def test_old_examples_are_unchanged(added, lake_df):
    lake, before = added["lake"], added["before"]
    after = dump(lake_df, lake, RUN)
    for t in TABLES:
        old = after[t][after[t].example_id < 6].reset_index(drop=True)
        pd.testing.assert_frame_equal(old, before["tables"][t], check_dtype=False, obj=t)
    now = listing(lake)
    changed = sorted(f for f, v in before["files"].items() if now.get(f) != v)
    assert changed == [f"runs/{RUN}.parquet", f"runs/{TOPK}.parquet"]


def test_attention_equals_the_models_own(added, built, lake_df):
    """Every weight of the live example (the run keeps all) against the model run with transformers."""
    lake = added["lake"]
    for r, img, text in zip(added["results"][:2], added["images"], (TEXT, "is there a red circle ?")):
        att, T, seq_of, label = reference(built["model"], img, text)
        assert r.prediction == label
        toks = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx",
                       [RUN, r.example_id])
        ex = lake_df(lake, "SELECT * FROM examples WHERE run = ? AND example_id = ?", [RUN, r.example_id]).iloc[0]
        s = token_seq(toks, T, seq_of)
        n = len(s)
        assert ex.n_tokens == n and len(set(s)) == n
        assert (ex.grid_h, ex.grid_w) == ((4, 5) if img.size == (80, 64) else (4, 4))
        a = lake_df(lake, "SELECT layer, head, query_idx, key_idx, weight FROM attention WHERE run = ? "
                    "AND example_id = ?", [RUN, r.example_id])
        stats = lake_df(lake, "SELECT layer, head, stat, value FROM head_stats WHERE run = ? AND example_id = ?",
                        [RUN, r.example_id]).set_index(["layer", "head", "stat"]).value
        text_rows = (toks.modality == "text").to_numpy()
        img_keys = (toks.modality == "image").to_numpy()
        for layer in range(LAYERS):
            for head in range(HEADS):
                w = a[(a["layer"] == layer) & (a["head"] == head)]
                assert len(w) == n * n
                W = np.zeros((n, n), np.float32)
                W[w.query_idx.to_numpy(), w.key_idx.to_numpy()] = w.weight.to_numpy()
                want = att[layer][head][np.ix_(s, s)]
                np.testing.assert_allclose(W, want, atol=1e-3, rtol=1e-2, err_msg=f"L{layer} H{head}")
                t2i = want[text_rows][:, img_keys].sum(1).mean()
                assert stats[(layer, head, "t2i")] == pytest.approx(t2i, rel=1e-4, abs=1e-5)
                assert stats[(layer, head, "max")] == pytest.approx(want.max(1).mean(), rel=1e-4, abs=1e-5)
                assert stats[(layer, head, "kept_mass")] == pytest.approx(1.0, abs=1e-5)


def test_the_new_example_is_everywhere_the_old_ones_are(added, lake_df):
    lake = added["lake"]
    per = lambda t: lake_df(lake, f"SELECT example_id, count(*) AS n FROM {t} WHERE run = ? GROUP BY ALL "  # noqa: E731
                            "ORDER BY example_id", [RUN]).set_index("example_id").n
    tokens = per("tokens")
    assert tokens[6] > 0 and tokens[7] > 0
    for t, want in (("head_stats", lambda e: per("head_stats")[0]),
                    ("attention", lambda e: LAYERS * HEADS * tokens[e] ** 2),
                    ("hidden_states", lambda e: (LAYERS + 1) * tokens[e])):
        n = per(t)
        for e in (0, 5, 6, 7):
            assert n[e] == want(e), (t, e)
    rel = lake_df(lake, "SELECT DISTINCT example_id, method FROM relevancy WHERE run = ?", [RUN])
    assert {(6, "rollout"), (7, "rollout")} <= set(zip(rel.example_id, rel.method))
    # sample:2 keeps the vectors of two manifest rows, and of every live example
    vec = lake_df(lake, "SELECT example_id, count(vec) AS nv, count(*) AS n FROM hidden_states WHERE run = ? "
                  "GROUP BY ALL", [RUN]).set_index("example_id")
    assert (vec.loc[[6, 7]].nv == vec.loc[[6, 7]].n).all()
    assert (vec.loc[list(range(6))].nv > 0).sum() == 2


def test_queries_read_the_live_chunk(added):
    """The app's one-example attention read looks in the chunk ``example_id // chunk_size`` first; a live
    example sits in a chunk of its own, and the read still finds it (the view is the fallback)."""
    from lake import queries
    from lake.catalog import open_catalog

    cat = open_catalog(added["lake"])
    try:
        for ex in (6, 7):
            ids = queries.examples(cat, RUN, None, limit=100).example_id.tolist()
            assert ex in ids
            block = queries.attention_block(cat, RUN, ex, "self", 1, head=1)
            n = int(cat.df("SELECT n_tokens FROM examples WHERE run = ? AND example_id = ?", [RUN, ex]).n_tokens[0])
            assert len(block) == n * n
    finally:
        cat.close()


def test_topk_capture_keeps_the_models_top_keys(added, built, lake_df):
    """The ``topk`` run's capture (top 3 keys per row) applies to its live example too."""
    lake = added["lake"]
    r = added["results"][2]
    att, T, seq_of, _ = reference(built["model"], added["images"][0], TEXT)
    toks = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [TOPK, 6])
    s = token_seq(toks, T, seq_of)
    a = lake_df(lake, "SELECT layer, head, query_idx, key_idx FROM attention WHERE run = ? AND example_id = ?",
                [TOPK, 6])
    assert lake_df(lake, "SELECT count(*) AS n FROM hidden_states WHERE run = ?", [TOPK]).n[0] == 0
    for layer in range(LAYERS):
        for head in range(HEADS):
            want = att[layer][head][np.ix_(s, s)]
            w = a[(a["layer"] == layer) & (a["head"] == head)]
            for q in range(len(s)):
                keys = set(w[w.query_idx == q].key_idx)
                top = np.sort(want[q])[::-1]
                assert len(keys) == 3 and keys == set(np.argsort(-want[q])[:3]) or top[2] - top[3] < 1e-3
    assert r.example_id == 6
    assert read_run_row(lake, TOPK)["n_examples"] == 7


# -- bad inputs --------------------------------------------------------------------------------------
def test_bad_inputs_raise_one_line_and_change_nothing(built, tmp_path, monkeypatch):
    lake = fresh_lake(built, tmp_path)
    good = png(noise_image((64, 64), seed=1))
    cases = [
        (b"this is not an image", TEXT, "not an image"),
        (b"", TEXT, "empty"),
        (good, "", "text is empty"),
        (good, "   \n ", "text is empty"),
        (good, "x" * (live.MAX_TEXT_CHARS + 1), "characters"),
        (b"\x89PNG\r\n\x1a\n" + bytes(live.MAX_UPLOAD_BYTES), TEXT, "MB"),
        (png(Image.new("RGB", (1, 1))), TEXT, "2 px"),  # the extraction's own image check
        (png(noise_image((64, 64)))[:200], TEXT, "truncated or corrupt"),
        ("a path", TEXT, "bytes of an image file"),
        (png(Image.new("RGB", (420, 20))), TEXT, "aspect ratio"),  # the extraction's own image check
    ]
    before = listing(lake)
    for image, text, words in cases:
        with pytest.raises(live.LiveError) as e:
            live.add_example(lake, RUN, image, text)
        msg = str(e.value)
        assert words in msg and "\n" not in msg and "vlatlas-live" not in msg, msg
        # a clause about the upload, never "the upload cannot be used: image the upload is …"
        assert msg.startswith(("the uploaded ", "the text ", "the image ")), msg
        assert "cannot be used" not in msg and "image the upload" not in msg and "file the upload" not in msg, msg
        assert listing(lake) == before, words
    monkeypatch.setattr(live, "MAX_UPLOAD_PIXELS", 4000)
    with pytest.raises(live.LiveError, match="megapixels"):
        live.add_example(lake, RUN, good, TEXT)
    with pytest.raises(live.LiveError, match="megapixels"):
        live.add_example(lake, RUN, noise_image((64, 64)), TEXT)
    with pytest.raises(live.LiveError, match="no run 'nope'"):
        live.add_example(lake, "nope", noise_image((8, 8)), TEXT)
    assert listing(lake) == before


def test_unreachable_model_is_said_and_changes_nothing(built, tmp_path):
    lake = fresh_lake(built, tmp_path)
    row = read_run_row(lake, RUN)
    assert live.unavailable(lake, RUN) is None
    for model, words in ((str(tmp_path / "gone"), "is not on this machine"),
                         ("nobody-here/not-a-cached-model", "Hugging Face cache")):
        LakeWriter(lake, RUN).write_run_row({**row, "model": model})
        before = listing(lake)
        why = live.unavailable(lake, RUN)
        assert why and words in why and "\n" not in why
        with pytest.raises(live.LiveError, match="not available"):
            live.add_example(lake, RUN, png(noise_image((64, 64))), TEXT)
        assert listing(lake) == before
    assert "no run" in live.unavailable(lake, "nope")


def test_a_failed_forward_leaves_the_lake_as_it_was(built, tmp_path, monkeypatch):
    """The model fails after the run's row was set to running: the chunk's files are removed and the
    row restored."""
    from pipeline.models import load_adapter

    lake = fresh_lake(built, tmp_path)
    adapter = load_adapter(str(built["model"]))

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory\nmore lines")

    monkeypatch.setattr(adapter, "forward", boom)
    before, row = listing(lake), read_run_row(lake, RUN)
    with pytest.raises(live.LiveError, match="running the model failed on cpu: CUDA out of memory$"):
        live.add_example(lake, RUN, png(noise_image((64, 64))), TEXT, adapter=adapter, device="cpu")
    after = listing(lake)
    assert set(after) == set(before)
    assert {f for f in after if after[f] != before[f]} <= {f"runs/{RUN}.parquet"}
    assert read_run_row(lake, RUN) == row


def test_a_cuda_device_falls_back_to_the_cpu_when_absent(built, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    lake = fresh_lake(built, tmp_path)
    r = live.add_live_example(lake, TOPK, png(noise_image((64, 64))), TEXT, device="cuda")
    assert r.device == "cpu" and "not available here" in r.note and "CPU" in r.note


def test_a_running_run_reserves_the_manifests_ids(built, tmp_path, lake_df):
    """A run that stopped part-way: the live example's id and chunk come after every manifest row, so a
    resumed extraction never reuses them, and resuming counts it."""
    lake = fresh_lake(built, tmp_path)
    row = read_run_row(lake, RUN)
    for p in (lake / "_state" / RUN).glob("chunk-000001.done"):
        p.unlink()  # chunk 1 (ids 4, 5) not committed
    LakeWriter(lake, RUN).write_run_row({**row, "status": "running", "n_examples": None})
    r = live.add_live_example(lake, RUN, png(noise_image((64, 64))), TEXT)
    assert (r.example_id, r.chunk) == (6, 2)
    assert read_run_row(lake, RUN)["status"] == "running"
    ids = lake_df(lake, "SELECT example_id FROM examples WHERE run = ? ORDER BY 1", [RUN]).example_id.tolist()
    assert ids == [0, 1, 2, 3, 6]
    s = extract(str(built["model"]), row["manifest"], lake, RUN, batch_size=3, chunk_size=4, keep_attention="all",
                keep_hidden="sample:2", explain="rollout", progress=False)
    assert s.resumed_chunks == 1
    assert read_run_row(lake, RUN)["n_examples"] == 7
    ids = lake_df(lake, "SELECT example_id FROM examples WHERE run = ? ORDER BY 1", [RUN]).example_id.tolist()
    assert ids == list(range(7))


# -- the Examples page -------------------------------------------------------------------------------
def _app(lake, monkeypatch, **params):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("VLATLAS_LAKE", str(lake))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "streamlit_app" / "app.py"),
                           default_timeout=120)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _widget(items, label):
    return next(w for w in items if w.label == label)


def test_examples_page_adds_a_live_example(built, tmp_path, monkeypatch):
    lake = fresh_lake(built, tmp_path)
    at = _app(lake, monkeypatch, run=RUN, ex=1)
    assert any(e.label == "Add a live example" for e in at.expander)
    # a file that is not an image: one line, nothing written
    before = listing(lake)
    _widget(at.file_uploader, "Image").set_value(("fake.png", b"not an image at all", "image/png"))
    _widget(at.text_input, "Question or text").set_value(TEXT)
    at.button(key="live_add").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "not an image" in errors[0] and "Traceback" not in errors[0]
    assert listing(lake) == before and at.session_state["ex"] == 1

    img = noise_image((64, 64), seed=9)
    _widget(at.file_uploader, "Image").set_value(("scene.png", png(img), "image/png"))
    _widget(at.text_input, "Question or text").set_value(TEXT)
    _widget(at.text_input, "Answer (optional)").set_value("red")
    at.button(key="live_add").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["ex"] == 6
    ok = " ".join(str(s.value) for s in at.success)
    _, _, _, label = reference(built["model"], img, TEXT)
    assert "#6" in ok and f"**{label}**" in ok and "live-6-" in ok
    assert any("Selected: #6" in str(h.value) for h in at.subheader)
    table = at.dataframe[0].value
    assert 6 in table.example_id.tolist()
    assert read_run_row(lake, RUN)["n_examples"] == 7
    # the form is new (empty) for the next example
    assert _widget(at.text_input, "Question or text").value == ""


def test_examples_page_says_why_live_examples_are_unavailable(built, tmp_path, monkeypatch):
    lake = fresh_lake(built, tmp_path)
    LakeWriter(lake, RUN).write_run_row({**read_run_row(lake, RUN), "model": str(tmp_path / "moved")})
    at = _app(lake, monkeypatch, run=RUN, ex=1)
    info = " ".join(str(i.value) for i in at.info)
    assert "Live examples are not available" in info and "is not on this machine" in info
    assert not at.file_uploader and not [b for b in at.button if b.key == "live_add"]


# -- the Examples page's messages and limits (issue 24) ------------------------------------------------
def _errors(at) -> list[str]:
    return [str(e.value) for e in at.error]


@pytest.mark.parametrize("name, data, text, want", [
    ("fake.png", b"not an image at all", TEXT,
     "The uploaded file is not an image (or not a format PIL can open: PNG, JPEG, WebP …)."),
    ("tiny.png", png(Image.new("RGB", (1, 1))), TEXT, "The uploaded image is 1x1; both sides must be at least 2 px."),
    ("long.png", png(Image.new("RGB", (420, 20))), TEXT,
     "The uploaded image is 420x20, an aspect ratio above the limit of 20:1."),
    ("cut.png", png(noise_image((64, 64)))[:200], TEXT,
     "The uploaded image is truncated or corrupt and cannot be decoded: "),
    ("scene.png", png(noise_image((64, 64))), "  ", "The text is empty: type a question or a text about the image."),
], ids=["not-an-image", "too-small", "elongated", "truncated", "empty-text"])
def test_examples_page_says_each_bad_upload_in_a_sentence(built, tmp_path, monkeypatch, name, data, text, want):
    lake = fresh_lake(built, tmp_path)
    at = _app(lake, monkeypatch, run=RUN, ex=1)
    before = listing(lake)
    _widget(at.file_uploader, "Image").set_value((name, data, "image/png"))
    _widget(at.text_input, "Question or text").set_value(text)
    at.button(key="live_add").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = _errors(at)
    assert len(errors) == 1 and errors[0].startswith(want) and errors[0].endswith("."), errors
    assert "the upload" not in errors[0].replace("the uploaded", "") and "Traceback" not in errors[0]
    assert listing(lake) == before


def test_examples_page_keeps_a_long_text_and_says_it_is_too_long(built, tmp_path, monkeypatch):
    """3,000 characters: kept in the field as typed, said to be too long at once and on the button, and
    nothing written (the widget has no ``max_chars``, which drops a longer paste in the browser)."""
    lake = fresh_lake(built, tmp_path)
    at = _app(lake, monkeypatch, run=RUN, ex=1)
    long = ("what color is the square " * 200)[:2999] + "?"
    box = _widget(at.text_input, "Question or text")
    assert box.proto.max_chars == 0  # no limit in the browser
    box.set_value(long).run()
    assert _widget(at.text_input, "Question or text").value == long
    warnings = [str(w.value) for w in at.warning]
    assert any("3,000 characters, more than the limit of 2,000" in w and "what you typed is kept" in w
               for w in warnings), warnings
    before = listing(lake)
    _widget(at.file_uploader, "Image").set_value(("scene.png", png(noise_image((64, 64))), "image/png"))
    at.button(key="live_add").click().run()
    assert _errors(at) == [f"The text has 3000 characters, more than the limit of {live.MAX_TEXT_CHARS}."]
    assert not any("empty" in e for e in _errors(at))
    assert _widget(at.text_input, "Question or text").value == long
    assert listing(lake) == before


def test_examples_page_uploader_states_the_apps_limit(built, monkeypatch):
    at = _app(built["lake"], monkeypatch, run=RUN, ex=1)
    up = _widget(at.file_uploader, "Image")
    assert up.proto.max_upload_size_mb == 20 == live.MAX_UPLOAD_BYTES // 2**20  # "20MB per file" in the browser
    assert any("Up to 20 MB and 50 megapixels" in str(c.value) for c in at.caption)


def test_an_example_without_an_answer_says_so(added, monkeypatch):
    r1, r2, _ = added["results"]
    at = _app(added["lake"], monkeypatch, run=RUN, ex=r1.example_id)
    shown = " ".join(str(m.value) for m in at.markdown)
    assert "no answer given · prediction **" in shown and "None" not in shown, shown
    at = _app(added["lake"], monkeypatch, run=RUN, ex=r2.example_id)
    assert "answer **yes** · prediction **" in " ".join(str(m.value) for m in at.markdown)


def test_a_live_example_opens_on_the_content_word_that_looks_at_the_image(added, monkeypatch, raw_df):
    """A live example has no boxes: the Attention page opens on the content word ("color" or "square",
    never "what" or "is") whose row puts the most mass on the patches at the first view's head, as the
    lake's Parquet files have it."""
    r1 = added["results"][0]
    at = _app(added["lake"], monkeypatch, run=RUN, ex=r1.example_id)
    at.switch_page("app_pages/attention.py").run()
    assert not at.exception, [e.value for e in at.exception]
    layer, head = at.session_state["layer"], at.session_state["head"]
    tok = raw_df(added["lake"], "SELECT * FROM {tokens} WHERE run = ? AND example_id = ? ORDER BY token_idx",
                 [RUN, r1.example_id])
    att = raw_df(added["lake"], "SELECT query_idx, key_idx, CAST(weight AS DOUBLE) AS weight FROM {attention} "
                                "WHERE run = ? AND example_id = ? AND layer = ? AND head = ?",
                 [RUN, r1.example_id, int(layer), int(head)])
    patches = set(tok[tok.role == "patch"].token_idx)
    words = tok[tok.token.isin(["color", "square"])]
    mass = {int(w.text_pos): att[(att.query_idx == w.token_idx) & att.key_idx.isin(patches)].weight.sum()
            for w in words.itertuples()}
    assert len(mass) == 2
    want = max(mass, key=lambda p: (mass[p], -p))
    assert at.session_state["tokens"] == [want], (at.session_state["tokens"], mass)
    cap = next(str(c.value) for c in at.caption if str(c.value).startswith("**text → image**"))
    assert f"text → image mass {mass[want]:.4f}**" in cap
