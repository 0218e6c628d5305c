"""A live example through a real browser: `streamlit run` on a lake built from a tiny random ViLT (loopback
only), Debian's headless Chromium driven by Playwright (no browser is downloaded). The PNG goes through
Streamlit's own upload endpoint, as a user's would."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from tests.browser import require_chromium, serve, settle, tiny_vilt_lake
from tests.tiny import noise_image

pytestmark = pytest.mark.browser
require_chromium()


@pytest.fixture(scope="module")
def vilt_lake(tmp_path_factory):
    return tiny_vilt_lake(tmp_path_factory.mktemp("browser_live"))


@pytest.fixture(scope="module")
def server(vilt_lake):
    with serve(vilt_lake, env={"HF_HUB_OFFLINE": "1"}) as url:
        yield url


def _settle(page) -> None:
    settle(page, timeout_ms=90_000)  # a live example runs the model inside the script run


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image((64, 64), seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def _files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _open_example_1(browser, server):
    """A new page on example 1 of run ``tiny``, settled, and the list its page errors go to."""
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server}/?run=tiny&ex=1")
    _settle(page)
    return page, errors


def _open_form(page):
    page.get_by_text("Add a live example").first.click()
    page.wait_for_selector('[data-testid="stFileUploaderDropzoneInput"]', state="attached", timeout=30_000)


def _fill(page, name: str, data: bytes, text: str) -> None:
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(
        files=[{"name": name, "mimeType": "image/png", "buffer": data}])
    page.wait_for_selector(f'text="{name}"', timeout=30_000)  # the upload finished
    box = page.get_by_label("Question or text")
    box.fill(text)
    box.press("Enter")
    _settle(page)
    page.get_by_role("button", name="Run the model and add the example").click()
    time.sleep(1)
    _settle(page)


def test_a_bad_upload_says_why_and_changes_nothing(server, browser, vilt_lake):
    page, errors = _open_example_1(browser, server)
    before = _files(vilt_lake)
    _open_form(page)
    _fill(page, "fake.png", b"this is not an image, whatever its name says", "what color is the circle ?")
    page.wait_for_selector('[data-testid="stAlertContentError"]', timeout=60_000)
    body = page.inner_text("body")
    assert "not an image" in body and "Traceback" not in body
    assert page.locator('[data-testid="stException"]').count() == 0
    assert _files(vilt_lake) == before
    assert "ex=1" in page.url
    assert not errors, errors
    page.close()


def test_upload_adds_and_selects_the_example(server, browser, vilt_lake):
    page, errors = _open_example_1(browser, server)
    _open_form(page)
    _fill(page, "scene.png", _png(5), "what color is the square ?")
    page.wait_for_selector('text=/Added live example #6/', timeout=120_000)
    _settle(page)
    body = page.inner_text("body")
    assert page.locator('[data-testid="stException"]').count() == 0, body[:2000]
    assert "Selected: #6" in body and "live-6" in body and "the model predicts" in body
    assert "ex=6" in page.url, page.url
    assert "of 7 examples" in body
    # the table lists it (read from the grid's accessible cells: the grid itself is drawn on a canvas)
    page.wait_for_selector('[data-testid="stDataFrame"] td', state="attached", timeout=30_000)
    cells = [c.strip() for c in page.locator('[data-testid="stDataFrame"] td').all_text_contents()]
    assert any(c.startswith("live-6-") for c in cells), cells[-12:]
    assert "what color is the square ?" in cells and "live" in cells, cells[-12:]
    assert (vilt_lake / "_state" / "tiny" / "chunk-000001.done").exists()
    assert not errors, errors
    page.close()
