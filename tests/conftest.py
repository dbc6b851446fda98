"""Fixtures shared by the browser tests (see ``browser_support.py``)."""

from __future__ import annotations

import shutil

import pytest

from browser_support import CHROMIUM, CHROMIUM_ARGS, Watched, unavailable


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("Playwright is not installed: pip install playwright")
    if not shutil.which(CHROMIUM):
        unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as e:
            unavailable(f"Chromium at {CHROMIUM} does not start: {e}")
        yield chromium
        chromium.close()


@pytest.fixture
def watched(browser):
    w = Watched(browser)
    yield w
    w.context.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy zoo checks (run by CI too); alone: pytest -m slow")
