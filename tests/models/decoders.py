"""What the family tests share, most of it the decoders': a tiny random-weight model built, sharpened and
saved the same way, loaded with eager attention (the only implementation that returns weights), the model's
own greedy answer and teacher-forced pass, and checks several families make in the same words (a tiled
family's token table, the mass of the word 'circle', the lens against the model's head)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.models import conformance as conf

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_tower(model_type: str | None, image_size, patch_size, **kw) -> dict:
    """A two-layer, 32-wide vision config (``model_type`` None: the composite config's default)."""
    head = {} if model_type is None else {"model_type": model_type}
    return {**head, "image_size": image_size, "patch_size": patch_size, **TINY, **kw}


def tiny_lm(model_type: str | None, vocab_size: int, **kw) -> dict:
    """A two-layer, 32-wide language-model config with bos 1, eos 2, pad 3 unless ``kw`` says otherwise."""
    head = {} if model_type is None else {"model_type": model_type}
    return {**head, "vocab_size": vocab_size, **TINY, "max_position_embeddings": 128,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **kw}


def random_model(cls, cfg, seed: int):
    """``cls(cfg)`` in eval mode from ``seed``, its config marked as random weights (the app says so)."""
    cfg.vlatlas_random_weights = True
    torch.manual_seed(seed)
    return cls(cfg).eval()


def sharpen(layers, attr: str = "self_attn", std: float = 0.4) -> None:
    """Peaked, distinct attention rows: HF's small init gives near-uniform attention, under which a wrongly
    permuted matrix would still look right. Draws query then key weights layer by layer, in order."""
    with torch.no_grad():
        for layer in layers:
            att = getattr(layer, attr)
            att.q_proj.weight.normal_(0.0, std)
            att.k_proj.weight.normal_(0.0, std)


def tower_and_lm(model) -> list:
    """The vision tower's encoder layers, then the language model's (the usual composite model)."""
    return list(model.model.vision_tower.encoder.layers) + list(model.model.language_model.layers)


def sharpen_with_positions(model) -> None:
    """Peaked rows in the tower and the language model, then the tower's patch position embeddings redrawn
    larger than HF's small init (a CLIP or SigLIP tower's), as LLaVA's, LLaVA-NeXT's and PaliGemma's builders
    always did."""
    sharpen(tower_and_lm(model))
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, 0.5)


def save(model, out, *parts, eos=2, pad=3, suppress=None):
    """Set the generation config's eos / pad (and suppressed tokens), save the model and then each of
    ``parts`` (processor, tokenizer, image processor) to ``out``."""
    gc = model.generation_config
    gc.eos_token_id = eos
    gc.pad_token_id = pad
    if suppress is not None:
        gc.suppress_tokens = suppress
    model.save_pretrained(out)
    for part in parts:
        part.save_pretrained(out)
    return out


def load_eager(cls, mdir):
    """``cls`` from ``mdir`` with eager attention, in eval mode."""
    return cls.from_pretrained(mdir, attn_implementation="eager").eval()


def until(gen: list[int], stops) -> list[int]:
    """``gen`` cut after its first token in ``stops`` (kept), whole when none stops it."""
    stop = next((i for i, t in enumerate(gen) if t in stops), None)
    return gen if stop is None else gen[:stop + 1]


def greedy(model, enc, max_new_tokens: int, suppress: list[int], eos: int = 2) -> list[int]:
    """The model's own greedy answer to ``enc`` (suppressing ``suppress``), cut after ``eos``."""
    with torch.no_grad():
        seq = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, suppress_tokens=suppress)
    P = enc["input_ids"].shape[1]
    gen = seq[0, P:].tolist()
    return gen[:gen.index(eos) + 1] if eos in gen else gen


def word_t2i_by_hand(lake_df, lake, run: str, A) -> None:
    """The mass the word 'circle' of example 0 puts on its image tokens, head 1 of lm layer 1, as stored,
    against ``A`` (that head's ``[query, key]`` weights from the model's own teacher-forced pass)."""
    import pytest

    t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = 0 ORDER BY token_idx", [run])
    lm = t[t.stream == "lm"]
    w = int(lm.token_idx[lm.token == "circle"].iloc[0])
    image = lm.token_idx[lm.modality == "image"].to_numpy()
    a = lake_df(lake, f"SELECT key_idx, weight FROM attention WHERE run = '{run}' AND example_id = 0 AND "
                "stream = 'lm' AND layer = 1 AND head = 1 AND query_idx = ?", [w])
    mass = a[a.key_idx.isin(image)].weight.sum()
    assert mass == pytest.approx(A[w][image].sum(), abs=2e-3) and mass > 0


def lm_then_vision(t):
    """The lm rows and the vision rows of one example's token table, asserting the lm stream comes first."""
    lm, vis = t[t.stream == "lm"], t[t.stream == "vision"]
    assert list(t.stream) == ["lm"] * len(lm) + ["vision"] * len(vis)
    return lm, vis


@dataclass(frozen=True)
class CropLayout:
    """A tiling family's tiny layout: image tokens per crop (``seq``, a ``pool`` x ``pool`` grid after
    pooling ``sf`` x ``sf`` patches), the tower's ``side`` x ``side`` patches of ``ps`` px per crop."""
    seq: int
    pool: int
    side: int
    ps: int
    sf: int


def assert_crop_tokens(lm, vis, crops, gen, size, k: CropLayout) -> None:
    """One tiled example's token table against the crops computed by hand (``crops``: per crop in the
    processor's order ``(tile, origin x, origin y, scale x, scale y)``; ``size``: the original (W, H)):
    each marker is followed by its crop's image tokens, whose tile is the crop's; bos first; the answer's
    rows; image and tower boxes through the crop's place; the global image covers the whole original."""
    import numpy as np
    import pytest

    W, H = size
    img = lm[lm.modality == "image"]
    tiles = [c[0] for c in crops]
    assert list(img.tile) == [tl for tl in tiles for _ in range(k.seq)]
    for i, p in enumerate(lm.seq_pos[lm.role.isin(["tile_marker", "global_marker"])]):
        assert list(lm.tile.iloc[p + 1:p + 1 + k.seq]) == [tiles[i]] * k.seq
    assert list(zip(img.patch_row, img.patch_col)) == [(r, c) for _ in crops for r in range(k.pool)
                                                       for c in range(k.pool)]
    txt = lm[(lm.modality == "text") & (lm.role != "generated")]
    assert txt.role.iloc[0] == "bos"
    gl = lm[lm.role == "generated"]
    assert len(gen) >= 1 and len(gl) == len(gen)  # their pieces and places: the conformance suite
    # boxes computed here: pooled sf x sf blocks of patches, through the crop's place
    q = k.ps * k.sf
    exp = [((ox + c * q) * sx, (oy + r * q) * sy, (ox + (c + 1) * q) * sx, (oy + (r + 1) * q) * sy)
           for _, ox, oy, sx, sy in crops for r in range(k.pool) for c in range(k.pool)]
    np.testing.assert_allclose(img[["x0", "y0", "x1", "y1"]].to_numpy(float), exp, atol=1e-3)
    # the tower: every crop's side x side patches, one after another
    ps, side = k.ps, k.side
    assert list(vis.seq_pos) == list(range(len(crops) * side * side))
    assert list(vis.tile) == [tl for tl in tiles for _ in range(side * side)]
    expv = [((ox + c * ps) * sx, (oy + r * ps) * sy, (ox + (c + 1) * ps) * sx, (oy + (r + 1) * ps) * sy)
            for _, ox, oy, sx, sy in crops for r in range(side) for c in range(side)]
    np.testing.assert_allclose(vis[["x0", "y0", "x1", "y1"]].to_numpy(float), expv, atol=1e-3)
    g = img[img.tile == 0]  # the whole original is covered by the global image's tokens
    assert g.x0.min() == pytest.approx(0) and g.x1.max() == pytest.approx(W) and g.y1.max() == pytest.approx(H)


def generate_with_attentions(model, enc, max_new_tokens: int, suppress: list[int]):
    """The model's own greedy generation on ``enc`` (suppressing ``suppress``), with its attentions."""
    with torch.no_grad():
        return model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, suppress_tokens=suppress,
                              output_attentions=True, return_dict_in_generate=True)


def answer(g, ids: list[int], stops) -> tuple[list[int], list[int]]:
    """What ``generate`` wrote after the prompt ``ids``: all of it, and that cut after its first stop."""
    new = g.sequences[0, len(ids):].tolist()
    return new, until(new, stops)


def stored_attention(lake_df, lake, run: str, ex: int, stream: str, layer: int):
    """One example's token table and its stored weights ``[head, token, token]`` (0 where none is stored)."""
    import numpy as np

    t = lake_df(lake, "SELECT * FROM tokens WHERE run = ? AND example_id = ? ORDER BY token_idx", [run, ex])
    n = len(t)
    a = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = ? AND example_id = ? "
                "AND stream = ? AND layer = ?", [run, ex, stream, layer])
    A = np.zeros((int(a["head"].max()) + 1, n, n))
    A[a["head"].to_numpy(), a.query_idx.to_numpy(), a.key_idx.to_numpy()] = a.weight.to_numpy()
    return t, A


def square(a, n: int, offset: int = 0):
    """Stored weights ``a`` (head, query_idx, key_idx, weight rows) as ``[head, query, key]`` over ``n``
    tokens of two heads, indices less ``offset`` (0 where none is stored)."""
    import numpy as np

    A = np.zeros((2, n, n), np.float32)
    A[a["head"].to_numpy(), a.query_idx.to_numpy() - offset, a.key_idx.to_numpy() - offset] = a.weight.to_numpy()
    return A


def rerun(model, g, n: int, **inputs):
    """The teacher-forced pass by transformers alone over ``generate``'s first ``n`` ids (the stored lm
    tokens), with ``inputs`` (pixel values and their kin)."""
    ids = g.sequences[0].tolist()[:n]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_attentions=True, **inputs)


def assert_never_generated(refs, token: int) -> None:
    """``token`` is nowhere in what ``generate`` wrote, for each ``(inputs, generate output)`` of ``refs``."""
    for enc, g in refs:
        new = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
        assert token not in new


def parts(s):
    """A conformance subject as the family tests' tuple: (model dir, lake root, reference model, processor,
    images, texts)."""
    return s.mdir, s.lake, s.model, s.proc, s.images, s.texts


def attentions(o, v, tiled: bool = False) -> dict:
    """The reference's ``lm`` and ``vision`` attentions of one example from the teacher-forced pass ``o``
    and the tower's own run ``v`` (``tiled``: crops that never see each other, as one block-diagonal
    matrix)."""
    vision = [conf.block_diagonal(x.numpy()) for x in v.attentions] if tiled else [x[0].numpy() for x in v.attentions]
    return {"lm": [x[0].numpy() for x in o.attentions], "vision": vision}


def assert_circle_mass(lake_df, lake, run: str, lm, A, where=(0, 1, 1)) -> None:
    """The mass the question word 'circle' puts on every image token (``where``: example, layer, head), as
    stored, against ``A`` (that head's ``[query, key]`` weights by the model's own teacher-forced pass)."""
    import pytest

    ex, layer, head = where
    image = (lm.modality == "image").to_numpy()
    w = int(lm[lm.token == "circle"].token_idx.iloc[0])
    a = lake_df(lake, f"SELECT key_idx, weight FROM attention WHERE run = '{run}' AND example_id = ? AND "
                "stream = 'lm' AND layer = ? AND head = ? AND query_idx = ?", [ex, layer, head, w])
    mass = a[a.key_idx.isin(lm[lm.modality == "image"].token_idx)].weight.sum()
    assert mass == pytest.approx(A[w][image].sum(), abs=2e-3) and mass > 0


def prompt(enc) -> tuple[list[int], int]:
    """The prompt's ids of one example's inputs, and its length."""
    ids = enc["input_ids"][0].tolist()
    return ids, len(ids)


def auto_loader(cls_name: str):
    """A conformance case's ``load``: transformers' ``cls_name`` from the model dir with eager attention,
    and the checkpoint's AutoProcessor."""
    def load(mdir):
        import transformers as tf

        return load_eager(getattr(tf, cls_name), mdir), tf.AutoProcessor.from_pretrained(mdir)
    return load


def assert_processor_is_theirs(monkeypatch, theirs, proc, images, prompts) -> None:
    """``proc`` gives exactly what transformers' own processor gives on ``images`` and ``prompts``; ``theirs``
    builds that one without its video processor (which needs torchvision), so the class check is relaxed
    for a missing part while it is built and used."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if arg is None else check(self, name, arg))
    e1 = theirs()(images=images, text=prompts, return_tensors="pt", padding=True)
    e2 = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    assert set(e1) == set(e2)
    for k in e1:
        assert torch.equal(torch.as_tensor(e1[k]), torch.as_tensor(e2[k])), k
    monkeypatch.undo()


def assert_lens_is_lm_head(model, lens, hs) -> None:
    """Every stored lens row (top items of lm_head(norm(h))) against the model's own head on the stored
    lm vectors ``hs`` (float16-rounded): its probability, and rank 0 the argmax."""
    import numpy as np
    import pytest

    with torch.no_grad():
        h = torch.tensor(np.stack(hs.vec.to_numpy()), dtype=torch.float32)
        p = torch.softmax(model.lm_head(model.model.language_model.norm(h)), -1).numpy()
    row = {(r.example_id, r.layer, r.token_idx): i for i, r in enumerate(hs.itertuples())}
    for r in lens.itertuples():
        want = p[row[(r.example_id, r.layer, r.token_idx)]]
        assert r.prob == pytest.approx(want[r.vocab_id], abs=5e-3)
        if r.rank == 0:
            assert want[r.vocab_id] >= want.max() - 5e-3


def merger_inputs(lake_df, lake, run: str, ex: int):
    """What a merging projector sees and writes, read from the lake: the lm rows at hidden layer 0 (the
    model's inputs_embeds), the last tower layer's vectors by (patch row, patch col), and the lm's image rows."""
    import numpy as np

    h = lake_df(lake, "SELECT t.stream, t.modality, t.token, t.patch_row, t.patch_col, h.layer, h.vec "
                "FROM hidden_states h JOIN tokens t USING (run, example_id, token_idx) WHERE h.run = ? AND "
                "h.example_id = ? AND ((h.stream = 'lm' AND h.layer = 0) OR (h.stream = 'vision' AND h.layer = 2)) "
                "ORDER BY h.token_idx", [run, ex])
    lm, vis = h[h.stream == "lm"], h[h.stream == "vision"]
    last = {(int(r), int(c)): np.asarray(v, np.float32) for r, c, v in zip(vis.patch_row, vis.patch_col, vis.vec)}
    return lm, last, lm[lm.modality == "image"]


@dataclass(frozen=True)
class RowAt:
    """One stored attention row: run, stream, example, layer, head and query token."""
    run: str
    stream: str
    ex: int
    layer: int
    head: int
    query_idx: int


def raw_row(raw_df, lake, at: RowAt):
    """{key_idx: weight} of one attention row, read straight from the Parquet files."""
    a = raw_df(lake, "SELECT key_idx, weight FROM {attention} WHERE run = ? AND stream = ? AND layer = ? AND "
               "example_id = ? AND head = ? AND query_idx = ?",
               [at.run, at.stream, at.layer, at.ex, at.head, at.query_idx])
    assert len(a), "the row must be in the lake"
    return a.set_index("key_idx").weight.astype(float)


def stored_patch_vectors(lake_df, lake, run: str, ex: int):
    """``[patch, dim]``: the vision stream's stored hidden layer 0 of one example's patch tokens, in order."""
    import numpy as np

    h = lake_df(lake, "SELECT h.vec FROM hidden_states h JOIN tokens t USING (run, example_id, token_idx) "
                "WHERE h.run = ? AND h.example_id = ? AND h.stream = 'vision' AND h.layer = 0 "
                "AND t.role = 'patch' ORDER BY h.token_idx", [run, ex])
    return np.stack(h.vec.to_list()).astype(np.float32)
