"""``--capture-modules``: the activations table against the modules' own outputs.

One extraction of the tiny LLaVA (tests/models/test_llava.py) captures both language-model MLPs (by
``*``), an MLP of the CLIP vision tower, the projector (one row per image token) and an attention
module (a tuple: its first tensor). The expected values come from forward hooks written here, on the
model loaded alone and run on one example at a time (teacher-forced on the answer the lake stored);
the stored rows are read back from the lake through DuckDB (lake.catalog.Catalog).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lake.catalog import Catalog
from lake.commit import read_run_row
from lake.store import Store
from pipeline.capture_config import Capture, parse_modules
from pipeline.extraction.modules import match_modules, matches
from pipeline.extraction.run import extract
from tests.models.test_llava import load, make_tiny_llava, scene_rows
from tests.tiny import write_manifest

LM_MLP = "model.language_model.layers.*.mlp"
TOWER_MLP = "model.vision_tower.encoder.layers.1.mlp"
PROJECTOR = "model.multi_modal_projector"
ATTN = "model.language_model.layers.0.self_attn"  # returns (output, weights)
SAMPLE = 2  # examples with vectors


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capmod")
    mdir = make_tiny_llava(tmp / "model")
    manifest = write_manifest(tmp / "data", scene_rows())
    lake = tmp / "lake"
    extract(str(mdir), manifest, lake, "cap", progress=False, batch_size=2, keep_attention="none",
            keep_hidden=f"sample:{SAMPLE}", capture_modules=",".join([LM_MLP, TOWER_MLP, PROJECTOR, ATTN]))
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    images = [Image.open(tmp / "data" / r["image"]).convert("RGB") for r in rows]
    return mdir, manifest, lake, images, [r["text"] for r in rows]


NAMES = ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp", TOWER_MLP, PROJECTOR, ATTN]


def hooked(model, proc, lake, ex: int, image, text) -> dict[str, np.ndarray]:
    """The modules' own outputs on example ``ex`` alone: forward hooks on the model, teacher-forced on
    the lake's stored tokens (the prompt and the generated answer), ``[seq, dim]`` each."""
    mods = dict(model.named_modules())
    enc = proc(images=[image], text=[f"<image> {text}"], return_tensors="pt")
    ids = Catalog(lake).df("SELECT seq_pos, token FROM tokens WHERE run = 'cap' AND example_id = ? AND stream = 'lm' "
                           "ORDER BY seq_pos", [ex])
    gen = [proc.tokenizer.convert_tokens_to_ids(t) for t in ids.token.iloc[enc["input_ids"].shape[1]:]]
    got: dict[str, np.ndarray] = {}

    def keep(name):
        def fn(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            got[name] = t[0].detach().float().numpy()  # batch of one
        return fn

    handles = [mods[n].register_forward_hook(keep(n)) for n in NAMES]
    try:
        with torch.no_grad():
            model(input_ids=torch.cat([enc["input_ids"], torch.tensor([gen], dtype=torch.long)], 1),
                  pixel_values=enc["pixel_values"])
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.fixture(scope="module")
def own(built):
    """Every example's modules' own outputs (:func:`hooked`)."""
    mdir, _, lake, images, texts = built
    model, proc = load(mdir)
    return [hooked(model, proc, lake, ex, image, text) for ex, (image, text) in enumerate(zip(images, texts))]


def stored(lake, module: str, ex: int | None = None):
    """One module's rows with each token's stream, modality and seq_pos (the views the app reads)."""
    rows = Catalog(lake).df(
        "SELECT a.example_id, a.stream, a.layer, a.token_idx, a.norm, a.vec, t.stream AS tstream, t.seq_pos, "
        "t.modality, t.role FROM activations a JOIN tokens t ON t.run = a.run AND t.example_id = a.example_id "
        "AND t.token_idx = a.token_idx WHERE a.run = 'cap' AND a.module = ? ORDER BY a.example_id, a.token_idx",
        [module])
    return rows if ex is None else rows[rows.example_id == ex]


def _check(rows, own, name: str, position) -> int:
    """Every stored norm (and vector, where stored) = the hooked output at the token's row."""
    vectors = 0
    for r in rows.itertuples():
        want = own[r.example_id][name][position(r)]
        assert r.norm == pytest.approx(float(np.linalg.norm(want)), rel=1e-4, abs=1e-4), (name, r.example_id)
        if isinstance(r.vec, (list, np.ndarray)):  # null outside the sample
            # float16-rounded, stored as float32
            np.testing.assert_allclose(np.asarray(r.vec, np.float32), want, rtol=2e-3, atol=2e-3)
            vectors += 1
    return vectors


def test_decoder_mlps_equal_their_own_output(built, own):
    lake = built[2]
    n_tokens = Catalog(lake).df("SELECT count(*) AS n FROM tokens WHERE run = 'cap' AND stream = 'lm'").n.iloc[0]
    for layer in (0, 1):
        name = f"model.language_model.layers.{layer}.mlp"
        rows = stored(lake, name)
        assert len(rows) == n_tokens  # a norm for every lm token
        assert set(rows.stream) == {"lm"} and set(rows.tstream) == {"lm"} and set(rows.layer) == {layer}
        vectors = _check(rows, own, name, lambda r: r.seq_pos)
        assert vectors == rows[rows.example_id.isin(_sampled(lake))].shape[0] > 0


def test_tower_mlp_equals_its_own_output(built, own):
    lake = built[2]
    rows = stored(lake, TOWER_MLP)
    n_tokens = Catalog(lake).df("SELECT count(*) AS n FROM tokens WHERE run = 'cap' AND stream = 'vision'").n.iloc[0]
    assert len(rows) == n_tokens and set(rows.stream) == {"vision"} and set(rows.tstream) == {"vision"}
    assert set(rows.layer) == {1}
    assert _check(rows, own, TOWER_MLP, lambda r: r.seq_pos) > 0


def test_projector_has_one_row_per_image_token(built, own):
    """The projector's rows are the image's patch features, in order: lm's image tokens, no layer."""
    lake = built[2]
    rows = stored(lake, PROJECTOR)
    assert set(rows.stream) == {"lm"} and set(rows.modality) == {"image"} and rows.layer.isna().all()
    rank = rows.groupby("example_id").seq_pos.rank(method="first").astype(int) - 1
    rows = rows.assign(rank=rank.to_numpy())
    for ex, g in rows.groupby("example_id"):
        assert len(g) == own[ex][PROJECTOR].shape[0]  # every row of the output, once
    assert _check(rows, own, PROJECTOR, lambda r: r.rank) > 0


def test_tuple_output_takes_its_first_tensor(built, own):
    lake = built[2]
    rows = stored(lake, ATTN)
    assert set(rows.stream) == {"lm"} and set(rows.layer) == {0}
    assert _check(rows, own, ATTN, lambda r: r.seq_pos) > 0


def _sampled(lake) -> list[int]:
    """The examples whose hidden vectors are stored: the activations' vectors are theirs."""
    h = Catalog(lake).df("SELECT DISTINCT example_id FROM hidden_states WHERE run = 'cap' AND vec IS NOT NULL")
    return sorted(h.example_id)


def test_vectors_follow_the_keep_hidden_sample(built):
    lake = built[2]
    a = Catalog(lake).df("SELECT DISTINCT example_id FROM activations WHERE run = 'cap' AND vec IS NOT NULL")
    assert sorted(a.example_id) == _sampled(lake) and len(_sampled(lake)) == SAMPLE
    mods = Catalog(lake).df("SELECT DISTINCT module FROM activations WHERE run = 'cap' ORDER BY module")
    assert list(mods.module) == sorted(["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp",
                                        TOWER_MLP, PROJECTOR, ATTN])
    cap = Capture.from_json(Catalog(lake).df("SELECT capture FROM runs WHERE run = 'cap'").capture.iloc[0])
    assert cap.modules == (LM_MLP, TOWER_MLP, PROJECTOR, ATTN)


def test_one_star_is_one_segment_two_any_number(built):
    model, _ = load(built[0])
    names = [n for n, _ in model.named_modules()]
    assert match_modules(names, (LM_MLP,)) == ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
    deeper = match_modules(names, ("model.language_model.layers.**",))
    assert "model.language_model.layers.0.mlp.gate_proj" in deeper and "model.language_model.layers.1" in deeper
    under = [n for n in names if n.startswith("model.language_model.layers.")]
    assert deeper == ["model.language_model.layers"] + under  # ** spans any number of segments, none included
    anywhere = match_modules(names, ("model.**.mlp",))
    assert set(anywhere) == {n for n in names if n.startswith("model.") and n.endswith(".mlp")}
    assert any("vision_tower" in n for n in anywhere) and any("language_model" in n for n in anywhere)
    assert not matches("a.*", "a.b.c") and matches("a.**", "a.b.c") and matches("a.**.c", "a.c")
    assert matches("a.b*", "a.bc") and not matches("a.b*", "a.bc.d")


def test_a_pattern_matching_nothing_is_refused_with_the_nearest_names(built, tmp_path):
    mdir, manifest = built[0], built[1]
    model, _ = load(mdir)
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError) as e:
        match_modules(names, (LM_MLP, "model.language_model.layers.*.mlpp"))
    assert "'model.language_model.layers.*.mlpp' matches no module" in str(e.value)
    assert "model.language_model.layers.0.mlp" in str(e.value) and "\n" not in str(e.value)
    lake = tmp_path / "lake"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--model", str(mdir), "--data",
                        str(manifest), "--lake", str(lake), "--run", "bad", "--quiet", "--capture-modules",
                        "model.language_model.layers.*.mlpp"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    err = [x for x in r.stderr.splitlines() if x.startswith("vlatlas: error:")]
    assert len(err) == 1 and "matches no module of this model; the nearest names are" in err[0]
    assert "model.language_model.layers.0.mlp" in err[0]
    assert not (lake / "runs").exists()  # refused before any work started


def test_an_output_that_is_not_per_token_is_refused(built, tmp_path):
    """The tower's pooled output ([batch, dim]) is no vector per token."""
    mdir, manifest = built[0], built[1]
    with pytest.raises(ValueError) as e:
        extract(str(mdir), manifest, tmp_path / "lake", "pooled", progress=False, batch_size=2, limit=2,
                keep_attention="none", capture_modules="model.vision_tower.post_layernorm")
    msg = str(e.value)
    assert "\n" not in msg and "module model.vision_tower.post_layernorm outputs shape [2, 32]" in msg
    assert "not one vector per token" in msg
    assert read_run_row(Store(tmp_path / "lake"), "pooled") is None  # no half-made run is left behind


def test_capture_json_records_the_patterns_and_old_json_still_loads():
    old = ('{"chunk_size": 64, "explain": "", "keep_attention": "budget:8:0.9:2", "keep_hidden": "sample:256", '
           '"random_weights": false}')
    assert Capture.from_json(old).modules == ()
    assert Capture.from_json(old).to_json() == old  # a run without modules resumes against its old row
    c = Capture.from_options(capture_modules=f"{LM_MLP}, {PROJECTOR},{LM_MLP}")
    assert c.modules == (LM_MLP, PROJECTOR)
    assert Capture.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="--capture-modules"):
        parse_modules("a,,b")


def test_a_live_example_captures_the_runs_modules(built, tmp_path):
    """A live example runs with the run's capture: its activations are the modules' own outputs too."""
    import shutil

    from pipeline import live

    mdir, _, lake, images, texts = built
    lake = Path(shutil.copytree(lake, tmp_path / "lake"))
    image, text = images[3], "what color is the circle ?"
    r = live.add_live_example(lake, "cap", image, text)
    model, proc = load(mdir)
    own = {r.example_id: hooked(model, proc, lake, r.example_id, image, text)}
    for name in NAMES:
        rows = stored(lake, name, r.example_id)
        assert len(rows), name
        at = (lambda x: x.rank) if name == PROJECTOR else (lambda x: x.seq_pos)
        if name == PROJECTOR:
            rows = rows.assign(rank=np.arange(len(rows)))  # lm's image tokens, in order
        assert _check(rows, own, name, at) == len(rows)  # a live example keeps its vectors


def test_modules_are_placed_by_the_familys_declared_paths(built):
    from pipeline.extraction.modules import site
    from pipeline.models import load_adapter

    a = load_adapter(str(built[0]))
    assert (site(a, "model.language_model.layers.1.mlp.up_proj").stream, site(a, LM_MLP.replace("*", "1")).layer) == \
        ("lm", 1)
    assert (site(a, TOWER_MLP).stream, site(a, TOWER_MLP).layer) == ("vision", 1)
    for name, stream in (("model.language_model.embed_tokens", "lm"), ("model.vision_tower.post_layernorm", "vision")):
        s = site(a, name)  # among a stream's modules, outside its blocks: that stream, no layer
        assert (s.stream, s.layer, s.streams) == (stream, None, (stream,)), name
    s = site(a, PROJECTOR)  # between the two: its output's length decides (test_projector_has_one_row_per_image_token)
    assert s.stream is None and s.layer is None and set(s.streams) == {"lm", "vision"}


def test_a_module_run_twice_in_one_pass_is_refused():
    """Its tokens would be stored twice: the second call is refused with one line."""
    from pipeline.capture import HookPoint, ModuleOutputError
    from pipeline.extraction.modules import Site
    from pipeline.extraction.sink import BatchSink, SinkBatch

    sink = BatchSink(None, SinkBatch({}, [], [], [0], np.ones(1, bool)), Capture(), "cpu",
                     sites={"m": Site("m", "lm", 0, ("lm",))})
    point = HookPoint("lm", 0, "module", torch.nn.Identity(), name="m")
    sink(point, torch.zeros(1, 3, 4))
    with pytest.raises(ModuleOutputError, match="module m runs more than once") as e:
        sink(point, torch.zeros(1, 3, 4))
    assert "\n" not in str(e.value)
