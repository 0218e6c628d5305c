"""Fixtures the app tests share."""

from __future__ import annotations

import pytest

from tests.browser import chromium


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (Debian's) for the module's browser tests, closed after them."""
    with chromium() as b:
        yield b


@pytest.fixture(scope="session")
def methods_lake(tmp_path_factory):
    """A tiny ViLT with a sink token, run ``ex`` of three scenes with every weight kept and
    ``--explain relevancy,rollout,value``: the lake the explanation methods' pages are read on
    (read only: the tests that share it never write to it)."""
    from tests.pipeline.test_explain import explained_run
    from tests.tiny import make_sink_vilt

    _, _, root = explained_run(make_sink_vilt, tmp_path_factory.mktemp("methods"), "ex", 3,
                               "relevancy,rollout,value", keep_attention="all", batch_size=3)
    return root


class Downloads(dict):
    """``{download button key: the data it was given}`` of the latest run, and ``names``: the file
    name each was offered under."""

    def __init__(self):
        super().__init__()
        self.names: dict[str, str] = {}


@pytest.fixture
def downloads(monkeypatch) -> Downloads:
    """What each of the app's download buttons was handed, filled as pages run."""
    from streamlit.elements.widgets.button import ButtonMixin

    got = Downloads()
    original = ButtonMixin.download_button

    def recording(self, label, data, *args, **kwargs):
        if kwargs.get("key") is not None:
            got[kwargs["key"]] = data
            got.names[kwargs["key"]] = kwargs.get("file_name")
        return original(self, label, data, *args, **kwargs)

    monkeypatch.setattr(ButtonMixin, "download_button", recording)
    return got
