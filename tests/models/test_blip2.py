"""BLIP-2 and InstructBLIP (vision tower -> Q-Former -> OPT decoder): token table, attention of every
stream, answer, pages.

A tiny random Blip2ForConditionalGeneration (ViT: 32 px images, 8 px patches -> a 4 x 4 grid and an
image [CLS], 2 layers; Q-Former: 2 layers, cross-attention in every layer, Q = 4 query tokens; OPT: 2
layers, 2 heads) with a Blip2Processor made of a BlipImageProcessorPil and a word-level tokenizer
with ``<image>``, all built from files; nothing is downloaded. Expected values come from the model's
own ``generate`` and outputs run without hooks, one example at a time, never from pipeline code.
InstructBLIP's Q-Former instruction is cut by a BERT word-piece tokenizer (``tests.tiny.write_vocab``).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pipeline.models import load_adapter
from tests.models import conformance as conf
from tests.models import decoders as dec
from tests.models.conformance import extract
from tests.tiny import WORDS, noise_image, noise_scene_rows, word_tokenizer, write_manifest

IMG, PS, G, Q = 32, 8, 4, 4
IMAGE_ID = 4
SCENES = [  # (original size (w, h), question, answer)
    ((32, 32), "what color is the circle ?", "red"),
    ((96, 64), "is there a red square left of the circle ?", "yes"),
    ((40, 80), "how many ?", None),
]


def blip2_tokenizer():
    """A word-level fast tokenizer with ``<image>`` at IMAGE_ID; it adds bos (as OPT's does)."""
    vocab = {"<pad>": 0, "</s>": 2, "<s>": 1, "<unk>": 3, "<image>": IMAGE_ID,
             **{w: i + 5 for i, w in enumerate(WORDS)}}
    tok = word_tokenizer(vocab, ("<image>", "<s>"), bos="<s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         padding_side="left")
    return tok, vocab


def make_tiny_blip2(out, seed: int = 0, qformer_layers: int = 2, cross_every: int = 1):
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tok, vocab = blip2_tokenizer()
    ip = tf.BlipImageProcessorPil(size={"height": IMG, "width": IMG})
    proc = tf.Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=Q)
    vision = dec.tiny_tower(None, IMG, PS)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=qformer_layers, num_attention_heads=2,
                   encoder_hidden_size=32, cross_attention_frequency=cross_every, vocab_size=64)
    text = dict(model_type="opt", vocab_size=len(vocab), hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    cfg = tf.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=Q,
                         image_token_index=IMAGE_ID)
    model = dec.random_model(tf.Blip2ForConditionalGeneration, cfg, seed)
    sharpen_everything(model)
    return dec.save(model, out, proc, pad=0)


def sharpen_everything(model) -> None:
    """Peaked, distinct attention rows (HF's init is near uniform): every weight of two or more dimensions
    (linear and conv weights, position and class embeddings) redrawn, and distinct query tokens."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        model.query_tokens.normal_(0.0, 1.0)


MAX_NEW = 16  # llava.MAX_NEW_TOKENS: the tiny checkpoint sets no length


VARIANTS = ["blip2", "instructblip", "instructblip-llama"]


def scene_rows(mdir=None) -> list[dict]:
    return noise_scene_rows(SCENES, [0, 0, 16, 16])


def loader(variant: str):
    return dec.auto_loader("Blip2ForConditionalGeneration" if variant == "blip2"
                           else "InstructBlipForConditionalGeneration")


def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
    """Prompt ids, greedy answer, and each stream's attention by the model's own modules."""
    enc, gen = reference(s.model, s.proc, s.images[ex], s.texts[ex])
    own = own_attentions(s.model, enc, gen)
    return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen, patches={"lm": 0, "vision": G * G},
                          attentions={k: [x[0].numpy() for x in v] for k, v in own.items()},
                          prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())


MAKE = {"blip2": make_tiny_blip2, "instructblip": lambda d: make_tiny_instructblip(d),
        "instructblip-llama": lambda d: make_tiny_instructblip(d, lm="llama")}
CASES = [conf.FamilyCase(id=v, family=v.split("-")[0], run="b2", make_model=lambda d, v=v: MAKE[v](d), rows=scene_rows,
                         load=loader(v), reference=conformance_reference, image_token=IMAGE_ID, page_example=1,
                         streams=("lm", "qformer", "qformer_cross", "vision"), hidden=("lm", "qformer", "vision"))
         for v in VARIANTS]


@pytest.fixture(scope="module", params=VARIANTS)
def b2(request, tmp_path_factory):
    """(model dir, lake root, reference model, processor, images, texts) of BLIP-2 / InstructBLIP; the
    conformance suite's lake."""
    return dec.parts(conf.subject(CASES[VARIANTS.index(request.param)], tmp_path_factory))


def family(b2) -> str:
    return "instructblip" if "Instruct" in type(b2[2]).__name__ else "blip2"


@conf.memo  # shared with the conformance suite: the model runs once per example
def reference(model, proc, image, text):
    """The model alone on one example: its inputs and its own greedy answer."""
    enc = proc(images=[image], text=[text], return_tensors="pt")
    return enc, dec.greedy(model, enc, MAX_NEW, [IMAGE_ID])


@conf.memo  # shared with the conformance suite: the model runs once per example
def teacher_forced(model, enc, gen):
    ids = torch.cat([enc["input_ids"], torch.tensor([gen])], 1)
    with torch.no_grad():
        extra = {k: enc[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in enc}
        return model(input_ids=ids, pixel_values=enc["pixel_values"], attention_mask=torch.ones_like(ids),
                     output_attentions=True, return_dict=True, **extra)


@conf.memo  # shared with the conformance suite: the model runs once per example
def own_attentions(model, enc, gen) -> dict:
    """Each stream's attention by the model's own modules, unhooked: the language model on the
    teacher-forced inputs; the tower and the Q-Former (as ``generate`` calls them) on the image."""
    o = teacher_forced(model, enc, gen)
    with torch.no_grad():
        v = model.vision_model(enc["pixel_values"], output_attentions=True, return_dict=True)
        extra = {}
        if "qformer_input_ids" in enc:  # InstructBLIP: the instruction follows the query tokens
            extra = {"input_ids": enc["qformer_input_ids"],
                     "attention_mask": torch.ones(1, Q + enc["qformer_input_ids"].shape[1], dtype=torch.long)}
        qf = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=v.last_hidden_state,
                           output_attentions=True, return_dict=True, **extra)
    # the Q-Former's recorded ``attentions`` hold its self- and cross-attention modules' weights, in order
    own_self = [a for a in qf.attentions if a.shape[-1] == a.shape[-2]]
    return {"lm": o.language_model_outputs.attentions, "qformer": own_self,
            "qformer_cross": qf.cross_attentions, "vision": v.attentions}


def tokens(lake_df, lake, ex):
    return lake_df(lake, "SELECT * FROM tokens WHERE run = 'b2' AND example_id = ? ORDER BY token_idx", [ex])


def lake_attention(lake_df, lake, ex, stream, layer):
    """The stored attention of one layer, indexed by the tokens' sequence positions: (head, q, k, w)."""
    t = tokens(lake_df, lake, ex).set_index("token_idx").seq_pos
    a = lake_df(lake, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = 'b2' AND "
                "example_id = ? AND stream = ? AND layer = ?", [ex, stream, layer])
    return (a["head"].to_numpy(), t[a.query_idx].to_numpy(), t[a.key_idx].to_numpy(),
            a.weight.to_numpy(np.float32))


def test_registered_and_streams(b2):
    from pipeline.models import FAMILIES

    a = load_adapter(str(b2[0]))
    assert FAMILIES[a.model.config.model_type][0] == a.family == family(b2)
    assert a.streams() == {s: {"layers": 2, "heads": 2, "hidden_size": 32}
                           for s in ("lm", "qformer", "qformer_cross", "vision")}
    assert a.model.config.qformer_config._attn_implementation == "eager"


def test_token_table_matches_the_models_inputs(b2, lake_df):
    mdir, lake, model, proc, images, texts = b2
    for ex, (im, text) in enumerate(zip(images, texts)):
        enc, gen = reference(model, proc, im, text)
        ids, P = dec.prompt(enc)
        assert ids[:Q] == [IMAGE_ID] * Q and ids[Q] == 1  # the processor's Q placeholders, then bos
        t = tokens(lake_df, lake, ex)
        lm, qf, vis = (t[t.stream == s] for s in ("lm", "qformer", "vision"))
        assert list(t.stream) == ["lm"] * len(lm) + ["qformer"] * len(qf) + ["vision"] * len(vis)
        instr = enc["qformer_input_ids"][0].tolist() if "qformer_input_ids" in enc else []
        assert len(qf) == Q + len(instr) and list(qf.seq_pos) == list(range(len(qf)))
        if instr:  # InstructBLIP: the instruction's tokens, as the Q-Former's own tokenizer cut them
            assert list(qf.token.iloc[Q:]) == proc.qformer_tokenizer.convert_ids_to_tokens(instr)
            assert list(qf.role.iloc[Q:]) == ["cls"] + ["word"] * (len(instr) - 2) + ["sep"]
            assert set(qf.modality.iloc[Q:]) == {"text"}
        assert len(lm) == P + len(gen) and list(lm.seq_pos) == list(range(P + len(gen)))
        for part in (lm.iloc[:Q], qf.iloc[:Q]):
            assert list(part.seq_pos) == list(range(Q))
            assert set(part.modality) == {"image"} and set(part.role) == {"query"}
            assert part.patch_row.isna().all() and part.x0.isna().all()
        txt = lm[(lm.modality == "text") & (lm.role != "generated")]
        assert txt.role.iloc[0] == "bos" and set(txt.role.iloc[1:]) == {"word"}
        gl = lm[lm.role == "generated"]
        assert len(gen) >= 1 and len(gl) == len(gen)  # their pieces and places: the conformance suite
        assert list(vis.role) == ["image_cls"] + ["patch"] * (G * G)
        assert list(vis.seq_pos) == list(range(1 + G * G))
        W, H = im.size  # resized to 32 x 32, each axis by its own ratio
        exp = np.array([[c * PS * W / IMG, r * PS * H / IMG, (c + 1) * PS * W / IMG, (r + 1) * PS * H / IMG]
                        for r in range(G) for c in range(G)])
        np.testing.assert_allclose(vis.iloc[1:][["x0", "y0", "x1", "y1"]].to_numpy(float), exp, atol=1e-4)


@pytest.mark.parametrize("stream", ["lm", "qformer", "qformer_cross", "vision"])
def test_attention_of_every_stream_is_peaked_and_shaped(b2, stream):
    """Each stream's own attention (the suite's reference, checked there against every stored weight,
    every pair stored, rows summing to 1) has both layers and peaked rows (uniform over 17 keys is
    0.06): a wrong token order would not match by chance; the cross-attention is queries x tower."""
    s = conf.built(b2[1])
    for ex in (0, 1):
        own = s.ref(ex).attentions[stream]
        assert len(own) == 2
        for A in own:
            assert A.max() > 0.2
        if stream == "qformer_cross":
            assert A.shape[1:] == (Q, 1 + G * G)


def test_t2i_of_a_word_by_hand(b2, lake_df):
    """One lm word's mass on the query tokens, from the model's own attention (the head's t2i: the
    conformance suite)."""
    mdir, lake, model, proc, images, texts = b2
    ex, layer, head = 1, 1, 1
    enc, gen = reference(model, proc, images[ex], texts[ex])
    A = teacher_forced(model, enc, gen).language_model_outputs.attentions[layer][0, head].numpy().astype(np.float64)
    lm = tokens(lake_df, lake, ex)
    lm = lm[lm.stream == "lm"]
    image = (lm.modality == "image").to_numpy()
    word = int(lm[lm.token == "red"].seq_pos.iloc[0])
    assert A[word, :Q].sum() == pytest.approx(A[word][image].sum()) and A[word, :Q].sum() > 0


@pytest.mark.parametrize("xlayer,xhead", [(1, "mean"), (0, 1)])
def test_composed_view_lm_token_through_queries_to_patches(b2, monkeypatch, xlayer, xhead):
    """The Attention page's composed view on stream lm equals, patch by patch, the LM's own attention from a
    word to the query tokens times the Q-Former's own cross-attention of those queries, summed over the
    queries; its first factor (text -> query tokens) is drawn beside it."""
    from tests.app.test_app import chart_data, open_app

    mdir, lake, model, proc, images, texts = b2
    ex = 1
    enc, gen = reference(model, proc, images[ex], texts[ex])
    ids = enc["input_ids"][0].tolist()
    word = ids.index(proc.tokenizer.convert_tokens_to_ids("red"))
    own = own_attentions(model, enc, gen)
    # the LM head where the word looks most at the query tokens (random weights: some heads hardly do)
    mass = np.array([[own["lm"][lay][0, h, word, :Q].sum().item() for h in range(2)] for lay in range(2)])
    layer, head = (int(i) for i in np.unravel_index(mass.argmax(), mass.shape))
    A = own["lm"][layer][0, head].double().numpy()  # [lm query, lm key]
    C = own["qformer_cross"][xlayer][0].double().numpy()  # [head, Q, 1 + G*G]
    C = C.mean(0) if xhead == "mean" else C[xhead]
    a = A[word, :Q]  # the word's attention on the query tokens (the processor puts them first)
    expected = (a[:, None] * C[:, 1:]).sum(0)  # [G*G]: patch (r, c) at r * G + c; C[:, 0] is the vision [CLS]
    assert a.sum() > 0.05 and expected.max() > 0.01  # a test that would notice a zero view

    text_pos = word - Q  # text positions count the LM's text tokens: the query tokens come first
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="b2", ex=ex, stream="lm", layer=layer,
                  head=head, tokens=text_pos, xlayer=xlayer, xhead=xhead)
    assert [p.value for p in at.get("pills") if p.label == "Query text tokens"][0] == [text_pos]
    img = chart_data(at, "composed", "weight").sort_values(["patch_row", "patch_col"])
    assert len(img) == G * G
    got = np.zeros(G * G)
    got[img.patch_row.astype(int) * G + img.patch_col.astype(int)] = img.weight
    np.testing.assert_allclose(got, expected, atol=3e-3)
    strip = chart_data(at, "text-queries", "weight")
    assert list(strip.word) == [f"q{k}" for k in range(Q)]
    np.testing.assert_allclose(strip.weight.to_numpy(float), a, atol=2e-3)
    caption = " ".join(str(e.value) for e in at.caption)
    assert "Composed, not an attention the model computes" in caption
    assert f"cross layer {xlayer}" in caption
    on_queries = float(re.search(r"Mass on the query tokens \*\*([0-9.]+)", caption).group(1))
    on_patches = float(re.search(r"on the patches \*\*([0-9.]+)", caption).group(1))
    assert on_queries == pytest.approx(a.sum(), abs=2e-3) and on_patches == pytest.approx(expected.sum(), abs=3e-3)


def test_query_tokens_over_the_patches(b2, monkeypatch):
    """Stream qformer_cross: the queries are the learned query tokens only (not InstructBLIP's
    instruction), and their view is the Q-Former's own cross-attention over the patches."""
    from tests.app.test_app import chart_data, open_app

    mdir, lake, model, proc, images, texts = b2
    ex, layer, head, q = 0, 1, 0, 2
    enc, gen = reference(model, proc, images[ex], texts[ex])
    C = own_attentions(model, enc, gen)["qformer_cross"][layer][0, head].double().numpy()  # [Q, 1 + G*G]
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="b2", ex=ex, stream="qformer_cross",
                  layer=layer, head=head)
    pills = next(p for p in at.get("pills") if p.label == "Query tokens")
    assert pills.options == [f"q{k}" for k in range(Q)] and pills.value == list(range(Q))  # all, at first
    img = chart_data(at, "query-image", "weight")
    got = np.zeros(G * G)
    got[img.patch_row.astype(int) * G + img.patch_col.astype(int)] = img.weight
    np.testing.assert_allclose(got, C[:, 1:].mean(0), atol=2e-3)
    at = open_app(lake, monkeypatch, page="app_pages/attention.py", run="b2", ex=ex, stream="qformer_cross",
                  layer=layer, head=head, qtokens=q)
    img = chart_data(at, "query-image", "weight")
    got[img.patch_row.astype(int) * G + img.patch_col.astype(int)] = img.weight
    np.testing.assert_allclose(got, C[q, 1:], atol=2e-3)


def test_cross_attention_every_other_layer(tmp_path, lake_df):
    """As the released checkpoints: cross-attention in every 2nd Q-Former layer (4 layers: 0 and 2).
    ``qformer_cross`` has 2 layers, layer k being the k-th Q-Former layer with cross-attention, equal to
    the weights that layer's own cross-attention module returns; ``qformer`` keeps all 4 layers."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    mdir = make_tiny_blip2(tmp_path / "model", qformer_layers=4, cross_every=2)
    size, text, answer = SCENES[1]
    manifest = write_manifest(tmp_path / "data", [{"id": "s0", "image": noise_image(size, seed=1), "text": text,
                                                    "answer": answer}])
    extract(str(mdir), manifest, tmp_path / "lake", "b2", keep_attention="all", progress=False)
    streams = json.loads(lake_df(tmp_path / "lake", "SELECT streams FROM runs WHERE run = 'b2'").streams.iloc[0])
    assert (streams["qformer"]["layers"], streams["qformer_cross"]["layers"]) == (4, 2)

    model = Blip2ForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = Blip2Processor.from_pretrained(mdir)
    layers = model.qformer.encoder.layer
    assert [bool(lay.has_cross_attention) for lay in layers] == [True, False, True, False]
    seen = {}  # Q-Former layer -> the weights its own cross-attention module returns
    for i in (0, 2):
        layers[i].crossattention.attention.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, out[1][0].detach().numpy()))
    image = Image.open(tmp_path / "data" / "images" / "s0.png").convert("RGB")
    enc, _ = reference(model, proc, image, text)  # generate runs the Q-Former once
    for k, qlayer in enumerate((0, 2)):
        h, q, key, w = lake_attention(lake_df, tmp_path / "lake", 0, "qformer_cross", k)
        A = seen[qlayer]  # [head, Q, 1 + G*G]
        assert len(w) == A.size and A.max() > 0.2
        np.testing.assert_allclose(w, A[h, q, key], atol=2e-3)
    assert not np.allclose(seen[0], seen[2], atol=0.05)  # the two layers differ: a swapped mapping would show


def make_tiny_instructblip(out, seed: int = 0, lm: str = "opt"):
    """InstructBLIP: as BLIP-2, with a BERT word-piece tokenizer for the Q-Former's instruction."""
    import transformers as tf

    from tests.tiny import write_vocab

    out.mkdir(parents=True, exist_ok=True)
    tok, vocab = blip2_tokenizer()
    qtok = tf.BertTokenizer(str(write_vocab(out / "qformer_vocab.txt")), do_lower_case=True)
    ip = tf.BlipImageProcessorPil(size={"height": IMG, "width": IMG})
    proc = tf.InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=Q)
    vision = dec.tiny_tower(None, IMG, PS)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   encoder_hidden_size=32, cross_attention_frequency=1, vocab_size=len(qtok), pad_token_id=0)
    text = dict(model_type="opt", vocab_size=len(vocab), hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    if lm == "llama":  # as InstructBLIP's Vicuna checkpoints
        text = dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                    max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = tf.InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=Q,
                                image_token_index=IMAGE_ID)
    model = dec.random_model(tf.InstructBlipForConditionalGeneration, cfg, seed)
    sharpen_everything(model)
    return dec.save(model, out, proc, pad=0)
