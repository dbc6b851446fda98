"""Fixtures shared by the browser tests (see ``browser_support.py``)."""

from __future__ import annotations

import shutil

import pytest

from browser_support import CHROMIUM, CHROMIUM_ARGS, Watched, unavailable
from trained_runs import serve_seeds, train_seeds


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


@pytest.fixture(scope="session")
def two_seeds(tmp_path_factory):
    """A log dir with two short real trainings of the demo net, runs ``seed0`` and ``seed1``."""
    root = tmp_path_factory.mktemp("seeds")
    train_seeds(root)
    return root


@pytest.fixture(scope="session")
def seeds_server(two_seeds):
    """A real TensorBoard (``--load_fast=true``) over ``two_seeds``."""
    with serve_seeds(two_seeds) as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def schedules_independent_of_machine_load():
    """Tests of schedules and records get every scheduled checkpoint, however loaded the machine.

    The overhead budget thins checkpoints by wall time; tests/test_budget.py tests it on a clock
    it controls, with the real grace.
    """
    from tb_convviz import budget

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget, "GRACE_SECONDS", float("inf"))
        yield
