"""Head statistics and flattening, checked on small hand-built attention matrices.

Every expected number is computed here, by hand or by plain numpy loops that
follow the formulas of ``pipeline/stats.py``'s docstring, never by calling the
code under test.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lake.schema import ATTENTION, HEAD_STATS, HIDDEN_STATES
from pipeline.capture_config import AttentionPolicy as KeepPolicy
from pipeline.extraction.keep import keep_mask, kept_mass
from pipeline.extraction.rows import attention_table, head_stats_table, hidden_table
from pipeline.models.tokens import boxed_masks as _boxed_masks, token_rows
from pipeline.stats import STAT_HELP, TokenMasks, head_stats

NAN = float("nan")
SPECIAL = {"cls", "sep", "bos", "eos", "image_cls", "image_newline", "vision_start", "vision_end", "im_start",
           "im_end", "img_break", "img_end", "inst", "inst_end", "image_boundary", "tile_marker",
           "global_marker"}  # lake.schema.ROLES_SPECIAL
STATS = ["t2i", "t2t", "i2t", "i2i", "i2i_noself", "entropy", "sink", "max", "img_entropy", "grounding", "pointing",
         "boxed_img_mass"]


# -- a tiny example: [CLS] red circle [SEP] [IMG] + a 2 x 2 grid of 10 px patches -------------------

ROLES = ["cls", "word", "word", "sep", "image_cls", "patch", "patch", "patch", "patch"]
MODALITY = ["text"] * 4 + ["image"] * 5
# pixel boxes of the patches (x0, y0, x1, y1), raster order: (0,0) (0,1) (1,0) (1,1)
PATCH_BOX = {5: (0, 0, 10, 10), 6: (10, 0, 20, 10), 7: (0, 10, 10, 20), 8: (10, 10, 20, 20)}


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def example_attention(seed: int, n: int, heads: int = 2) -> np.ndarray:
    """``[head, n, n]`` float64, every row sums to 1, no ties."""
    rng = np.random.default_rng(seed)
    return softmax_rows(rng.normal(size=(heads, n, n)) * 1.5)


def ref_stats(A: np.ndarray, roles, modality, boxed=None, in_box=None) -> dict[str, list[float]]:
    """The docstring formulas, one plain loop per statistic. ``A`` is ``[head, n, n]`` of valid tokens."""
    H, n, _ = A.shape
    text = [i for i in range(n) if modality[i] == "text"]
    image = [i for i in range(n) if modality[i] == "image"]
    patch = [i for i in range(n) if roles[i] == "patch"]
    special = [i for i in range(n) if roles[i] in SPECIAL]
    boxed_q = [q for q in range(n) if boxed and boxed[q]]

    def mean(v):
        return sum(v) / len(v) if v else NAN

    def ent(p, m):
        return -sum(x * math.log(x) for x in p if x > 0) / math.log(m)

    out = {s: [] for s in STATS}
    for h in range(H):
        a = A[h]
        out["t2i"].append(mean([sum(a[q, k] for k in image) for q in text]))
        out["t2t"].append(mean([sum(a[q, k] for k in text) for q in text]))
        out["i2t"].append(mean([sum(a[q, k] for k in text) for q in image]))
        out["i2i"].append(mean([sum(a[q, k] for k in image) for q in image]))
        out["i2i_noself"].append(mean([sum(a[q, k] for k in image if k != q) for q in image]))
        out["entropy"].append(mean([ent(a[q], n) for q in range(n)]))
        out["sink"].append(mean([sum(a[q, k] for k in special) for q in range(n)]))
        out["max"].append(mean([max(a[q]) for q in range(n)]))
        rows = []
        for q in text if patch else []:
            s = sum(a[q, k] for k in patch)
            rows.append(ent([a[q, k] / s for k in patch], len(patch)))
        out["img_entropy"].append(mean(rows))
        g, p, m = [], [], []
        for q in boxed_q:
            s = sum(a[q, k] for k in patch)
            m.append(s)
            if s < 0.01:  # the word hardly looks at the image: left out of grounding and pointing
                continue
            g.append(sum(a[q, k] for k in patch if in_box[q][k]) / s)
            best = max(patch, key=lambda k: a[q, k])
            p.append(1.0 if in_box[q][best] else 0.0)
        out["grounding"].append(mean(g))
        out["pointing"].append(mean(p))
        out["boxed_img_mass"].append(mean(m))
    return out


def masks_for(examples: list[dict], N: int | None = None) -> TokenMasks:
    """Pad per-example role / modality / box lists into ``[batch, N]`` masks."""
    N = N or max(len(e["roles"]) for e in examples)
    B = len(examples)
    z = lambda: torch.zeros(B, N, dtype=torch.bool)  # noqa: E731
    valid, text, image, patch, special, boxed = z(), z(), z(), z(), z(), z()
    in_box = torch.zeros(B, N, N, dtype=torch.bool)
    any_box = False
    for b, e in enumerate(examples):
        for i, (r, m) in enumerate(zip(e["roles"], e["modality"])):
            valid[b, i] = True
            text[b, i] = m == "text"
            image[b, i] = m == "image"
            patch[b, i] = r == "patch"
            special[b, i] = r in SPECIAL
        if e.get("boxed"):
            any_box = True
            n = len(e["roles"])
            boxed[b, :n] = torch.tensor(e["boxed"])
            in_box[b, :n, :n] = torch.tensor(e["in_box"])
    if not any_box:
        return TokenMasks(valid, text, image, patch, special)
    return TokenMasks(valid, text, image, patch, special, in_box, boxed)


def batch_attention(examples: list[dict], N: int | None = None) -> torch.Tensor:
    """``[batch, head, N, N]`` float32, padding rows and columns zero."""
    N = N or max(len(e["roles"]) for e in examples)
    H = examples[0]["A"].shape[0]
    out = torch.zeros(len(examples), H, N, N)
    for b, e in enumerate(examples):
        n = len(e["roles"])
        out[b, :, :n, :n] = torch.tensor(e["A"], dtype=torch.float32)
    return out


def boxed_example(seed: int = 0) -> dict:
    """The 9-token example; the word "circle" (token 2) has a box holding patch 8 only."""
    A = example_attention(seed, 9)
    # Row of "circle" set by hand: head 0 points into the box, head 1 does not.
    #           cls   red   circ  sep   img   p00   p01   p10   p11
    A[0, 2] = [0.40, 0.05, 0.05, 0.05, 0.05, 0.10, 0.10, 0.05, 0.15]
    A[1, 2] = [0.05, 0.05, 0.05, 0.05, 0.05, 0.30, 0.20, 0.15, 0.10]
    boxed = [False, False, True] + [False] * 6
    in_box = [[False] * 9 for _ in range(9)]
    in_box[2][8] = True
    return {"roles": ROLES, "modality": MODALITY, "A": A, "boxed": boxed, "in_box": in_box}


def as_np(stats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in stats.items()}


def assert_stats_equal(got: dict[str, np.ndarray], b: int, want: dict[str, list[float]], atol=1e-6):
    for s in STATS:
        np.testing.assert_allclose(got[s][b], np.asarray(want[s]), rtol=1e-5, atol=atol, equal_nan=True,
                                   err_msg=f"stat {s}")


# -- head_stats ----------------------------------------------------------------------------


def test_every_stat_matches_the_formulas():
    ex = boxed_example()
    got = as_np(head_stats(batch_attention([ex]), masks_for([ex])))
    assert set(got) == set(STATS)
    assert all(v.shape == (1, 2) for v in got.values())
    assert all(t.dtype == torch.float32 for t in head_stats(batch_attention([ex]), masks_for([ex])).values())
    assert_stats_equal(got, 0, ref_stats(ex["A"], ROLES, MODALITY, ex["boxed"], ex["in_box"]))


def test_grounding_and_pointing_by_hand():
    ex = boxed_example()
    got = as_np(head_stats(batch_attention([ex]), masks_for([ex])))
    # head 0: patch mass 0.10 + 0.10 + 0.05 + 0.15 = 0.40, in the box 0.15; the top patch (p11) is in it.
    # The [CLS] weight (0.40) is larger but is not a patch, so it does not count for pointing.
    assert got["grounding"][0, 0] == pytest.approx(0.15 / 0.40, rel=1e-6)
    assert got["pointing"][0, 0] == 1.0
    # head 1: patch mass 0.75, in the box 0.10; the top patch is p00, outside the box.
    assert got["grounding"][0, 1] == pytest.approx(0.10 / 0.75, rel=1e-6)
    assert got["pointing"][0, 1] == 0.0


def test_words_that_hardly_look_at_the_image_are_left_out():
    """The 1% rule: a boxed word with under 1% of its attention on the patches does not count for
    grounding or pointing (per head); a head whose boxed words all fall under it has no value."""
    ex = boxed_example()
    A = ex["A"]
    #           cls    red   circ  sep   img   p00    p01    p10    p11
    A[0, 1] = [0.500, 0.2, 0.2, 0.09, 0.005, 0.001, 0.001, 0.001, 0.002]  # "red": 0.5% on patches
    A[1, 1] = [0.300, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.15]  # 30% on patches
    A[1, 2] = [0.900, 0.04, 0.04, 0.011, 0.004, 0.001, 0.001, 0.001, 0.002]  # "circle", head 1: 0.5%
    ex["boxed"][1] = True
    ex["in_box"][1][8] = True  # "red" has the same box as "circle"
    got = as_np(head_stats(batch_attention([ex]), masks_for([ex])))
    # head 0: only "circle" (40% on patches) counts
    assert got["grounding"][0, 0] == pytest.approx(0.15 / 0.40, rel=1e-6)
    assert got["pointing"][0, 0] == 1.0
    assert got["boxed_img_mass"][0, 0] == pytest.approx((0.005 + 0.40) / 2, rel=1e-5)
    # head 1: only "red" (30%, its top patch p11 is in the box) counts
    assert got["grounding"][0, 1] == pytest.approx(0.15 / 0.30, rel=1e-6)
    assert got["pointing"][0, 1] == 1.0
    assert got["boxed_img_mass"][0, 1] == pytest.approx((0.30 + 0.005) / 2, rel=1e-5)
    assert_stats_equal(got, 0, ref_stats(A, ROLES, MODALITY, ex["boxed"], ex["in_box"]))
    # every boxed word under 1% in head 1: null grounding and pointing, the mass still recorded
    A[1, 1] = A[1, 2]
    got = as_np(head_stats(batch_attention([ex]), masks_for([ex])))
    assert np.isnan(got["grounding"][0, 1]) and np.isnan(got["pointing"][0, 1])
    assert got["boxed_img_mass"][0, 1] == pytest.approx(0.005, rel=1e-5)
    assert np.isfinite(got["grounding"][0, 0])


def test_uniform_attention_by_hand():
    n = 9
    ex = {"roles": ROLES, "modality": MODALITY, "A": np.full((2, n, n), 1 / n)}
    got = as_np(head_stats(batch_attention([ex]), masks_for([ex])))
    want = {
        "t2i": 5 / 9, "t2t": 4 / 9, "i2t": 4 / 9, "i2i": 5 / 9,
        "i2i_noself": 4 / 9,  # 5 image keys minus the query itself
        "entropy": 1.0, "sink": 3 / 9,  # cls, sep, image_cls
        "max": 1 / 9, "img_entropy": 1.0,  # uniform over the 4 patches
    }
    for s, v in want.items():
        np.testing.assert_allclose(got[s][0], [v, v], rtol=1e-5, err_msg=s)
    assert np.isnan(got["grounding"]).all() and np.isnan(got["pointing"]).all()


def test_one_hot_rows_by_hand():
    """Every query attends only to the first patch (token 5)."""
    A = np.zeros((1, 9, 9))
    A[:, :, 5] = 1.0
    ex = {"roles": ROLES, "modality": MODALITY, "A": A}
    got = as_np(head_stats(batch_attention([ex]), masks_for([ex])))
    assert got["t2i"][0, 0] == pytest.approx(1.0)
    assert got["t2t"][0, 0] == pytest.approx(0.0)
    assert got["i2i"][0, 0] == pytest.approx(1.0)
    # the patch itself puts all its weight on itself: 4 of the 5 image queries keep 1, one keeps 0
    assert got["i2i_noself"][0, 0] == pytest.approx(4 / 5)
    assert got["entropy"][0, 0] == pytest.approx(0.0, abs=1e-6)
    assert got["img_entropy"][0, 0] == pytest.approx(0.0, abs=1e-6)
    assert got["max"][0, 0] == pytest.approx(1.0)
    assert got["sink"][0, 0] == pytest.approx(0.0)


def test_empty_query_sets_are_nan():
    # text only: no image queries and no patches
    text_only = {"roles": ["cls", "word", "sep"], "modality": ["text"] * 3, "A": example_attention(1, 3)}
    # image only: no text queries
    image_only = {"roles": ["image_cls", "patch", "patch", "patch", "patch"], "modality": ["image"] * 5,
                  "A": example_attention(2, 5)}
    exs = [boxed_example(), text_only, image_only]
    got = as_np(head_stats(batch_attention(exs), masks_for(exs)))

    assert_stats_equal(got, 1, ref_stats(text_only["A"], text_only["roles"], text_only["modality"]))
    assert_stats_equal(got, 2, ref_stats(image_only["A"], image_only["roles"], image_only["modality"]))
    for s in ("i2t", "i2i", "i2i_noself", "img_entropy", "grounding", "pointing"):
        assert np.isnan(got[s][1]).all(), s
    # text queries exist: the mass they put on (absent) image keys is 0, not NaN
    np.testing.assert_allclose(got["t2i"][1], 0.0, atol=1e-7)
    np.testing.assert_allclose(got["t2t"][1], 1.0, rtol=1e-6)
    for s in ("t2i", "t2t", "img_entropy", "grounding", "pointing"):
        assert np.isnan(got[s][2]).all(), s
    np.testing.assert_allclose(got["i2t"][2], 0.0, atol=1e-7)
    # the boxed example in the same batch keeps its grounding
    assert np.isfinite(got["grounding"][0]).all()
    for s in ("entropy", "sink", "max"):
        assert np.isfinite(got[s]).all(), s


def test_no_boxes_gives_nan_grounding():
    ex = boxed_example()
    plain = {k: v for k, v in ex.items() if k not in ("boxed", "in_box")}
    got = as_np(head_stats(batch_attention([plain]), masks_for([plain])))
    assert np.isnan(got["grounding"]).all() and np.isnan(got["pointing"]).all()
    # boxes given, but no word is boxed
    m = masks_for([ex])
    m.boxed = torch.zeros_like(m.boxed)
    got = as_np(head_stats(batch_attention([ex]), m))
    assert np.isnan(got["grounding"]).all() and np.isnan(got["pointing"]).all()
    assert np.isfinite(got["t2i"]).all()


def test_padding_slots_do_not_change_an_example():
    small = boxed_example(seed=3)
    roles = ["cls", "word", "word", "word", "sep", "image_cls"] + ["patch"] * 6
    big = {"roles": roles, "modality": ["text"] * 5 + ["image"] * 7, "A": example_attention(4, 12)}
    alone = as_np(head_stats(batch_attention([small]), masks_for([small])))
    padded = as_np(head_stats(batch_attention([big, small]), masks_for([big, small])))
    for s in STATS:
        np.testing.assert_allclose(padded[s][1], alone[s][0], rtol=1e-6, atol=1e-7, equal_nan=True, err_msg=s)
    # and the padded example is still right by the formulas (entropy divides by log 9, not log 12)
    assert_stats_equal(padded, 1, ref_stats(small["A"], ROLES, MODALITY, small["boxed"], small["in_box"]))
    assert_stats_equal(padded, 0, ref_stats(big["A"], big["roles"], big["modality"]))
    # padding at the end of a batch of one (N larger than the example)
    wide = as_np(head_stats(batch_attention([small], N=14), masks_for([small], N=14)))
    for s in STATS:
        np.testing.assert_allclose(wide[s][0], alone[s][0], rtol=1e-6, atol=1e-7, equal_nan=True, err_msg=s)


def test_stat_help_names_every_stat():
    from lake.schema import EXPLAIN_STATS

    explained = {s for v in EXPLAIN_STATS.values() for s in v}
    assert set(STAT_HELP) == set(STATS) | {"kept_mass"} | explained


def boxed_masks(*args):
    """The masks as plain lists, for readable comparisons."""
    return tuple(x.tolist() for x in _boxed_masks(*args))


# -- boxed_masks ---------------------------------------------------------------------------


def tokens_table(words: list[str], grid=(2, 2), px=10.0) -> pa.Table:
    """A token table: [CLS] words [SEP] [IMG] patches (raster order) of ``px``-pixel patches."""
    text = ["[CLS]", *words, "[SEP]"]
    nt = len(text)
    gh, gw = grid
    rc = [(r, c) for r in range(gh) for c in range(gw)]
    n = nt + 1 + len(rc)
    none = [None] * nt
    return token_rows(
        token_idx=list(range(n)), stream=["self"] * n,
        modality=["text"] * nt + ["image"] * (1 + len(rc)),
        role=["cls"] + ["word"] * len(words) + ["sep", "image_cls"] + ["patch"] * len(rc),
        token=text + [None] * (1 + len(rc)),
        seq_pos=list(range(n)), text_pos=list(range(nt)) + [None] * (1 + len(rc)),
        patch_row=none + [None] + [r for r, _ in rc], patch_col=none + [None] + [c for _, c in rc],
        x0=none + [0.0] + [c * px for _, c in rc], y0=none + [0.0] + [r * px for r, _ in rc],
        x1=none + [gw * px] + [(c + 1) * px for _, c in rc], y1=none + [gh * px] + [(r + 1) * px for r, _ in rc],
    )


PIECES = {"reddish": ["red", "##dish"], "circle": ["circle"], "Circle": ["Circle"], "cat": ["cat"]}


def pieces_of(label):
    return PIECES.get(label, label.lower().split())


def patches_in(in_box, j, first_patch):
    return [k - first_patch for k in range(len(in_box[j])) if in_box[j][k]]


def test_boxed_masks_centre_in_box():
    t = tokens_table(["a", "circle"])  # tokens: 0 CLS, 1 a, 2 circle, 3 SEP, 4 IMG, 5..8 patches
    # patch centres: (5,5) (15,5) (5,15) (15,15); the box holds the two of the right column
    boxed, in_box = boxed_masks(t, [{"label": "circle", "box": [12, 0, 20, 20]}], pieces_of)
    assert boxed == [False, False, True, False, False, False, False, False, False]
    assert patches_in(in_box, 2, 5) == [1, 3]
    assert not any(any(row) for j, row in enumerate(in_box) if j != 2)
    # a box edge exactly on a centre counts as inside
    _, in_box = boxed_masks(t, [{"label": "circle", "box": [5, 5, 15, 15]}], pieces_of)
    assert patches_in(in_box, 2, 5) == [0, 1, 2, 3]


def test_boxed_masks_falls_back_to_the_patch_holding_the_centre():
    t = tokens_table(["a", "circle"])
    # a small box that holds no patch centre; its centre (12.5, 3.5) lies in patch (0, 1)
    boxed, in_box = boxed_masks(t, [{"label": "circle", "box": [11, 1, 14, 6]}], pieces_of)
    assert boxed[2]
    assert patches_in(in_box, 2, 5) == [1]
    # a centre on the boundary x = 10 belongs to the patch to its right
    _, in_box = boxed_masks(t, [{"label": "circle", "box": [9, 11, 11, 13]}], pieces_of)
    assert patches_in(in_box, 2, 5) == [3]


def test_boxed_masks_multi_piece_label_and_misses():
    t = tokens_table(["a", "red", "##dish", "circle", "red"])  # 0 CLS .. 6 SEP, 7 IMG, 8..11 patches
    boxes = [{"label": "reddish", "box": [0, 0, 10, 20]}, {"label": "Circle", "box": [10, 10, 20, 20]},
             {"label": "cat", "box": [0, 0, 20, 20]}]
    boxed, in_box = boxed_masks(t, boxes, pieces_of)
    # both pieces of "reddish" are boxed; the lone "red" at the end is not (it is not "red ##dish")
    assert boxed == [False, False, True, True, True, False, False] + [False] * 5
    assert patches_in(in_box, 2, 8) == [0, 2] and patches_in(in_box, 3, 8) == [0, 2]
    assert patches_in(in_box, 4, 8) == [3]  # label matched case-insensitively
    assert boxes[2]["label"] == "cat"  # not in the text: no token boxed for it
    # no boxes at all
    boxed, in_box = boxed_masks(t, None, pieces_of)
    assert not any(boxed) and not any(any(r) for r in in_box)
    boxed, _ = boxed_masks(t, [], pieces_of)
    assert not any(boxed)


def test_boxed_masks_feed_head_stats():
    """boxed_masks' output, used as the stats' masks, gives the hand-computed grounding."""
    t = tokens_table(["red", "circle"])
    boxed, in_box = boxed_masks(t, [{"label": "circle", "box": [9, 9, 20, 20]}], pieces_of)
    ex = boxed_example()
    assert boxed == ex["boxed"] and in_box == ex["in_box"]


# -- KeepPolicy ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, k, p, s", [
    ("all", "all", None, None, "all"), ("ALL", "all", None, None, "all"), ("", "all", None, None, "all"),
    (None, "all", None, None, "all"), (" topk:3 ", "topk", 3, None, "topk:3"), ("mass:0.90", "mass", None, 0.9, "mass:0.9"),
    ("mass:1", "mass", None, 1.0, "mass:1"), ("cross", "cross", None, None, "cross"), ("none", "none", None, None, "none"),
])
def test_keep_policy_parse(text, kind, k, p, s):
    pol = KeepPolicy.parse(text)
    assert (pol.kind, pol.k, pol.p) == (kind, k, p)
    assert str(pol) == s
    assert KeepPolicy.parse(str(pol)) == pol


@pytest.mark.parametrize("text", ["topk:0", "topk:-2", "topk:x", "topk", "topk:1.5", "mass:0", "mass:1.5",
                                  "mass:-0.1", "mass:abc", "top:3", "bogus", "all:3"])
def test_keep_policy_parse_rejects(text):
    with pytest.raises(ValueError) as e:
        KeepPolicy.parse(text)
    msg = str(e.value)
    assert "--keep-attention" in msg and repr(text) in msg
    for choice in ("all", "topk:K", "mass:P", "cross", "none"):
        assert choice in msg


def test_keep_policy_json():
    import json
    assert json.loads(KeepPolicy.parse("topk:5").to_json()) == {"kind": "topk", "k": 5}
    assert json.loads(KeepPolicy.parse("all").to_json()) == {"kind": "all"}


# -- keep_mask / kept_mass -----------------------------------------------------------------

ROW = [0.5, 0.3, 0.15, 0.05]


def row_batch():
    """One example, one head, 4 tokens (text, text, image, image) plus one padding slot.

    Row q is ROW rolled by q, so the largest key of row q is key q.
    """
    A = torch.zeros(1, 1, 5, 5)
    for q in range(4):
        A[0, 0, q, :4] = torch.tensor(np.roll(ROW, q), dtype=torch.float32)
    valid = torch.tensor([[True, True, True, True, False]])
    image = torch.tensor([[False, False, True, True, False]])
    return A, valid, image


def kept_keys(keep, q):
    return sorted(int(k) for k in torch.nonzero(keep[0, 0, q]).flatten())


def rolled(keys, q):
    return sorted((k + q) % 4 for k in keys)


@pytest.mark.parametrize("policy, first_row_keys", [
    ("all", [0, 1, 2, 3]),
    ("topk:1", [0]), ("topk:2", [0, 1]), ("topk:3", [0, 1, 2]), ("topk:4", [0, 1, 2, 3]),
    ("topk:9", [0, 1, 2, 3]),  # K above the number of keys: every valid key, never the padding slot
    # mass:P keeps keys in descending order while the mass before them is below P,
    # so the key that reaches or crosses P is kept and none after it.
    ("mass:0.4", [0]),  # 0.5 crosses 0.4
    ("mass:0.5", [0]),  # 0.5 reaches 0.5
    ("mass:0.7", [0, 1]),  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    ("mass:0.8", [0, 1]),  # 0.5 + 0.3 reaches 0.8 exactly
    ("mass:0.81", [0, 1, 2]),
    ("mass:0.95", [0, 1, 2]),  # 0.5 + 0.3 + 0.15 reaches 0.95
    ("mass:0.96", [0, 1, 2, 3]),
    ("mass:1", [0, 1, 2, 3]),
    ("none", []),
])
def test_keep_mask_by_hand(policy, first_row_keys):
    A, valid, image = row_batch()
    keep = keep_mask(A, valid, image, KeepPolicy.parse(policy))
    assert keep.shape == A.shape and keep.dtype == torch.bool
    for q in range(4):
        assert kept_keys(keep, q) == rolled(first_row_keys, q), f"{policy} row {q}"
    assert not keep[0, 0, 4].any() and not keep[0, 0, :, 4].any()  # padding never kept
    want = sum(ROW[k] for k in first_row_keys)  # every row keeps the same share
    assert kept_mass(A, keep, valid)[0, 0].item() == pytest.approx(want, abs=1e-6)


def test_keep_mask_cross():
    A, valid, image = row_batch()
    keep = keep_mask(A, valid, image, KeepPolicy.parse("cross"))
    for q in range(4):
        assert kept_keys(keep, q) == ([2, 3] if q < 2 else [0, 1])
    # rows 0, 1 (text) keep image keys 2, 3; rows 2, 3 (image) keep text keys 0, 1
    want = np.mean([ROW[2] + ROW[3], ROW[1] + ROW[2], ROW[2] + ROW[3], ROW[1] + ROW[2]])
    assert kept_mass(A, keep, valid)[0, 0].item() == pytest.approx(want, abs=1e-6)


def test_kept_mass_ignores_padding_rows():
    A, valid, image = row_batch()
    A[0, 0, 4, :] = 0.25  # garbage in the padding row must not count
    keep = keep_mask(A, valid, image, KeepPolicy.parse("all"))
    assert kept_mass(A, keep, valid)[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    keep_all = torch.ones_like(keep)
    assert kept_mass(A, keep_all, valid)[0, 0].item() == pytest.approx(1.0, abs=1e-6)


# -- tables ----------------------------------------------------------------------------------


def test_attention_table_order_and_types():
    A = torch.rand(2, 2, 3, 3)
    keep = torch.zeros(2, 2, 3, 3, dtype=torch.bool)
    picks = [(1, 1, 2, 0), (0, 0, 0, 1), (1, 0, 1, 2), (0, 1, 2, 2), (0, 0, 0, 0), (0, 1, 0, 2)]
    for b, h, q, k in picks:
        keep[b, h, q, k] = True
    t = attention_table(A, keep, [10, 20])
    assert t.schema.equals(ATTENTION.schema)
    assert [f.type for f in t.schema] == [pa.int64(), pa.int16(), pa.int32(), pa.int32(), pa.float32()]
    rows = list(zip(*(t.column(c).to_pylist() for c in ("example_id", "head", "query_idx", "key_idx"))))
    want = sorted(picks)
    assert rows == [((10, 20)[b], h, q, k) for b, h, q, k in want]
    w = t.column("weight").to_numpy()
    assert w.dtype == np.float32  # float16-rounded values, stored as float32
    np.testing.assert_array_equal(
        w, np.array([A[b, h, q, k].item() for b, h, q, k in want], np.float16).astype(np.float32))
    assert attention_table(A, torch.zeros_like(keep), [10, 20]).num_rows == 0


def test_head_stats_table_nan_becomes_null():
    stats = {"t2i": torch.tensor([[0.25, NAN], [0.5, 0.75]]), "grounding": torch.full((2, 2), NAN)}
    t = head_stats_table(stats, [7, 9], "self", 3)
    assert t.schema.equals(HEAD_STATS.schema)
    assert t.num_rows == 8
    rows = t.to_pylist()
    got = {(r["example_id"], r["head"], r["stat"]): r["value"] for r in rows}
    assert got == {(7, 0, "t2i"): 0.25, (7, 1, "t2i"): None, (9, 0, "t2i"): 0.5, (9, 1, "t2i"): 0.75,
                   (7, 0, "grounding"): None, (7, 1, "grounding"): None,
                   (9, 0, "grounding"): None, (9, 1, "grounding"): None}
    assert {r["stream"] for r in rows} == {"self"} and {r["layer"] for r in rows} == {3}
    assert t.column("value").null_count == 5
    # null, not a NaN value, after a Parquet round trip too
    buf = io.BytesIO()
    pq.write_table(t, buf)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert back.column("value").null_count == 5
    assert not any(isinstance(v, float) and math.isnan(v) for v in back.column("value").to_pylist())


def test_hidden_table_round_trip():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 6) * 3  # [batch, token, dim]
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    t = hidden_table(hidden, valid, [5, 8])
    assert t.schema.equals(HIDDEN_STATES.schema)
    buf = io.BytesIO()
    pq.write_table(t, buf)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert back.schema.equals(HIDDEN_STATES.schema)
    want = [(5, 0), (5, 1), (5, 2), (8, 0), (8, 1)]
    assert list(zip(back.column("example_id").to_pylist(), back.column("token_idx").to_pylist())) == want
    for row, (e, j) in zip(back.to_pylist(), want):
        b = 0 if e == 5 else 1
        v = hidden[b, j].numpy()
        # float16-rounded values stored as float32: exactly the float16 values, nothing more
        np.testing.assert_array_equal(np.array(row["vec"], np.float32), v.astype(np.float16).astype(np.float32))
        assert row["norm"] == pytest.approx(float(np.linalg.norm(v.astype(np.float64))), rel=1e-6)
