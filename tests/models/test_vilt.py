"""The ViLT adapter's token table, checked against the model itself.

ViLT samples and permutes image patches inside ``visual_embed``, so the only
trustworthy witness of where a patch sits is the model: its embedding output
(hidden state 0) for a patch is ``patch_embeddings(pixels)[:, row, col] +
position_embeddings[1 + row * grid + col] + token_type_embeddings(1)``. Every
expected value here is computed from the model's parameters or from the
model's own ``outputs.attentions`` / ``outputs.hidden_states``, never from
pipeline code. The tiny model (tests/tiny.py) has 64 px images and 16 px
patches: a 64 x 64 image is a 4 x 4 grid, the position table's own size, so its
position embeddings need no interpolation.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lake.schema import STATS
from pipeline.capture import NoAttentionError, capture
from pipeline.models import load_adapter
from tests.models import conformance as conf
from tests.models.conformance import extract
from tests.tiny import ANSWERS, make_tiny_vilt, noise_image, write_manifest

PS = 16  # patch size of the tiny model
TEXT = "what color is the circle ?"
# (original size, processed size (w, h) after shortest_edge=64 and a multiple of 16)
SCENES = [
    ((64, 64), (64, 64), "what color is the circle ?"),
    ((120, 80), (96, 64), "is there a red square left of the circle ?"),  # scaled by 1.25 both ways
    ((100, 70), (80, 64), "how many ?"),  # 91 px wide rounds down to 80: x and y scale differ
    ((64, 80), (64, 80), "the blue triangle"),
]


# -- the model, independently of the pipeline ----------------------------------------------


@pytest.fixture(scope="module")
def ref(tiny_vilt):
    """The tiny model and processor, loaded with transformers directly."""
    from transformers import ViltForQuestionAnswering, ViltProcessor

    model = ViltForQuestionAnswering.from_pretrained(tiny_vilt).eval()
    return model, ViltProcessor.from_pretrained(tiny_vilt)


@conf.memo  # shared with the conformance suite: the model runs once per example
def ref_forward(model, proc, images, texts, seed=0):
    """Run the model on a batch as transformers does; also return where each patch went.

    Returns the processor's encoding, the outputs (attentions and hidden states of
    every layer, in sequence order) and ``seq_of[b][(row, col)]``: the sequence position
    of patch (row, col) of example ``b``, read from ``visual_embed``'s own patch_index.
    """
    enc = proc(images=images, text=texts, return_tensors="pt", padding=True)
    base = getattr(model, "vilt", model)
    emb = base.embeddings
    rec = {}
    original = emb.visual_embed

    def recording(*a, **k):
        out = original(*a, **k)
        rec["index"], rec["mask"] = out[2][0], out[1]  # [batch, P, 2], [batch, 1 + P]
        return out

    emb.visual_embed = recording
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(**enc, output_attentions=True, output_hidden_states=True)
    finally:
        del emb.visual_embed
    T = enc["input_ids"].shape[1]
    seq_of = []
    for b in range(len(images)):
        m = {}
        for j in range(rec["index"].shape[1]):
            if rec["mask"][b, 1 + j]:
                m[tuple(int(x) for x in rec["index"][b, j])] = T + 1 + j
        seq_of.append(m)
    return enc, out, seq_of


def expected_embedding(model, proc, image, row, col):
    """Hidden state 0 of patch (row, col), from the model's parameters.

    ``patch_embeddings(pixels)`` at the patch + the position embedding of that grid
    cell (bilinearly resized, corners aligned, to the image's grid as ViLT does) +
    the image token type embedding.
    """
    emb = getattr(model, "vilt", model).embeddings
    with torch.no_grad():
        px = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
        pe = emb.patch_embeddings(px)[0]  # [dim, grid_h, grid_w]
        D, gh, gw = pe.shape
        n = int(round((emb.position_embeddings.shape[1] - 1) ** 0.5))
        pos = emb.position_embeddings[0, 1:].T.reshape(1, D, n, n)
        if (gh, gw) != (n, n):
            pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=True)
        return pe[:, row, col] + pos[0, :, row, col] + emb.token_type_embeddings.weight[1]


# -- the adapter on one batch ----------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_vilt):
    return load_adapter(str(tiny_vilt))


def run_adapter(adapter, images, texts, keep_hidden=None, seed=1):
    inputs, notes = adapter.encode(texts, images)
    got = {}
    with capture(adapter.hook_points(keep_hidden), lambda p, t: got.__setitem__((p.kind, p.layer), t)):
        torch.manual_seed(seed)
        out = adapter.forward(inputs)
    layout = adapter.layout(inputs, images, [None] * len(images))
    return inputs, out, got, layout


def test_hidden_state_0_of_each_patch_is_that_grid_cell(adapter, ref):
    model, proc = ref
    img = noise_image((64, 64), seed=5)
    inputs, _, got, layout = run_adapter(adapter, [img], [TEXT], keep_hidden={0})
    h0 = got[("hidden", 0)][0]  # [seq, dim] in sequence order
    toks = layout.tokens[0].to_pylist()
    emb = model.vilt.embeddings
    pe = emb.patch_embeddings(inputs["pixel_values"])[0].detach()  # [dim, 4, 4]
    pos = emb.position_embeddings[0].detach()  # [1 + 16, dim]
    tt = emb.token_type_embeddings.weight[1].detach()

    def plain(r, c):  # the 4 x 4 grid needs no interpolation
        return pe[:, r, c] + pos[1 + r * 4 + c] + tt

    patches = [t for t in toks if t["role"] == "patch"]
    assert [(t["patch_row"], t["patch_col"]) for t in patches] == [(r, c) for r in range(4) for c in range(4)]
    for t in patches:
        r, c = t["patch_row"], t["patch_col"]
        torch.testing.assert_close(h0[t["seq_pos"]], plain(r, c), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(r, c), expected_embedding(model, proc, img, r, c), rtol=1e-5, atol=1e-5)

    # The check can fail: wrong positions do not match.
    T = sum(t["modality"] == "text" for t in toks)
    seq_order = [torch.allclose(h0[T + 1 + i], plain(t["patch_row"], t["patch_col"]), atol=1e-4)
                 for i, t in enumerate(patches)]
    assert not all(seq_order), "patches came out in raster order; the permutation went untested"
    for t in patches:
        r, c = t["patch_row"], t["patch_col"]
        if (r, c) != (c, r):  # transposed grid
            assert not torch.allclose(h0[t["seq_pos"]], plain(c, r), atol=1e-2)
        assert not torch.allclose(h0[t["seq_pos"]], plain(r, (c + 1) % 4), atol=1e-2)  # shifted column

    # the image [CLS] and the text tokens
    img_cls = next(t for t in toks if t["role"] == "image_cls")
    torch.testing.assert_close(h0[img_cls["seq_pos"]], emb.cls_token[0, 0].detach() + pos[0] + tt,
                               rtol=1e-5, atol=1e-5)
    text_emb = emb.text_embeddings(input_ids=inputs["input_ids"]).detach()[0]  # [T, dim]
    text_emb = text_emb + emb.token_type_embeddings.weight[0].detach()
    for t in toks:
        if t["modality"] == "text":
            torch.testing.assert_close(h0[t["seq_pos"]], text_emb[t["seq_pos"]], rtol=1e-5, atol=1e-5)


def test_hook_drops_attentions_from_the_outputs(adapter):
    img = noise_image((64, 64), seed=1)
    inputs, out, got, _ = run_adapter(adapter, [img], [TEXT])
    L = adapter.model.config.num_hidden_layers
    assert len(out.attentions) == L and all(a is None for a in out.attentions)
    assert sorted(k for k in got if k[0] == "attention") == [("attention", i) for i in range(L)]
    assert sorted(k for k in got if k[0] == "hidden") == [("hidden", i) for i in range(L + 1)]
    # without the hooks the model still returns its weights
    torch.manual_seed(1)
    plain = adapter.forward(inputs)
    assert all(isinstance(a, torch.Tensor) for a in plain.attentions)
    for i in range(L):
        torch.testing.assert_close(got[("attention", i)], plain.attentions[i])


def test_model_without_weights_gives_a_clear_error(adapter):
    img = noise_image((64, 64), seed=1)
    inputs, _ = adapter.encode([TEXT], [img])
    with pytest.raises(NoAttentionError) as e:
        with capture(adapter.hook_points(set()), lambda p, t: None), torch.no_grad():
            adapter.model(**inputs, output_attentions=False)  # as SDPA would: no weights
    assert "eager" in str(e.value) and "output_attentions=True" in str(e.value)


def test_keep_hidden_selects_hook_points(adapter):
    pts = adapter.hook_points({0, 2})
    assert sorted((p.kind, p.layer) for p in pts) == [("attention", 0), ("attention", 1), ("hidden", 0), ("hidden", 2)]
    assert {p.stream for p in pts} == {"self"}
    assert [p.kind for p in adapter.hook_points(set())] == ["attention", "attention"]


def test_check_image_rejects_images_without_a_whole_patch(adapter):
    from pipeline.data import BadInput

    for size in [(64, 64), (64, 1000 // 20), (120, 80), (100, 16)]:
        adapter.check_image(noise_image(size))  # accepted
    for size in [(300, 20), (20, 300)]:  # 15:1 passes load_image's 20:1 limit but rounds to 0 px here
        with pytest.raises(BadInput) as e:
            adapter.check_image(noise_image(size))
        assert e.value.stage == "image" and f"{size[0]}x{size[1]}" in e.value.message


def test_text_truncation_is_noted(adapter):
    long = " ".join(["what color is the circle"] * 6)  # 30 words + 2 specials > 16 positions
    inputs, notes = adapter.encode([long, TEXT], [noise_image((64, 64)), noise_image((64, 64), 1)])
    assert inputs["input_ids"].shape[1] == 16
    assert notes[1] == []
    assert notes[0] and notes[0][0][0] == "text" and "32" in notes[0][0][1] and "16" in notes[0][0][1]


# -- through the whole extract into the lake ----------------------------------------------------


def _scenes(model, proc) -> dict:
    """Four noise images of different sizes and texts of different lengths, with the model's own
    predictions. Answers: example 0's is the model's own prediction (computed here, alone), 1's is
    another label, 2 has none, 3's is the prediction in other case and spacing."""
    images = [noise_image(size, seed=10 + i) for i, (size, _, _) in enumerate(SCENES)]
    texts = [t for _, _, t in SCENES]
    preds = []
    for img, text in zip(images, texts):
        enc = proc(images=[img], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) > 1e-4, "near tie in the tiny model's logits; change a seed"
        preds.append(model.config.id2label[int(logits.argmax())])
    other = next(a for a in ANSWERS if a != preds[1])
    answers = [preds[0], other, None, "  " + preds[3].upper() + " "]
    rows = [{"id": f"s{i}", "image": img, "text": t, "answer": a,
             "boxes": [{"label": "circle", "box": [8, 8, 40, 40]}] if "circle" in t else None}
            for i, (img, t, a) in enumerate(zip(images, texts, answers))]
    return {"rows": rows, "images": images, "texts": texts, "preds": preds, "answers": answers}


@pytest.fixture(scope="module")
def scenes(ref, tmp_path_factory):
    """:func:`_scenes` of the tiny model, written as a manifest."""
    sc = _scenes(*ref)
    sc["manifest"] = write_manifest(tmp_path_factory.mktemp("scenes"), sc.pop("rows"))
    return sc


def load(mdir):
    from transformers import ViltForQuestionAnswering, ViltProcessor

    return ViltForQuestionAnswering.from_pretrained(mdir).eval(), ViltProcessor.from_pretrained(mdir)


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """The model alone on one example: its text ids then its image embeddings ([CLS], every patch), its
    attention put in the lake's ``seq_pos`` order by each patch's (row, col) as ``visual_embed`` placed it
    (ViLT draws its patch order at random), and its top answer."""
    enc, out, seq_of = ref_forward(s.model, s.proc, [s.images[ex]], [s.texts[ex]])
    T = enc["input_ids"].shape[1]
    t = conf.tokens(s, ex).sort_values("seq_pos")
    pos = [int(r.seq_pos) if r.modality == "text" else T if r.role == "image_cls" else
           seq_of[0][(int(r.patch_row), int(r.patch_col))] for r in t.itertuples()]  # the model's position
    sp = t.seq_pos.to_numpy()
    att = []
    for a in out.attentions:  # [1, head, seq, seq]
        own = np.zeros((a.shape[1], len(sp), len(sp)), np.float32)
        own[:, sp[:, None], sp[None, :]] = a[0].numpy()[:, np.array(pos)[:, None], np.array(pos)[None, :]]
        att.append(own)
    h, w = enc["pixel_values"].shape[-2:]
    return conf.Reference(ids=enc["input_ids"][0].tolist() + [conf.EMBEDDED] * (1 + len(seq_of[0])),
                          patches={"self": (h // PS) * (w // PS)}, attentions={"self": att},
                          prediction=s.model.config.id2label[int(out.logits[0].argmax())])


def model_positions(s: conf.Subject, ex: int, seq_pos: np.ndarray) -> np.ndarray:
    """The model's sequence position of example ``ex``'s tokens at ``seq_pos`` (text, then the image's
    [CLS], then the patches where ``visual_embed`` drew them), as :func:`conformance_reference` places them."""
    enc, _, seq_of = ref_forward(s.model, s.proc, [s.images[ex]], [s.texts[ex]])
    T = enc["input_ids"].shape[1]
    t = conf.tokens(s, ex).set_index("seq_pos")
    return np.array([p if t.modality[p] == "text" else T if t.role[p] == "image_cls" else
                     seq_of[0][(int(t.patch_row[p]), int(t.patch_col[p]))] for p in seq_pos])


CASES = [conf.FamilyCase(id="vilt", family="vilt", run="b1", make_model=make_tiny_vilt,
                         rows=lambda mdir: _scenes(*load(mdir))["rows"], load=load, reference=conformance_reference,
                         text_stream="self", streams=("self",), image_token=conf.EMBEDDED, positions=model_positions,
                         statistic=("self", 1, 1, "t2i"),
                         extract=dict(batch_size=1, keep_attention="all", keep_hidden="all"),
                         # one stream (its selector disabled): tests/app/test_app.py runs every page on a ViLT lake
                         skip=frozenset({"pages"}))]


@pytest.fixture(scope="module")
def lake4(tiny_vilt, scenes, tmp_path_factory):
    """The four scenes in one batch of 4 (text and image padding in play)."""
    root = tmp_path_factory.mktemp("lake4")
    s = extract(str(tiny_vilt), scenes["manifest"], root, "b4", batch_size=4, keep_attention="all", keep_hidden="all", progress=False)
    assert s.extracted == 4 and s.skipped == 0
    return root


@pytest.fixture(scope="module")
def lake1(tmp_path_factory):
    """The four scenes one at a time: the conformance suite's lake."""
    root = conf.subject(CASES[0], tmp_path_factory).lake
    assert len(conf.raw(root, "SELECT * FROM {examples}")) == 4
    return root


def lake_tokens(lake_df, root, example_id):
    return lake_df(root, "SELECT * FROM tokens WHERE example_id = ? ORDER BY token_idx", [example_id])


def test_lake_hidden_state_0_of_patches(lake_df, lake4, ref, scenes):
    model, proc = ref
    for ex, img in enumerate(scenes["images"]):
        toks = lake_tokens(lake_df, lake4, ex)
        hid = lake_df(lake4, "SELECT token_idx, vec FROM hidden_states WHERE layer = 0 AND example_id = ? "
                      "ORDER BY token_idx", [ex])
        assert list(hid.token_idx) == list(toks.token_idx)
        vec = {int(t): np.asarray(v, np.float32) for t, v in zip(hid.token_idx, hid.vec)}
        patches = toks[toks.role == "patch"]
        assert len(patches) > 0
        for t in patches.itertuples():
            r, c = int(t.patch_row), int(t.patch_col)
            want = expected_embedding(model, proc, img, r, c).numpy()
            np.testing.assert_allclose(vec[t.token_idx], want, rtol=1e-2, atol=2e-3,
                                       err_msg=f"example {ex} patch ({r}, {c})")
            grid_w = int(patches.patch_col.max()) + 1
            wrong = expected_embedding(model, proc, img, r, (c + 1) % grid_w).numpy()
            assert np.abs(vec[t.token_idx] - wrong).max() > 0.05  # a shifted position would be caught


def test_lake_token_table(lake_df, lake4, ref, scenes):
    _, proc = ref
    tok = proc.tokenizer
    examples = lake_df(lake4, "SELECT * FROM examples ORDER BY example_id")
    assert list(examples.example_id) == [0, 1, 2, 3]
    for ex, ((ow, oh), (pw, ph), text) in enumerate(SCENES):
        t = lake_tokens(lake_df, lake4, ex)
        row = examples.iloc[ex]
        pieces = ["[CLS]"] + tok.tokenize(text) + ["[SEP]"]
        n_text = len(pieces)
        gh, gw = ph // PS, pw // PS
        assert (row.grid_h, row.grid_w) == (gh, gw)
        assert (row.image_width, row.image_height) == (ow, oh)
        assert row.n_tokens == len(t) == n_text + 1 + gh * gw
        assert list(t.token_idx) == list(range(len(t)))
        assert set(t.stream) == {"self"}
        assert list(t.modality) == ["text"] * n_text + ["image"] * (1 + gh * gw)
        assert list(t.role) == ["cls"] + ["word"] * (n_text - 2) + ["sep", "image_cls"] + ["patch"] * (gh * gw)
        assert list(t.token[:n_text]) == pieces
        assert t.token[n_text:].isna().all()
        assert list(t.seq_pos[:n_text]) == list(range(n_text))
        assert list(t.text_pos[:n_text]) == list(range(n_text))
        assert t.text_pos[n_text:].isna().all()
        assert t[:n_text][["patch_row", "patch_col", "x0", "y0", "x1", "y1"]].isna().all().all()
        # image tokens sit after the (padded) text, each at its own position
        img_seq = list(t.seq_pos[n_text:])
        assert min(img_seq) >= n_text and len(set(img_seq)) == len(img_seq)
        # patches in raster order, covering the grid; boxes in pixels of the original image
        p = t[t.role == "patch"]
        assert list(zip(p.patch_row, p.patch_col)) == [(r, c) for r in range(gh) for c in range(gw)]
        sx, sy = ow / pw, oh / ph
        for q in p.itertuples():
            want = (q.patch_col * PS * sx, q.patch_row * PS * sy, (q.patch_col + 1) * PS * sx,
                    (q.patch_row + 1) * PS * sy)
            assert (q.x0, q.y0, q.x1, q.y1) == pytest.approx(want, rel=1e-5)
        assert p.x1.max() == pytest.approx(ow) and p.y1.max() == pytest.approx(oh)
        assert p.x0.min() == 0 and p.y0.min() == 0
        last_col = p[p.patch_col == gw - 1]
        np.testing.assert_allclose(last_col.x1, ow, rtol=1e-6)
        cls = t[t.role == "image_cls"].iloc[0]
        assert (cls.x0, cls.y0, cls.x1, cls.y1) == (0, 0, ow, oh)


def test_non_square_image_scales_boxes(lake_df, lake4):
    """120 x 80 becomes 96 x 64 (4 x 6 patches of 16 px = 20 px of the original)."""
    p = lake_df(lake4, "SELECT * FROM tokens WHERE example_id = 1 AND role = 'patch' ORDER BY token_idx")
    assert len(p) == 24
    last = p[(p.patch_row == 3) & (p.patch_col == 5)].iloc[0]
    assert (last.x0, last.y0, last.x1, last.y1) == (100, 60, 120, 80)
    p = lake_df(lake4, "SELECT * FROM tokens WHERE example_id = 2 AND role = 'patch' ORDER BY token_idx")
    last = p[(p.patch_row == 3) & (p.patch_col == 4)].iloc[0]  # 100 x 70 -> 80 x 64
    assert last.x1 == pytest.approx(100) and last.y1 == pytest.approx(70)
    assert last.x0 == pytest.approx(80) and last.y0 == pytest.approx(3 * 16 * 70 / 64)


def test_lake_attention_and_hidden_equal_the_models_own(lake_df, lake4, ref, scenes):
    """Same batch as the extract (all four), the model's outputs permuted into token order."""
    model, proc = ref
    enc, out, seq_of = ref_forward(model, proc, scenes["images"], scenes["texts"])
    T = enc["input_ids"].shape[1]
    for ex in range(4):
        toks = lake_tokens(lake_df, lake4, ex)
        s = []
        for t in toks.itertuples():
            if t.modality == "text":
                s.append(int(t.seq_pos))
            elif t.role == "image_cls":
                s.append(T)
            else:
                s.append(seq_of[ex][(int(t.patch_row), int(t.patch_col))])
        assert len(set(s)) == len(s)
        n = len(s)
        att = lake_df(lake4, "SELECT layer, head, query_idx, key_idx, weight FROM attention WHERE example_id = ?",
                      [ex])
        for layer in range(2):
            for head in range(2):
                a = att[(att["layer"] == layer) & (att["head"] == head)]
                assert len(a) == n * n
                W = np.zeros((n, n), np.float32)
                W[a.query_idx.to_numpy(), a.key_idx.to_numpy()] = a.weight.to_numpy()
                want = out.attentions[layer][ex, head].numpy()[np.ix_(s, s)]
                np.testing.assert_allclose(W, want, atol=1e-3, rtol=1e-2, err_msg=f"ex {ex} L{layer} H{head}")
        hid = lake_df(lake4, "SELECT layer, token_idx, vec, norm FROM hidden_states WHERE example_id = ? "
                      "ORDER BY layer, token_idx", [ex])
        assert sorted(set(hid.layer)) == [0, 1, 2]
        for layer in range(3):
            h = hid[hid.layer == layer]
            got = np.stack([np.asarray(v, np.float32) for v in h.vec])
            want = out.hidden_states[layer][ex].numpy()[s]
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
            np.testing.assert_allclose(h.norm, np.linalg.norm(want, axis=-1), rtol=1e-4)


def test_per_example_results_do_not_depend_on_the_batch(lake_df, lake1, lake4):
    q = "SELECT example_id, stream, layer, head, stat, value FROM head_stats ORDER BY ALL"
    a, b = lake_df(lake1, q), lake_df(lake4, q)
    assert len(a) == len(b) == 4 * 2 * 2 * len(STATS)
    assert (a.drop(columns="value") == b.drop(columns="value")).all().all()
    np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert a.value.isna().equals(b.value.isna())

    cols = "example_id, token_idx, stream, modality, role, token, text_pos, patch_row, patch_col, x0, y0, x1, y1"
    ta = lake_df(lake1, f"SELECT {cols} FROM tokens ORDER BY example_id, token_idx")
    tb = lake_df(lake4, f"SELECT {cols} FROM tokens ORDER BY example_id, token_idx")
    assert ta.equals(tb)
    # seq_pos of text tokens is the same; image tokens move with the batch's text padding
    q = "SELECT example_id, token_idx, seq_pos FROM tokens WHERE modality = 'text' ORDER BY ALL"
    assert lake_df(lake1, q).equals(lake_df(lake4, q))

    q = "SELECT layer, example_id, head, query_idx, key_idx, weight FROM attention ORDER BY ALL"
    wa, wb = lake_df(lake1, q), lake_df(lake4, q)
    assert (wa.drop(columns="weight") == wb.drop(columns="weight")).all().all()
    np.testing.assert_allclose(wa.weight, wb.weight, atol=2e-3)

    ea = lake_df(lake1, "SELECT * EXCLUDE (run) FROM examples ORDER BY example_id")
    eb = lake_df(lake4, "SELECT * EXCLUDE (run) FROM examples ORDER BY example_id")
    assert ea.drop(columns="meta").equals(eb.drop(columns="meta"))


def test_vqa_predictions(lake_df, lake4, scenes):
    ex = lake_df(lake4, "SELECT example_id, answer, prediction, correct, meta FROM examples ORDER BY example_id")
    assert list(ex.prediction) == scenes["preds"]
    assert [None if pd.isna(a) else a for a in ex.answer] == scenes["answers"]
    # example 0's answer is the prediction, 1's is not, 2 has none, 3's differs only in case and spaces
    assert [None if pd.isna(c) else bool(c) for c in ex.correct] == [True, False, None, True]
    for m in ex.meta:
        assert 0 <= json.loads(m)["score"] <= 1


def test_boxes_give_grounding(lake_df, lake4):
    g = lake_df(lake4, "SELECT example_id, value FROM head_stats WHERE stat = 'grounding' ORDER BY ALL")
    has_box = {0, 1}  # texts with "circle"
    for r in g.itertuples():
        if r.example_id in has_box:
            assert 0 <= r.value <= 1
        else:
            assert np.isnan(r.value)


# -- other heads --------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["retrieval", "base"])
def test_other_vilt_heads_extract(head, tmp_path, lake_df, scenes):
    from transformers import ViltForImageAndTextRetrieval, ViltModel, ViltProcessor

    model_dir = make_tiny_vilt(tmp_path / f"vilt-{head}", head=head)
    adapter = load_adapter(str(model_dir))
    assert type(adapter.model).__name__ == {"retrieval": "ViltForImageAndTextRetrieval", "base": "ViltModel"}[head]
    s = extract(str(model_dir), scenes["manifest"], tmp_path / "lake", "r", batch_size=2, limit=2,
                keep_attention="all", keep_hidden="all", progress=False, adapter=adapter)
    assert s.extracted == 2
    root = tmp_path / "lake"
    ex = lake_df(root, "SELECT * FROM examples ORDER BY example_id")
    assert len(ex) == 2
    n_att = lake_df(root, "SELECT count(*) AS n FROM attention").n[0]
    assert n_att == int(ex.n_tokens.pow(2).sum()) * 2 * 2
    assert len(lake_df(root, "SELECT DISTINCT layer FROM hidden_states")) == 3
    runs = lake_df(root, "SELECT * FROM runs")
    assert runs.status[0] == "complete" and runs.model_family[0] == "vilt"
    sums = lake_df(root, "SELECT sum(weight) AS s FROM attention GROUP BY example_id, layer, head, query_idx")
    np.testing.assert_allclose(sums.s, 1.0, atol=5e-3)
    # the hooks sit on the right modules: hidden state 0 of each patch is its grid cell's embedding
    model = {"retrieval": ViltForImageAndTextRetrieval, "base": ViltModel}[head].from_pretrained(model_dir).eval()
    proc = ViltProcessor.from_pretrained(model_dir)
    h0 = lake_df(root, "SELECT h.vec, t.patch_row, t.patch_col FROM hidden_states h JOIN tokens t "
                 "USING (example_id, token_idx) WHERE h.layer = 0 AND h.example_id = 0 AND t.role = 'patch'")
    assert len(h0) == 16
    for r in h0.itertuples():
        want = expected_embedding(model, proc, scenes["images"][0], r.patch_row, r.patch_col).numpy()
        np.testing.assert_allclose(np.asarray(r.vec, np.float32), want, rtol=1e-2, atol=2e-3)
    if head == "base":
        assert ex.prediction.isna().all() and ex.correct.isna().all()
    else:
        for i in range(2):
            enc = proc(images=[scenes["images"][i]], text=[scenes["texts"][i]], return_tensors="pt")
            with torch.no_grad():
                score = float(model(**enc).logits[0, 0])
            assert float(ex.prediction[i]) == pytest.approx(score, abs=2e-4)
            assert ex.correct.isna()[i]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_results(tiny_vilt, scenes, lake1, lake_df, tmp_path):
    s = extract(str(tiny_vilt), scenes["manifest"], tmp_path, "b1", batch_size=1, device="cuda", keep_attention="all", keep_hidden="all", progress=False)
    assert s.extracted == 4
    q = "SELECT example_id, layer, head, stat, value FROM head_stats ORDER BY ALL"
    a, b = lake_df(lake1, q), lake_df(tmp_path, q)
    assert (a.drop(columns="value") == b.drop(columns="value")).all().all()
    np.testing.assert_allclose(a.value, b.value, rtol=1e-3, atol=1e-4, equal_nan=True)
    q = "SELECT * EXCLUDE (run, seq_pos) FROM tokens ORDER BY example_id, token_idx"
    assert lake_df(lake1, q).equals(lake_df(tmp_path, q))


# -- sampled patches, workers and batches ---------------------------------------------------------


def test_sampled_patches_and_results_do_not_depend_on_workers_or_batches(tmp_path, lake_df, scenes):
    """A ViLT that keeps 6 of its 16 patches samples them per example: the same patches, token table,
    statistics and kept weights whatever the batch size and number of input workers."""
    from transformers import ViltConfig

    model_dir = make_tiny_vilt(tmp_path / "vilt-sampling")
    cfg = ViltConfig.from_pretrained(model_dir)
    cfg.max_image_length = 6
    cfg.save_pretrained(model_dir)
    lakes = {}
    for name, bs, workers in (("b1w0", 1, 0), ("b3w2", 3, 2), ("b4w1", 4, 1)):
        s = extract(str(model_dir), scenes["manifest"], tmp_path / name, "r", batch_size=bs, workers=workers,
                    progress=False)
        assert s.extracted == 4 and s.workers == workers
        lakes[name] = tmp_path / name
    tq = "SELECT * EXCLUDE (run, seq_pos) FROM tokens ORDER BY example_id, token_idx"
    ref = lake_df(lakes["b1w0"], tq)
    n_patch = ref[ref.role == "patch"].groupby("example_id").size()
    assert set(n_patch) == {6}  # sampled: 6 of 16
    # the examples do not all keep the same 6 cells: the sampling is per example, not one draw
    cells = ref[ref.role == "patch"].groupby("example_id").apply(lambda d: tuple(zip(d.patch_row, d.patch_col)))
    assert len(set(cells)) > 1
    sq = "SELECT example_id, layer, head, stat, value FROM head_stats ORDER BY ALL"
    aq = "SELECT layer, example_id, head, query_idx, key_idx, weight FROM attention ORDER BY ALL"
    for name in ("b3w2", "b4w1"):
        assert lake_df(lakes[name], tq).equals(ref), name
        a, b = lake_df(lakes[name], sq), lake_df(lakes["b1w0"], sq)
        np.testing.assert_allclose(a.value, b.value, rtol=1e-4, atol=1e-5, equal_nan=True)
        wa, wb = lake_df(lakes[name], aq), lake_df(lakes["b1w0"], aq)
        assert (wa.drop(columns="weight") == wb.drop(columns="weight")).all().all(), name
        np.testing.assert_allclose(wa.weight, wb.weight, atol=2e-3)
