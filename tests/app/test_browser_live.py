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
    assert "no answer given" in body and "answer None" not in body  # uploaded without an answer
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


def test_a_long_paste_is_kept_and_said_to_be_too_long(server, browser, vilt_lake):
    """3,000 characters pasted from the clipboard (Ctrl+V) stay in the field, a warning says at once that
    they are over the 2,000-character limit, and running says so too: never "the text is empty". The
    uploader states the app's own 20 MB limit. Nothing is written."""
    context = browser.new_context(viewport={"width": 1400, "height": 1400},
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server}/?run=tiny&ex=1")
    _settle(page)
    before = _files(vilt_lake)
    _open_form(page)
    limits = page.locator('[data-testid="stFileUploaderDropzoneInstructions"]').first.inner_text()
    assert "20MB per file" in limits and "200MB" not in limits, limits
    long = ("what color is the square " * 200)[:2999] + "?"
    page.evaluate("text => navigator.clipboard.writeText(text)", long)
    box = page.get_by_label("Question or text")
    box.click()
    box.press("Control+V")
    box.press("Enter")
    _settle(page)
    assert len(box.input_value()) == 3000  # the paste is kept whole
    page.wait_for_selector('text=/3,000 characters, more than the limit of 2,000/', timeout=30_000)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(
        files=[{"name": "scene.png", "mimeType": "image/png", "buffer": _png(7)}])
    page.wait_for_selector('text="scene.png"', timeout=30_000)
    page.get_by_role("button", name="Run the model and add the example").click()
    time.sleep(1)
    _settle(page)
    page.wait_for_selector('[data-testid="stAlertContentError"]', timeout=60_000)
    said = page.locator('[data-testid="stAlertContentError"]').first.inner_text()
    assert said.strip() == "The text has 3000 characters, more than the limit of 2000.", said
    body = page.inner_text("body")
    assert "empty" not in body.lower() and "Traceback" not in body
    assert len(page.get_by_label("Question or text").input_value()) == 3000
    assert _files(vilt_lake) == before
    assert not errors, errors
    context.close()
