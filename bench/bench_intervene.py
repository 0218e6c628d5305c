"""Head ablation batched against a loop of single hooked forwards, and how well attribution patching ranks heads.

``make bench-intervene`` (or ``python bench/bench_intervene.py``) loads the committed demo model
(``pipeline/demo/model``: a ViLT VQA model trained on the shapes world, 4 layers x 4 heads, 64 x 64
images, about 26 tokens), writes ``--n`` scenes with ``pipeline.demo.shapes.write_dataset`` (seed
``--seed``, not the demo lake's), encodes each once as ``vlatlas intervene`` does
(``extraction.inputs.prepare_batch``, the model's own score of its answer: ``Scorer.base``) and takes
each head's mean output over these examples (``chunk.head_means``, what ``--ablate mean`` replaces a
head's output by). Then, on the same examples, measured side by side in one run:

* ``batched``: ``vlatlas intervene --kind heads``'s own path (``chunk.head_rows``): an example's
  inputs repeated ``--batch-size`` times, one head ablated in each row by one ``HeadAblation`` hook;
* ``loop``: the loop a user would write: for each head, one forward of the example alone (a batch of
  one) under the same ``HeadAblation`` hook, ablating that head;
* ``estimate``: attribution patching (``chunk.estimate_heads``): one forward and one backward pass
  an example for every head's first-order effect.

Each is timed over all the examples (after an untimed warm-up example), ``--repeats`` times, alternating,
and the median is reported as heads ablated per second; ``batched`` and ``loop`` must give the same
``metric_after`` for every (example, head), and the largest difference is printed. Then the
estimate is compared with exact ablation (``batched``'s effects, ``metric_after - metric_before``),
for mean and for zero ablation: the Spearman correlation over the 16 heads of each example (the
mean over examples, and how many examples have an undefined one: every head with the same effect),
and over the heads' mean effects (one number over the 16 heads). Figures only: nothing is asserted
about timings (the run fails only when the two ways' scores differ by more than float rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_intervene.py` from the repo root
    sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="scenes (default 64)")
    ap.add_argument("--seed", type=int, default=7, help="the scenes' seed (default 7)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of each way, alternating (default 3)")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="heads ablated in one forward pass, batched (default 16: the demo model's every head)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the demo model is 128 wide; 0 keeps torch's default)")
    ap.add_argument("--model", default=str(ROOT / "pipeline" / "demo" / "model"))
    a = ap.parse_args(argv)
    if a.n < 2 or a.repeats < 1 or a.batch_size < 1:
        sys.exit("--n must be at least 2, --repeats and --batch-size at least 1")
    import torch

    threads = torch.get_num_threads()
    try:
        run(a)
    finally:
        torch.set_num_threads(threads)  # as it found it (the bench can run inside another process)


def run(a: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from pipeline.data import read_manifest
    from pipeline.demo.shapes import write_dataset
    from pipeline.extraction.inputs import prepare_batch, to_device
    from pipeline.intervene.chunk import InterventionWork, estimate_heads, head_means, head_rows
    from pipeline.intervene.engine import HeadAblation, base_rows, head_count, scorer_for, stream_layers
    from pipeline.intervene.spec import InterventionSpec
    from pipeline.models import load_adapter
    from pipeline.models.base import map_inputs

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    adapter = load_adapter(a.model, device=a.device)
    scorer = scorer_for(adapter)
    stream = "self"
    L, H = stream_layers(adapter, stream), head_count(adapter, stream)
    sites = [(stream, layer, h) for layer in range(L) for h in range(H)]
    layers = [(stream, layer) for layer in range(L)]
    dev = (torch.cuda.get_device_name() if a.device.startswith("cuda")
           else f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"head ablation on the demo model ({adapter.family}, {L} layers x {H} heads): device {a.device} ({dev}), "
          f"torch {torch.__version__}, {a.n} scenes (seed {a.seed}), batch {a.batch_size}, "
          f"load average {load0:.1f} at the start", flush=True)

    with tempfile.TemporaryDirectory(prefix="vlatlas-bench-intervene-") as tmp:
        rows = read_manifest(write_dataset(Path(tmp) / "data", a.n, a.seed))[0]
        t = time.perf_counter()
        bases = []
        for row in rows:
            item = prepare_batch(adapter, [row], set(), thumbnail=lambda li: b"")
            inputs = map_inputs(item["inputs"], lambda v: to_device(v, adapter.device))
            bases.append(scorer.base(inputs, item["images"][0], row.boxes, row.example_id))
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        np_means = head_means(adapter, rows, layers, adapter.device)
        t_means = time.perf_counter() - t
    means = {k: torch.as_tensor(v, device=adapter.device) for k, v in np_means.items()}
    print(f"  encoding and scoring each example once: {t_base:.2f} s; the heads' means (one pass): {t_means:.2f} s")

    spec = InterventionSpec.from_options("heads")
    work = InterventionWork(lake="", run="bench", spec=spec, device=adapter.device, batch_size=a.batch_size,
                            sites=tuple(sites), means=np_means)

    def batched(bs) -> np.ndarray:
        out = []
        for b in bs:
            out.append([r["metric_after"] for r in head_rows(scorer, work, b)])
        _sync(a.device)
        return np.array(out)

    def loop(bs) -> np.ndarray:
        out = []
        for b in bs:
            one = []
            for site in sites:
                with HeadAblation(adapter, [site], means)():
                    m, _ = scorer.after(b, base_rows(scorer, b), 1)
                one.append(m[0])
            out.append(one)
        _sync(a.device)
        return np.array(out)

    def estimate(bs, m) -> np.ndarray:
        out = []
        for b in bs:
            e = estimate_heads(scorer, b, layers, m)
            out.append([e[(s, layer)][h] for s, layer, h in sites])
        _sync(a.device)
        return np.array(out)

    ways = {"batched": batched, "loop": loop, "estimate": lambda bs: estimate(bs, means)}
    for fn in ways.values():  # warm-up
        fn(bases[:1])
    times: dict[str, list[float]] = {w: [] for w in ways}
    results = {}
    for _ in range(a.repeats):
        for w, fn in ways.items():
            t = time.perf_counter()
            results[w] = fn(bases)
            times[w].append(time.perf_counter() - t)
    heads = len(bases) * len(sites)
    med = {w: statistics.median(ts) for w, ts in times.items()}
    diff = float(np.abs(results["batched"] - results["loop"]).max())
    print(f"\nheads ablated per second ({len(bases)} examples x {len(sites)} heads = {heads:,} ablations; "
          f"median of {a.repeats} rounds):")
    print(f"  batched ({a.batch_size} heads a forward) {heads / med['batched']:9.1f} /s  ({med['batched']:.2f} s)")
    print(f"  loop (a forward a head)        {heads / med['loop']:9.1f} /s  ({med['loop']:.2f} s)")
    print(f"  batched / loop                 {med['loop'] / med['batched']:9.2f} x")
    print(f"  estimate (1 forward + 1 backward an example, every head) {heads / med['estimate']:9.1f} /s  "
          f"({med['estimate']:.2f} s; {med['loop'] / med['estimate']:.1f} x the loop)")
    print(f"  metric_after, batched vs loop: max |difference| {diff:.3g} over {results['batched'].size:,} values")
    if diff > 1e-3:  # float32 batched vs alone differ by ~1e-5; more is a wrong row, not rounding
        sys.exit(f"batched and loop ablations disagree by {diff:.3g}: a head's ablation leaks into another row")

    before = np.array([b.metric for b in bases])[:, None]
    zero_work = InterventionWork(lake="", run="bench", spec=InterventionSpec.from_options("heads", ablate="zero"),
                                 device=adapter.device, batch_size=a.batch_size, sites=tuple(sites), means=None)
    exact = {"mean": results["batched"] - before,
             "zero": np.array([[r["metric_after"] for r in head_rows(scorer, zero_work, b)] for b in bases]) - before}
    est = {"mean": results["estimate"], "zero": estimate(bases, None)}
    print(f"\nattribution patching against exact ablation, Spearman over the {len(sites)} heads:")
    for ablate in ("mean", "zero"):
        x, y = exact[ablate], est[ablate]
        per = np.array([spearmanr(x[i], y[i]).statistic if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0 else np.nan
                        for i in range(len(x))])
        over = spearmanr(x.mean(0), y.mean(0)).statistic
        top = int(np.argmin(x.mean(0)))
        print(f"  {ablate} ablation: per example, mean {np.nanmean(per):.3f} (median {np.nanmedian(per):.3f}, "
              f"{int(np.isnan(per).sum())} of {len(per)} undefined); of the heads' mean effects {over:.3f}; "
              f"the head that matters most (L{sites[top][1]}.H{sites[top][2]}, mean effect {x.mean(0)[top]:+.3f}) "
              f"estimated {y.mean(0)[top]:+.3f}, ranked {int((y.mean(0) < y.mean(0)[top]).sum()) + 1} of {len(sites)}")
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s (load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
