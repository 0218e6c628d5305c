"""A decoder's answer is the model's own: ``model.generate`` under the checkpoint's own generation config.

A tiny LLaVA (``tests/models/test_llava.py``) whose saved ``generation_config.json`` sets
``suppress_tokens``, ``bad_words_ids``, a list ``eos_token_id`` and ``max_new_tokens``, each chosen
from what the model generates without it, so that every setting changes the answer. Expected
answers come from the model's own ``generate`` (greedy), one example at a time, never from
pipeline code.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.extraction.run import extract
from tests.models.test_llava import IMAGE_ID, SCENES, make_tiny_llava
from tests.tiny import noise_image, write_manifest

EOS = 2
MAX_NEW = 6  # the checkpoint's own max_new_tokens (the adapter's default when a checkpoint sets none is 16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(model dir, chosen settings, lake root, images, texts)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tmp = tmp_path_factory.mktemp("generation")
    mdir = make_tiny_llava(tmp / "model")
    model = LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(mdir)
    images = [noise_image(size, seed=i) for i, (size, _, _) in enumerate(SCENES)]
    texts = [t for _, t, _ in SCENES]
    encs = [proc(images=[im], text=[f"<image> {t}"], return_tensors="pt") for im, t in zip(images, texts)]

    def greedy(n: int = MAX_NEW, **kw) -> list[list[int]]:
        with torch.no_grad():
            return [model.generate(**e, do_sample=False, max_new_tokens=n, **kw)[0, e["input_ids"].shape[1]:].tolist()
                    for e in encs]

    def ranked(gens, exclude):
        return [t for t, _ in Counter(t for g in gens for t in g if t not in exclude).most_common()]

    # each setting takes away a token the model would otherwise generate; among those, settings under
    # which the model never asks for <image> (so that suppressing it too cannot change the answer)
    chosen = None
    for suppress in ranked(greedy(16), {EOS, IMAGE_ID})[:4]:
        for bad in ranked(greedy(16, suppress_tokens=[suppress]), {EOS, IMAGE_ID, suppress})[:4]:
            free = greedy(suppress_tokens=[suppress], bad_words_ids=[[bad]])
            if not any(IMAGE_ID in g for g in free):
                chosen = suppress, bad, free
                break
        if chosen:
            break
    assert chosen is not None, "no settings found under which the tiny model never generates <image>"
    suppress, bad, free = chosen
    # a second eos: the earliest token (after the first) of any answer that is none of the above
    stop = min(((j, g[j]) for g in free for j in range(1, len(g)) if g[j] not in {EOS, suppress, bad}),
               default=(None, None))[1]
    assert stop is not None, free
    gc = model.generation_config
    gc.suppress_tokens = [suppress]
    gc.bad_words_ids = [[bad]]
    gc.eos_token_id = [EOS, stop]
    gc.max_new_tokens = MAX_NEW
    gc.save_pretrained(mdir)
    rows = [{"id": f"s{i}", "image": im, "text": t} for i, (im, t) in enumerate(zip(images, texts))]
    manifest = write_manifest(tmp / "data", rows)
    lake = tmp / "lake"
    extract(str(mdir), manifest, lake, "gen", batch_size=2, keep_attention="none", keep_hidden="none",
            progress=False)  # batches pad on the left
    return mdir, {"suppress": suppress, "bad": bad, "stop": stop}, lake, images, texts


def test_the_stored_answer_is_generates_own(checkpoint, lake_df):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    mdir, chosen, lake, images, texts = checkpoint
    model = LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(mdir)
    gc = model.generation_config  # as saved: the checkpoint's own settings
    assert gc.suppress_tokens == [chosen["suppress"]] and gc.bad_words_ids == [[chosen["bad"]]]
    assert gc.eos_token_id == [EOS, chosen["stop"]] and gc.max_new_tokens == MAX_NEW
    ex = lake_df(lake, "SELECT example_id, prediction, meta FROM examples WHERE run = 'gen' ORDER BY example_id")
    tok = lake_df(lake, "SELECT example_id, token_idx, token FROM tokens WHERE run = 'gen' AND stream = 'lm' "
                        "AND role = 'generated' ORDER BY example_id, token_idx")
    assert len(ex) == len(SCENES)
    stopped_early = replaced_differs = False
    for i, (im, text) in enumerate(zip(images, texts)):
        enc = proc(images=[im], text=[f"<image> {text}"], return_tensors="pt")
        P = enc["input_ids"].shape[1]
        with torch.no_grad():
            want = model.generate(**enc, do_sample=False)[0, P:].tolist()  # the checkpoint's config alone
            # what passing suppress_tokens=[<image>] and a length of its own would have generated
            replaced = model.generate(**enc, do_sample=False, suppress_tokens=[IMAGE_ID],
                                      max_new_tokens=16)[0, P:].tolist()
        assert IMAGE_ID not in want  # so suppressing <image> as well cannot change it
        assert 0 < len(want) <= MAX_NEW
        got = tok[tok.example_id == i].token.tolist()
        assert got == proc.tokenizer.convert_ids_to_tokens(want)
        assert ex.prediction[i] == proc.tokenizer.decode(want, skip_special_tokens=True).strip()
        assert chosen["suppress"] not in want and chosen["bad"] not in want
        stopped_early |= want[-1] == chosen["stop"]
        replaced_differs |= replaced != want and chosen["suppress"] in replaced
    assert stopped_early  # the second eos of the list ends an answer
    assert replaced_differs  # replacing the checkpoint's suppress_tokens would have stored another answer


def test_generation_config_merges_with_the_checkpoints(checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.models.llava import LlavaAdapter

    mdir, chosen, *_ = checkpoint
    model = LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(mdir)
    gc = LlavaAdapter(model, proc).generation_config()
    assert gc.suppress_tokens == [chosen["suppress"], IMAGE_ID]  # a union, the checkpoint's first
    assert gc.bad_words_ids == [[chosen["bad"]]] and gc.eos_token_id == [EOS, chosen["stop"]]
    assert gc.max_new_tokens == MAX_NEW and gc.do_sample is False and gc.num_beams == 1
    assert model.generation_config.suppress_tokens == [chosen["suppress"]]  # the model's own is left alone
    assert LlavaAdapter(model, proc, max_new_tokens=2).generation_config().max_new_tokens == 2  # a user's cap
    assert LlavaAdapter(model, proc, max_new_tokens=50).generation_config().max_new_tokens == MAX_NEW


def test_greedy_generation_config_lengths_and_union():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from pipeline.models.decoder import greedy_generation_config

    tok = SimpleNamespace(eos_token_id=2, pad_token_id=None)

    def gc(**kw):
        return SimpleNamespace(generation_config=GenerationConfig(**kw))

    g = greedy_generation_config(gc(), tok, suppress=(4,))  # a checkpoint that sets no length
    assert g.max_new_tokens == 16 and g.suppress_tokens == [4] and g.eos_token_id == 2 and g.pad_token_id == 2
    g = greedy_generation_config(gc(suppress_tokens=[4, 7], eos_token_id=[5, 6]), tok, suppress=(4,))
    assert g.suppress_tokens == [4, 7] and g.pad_token_id == 5  # no duplicate; pad: the first eos
    g = greedy_generation_config(gc(max_length=30), tok)  # max_length only: kept, with the prompt
    assert g.max_length == 30 and g.max_new_tokens is None
    g = greedy_generation_config(gc(max_length=30), tok, max_new_tokens=10, prompt_length=25)
    assert g.max_new_tokens == 5  # the checkpoint's room left after the prompt is the smaller
    g = greedy_generation_config(gc(max_new_tokens=8, do_sample=True, num_beams=3), tok, max_new_tokens=3)
    assert g.max_new_tokens == 3 and g.do_sample is False and g.num_beams == 1
