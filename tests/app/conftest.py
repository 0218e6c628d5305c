"""Fixtures the app tests share."""

from __future__ import annotations

import pytest

from tests.browser import chromium


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (Debian's) for the module's browser tests, closed after them."""
    with chromium() as b:
        yield b
