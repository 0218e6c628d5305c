"""Llama 3.2 Vision (Mllama): what is particular to it (roles and tiles of the token table, tile boxes, the
cross stream's padding and lifted mask and statistics, hidden states, lens, the app on lm_cross); the
conformance suite (tests/models/conformance.py, ``CASES`` below) checks its token table, three streams' weights,
entropy of lm_cross, answer and pages against the model.

A tiny random MllamaForConditionalGeneration (vision tower: 24 px tiles of 8 px patches -> 3 x 3 patches
and a CLS, 10 tokens padded to 16, at most 4 tiles, 2 local layers and 1 global layer; language model:
4 layers, cross-attention in layers 1 and 3) with an MllamaProcessor made of MllamaImageProcessorPil, a
word-level tokenizer and a Llama-3-like chat template, all built here; nothing is downloaded. Expected
values come from the model's own outputs and ``generate``, one example at a time (no batch padding), and
from the image processor's geometry recomputed here, never from pipeline code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.tiny import WORDS, noise_scene_rows, word_tokenizer

S, PS, G, T = 24, 8, 3, 4  # tile size, patch size, patches a side, max tiles
N_TILE, L_TILE = G * G + 1, 16  # CLS + patches; padded to a multiple of 8
SELF, CROSS = [0, 2], [1, 3]  # decoder layers: lm layers, lm_cross layers
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
TEMPLATE = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
            "<|end_header_id|>\n\n{% endif %}")
SCENES = [  # (original size (w, h), question, answer)
    ((40, 30), "what color is the circle ?", "red"),  # 2 x 2 tiles
    ((20, 70), "how many ?", None),  # 3 x 1 tiles (tall), padding tile 4
    ((24, 24), "is there a red square left of the circle ?", "yes"),  # 1 tile, three unused
]
RUN = "mll"


def mllama_tokenizer():
    vocab = {"<unk>": 0, **{s: i + 1 for i, s in enumerate(SPECIAL)}}
    for w in WORDS + ["user", "assistant"]:
        vocab[w] = len(vocab)
    image_id = len(vocab)  # as the released checkpoints: the image token is just past the head's vocabulary
    vocab["<|image|>"] = image_id
    tok = word_tokenizer(vocab, tuple(SPECIAL + ["<|image|>"]), bos_token="<|begin_of_text|>",
                         eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", padding_side="left")
    return tok, vocab, image_id


def make_tiny_mllama(out, seed: int = 0):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok, vocab, image_id = mllama_tokenizer()
    ip = tf.MllamaImageProcessorPil(size={"height": S, "width": S}, max_image_tiles=T)
    proc = tf.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=TEMPLATE)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
                  image_size=S, patch_size=PS, max_num_tiles=T, intermediate_layers_indices=[0],
                  vision_output_dim=64)
    text = dict(vocab_size=image_id, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, cross_attention_layers=CROSS,
                max_position_embeddings=128, bos_token_id=vocab["<|begin_of_text|>"],
                eos_token_id=vocab["<|eot_id|>"], pad_token_id=vocab["<|finetune_right_pad_id|>"])
    cfg = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    cfg.vlatlas_random_weights = True
    torch.manual_seed(seed)
    model = tf.MllamaForConditionalGeneration(cfg).eval()
    vm, lm = model.model.vision_model, model.model.language_model
    with torch.no_grad():  # peaked, distinct rows; open every gate (HF starts them at 0)
        for layer in list(vm.transformer.layers) + list(vm.global_transformer.layers):
            layer.self_attn.q_proj.weight.normal_(0.0, 0.4)
            layer.self_attn.k_proj.weight.normal_(0.0, 0.4)
        for d, layer in enumerate(lm.layers):
            attn = layer.cross_attn if d in CROSS else layer.self_attn
            attn.q_proj.weight.normal_(0.0, 0.4)
            attn.k_proj.weight.normal_(0.0, 0.4)
            if d in CROSS:
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(1.0)
        for emb in (vm.gated_positional_embedding, vm.pre_tile_positional_embedding,
                    vm.post_tile_positional_embedding):
            emb.gate.fill_(0.7)
        vm.gated_positional_embedding.tile_embedding.weight.normal_(0.0, 0.5)
        vm.pre_tile_positional_embedding.embedding.weight.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = vocab["<|eot_id|>"]
    model.generation_config.pad_token_id = vocab["<|finetune_right_pad_id|>"]
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 20, 15])


def load(mdir):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval(), \
        AutoProcessor.from_pretrained(mdir)


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer, and the model's own attention of each stream: lm its self-attention
    layers, lm_cross its cross-attention modules' weights placed on the vision stream's tokens (a tile's
    padding tokens, which the model drops before the cross-attention, get 0), vision the local then the
    global transformer's over every tile slot (padding included)."""
    enc, gen = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    o, cross, tower = teacher_forced(s.model, enc, gen)
    real_key = (np.arange(T * L_TILE) % L_TILE) < N_TILE
    lm_cross = []
    for d in CROSS:
        c = cross[d].numpy()  # [head, lm token, real vision token]
        A = np.zeros(c.shape[:2] + (T * L_TILE,), c.dtype)  # [head, lm token, vision token]
        A[:, :, real_key] = c
        lm_cross.append(A)
    n_real = int(enc["aspect_ratio_mask"][0, 0].sum())
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen, patches={"lm": 0, "vision": n_real * G * G},
                          attentions={"lm": [o.attentions[d][0].numpy() for d in SELF], "lm_cross": lm_cross,
                                      "vision": [tower[i].numpy() for i in sorted(tower)]},
                          prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())


CASES = [conf.FamilyCase(id="mllama", family="mllama", run=RUN, make_model=make_tiny_mllama, rows=scene_rows,
                         load=load, reference=conformance_reference,
                         extract=dict(batch_size=2, keep_attention="all", keep_hidden="all", explain="lens"),
                         image_token=None,  # <|image|> is a text marker (role vision_start): the tiles are keys
                         streams=("lm", "lm_cross", "vision"), hidden=("lm", "vision"),
                         cross=(("lm_cross", "lm", "vision"),), statistic=("lm_cross", 1, 1, "entropy"),
                         page_example=0)]


@pytest.fixture(scope="module")
def mll(tmp_path_factory):
    """(model dir, lake root, reference model, processor, images, texts); the conformance suite's lake."""
    return dec.parts(conf.subject(CASES[0], tmp_path_factory))


def prompt(proc, text):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    """The model alone on one example: its inputs and its own greedy answer (the image token is past the
    head's vocabulary: nothing to suppress)."""
    enc = proc(images=[[image]], text=[prompt(proc, text)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        g = model.generate(**enc, do_sample=False, max_new_tokens=16, return_dict_in_generate=True)
    P = enc["input_ids"].shape[1]
    gen = g.sequences[0, P:].tolist()
    eot = model.generation_config.eos_token_id
    gen = gen[:gen.index(eot) + 1] if eot in gen else gen
    return enc, gen


def run_teacher_forced(model, enc, gen):
    """The model on prompt + answer with every attention returned (hooks on the cross-attention modules:
    the model returns the self-attention layers' weights only)."""
    ids = torch.cat([enc["input_ids"], torch.tensor([gen])], dim=1)
    cam = enc["cross_attention_mask"]
    cam = torch.cat([cam, cam[:, -1:].expand(-1, len(gen), -1, -1)], dim=1)
    cross, tower = {}, {}
    hooks = [model.model.language_model.layers[d].cross_attn.register_forward_hook(
        lambda m, a, o, d=d: cross.__setitem__(d, o[1][0].detach())) for d in CROSS]
    vm = model.model.vision_model
    layers = list(vm.transformer.layers) + list(vm.global_transformer.layers)
    hooks += [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: tower.__setitem__(i, o[1][0].detach()))
              for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                      aspect_ratio_ids=enc["aspect_ratio_ids"], aspect_ratio_mask=enc["aspect_ratio_mask"],
                      cross_attention_mask=cam, output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return o, cross, tower


# shared with the conformance suite: the model runs once per example (a test that hooks the model calls
# run_teacher_forced itself)
teacher_forced = conf.memo(run_teacher_forced)


def tokens(lake_df, lake, ex):
    return lake_df(lake, f"SELECT * FROM tokens WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])


def block(lake_df, lake, ex, stream, layer):
    """One layer's stored attention of one example (every head)."""
    return lake_df(lake, f"SELECT head, query_idx, key_idx, weight FROM attention WHERE run = '{RUN}' AND "
                   "example_id = ? AND stream = ? AND layer = ?", [ex, stream, layer])


def canvas_grid(w, h):
    """(rows, cols, new_w, new_h): the processor's tile grid and resized size, recomputed: the grid of at
    most T tiles whose canvas needs the smallest upscale (else the least downscale; ties: the smaller
    canvas), the image fit into it keeping its aspect ratio (rounded down), at least one tile a side."""
    best = None
    for rows in range(1, T + 1):
        for cols in range(1, T + 1):
            if rows * cols > T:
                continue
            scale = min(rows * S / h, cols * S / w)
            key = (0, scale, rows * cols) if scale >= 1 else (1, -scale, rows * cols)
            if best is None or key < best[0]:
                best = (key, rows, cols)
    _, rows, cols = best
    tw, th = min(max(w, S), cols * S), min(max(h, S), rows * S)
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.floor(h * sw) or 1, th)
    else:
        nw, nh = min(math.floor(w * sh) or 1, tw), th
    return rows, cols, nw, nh


def test_registered_and_streams(mll):
    from pipeline.models import FAMILIES

    mdir, *_ = mll
    assert FAMILIES["mllama"][0] == "mllama"
    a = load_adapter(str(mdir))
    assert a.streams() == {"lm": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "lm_cross": {"layers": 2, "heads": 2, "hidden_size": 32},
                           "vision": {"layers": 3, "heads": 2, "hidden_size": 32}}
    assert a.self_layers == SELF and a.cross_layers == CROSS


def test_token_table_matches_the_models_inputs(mll, lake_df):
    mdir, lake, model, proc, images, texts = mll
    tok = proc.tokenizer
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen = reference(model, proc, im, text)
        t = tokens(lake_df, lake, ex)
        lm, vis = dec.lm_then_vision(t)
        ids, P = dec.prompt(enc)
        assert len(gen) >= 2
        assert (lm.modality == "text").all()  # <|image|> included: a marker, the tiles are the vision stream's
        assert list(lm.seq_pos) == list(range(P + len(gen)))  # in order; no left pads from the batch
        roles = {"<|begin_of_text|>": "bos", "<|image|>": "vision_start", "<|start_header_id|>": "im_start",
                 "<|end_header_id|>": "im_start", "<|eot_id|>": "im_end"}
        assert list(lm.role[:P]) == [roles.get(p, "word") for p in tok.convert_ids_to_tokens(ids)]
        assert set(lm.role[P:]) == {"generated"}
        # vision: every tile slot of the tower in its order, CLS + patches + padding per tile
        rows, cols, *_ = canvas_grid(*im.size)
        n_real = rows * cols
        assert int(enc["aspect_ratio_mask"][0, 0].sum()) == n_real
        assert list(vis.seq_pos) == list(range(T * L_TILE))
        assert list(vis.tile) == [1 + s // L_TILE for s in range(T * L_TILE)]
        want_roles = []
        for s in range(T * L_TILE):
            tile, q = divmod(s, L_TILE)
            want_roles.append("pad" if tile >= n_real or q >= N_TILE else "image_cls" if q == 0 else "patch")
        assert list(vis.role) == want_roles and (vis.modality == "image").all()
        p = vis[vis.role == "patch"]
        assert list(zip(p.patch_row, p.patch_col)) == [(r, c) for _ in range(n_real) for r in range(G)
                                                       for c in range(G)]
        assert vis[vis.role == "pad"].x0.isna().all()


def test_tile_boxes_in_original_pixels(mll, lake_df):
    """Each patch's box through its tile's place on the canvas and the resize, recomputed here."""
    mdir, lake, model, proc, images, texts = mll
    assert [canvas_grid(*im.size)[:2] for im in images] == [(2, 2), (3, 1), (1, 1)]
    for ex, im in enumerate(images):
        W, H = im.size
        rows, cols, nw, nh = canvas_grid(W, H)
        enc = proc.image_processor(images=[[im]], return_tensors="np")
        assert enc["aspect_ratio_mask"][0, 0].sum() == rows * cols
        t = tokens(lake_df, lake, ex)
        p = t[(t.stream == "vision") & (t.role == "patch")]
        want = []
        for tile in range(rows * cols):
            tr, tc = divmod(tile, cols)
            for r in range(G):
                for c in range(G):
                    x0, y0 = (tc * S + c * PS) * W / nw, (tr * S + r * PS) * H / nh
                    x1, y1 = (tc * S + (c + 1) * PS) * W / nw, (tr * S + (r + 1) * PS) * H / nh
                    want.append([min(x0, W), min(y0, H), min(x1, W), min(y1, H)])
        np.testing.assert_allclose(p[["x0", "y0", "x1", "y1"]].to_numpy(float), want, atol=1e-3)
        cls = t[(t.stream == "vision") & (t.role == "image_cls")]
        assert list(cls.tile) == list(range(1, rows * cols + 1))
    # example 0, 40 x 30 -> a 2 x 2 canvas of 48 x 48, the image not resized (it fits, and is at least a tile
    # a side): patch (0, 0) of tile 4 (bottom right) covers canvas x 24..32, y 24..32, clipped to the image's 30
    t = tokens(lake_df, lake, 0)
    p = t[(t.stream == "vision") & (t.role == "patch") & (t.tile == 4)]
    assert p[["x0", "y0", "x1", "y1"]].to_numpy(float)[0] == pytest.approx([24, 24, 32, 30], abs=1e-3)
    # example 1, 20 x 70 -> 3 x 1 tiles (24 x 72), the image kept at 20 x 70 (its height fits, so its aspect
    # ratio keeps its width): patch (0, 2) of tile 1 covers canvas x 16..24, clipped to the image's 20
    t = tokens(lake_df, lake, 1)
    p = t[(t.stream == "vision") & (t.role == "patch") & (t.tile == 1)]
    assert p[["x0", "y0", "x1", "y1"]].to_numpy(float)[2] == pytest.approx([16, 0, 20, 8], abs=1e-3)


def _dense(a, n_q, n_k, q0=0, k0=0):
    A = np.zeros((2, n_q, n_k), np.float32)
    A[a["head"].to_numpy(), a.query_idx.to_numpy() - q0, a.key_idx.to_numpy() - k0] = a.weight.to_numpy()
    return A


def test_cross_stream_padding_and_the_lifted_mask(mll, lake_df):
    """lm_cross beyond the suite's check (the stored weights = the model's own, rows summing to 1, lm
    queries over vision keys): a tile's padding tokens hold exactly 0; a token from <|image|> on weighs
    only the real tiles, one before it the whole tower (the model lifts its mask there)."""
    mdir, lake, model, proc, images, texts = mll
    vis_pos = np.arange(T * L_TILE)
    real_key = (vis_pos % L_TILE) < N_TILE
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen = reference(model, proc, im, text)
        t = tokens(lake_df, lake, ex)
        n = int((t.stream == "lm").sum())
        V = int((t.stream == "vision").sum())
        assert V == T * L_TILE
        for k in range(len(CROSS)):
            A = _dense(block(lake_df, lake, ex, "lm_cross", k), n, V, 0, n)  # [head, lm token, vision token]
            assert np.abs(A[:, :, ~real_key]).max() == 0
        lm = t[t.stream == "lm"]
        marker = int(lm.index[lm.role == "vision_start"][0])
        n_real = int(enc["aspect_ratio_mask"][0, 0].sum())
        A = _dense(block(lake_df, lake, ex, "lm_cross", 0), n, V, 0, n)
        used = (vis_pos // L_TILE) < n_real
        assert np.abs(A[:, marker:, ~used]).max(initial=0) == 0
        if n_real < T:
            assert A[:, :marker, ~used & real_key].min() > 0


def test_statistics_of_the_cross_stream_by_hand(mll, lake_df):
    """t2i, t2t, i2t, max and sink of lm_cross (its entropy is the conformance suite's statistic)."""
    mdir, lake, model, proc, images, texts = mll
    ex, k, head = 0, 1, 1
    enc, gen = reference(model, proc, images[ex], texts[ex])
    o, cross, tower = teacher_forced(model, enc, gen)
    A = cross[CROSS[k]][head].numpy().astype(np.float64)  # [query, key]: every lm token, real tower tokens
    st = lake_df(lake, f"SELECT stat, value FROM head_stats WHERE run = '{RUN}' AND example_id = ? AND "
                 "stream = 'lm_cross' AND layer = ? AND head = ?", [ex, k, head])
    got = dict(zip(st.stat, st.value))
    assert got["t2i"] == pytest.approx(1.0, abs=1e-4)  # every key is the image's
    assert got["t2t"] == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(got["i2t"])  # no image queries
    assert got["max"] == pytest.approx(A.max(1).mean(), abs=2e-4)
    t = tokens(lake_df, lake, ex)
    vis = t[t.stream == "vision"]
    cls = (vis.role.to_numpy() == "image_cls")[(np.arange(T * L_TILE) % L_TILE) < N_TILE]
    assert got["sink"] == pytest.approx(A[:, cls].sum(1).mean(), abs=2e-4)


def test_attention_page_and_head_summary_of_the_cross_stream(mll, monkeypatch, raw_df):
    """lm_cross on the Attention page: text → image only, the lm stream's text tokens as its queries and
    the vision stream's patches as its keys, the weights the lake's row; the Head summary's t2i and
    entropy of lm_cross are the lake's means per (layer, head)."""
    from tests.app.test_app import chart_data, heatmap, open_app

    mdir, lake, *_ = mll
    ex, layer, h = 0, 1, 1
    tok = raw_df(lake, f"SELECT * FROM {{tokens}} WHERE run = '{RUN}' AND example_id = ? ORDER BY token_idx", [ex])
    text = tok[tok.stream == "lm"].sort_values("text_pos")
    patches = tok[(tok.stream == "vision") & (tok.role == "patch")]
    g = text[text.role == "generated"].iloc[0]
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run=RUN, ex=ex, stream="lm_cross", layer=layer,
                  head=h, tokens=int(g.text_pos))
    assert at.selectbox(key="w_stream").value == "lm_cross"
    assert {json.loads(e.proto.spec).get("description") for e in at.get("vega_lite_chart")} == {"text-image"}
    ti = chart_data(at, "text-image", "weight")
    assert sorted(ti.token_idx) == sorted(patches.token_idx)
    a = raw_df(lake, f"SELECT key_idx, weight FROM {{attention}} WHERE run = '{RUN}' AND stream = 'lm_cross' AND "
               "layer = ? AND example_id = ? AND head = ? AND query_idx = ?", [layer, ex, h, int(g.token_idx)])
    row = a.set_index("key_idx").weight.astype(float)
    np.testing.assert_allclose(ti.weight.to_numpy(float), row.reindex(ti.token_idx).fillna(0).to_numpy(), atol=1e-6)
    assert ti.weight.sum() > 0
    for stat in ("t2i", "entropy"):
        at = open_app(lake, monkeypatch, page="app_pages/head_summary.py", run=RUN, ex=ex, stream="lm_cross",
                      stat=stat, layer=0, head=0)
        assert at.selectbox(key="w_stream").value == "lm_cross"
        want = raw_df(lake, "SELECT layer, head, avg(value) AS v FROM {head_stats} WHERE run = ? AND "
                      "stream = 'lm_cross' AND stat = ? GROUP BY layer, head ORDER BY layer, head", [RUN, stat])
        d = heatmap(at)
        assert len(want) == 2 * 2 and not want.v.isna().any()
        np.testing.assert_allclose(d.value.to_numpy(float), want.v.to_numpy(float), atol=1e-6)


def test_hidden_states_are_the_layers_outputs(mll, lake_df):
    """lm: hidden 0 the token embeddings, hidden k + 1 decoder layer SELF[k]'s output (the last one after
    the cross layer before it); vision: hidden 0 the local transformer's padded input, hidden 3 the global
    layer's output, in the tower's order (padding included)."""
    mdir, lake, model, proc, images, texts = mll
    ex = 1
    enc, gen = reference(model, proc, images[ex], texts[ex])
    got = {}
    m = model.model
    hooks = [m.language_model.layers[SELF[1]].register_forward_hook(lambda mod, a, o: got.__setitem__("lm2", o[0])),
             m.vision_model.transformer.register_forward_pre_hook(lambda mod, a: got.__setitem__("v0", a[0][0])),
             m.vision_model.global_transformer.layers[0].register_forward_hook(
                 lambda mod, a, o: got.__setitem__("v3", o[0]))]
    try:
        run_teacher_forced(model, enc, gen)
    finally:
        for h in hooks:
            h.remove()
    ids = enc["input_ids"][0].tolist() + gen
    want = {("lm", 0): m.language_model.embed_tokens.weight[ids].detach(), ("lm", 2): got["lm2"],
            ("vision", 0): got["v0"], ("vision", 3): got["v3"]}
    for (stream, layer), w in want.items():
        h = lake_df(lake, f"SELECT vec FROM hidden_states WHERE run = '{RUN}' AND example_id = ? AND stream = ? "
                    "AND layer = ? ORDER BY token_idx", [ex, stream, layer])
        vec = np.stack(h.vec.to_list()).astype(np.float32)
        assert vec.shape == tuple(w.shape)
        np.testing.assert_allclose(vec, w.numpy(), atol=2e-2, rtol=2e-2)


def test_lens_is_the_head_of_the_stored_lm_hidden_states(mll, lake_df):
    """``--explain lens``: at every lm hidden-state layer, the stored top items are lm_head(norm(h)) of the
    stored vectors (float16-rounded); the vision stream has none."""
    mdir, lake, model, *_ = mll
    lens = lake_df(lake, "SELECT stream, example_id, layer, token_idx, rank, vocab_id, prob FROM lens "
                   f"WHERE run = '{RUN}'")
    assert set(lens.stream) == {"lm"} and set(lens.layer) == {0, 1, 2}
    hs = lake_df(lake, f"SELECT example_id, layer, token_idx, vec FROM hidden_states WHERE run = '{RUN}' AND "
                 "stream = 'lm'")
    assert len(lens[lens["rank"] == 0]) == len(hs)
    dec.assert_lens_is_lm_head(model, lens, hs)


def test_a_processor_with_other_tiles_is_refused(mll):
    import transformers as tf

    from pipeline.models.mllama import MllamaAdapter

    mdir, lake, model, proc, *_ = mll
    other = tf.MllamaProcessor(image_processor=tf.MllamaImageProcessorPil(size={"height": S, "width": S},
                                                                          max_image_tiles=2),
                               tokenizer=proc.tokenizer, chat_template=TEMPLATE)
    with pytest.raises(NotImplementedError, match="makes up to 2 tiles of 24 px, the vision tower takes 4 of 24 px"):
        MllamaAdapter(model, other)
