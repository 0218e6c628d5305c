"""The shapes world and the committed demo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.demo import shapes
from pipeline.demo.build import MODEL_DIR

HAVE_MODEL = (MODEL_DIR / "config.json").exists()


def test_generator_is_deterministic_for_a_seed(tmp_path):
    a, b, c = shapes.generate(50, 7), shapes.generate(50, 7), shapes.generate(50, 8)
    strip = lambda xs: [(x["question"], x["answer"], x["boxes"], x["objs"]) for x in xs]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)
    m1 = shapes.write_dataset(tmp_path / "one", 20, 3)
    m2 = shapes.write_dataset(tmp_path / "two", 20, 3)
    assert m1.read_text() == m2.read_text()
    for line in m1.read_text().splitlines():
        img = json.loads(line)["image"]
        assert (tmp_path / "one" / img).read_bytes() == (tmp_path / "two" / img).read_bytes()


def test_boxes_match_the_drawn_pixels():
    bg = np.array(shapes.BACKGROUND)
    for ex in shapes.generate(200, 11):
        pix = np.asarray(shapes.draw(ex["objs"])).astype(int)
        painted = np.abs(pix - bg).sum(-1) > 30  # [H, W]
        covered = np.zeros_like(painted)
        for o in ex["objs"]:
            x0, y0, x1, y1 = o.box
            covered[y0:y1, x0:x1] = True
            inside = painted[y0:y1, x0:x1]
            # the shape touches all four sides of its box (tight box) ...
            assert inside[:, 0].any() and inside[:, -1].any() and inside[0, :].any() and inside[-1, :].any()
            # ... in the object's own colour, inside its own 16-pixel cell
            assert np.abs(pix[y0:y1, x0:x1][inside] - np.array(shapes.COLORS[o.color])).sum(-1).max() < 60
            assert x0 // shapes.CELL == (x1 - 1) // shapes.CELL == o.col
            assert y0 // shapes.CELL == (y1 - 1) // shapes.CELL == o.row
        assert not (painted & ~covered).any(), "paint outside every box"


def test_answers_are_true_of_the_scene():
    for ex in shapes.generate(300, 5):
        objs, q, a = ex["objs"], ex["question"].split(), ex["answer"]
        if ex["qtype"] == "color":
            (o,) = [o for o in objs if o.shape == q[4]]
            assert a == o.color
        elif ex["qtype"] == "shape":
            (o,) = [o for o in objs if o.color == q[4]]
            assert a == o.shape
        elif ex["qtype"] == "exist":
            assert a == ("yes" if any(o.color == q[3] and o.shape == q[4] for o in objs) else "no")
        elif ex["qtype"] == "count":
            assert a == str(sum(o.shape + "s" == q[2] for o in objs))
            assert len(ex["boxes"]) == int(a)
        else:
            (oa,) = [o for o in objs if o.shape == q[2]]
            (ob,) = [o for o in objs if o.shape == q[-2]]
            truth = oa.col < ob.col if "left" in q else oa.row < ob.row
            assert a == ("yes" if truth else "no")
        for b in ex["boxes"]:
            assert b["label"] in ex["question"].split()
    counts = {q: sum(e["qtype"] == q for e in shapes.generate(500, 1)) for q in shapes.QTYPES}
    assert set(counts.values()) == {100}


def test_short_training_lowers_the_loss(tmp_path):
    from pipeline.demo.train import TrainConfig, train

    m = train(tmp_path / "m", TrainConfig(n_train=1024, epochs=10, batch_size=64, lr=1e-3, warmup_steps=10,
                                          hidden=32, layers=1, heads=2, n_eval=100, max_steps=150), log=lambda s: None)
    first = np.mean([m["first_loss"]])
    assert m["last_loss"] < 0.8 * first, (m["first_loss"], m["last_loss"])
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "README.md").exists()


@pytest.mark.skipif(not HAVE_MODEL, reason="the demo model has not been trained into pipeline/demo/model")
def test_committed_model_loads_offline_and_meets_its_card(monkeypatch):
    from pipeline.demo.train import encode, evaluate
    from pipeline.models import load_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = json.loads((MODEL_DIR / "metrics.json").read_text())
    adapter = load_adapter(str(MODEL_DIR))
    assert adapter.model.config._attn_implementation == "eager"
    seed = 424_242  # neither the training seed nor the card's evaluation seed
    assert seed not in (card["config"]["seed"], card["config"]["eval_seed"])
    ex = shapes.generate(1000, seed)
    torch.manual_seed(0)
    acc = evaluate(adapter.model, encode(ex, adapter.processor, card["config"]["max_text"]),
                   [e["qtype"] for e in ex])
    assert acc["overall"] >= card["heldout_accuracy"]["overall"] - 0.04, acc
    for q in shapes.QTYPES:
        assert acc[q] >= card["heldout_accuracy"][q] - 0.1, (q, acc)


@pytest.mark.skipif(not HAVE_MODEL, reason="the demo model has not been trained into pipeline/demo/model")
def test_processor_path_matches_training_inputs():
    """The saved processor turns a PNG into exactly the pixel values training used."""
    from transformers import AutoProcessor

    from pipeline.demo.train import _pixel_values

    proc = AutoProcessor.from_pretrained(MODEL_DIR)
    ex = shapes.generate(4, 3)
    imgs = [shapes.draw(e["objs"]) for e in ex]
    enc = proc(images=imgs, text=[e["question"] for e in ex], return_tensors="pt", padding=True)
    pix = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2)
    assert enc["pixel_values"].shape == (4, 3, shapes.SIZE, shapes.SIZE)
    assert torch.allclose(enc["pixel_values"], _pixel_values(pix), atol=1e-5)


def test_training_is_deterministic_for_a_seed(tmp_path):
    from pipeline.demo.train import TrainConfig, train

    cfg = TrainConfig(n_train=256, epochs=1, batch_size=32, warmup_steps=5, hidden=32, layers=1, heads=2,
                      n_eval=40, max_steps=6)
    a = train(tmp_path / "a", cfg, log=lambda s: None)
    b = train(tmp_path / "b", cfg, log=lambda s: None)
    c = train(tmp_path / "c", TrainConfig(**{**cfg.__dict__, "seed": 1}), log=lambda s: None)
    assert a["last_loss"] == b["last_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


@pytest.mark.skipif(not HAVE_MODEL, reason="the demo model has not been trained into pipeline/demo/model")
def test_demo_lake_holds_its_interventions_and_a_reused_lake_completes_them(small_demo_lake, tmp_path):
    """The demo lake carries every demo intervention, each over the run's first examples, with the rows a
    variant each; a reused lake that lacks one (a build stopped in the interventions) gets it back, the
    same rows, and the build leaves torch's thread count as it found it."""
    import shutil

    import pyarrow.dataset as ds

    from pipeline.demo.build import build_demo_lake, demo_intervention_key, demo_interventions
    from pipeline.intervene.spec import InterventionSpec

    def rows(lake):
        return ds.dataset(lake / "interventions", partitioning="hive").to_table().to_pandas()

    iv = rows(small_demo_lake)
    manifest = [json.loads(x) for x in (small_demo_lake / "_demo_data" / "manifest.jsonl").read_text().splitlines()]
    n = len(manifest)
    per_example = {"heads": 16, "knockout": 2 * 4, "regions": 3 * 2 * 11}
    assert set(iv.intervention) == {demo_intervention_key(k, o) for k, o in demo_interventions()}
    for kind, options in demo_interventions():
        key = demo_intervention_key(kind, options)
        r = iv[iv.intervention == key]
        first = manifest[:options["limit"]]  # example_id: the row's position in the manifest
        if options.get("regions") == "boxes":
            assert len(r) == sum(len(m.get("boxes") or []) for m in first) > 0
            continue
        assert sorted(r.example_id.unique()) == list(range(min(n, options["limit"])))
        assert (r.groupby("example_id").size() == per_example[kind]).all(), key
        assert r.estimated.all() == bool(options.get("estimate")) == r.estimated.any(), key
    if any(m.get("boxes") for m in manifest):
        assert set(iv[iv.kind == "regions"].method) == {"attention", "rollout", "random", "box"}

    lake = tmp_path / "lake"
    shutil.copytree(small_demo_lake, lake)
    kind, options = demo_interventions()[2]  # the knockout
    digest = InterventionSpec.from_options(kind, **options).digest
    gone = sorted((lake / "interventions" / "run=demo").glob(f"iv-{digest}-*.parquet"))
    assert gone
    for p in gone:
        p.unlink()
    threads = torch.get_num_threads()
    build_demo_lake(lake, n=n, progress=False)
    assert torch.get_num_threads() == threads
    assert sorted((lake / "interventions" / "run=demo").glob(f"iv-{digest}-*.parquet")) == gone
    cols = ["example_id", "method", "layer"]
    key = demo_intervention_key(kind, options)
    a = iv[iv.intervention == key].sort_values(cols).reset_index(drop=True)
    b = rows(lake).query("intervention == @key").sort_values(cols).reset_index(drop=True)
    assert (a[cols + ["answer_after", "changed"]] == b[cols + ["answer_after", "changed"]]).all().all()
    np.testing.assert_allclose(a.metric_after, b.metric_after, rtol=1e-5, atol=1e-5)
