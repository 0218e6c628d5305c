"""Build the demo lake: held-out shapes scenes extracted with the committed demo model.

``vlatlas demo`` calls :func:`build_demo_lake`; a lake whose demo run is
complete is reused as it is (its probes and interventions added when it lacks them).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from lake.commit import read_run_row

MODEL_DIR = Path(__file__).resolve().parent / "model"
RUN = "demo"
DATA_SEED = 2_000_003  # neither the training seed nor the model card's evaluation seed
# Tokens on each demo map: the shapes world has few kinds of token, and 3,000 show its structure as
# well as `vlatlas embed`'s default 5,000 while keeping the demo lake's build under a minute on 2 cores.
MAP_TOKENS = 3000
# Examples (the run's first) each demo intervention covers, chosen so that the five add about 12 s to the
# build on 2 cores (a demo forward pass is ~10 ms of Python, whatever its batch: ~40 ms an example for
# exact head ablation, ~120 ms for the ranked regions: 66 re-encoded images, three rankings x two
# curves x 11 fractions). Over 64 examples rather than 128 a head's mean effect moves by up to 0.9 logit
# (layer 0's heads, which matter most); which head matters most, and at which layers knockout costs
# most, stay the same.
HEADS_N = 64
KNOCKOUT_N = 64
REGIONS_N = 32
BOXES_N = 64


def demo_probes():
    """The demo's probes: does a layer's hidden state at the image tokens inside the named object's box
    encode the object's colour, and its shape (the manifest's ``box_color``, ``box_shape``)? And does the
    hidden state of the word naming the object come to hold the object's colour (read from the image)?"""
    from pipeline.probe import ProbeSpec

    return [ProbeSpec("box_color", "image-in-box", "hidden"), ProbeSpec("box_shape", "image-in-box", "hidden"),
            ProbeSpec("box_color", "word", "hidden")]


def add_probes(lake: Path, progress: bool = True) -> None:
    """Run :func:`demo_probes` on the demo run's stored vectors and write their rows to ``probes``."""
    from lake.catalog import Catalog
    from pipeline.probe import ProbeError, run_probe, write_probes

    cat = Catalog(lake, timeout_s=120)
    try:
        for spec in demo_probes():
            try:
                rows = run_probe(cat, RUN, spec)
            except ProbeError as e:  # e.g. a demo lake built before its manifest had box_color
                print(f"vlatlas: no demo probe {spec.key}: {e} (`vlatlas demo --rebuild` makes the lake anew)",
                      file=sys.stderr)
                continue
            write_probes(cat, RUN, rows)
            if progress:
                best = rows.loc[rows.value.idxmax()]
                print(f"vlatlas: probe {spec.key}: best {best.metric} {best.value:.3f} at layer {int(best.layer)} "
                      f"(control {best.control:.3f})", file=sys.stderr)
    finally:
        cat.close()


def demo_interventions() -> list[tuple[str, dict]]:
    """The demo's interventions (``vlatlas intervene --kind KIND`` with these options): every head ablated
    to its mean, exactly and by attribution patching's estimate on the same examples (which heads
    matter, and how well the estimate ranks them); text -> image and [CLS] -> image attention blocked
    one layer at a time (which layers carry the image to the answer); image patches removed by the best
    grounding head's attention, by rollout and at random (deletion and insertion curves), and each
    object's box removed."""
    return [("heads", {"ablate": "mean", "limit": HEADS_N}),
            ("heads", {"ablate": "mean", "estimate": True, "limit": HEADS_N}),
            ("knockout", {"sets": "text->image,last->image", "window": 1, "limit": KNOCKOUT_N}),
            ("regions", {"regions": "ranked", "methods": "attention,rollout,random", "limit": REGIONS_N}),
            ("regions", {"regions": "boxes", "limit": BOXES_N})]


def demo_intervention_key(kind: str, options: dict) -> str:
    """The ``interventions.intervention`` key of one of :func:`demo_interventions`."""
    from pipeline.intervene.spec import InterventionSpec

    return InterventionSpec.from_options(kind, **options).key


def _interventions_missing(lake: Path, row: dict) -> bool:
    """Whether some demo intervention lacks a chunk file (never run, or stopped part way)."""
    from pipeline.capture_config import Capture
    from pipeline.intervene.spec import InterventionSpec, chunk_of_file

    folder = lake / "interventions" / f"run={RUN}"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    chunk = Capture.from_json(row["capture"]).chunk_size
    n = int(row.get("n_examples") or 0)
    for kind, options in demo_interventions():
        spec = InterventionSpec.from_options(kind, **options)
        want = {i // chunk for i in range(min(n, spec.limit or n))}  # the demo's example ids are 0..n-1
        if not want <= {chunk_of_file(x, spec.digest) for x in names}:
            return True
    return False


def add_interventions(lake: Path, progress: bool = True) -> None:
    """Run :func:`demo_interventions` on the demo run (one model for all; each resumes where it stopped)."""
    from pipeline.intervene.run import intervene
    from pipeline.intervene.spec import InterventionError
    from pipeline.models import load_adapter

    row = read_run_row(lake, RUN)
    adapter = load_adapter(row["model"], dtype=row.get("dtype") or "float32", revision=row.get("revision"))
    for kind, options in demo_interventions():
        try:
            # every variant of an example in one forward pass (66: the ranked regions'; ~10% faster than 16)
            s = intervene(lake, RUN, kind, adapter=adapter, batch_size=66, progress=False, **options)
        except InterventionError as e:  # e.g. a demo lake built before its run held rollout
            print(f"vlatlas: no demo intervention {kind}: {e} (`vlatlas demo --rebuild` makes the lake anew)",
                  file=sys.stderr)
            continue
        if progress:
            print(f"vlatlas: {s.line()}", file=sys.stderr)


@contextmanager
def _one_thread():
    """Torch on one thread while the demo model runs: a 128-wide model on ~26 tokens gains nothing from a
    second thread, and on a busy 2-core machine the threads' spinning made extraction and the
    interventions 3-10x slower (measured: 1,000 scenes extracted in 10 s on one thread, 33 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_demo_lake(lake: Path, n: int = 1000, progress: bool = True, rebuild: bool = False,
                    model_dir: Path = MODEL_DIR, embed_maps: bool = True) -> Path:
    """Generate ``n`` held-out scenes, extract them into ``lake`` (run ``demo``), add the probes, the maps
    and the interventions."""
    with _one_thread():
        return _build(Path(lake), n, progress, rebuild, model_dir, embed_maps)


def _build(lake: Path, n: int, progress: bool, rebuild: bool, model_dir: Path, embed_maps: bool) -> Path:
    from pipeline.demo.shapes import write_dataset
    from pipeline.extraction.run import extract

    row = read_run_row(lake, RUN)
    if row and row["status"] == "complete" and not rebuild:
        print(f"vlatlas: reusing the demo lake in {lake} (pass --rebuild to make it anew)", file=sys.stderr)
        if not (lake / "probes" / f"run={RUN}").is_dir():  # a lake built before the demo had probes
            add_probes(lake, progress)
        if _interventions_missing(lake, row):  # built before the demo had interventions, or stopped in them
            add_interventions(lake, progress)
        return lake
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"the demo model is missing from {model_dir}; train it with `vlatlas demo train --out {model_dir}`"
        )
    data_dir = lake / "_demo_data"
    manifest = data_dir / "manifest.jsonl"
    if not manifest.exists() or rebuild:
        manifest = write_dataset(data_dir, n, DATA_SEED)
    # Every example's hidden vectors (a small model: about 20 MB more), so that the Hidden states page has
    # the map, the path and the neighbours of whichever example a visitor opens first; rollout (a few
    # seconds more) so that the regions intervention tests it beside the best head's attention.
    s = extract(str(model_dir), manifest, lake, RUN, batch_size=32, chunk_size=128, overwrite=rebuild,
                progress=progress, keep_hidden="all", explain="rollout")
    print(s.line(), file=sys.stderr)
    add_probes(lake, progress)
    if embed_maps:
        try:
            from pipeline.embed import embed
        except ImportError:  # the maps arrive with `vlatlas embed`
            embed = None
        if embed is not None:
            print(embed(lake, RUN, n_tokens=MAP_TOKENS, progress=progress).line(), file=sys.stderr)
    add_interventions(lake, progress)  # last: a build stopped here resumes them on the next `vlatlas demo`
    return lake
