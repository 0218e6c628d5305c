"""The Attention page's methods in a real browser (issue 24): `streamlit run` on loopback over a tiny
ViLT run with ``--explain relevancy,rollout,value`` and every weight stored, Debian's headless
Chromium driven by Playwright. What a user reads (captions, notes, the drawn legends) and the file a
click on "Download PNG" saves, per method; the texts' numbers are checked under AppTest in
tests/app/test_defects_attention.py."""

from __future__ import annotations

import re

import pytest

from tests.browser import open_page, require_chromium, serve

pytestmark = pytest.mark.browser
require_chromium()

RUN, EX = "ex", 1


@pytest.fixture(scope="module")
def lake(methods_lake):
    return methods_lake  # run "ex" (RUN)


@pytest.fixture(scope="module")
def server(lake):
    with serve(lake) as url:
        yield url


def _open(browser, url: str):
    return open_page(browser, url, viewport={"width": 1400, "height": 1400}, accept_downloads=True)


def _saved_name(page) -> str:
    """The file name the first chart's (Text → image's) "Download PNG" saves under."""
    with page.expect_download(timeout=60_000) as d:
        page.get_by_role("button", name="Download PNG").first.click()
    return d.value.suggested_filename


def test_each_method_reads_and_saves_as_itself(server, browser):
    base = f"{server}/attention?run={RUN}&ex={EX}&layer=1&head=1&tokens=1&patches=r0c0"
    names = {}
    for method in ("attention", "value", "rollout", "relevancy"):
        page, errors = _open(browser, f"{base}&method={method}")
        body = page.inner_text("body")
        names[method] = _saved_name(page)
        if method == "value":
            assert "value-weighted attention read query → key" in body
            assert "coloured by the value-weighted attention" in body and "colour = V[query, key]" in body
            assert "colour = A[query, key]." not in body and "of their value-weighted on" not in body
            assert "of their value-weighted attention on the text" in body  # the sink takes it all
        if method == "rollout":
            assert "rollout through layer 1 of 2" in body
            assert "Rollout is stored for text queries over image patches: see Text → image." in body
        if method == "relevancy":
            assert "relevancy over all 2 layers and 2 heads" in body
            assert "see Prediction → image and Prediction → text." in body
            assert "see Text → image" not in body and "Image → text." not in body
        if method != "attention":
            assert "layer 1 of 2 · head 1 of 2 · attention" not in body
        assert not errors, errors
        page.close()
    assert len(set(names.values())) == 4, names
    assert names["attention"] == f"attention-{RUN}-ex{EX}-self-L1-H1-text-image.png"
    assert names["value"] == f"value-weighted-{RUN}-ex{EX}-self-L1-H1-text-image.png"
    assert names["rollout"] == f"rollout-{RUN}-ex{EX}-self-L1-text-image.png"
    assert names["relevancy"] == f"relevancy-{RUN}-ex{EX}-self-prediction-image.png"


def test_a_stretched_legend_of_tiny_weights_reads_short_numbers(server, browser):
    """Layer 1, head 1: the text's rows put about 1e-4 on the text; stretched, the drawn legends read
    numbers of at most 3 significant digits, never "0.00000000"."""
    page, errors = _open(browser, f"{server}/attention?run={RUN}&ex={EX}&layer=1&head=1&tokens=1&patches=r0c0"
                                  "&stretch=true")
    labels = page.evaluate("""() => Array.from(document.querySelectorAll(
        '[data-testid="stVegaLiteChart"] svg text')).map(t => t.textContent)""")
    numbers = [t for t in labels if re.fullmatch(r"[-0-9.e]+", t)]
    assert numbers, labels
    for t in numbers:
        assert re.fullmatch(r"-?(0|[1-9]\d*(\.\d*[1-9])?|0\.\d*[1-9])(e-?\d+)?", t), (t, numbers)
        assert len(t.lstrip("-").split("e")[0].replace(".", "").lstrip("0")) <= 3, (t, numbers)
    assert not errors, errors
    page.close()
