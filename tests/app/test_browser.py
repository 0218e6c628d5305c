"""The app in a real browser: `streamlit run` on a lake built from a tiny random ViLT, every page
opened in headless Chromium (Debian's package, driven by Playwright; no browser is downloaded).

Set VLATLAS_SCREENSHOTS=DIR to keep a PNG of every page.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.browser import open_page, require_chromium, serve, settle, tiny_vilt_lake

PAGES = {"": "Examples", "head_summary": "Head summary", "attention": "Attention"}

pytestmark = pytest.mark.browser
require_chromium()
_settle = settle


@pytest.fixture(scope="module")
def vilt_lake(tmp_path_factory):
    return tiny_vilt_lake(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def server(vilt_lake):
    with serve(vilt_lake) as url:
        yield url


@pytest.mark.parametrize("path,title", list(PAGES.items()))
def test_every_page_draws_its_charts(server, browser, path, title, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server}/{path}?run=tiny&ex=1")
    _settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:2000]
    if path:  # the chart pages: vega draws into a canvas or an svg inside each chart element
        page.wait_for_selector('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg',
                               timeout=30_000)
        drawn = page.locator('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg')
        assert drawn.count() >= 1
        box = drawn.first.bounding_box()
        assert box and box["width"] > 50 and box["height"] > 50
    else:  # the examples table
        page.wait_for_selector('[data-testid="stDataFrame"], [data-testid="stTable"]', timeout=30_000)
    if path == "attention":  # the image with its heatmap overlay
        # (Streamlit draws small charts as SVG: the picture is an <image> inside the chart's svg)
        page.wait_for_selector('[data-testid="stImage"] img, [data-testid="stVegaLiteChart"] canvas, '
                               '[data-testid="stVegaLiteChart"] svg image', timeout=30_000)
    assert "random weights" in page.inner_text("body")
    assert not errors, errors
    out = os.environ.get("VLATLAS_SCREENSHOTS")
    shot = (Path(out) if out else tmp_path) / f"page-{path or 'examples'}.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_shared_url_restores_the_view(server, browser):
    """A URL with run, example, layer and head opens the attention page on that view."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/attention?run=tiny&ex=2&layer=1&head=1")
    _settle(page)
    body = page.inner_text("body")
    assert page.locator('[data-testid="stException"]').count() == 0, body[:2000]
    assert "#2" in body
    assert "ex=2" in page.url and "layer=1" in page.url and "head=1" in page.url
    page.close()


def _open(browser, url: str):
    return open_page(browser, url, layout_s=0, viewport={"width": 1400, "height": 1400})


def _selectbox_value(page, label: str) -> str:
    return page.locator(f'input[role="combobox"][aria-label="{label}"]').first.input_value()


def _checked_radio(page, label: str) -> str:
    return page.locator(f'[role="radiogroup"][aria-label="{label}"] label[data-selected="true"]').first.inner_text()


def _pressed_pills(page, label: str) -> list[str]:
    return [b.inner_text() for b in page.locator(f'[role="toolbar"][aria-label="{label}"] '
                                                 'button[aria-pressed="true"]').all()]


def test_shared_url_restores_every_selection(server, browser):
    """URLs naming a statistic, a normalisation, a scope, a head, query tokens and patches open
    with exactly those selections shown by the widgets (as another person's browser would)."""
    page, errors = _open(browser, f"{server}/head_summary?run=tiny&ex=1&stat=entropy&norm=z_example"
                                  f"&scope=example&layer=1&head=1")
    assert _selectbox_value(page, "Statistic") == "entropy"
    assert _checked_radio(page, "Normalisation").startswith("z-score across layers")
    assert _checked_radio(page, "Of").startswith("example")  # the run mean is the default
    body = page.inner_text("body")
    assert "layer 1, head 1" in body and "Top examples for layer 1, head 1" in body
    for key, value in (("stat", "entropy"), ("norm", "z_example"), ("scope", "example"), ("layer", "1"),
                       ("head", "1")):
        assert f"{key}={value}" in page.url, page.url
    assert not errors, errors
    page.close()

    page, errors = _open(browser, f"{server}/attention?run=tiny&ex=2&layer=1&head=1&tokens=1,2&patches=r0c1,r1c2")
    assert _selectbox_value(page, "Head") == "head 1"
    assert [p.split(" ·")[0] for p in _pressed_pills(page, "Query text tokens")] == ["1", "2"]
    assert page.locator('input[type="range"][aria-label="Layer"]').first.input_value() == "1"
    body = page.inner_text("body")
    assert "#2" in body and "the selected patch(es) r0c1, r1c2" in body
    assert "averaged over the 2 selected queries" in body  # the two query tokens of the URL
    assert "tokens=1%2C2" in page.url or "tokens=1,2" in page.url, page.url
    assert not errors, errors
    page.close()

    sql = "SELECT layer, head, avg(value) AS t2i FROM head_stats WHERE stat = 't2i' GROUP BY ALL ORDER BY ALL"
    page, errors = _open(browser, f"{server}/sql?run=tiny&sql={urllib.parse.quote(sql)}")
    assert page.locator("textarea").first.input_value() == sql
    assert page.locator('[data-testid="stDataFrame"]').count() >= 1
    assert "Download PNG" in page.inner_text("body") and "Download Parquet" in page.inner_text("body")
    assert not errors, errors
    page.close()
