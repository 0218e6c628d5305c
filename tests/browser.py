"""What the browser tests share: a real `streamlit run` server on loopback over a lake, headless
Debian chromium driven by Playwright (no browser is downloaded), and waiting for a script run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.tiny import free_port

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


def require_chromium() -> None:
    """Skip the module without Debian's chromium; on CI (where `make test` installs it) fail instead."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium for this test")
        pytest.skip("Debian's chromium is not installed (make test installs it)", allow_module_level=True)


def tiny_vilt_lake(tmp: Path) -> Path:
    """A lake of run ``tiny``: a tiny random ViLT (saved under ``tmp/model``, so a live example can load
    it again) over six scenes, extracted three at a time; returns the lake's root."""
    from pipeline.extraction.run import extract
    from tests.tiny import make_manifest, make_tiny_vilt

    model = make_tiny_vilt(tmp / "model")
    manifest = make_manifest(tmp / "data", 6)
    extract(str(model), manifest, tmp / "lake", "tiny", batch_size=3, progress=False)
    return tmp / "lake"


@contextlib.contextmanager
def serve(lake, env: dict | None = None):
    """`streamlit run streamlit_app/app.py` on 127.0.0.1 over ``lake``; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app" / "app.py"),
         "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=dict(os.environ, VLATLAS_LAKE=str(lake), **(env or {})),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + (proc.stdout.read() if proc.stdout else ""))
    try:
        yield url
    finally:
        stop(proc, 10)


def stop(proc: subprocess.Popen, wait_s: float) -> None:
    """Stop a server the test started: SIGTERM, then SIGKILL after ``wait_s`` seconds."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def chromium():
    """A headless chromium (Debian's), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


def settle(page, timeout_ms: int = 60_000) -> None:
    """Wait for the app's script run to finish: the page has its title, Streamlit's status widget is
    gone and the main block's text has stopped changing for half a second (the status widget only
    shows once a run has gone on for a moment, so its absence alone can come too early)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stSidebar"]', timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stMainBlockContainer"] h1', timeout=timeout_ms)
    main = '[data-testid="stMainBlockContainer"]'
    deadline = time.time() + timeout_ms / 1000
    last = None
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count()
        text = page.locator(main).first.inner_text() if not running else None
        if not running and text == last:
            return
        last = text
        time.sleep(0.5)


def open_page(browser, url: str, *, charts: bool = True, layout_s: float = 1.0, console: bool = False,
              **page_options):
    """A new tab on ``url``, its script run settled and no exception on the page: ``(page, problems)``,
    ``problems`` collecting the page's JavaScript errors (and, with ``console``, its console errors but
    for resources the sandboxed browser cannot fetch). With ``charts``, it also waits for a chart to be
    drawn and ``layout_s`` seconds more for vega to lay every chart out. ``page_options``: Playwright's
    ``new_page`` options (``viewport``, ``accept_downloads`` …)."""
    page = browser.new_page(**page_options)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    if console:
        page.on("console", lambda m: problems.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    page.goto(url)
    settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:2000]
    if charts:
        page.wait_for_selector('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg',
                               timeout=30_000)
        time.sleep(layout_s)
    return page, problems
