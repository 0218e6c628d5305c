"""How long each page of the app takes on the demo lake, in a real browser, and its screenshots.

``python bench/bench_pages.py [--lake DIR] [--screenshots DIR] [--repeats N]`` builds the demo
lake in DIR when it is missing (``vlatlas demo``'s lake: 1,000 held-out scenes, the committed demo
model, its t-SNE maps; the build's seconds are printed), starts ``streamlit run`` on 127.0.0.1 and
drives Debian's headless Chromium (``/usr/bin/chromium``, through Playwright) at 1400x900:

* the first page of a fresh server (imports, caches empty), then ``--read`` seconds on it (default
  5, a person reading it; the app imports and prepares what later pages need in the background);
* each page reached by its sidebar link, ``--repeats`` rounds (the first round fills the caches);
* a widget change on the Attention page (the layer slider, one step) and on the Hidden states page
  (the map's layer).

A page is interactive when its script run has finished (Streamlit's status widget is gone; the
0.5 s the check waits to be sure is taken off). Figures only: nothing is asserted. With
``--screenshots DIR`` it also saves what a new user sees on every page (the docs' pictures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import chromium, serve, settle  # noqa: E402

PAGES = ("Examples", "Head summary", "Attention", "Hidden states", "Compare", "SQL", "Probes", "Interventions")
SHOTS = {"Examples": "examples", "Head summary": "head_summary", "Attention": "attention",
         "Hidden states": "hidden_states", "Compare": "compare", "SQL": "sql", "Probes": "probes",
         "Interventions": "interventions"}
SETTLE_WAIT = 0.5  # settle() waits this long to see that the run has ended


def _timed(page, action) -> float:
    t = time.perf_counter()
    action()
    time.sleep(0.2)  # let the rerun start before looking for its end
    settle(page)
    return time.perf_counter() - t - SETTLE_WAIT


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lake", help="the demo lake (built here when missing; default: a temporary folder)")
    ap.add_argument("--screenshots", help="save a 1400x900 PNG of every page in this folder")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the pages (default 3)")
    ap.add_argument("--read", type=float, default=5.0,
                    help="seconds spent on the first page before the first click, as a person reading it "
                         "would (the app imports and prepares in the background meanwhile; default 5)")
    args = ap.parse_args(argv)

    from pipeline.demo.build import build_demo_lake

    tmp = None if args.lake else tempfile.TemporaryDirectory(prefix="vlatlas-pages-")
    lake = Path(args.lake or tmp.name) / ("" if args.lake else "demo_lake")
    t = time.perf_counter()
    build_demo_lake(lake, progress=False)
    print(f"demo lake ready in {time.perf_counter() - t:.1f} s ({lake})")

    with serve(lake) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        first = _timed(page, lambda: page.goto(url))
        print(f"first page of a fresh server (Examples): {first:.2f} s; then {args.read:g} s reading it")
        time.sleep(args.read)
        rounds: dict[str, list[float]] = {p: [] for p in PAGES}
        for r in range(args.repeats):
            for name in (*PAGES[1:], PAGES[0]):
                link = page.locator('[data-testid="stSidebarNav"] a', has_text=name).first
                rounds[name].append(_timed(page, link.click))
                if args.screenshots and r == args.repeats - 1:
                    time.sleep(1.5)  # charts finish drawing after the script run
                    out = Path(args.screenshots)
                    out.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(out / f"{SHOTS[name]}.png"))
        print("\nseconds from a sidebar click to a finished page (first round | median of the later rounds):")
        for name, ts in rounds.items():
            later = statistics.median(ts[1:]) if len(ts) > 1 else float("nan")
            print(f"  {name:14s} {ts[0]:5.2f} | {later:5.2f}")

        page.locator('[data-testid="stSidebarNav"] a', has_text="Attention").first.click()
        settle(page)
        slider = page.locator('[data-testid="stSlider"] input[type="range"]').first  # Layer
        slider.focus()
        step = [_timed(page, lambda: slider.press("ArrowLeft")) for _ in range(2)]
        page.locator('[data-testid="stSidebarNav"] a', has_text="Hidden states").first.click()
        settle(page)
        hslider = page.locator('[data-testid="stSlider"] input[type="range"]').first  # the map's layer
        hslider.focus()
        hstep = [_timed(page, lambda: hslider.press("ArrowRight")) for _ in range(2)]
        print("\nseconds from a widget change to a finished page: Attention layer "
              + ", ".join(f"{s:.2f}" for s in step) + "; Hidden states map layer "
              + ", ".join(f"{s:.2f}" for s in hstep))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
