"""`make bench-intervene` runs end to end on a couple of scenes, and its batched and looped ablations agree."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pipeline.demo.build import MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason="the demo model is not committed")
def test_bench_prints_every_figure_and_the_two_ways_agree(capsys):
    spec = importlib.util.spec_from_file_location("bench_intervene", ROOT / "bench" / "bench_intervene.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import torch

    threads = torch.get_num_threads()
    bench.main(["--n", "3", "--repeats", "1"])
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    for what in ("batched (16 heads a forward)", "loop (a forward a head)", "batched / loop", "estimate (1 forward",
                 "mean ablation: per example", "zero ablation: per example"):
        assert what in out, what
    assert "3 examples x 16 heads = 48 ablations" in out
    diff = float(re.search(r"max \|difference\| (\S+) over 48 values", out).group(1))
    assert diff < 1e-4
