"""``--keep-attention all`` stores exactly the keys each query can see.

A tiny LLaVA (tests/models/test_llava.py's builder) runs over examples of different lengths in one batch
(the batch is padded on the left); every stored ``(head, query, key)`` of the language model must be
a weight the model itself gives a key it can see, and every such weight must be stored: checked
against the model's own ``output_attentions`` on each example alone (no padding), where a key the
causal mask hides has weight exactly 0.0 (eager attention). The vision tower sees every patch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.extraction.run import extract
from tests.models.test_llava import IMAGE_ID, MAX_NEW_TOKENS, SCENES, make_tiny_llava
from tests.tiny import noise_image, write_manifest


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tmp = tmp_path_factory.mktemp("keep-all")
    mdir = make_tiny_llava(tmp / "model")
    rows = [{"id": f"s{i}", "image": noise_image(size, seed=i), "text": t, "answer": a}
            for i, (size, t, a) in enumerate(SCENES)]
    manifest = write_manifest(tmp / "data", rows)
    extract(str(mdir), manifest, tmp / "lake", "all", batch_size=len(rows), keep_attention="all",
            keep_hidden="none", progress=False)
    model = LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(mdir)
    images = [Image.open(tmp / "data" / "images" / f"s{i}.png").convert("RGB") for i in range(len(rows))]
    return tmp / "lake", model, proc, images


def test_all_stores_every_visible_key_and_no_other(lake, lake_df):
    root, model, proc, images = lake
    lengths = set()
    for ex, (im, (_, text, _)) in enumerate(zip(images, SCENES)):
        tok = lake_df(root, "SELECT token_idx, stream FROM tokens WHERE run = 'all' AND example_id = ? "
                      "ORDER BY token_idx", [ex])
        n = int((tok.stream == "lm").sum())
        lengths.add(n)
        enc = proc(images=[im], text=[f"<image> {text}"], return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, suppress_tokens=[IMAGE_ID],
                               return_dict_in_generate=True)
            seq = g.sequences[:, :n]  # what the lake's lm tokens are: the prompt and the answer fed back
            out = model(input_ids=seq, pixel_values=enc["pixel_values"], attention_mask=torch.ones_like(seq),
                        output_attentions=True)
        for layer, att in enumerate(out.attentions):
            a = att[0].numpy()  # [head, query, key] of this example alone
            visible = a > 0  # eager attention: a masked key's weight is exactly 0.0
            assert not visible[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]].any()  # causal
            assert visible[:, np.tril_indices(n)[0], np.tril_indices(n)[1]].all()
            got = lake_df(root, "SELECT head, query_idx, key_idx, weight FROM attention WHERE run = 'all' AND "
                          "example_id = ? AND stream = 'lm' AND layer = ?", [ex, layer])
            stored = set(zip(got["head"], got.query_idx, got.key_idx))
            assert stored == set(zip(*np.nonzero(visible)))
            h, q, k = got["head"].to_numpy(), got.query_idx.to_numpy(), got.key_idx.to_numpy()
            np.testing.assert_allclose(got.weight.to_numpy(), a[h, q, k], atol=2e-3)
        v = lake_df(root, "SELECT head, query_idx, key_idx FROM attention WHERE run = 'all' AND example_id = ? "
                    "AND stream = 'vision' AND layer = 0", [ex])
        n_v = int((tok.stream == "vision").sum())
        assert len(v) == 2 * n_v * n_v  # a tower sees every patch: nothing is masked
    assert len(lengths) > 1  # the batch was padded
