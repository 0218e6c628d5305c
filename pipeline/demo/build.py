"""Build the demo lake: held-out shapes scenes extracted with the committed demo model.

``vlatlas demo`` calls :func:`build_demo_lake`; a lake whose demo run is
complete is reused as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lake.commit import read_run_row

MODEL_DIR = Path(__file__).resolve().parent / "model"
RUN = "demo"
DATA_SEED = 2_000_003  # neither the training seed nor the model card's evaluation seed
# Tokens on each demo map: the shapes world has few kinds of token, and 3,000 show its structure as
# well as `vlatlas embed`'s default 5,000 while keeping the demo lake's build under a minute on 2 cores.
MAP_TOKENS = 3000


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


def build_demo_lake(lake: Path, n: int = 1000, progress: bool = True, rebuild: bool = False,
                    model_dir: Path = MODEL_DIR, embed_maps: bool = True) -> Path:
    """Generate ``n`` held-out scenes, extract them into ``lake`` (run ``demo``), add the probes and the maps."""
    from pipeline.demo.shapes import write_dataset
    from pipeline.extraction.run import extract

    lake = Path(lake)
    row = read_run_row(lake, RUN)
    if row and row["status"] == "complete" and not rebuild:
        print(f"vlatlas: reusing the demo lake in {lake} (pass --rebuild to make it anew)", file=sys.stderr)
        if not (lake / "probes" / f"run={RUN}").is_dir():  # a lake built before the demo had probes
            add_probes(lake, progress)
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
    # the map, the path and the neighbours of whichever example a visitor opens first.
    s = extract(str(model_dir), manifest, lake, RUN, batch_size=32, chunk_size=128, overwrite=rebuild,
                progress=progress, keep_hidden="all")
    print(s.line(), file=sys.stderr)
    add_probes(lake, progress)
    if embed_maps:
        try:
            from pipeline.embed import embed
        except ImportError:  # the maps arrive with `vlatlas embed`
            return lake
        print(embed(lake, RUN, n_tokens=MAP_TOKENS, progress=progress).line(), file=sys.stderr)
    return lake
