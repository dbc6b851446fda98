"""A diverged model in the ConvViz tab: its NaN/inf units read "not finite", not patches or "dead"."""

from __future__ import annotations

import warnings

import pytest
import torch

from browser_support import IDLE
from tb_convviz import ConvVizLogger, ProbeSet
from tb_server import tensorboard_server
from test_setups import LAYERS, diverged_net

pytestmark = pytest.mark.timeout(300)
RUN = "diverged"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("not_finite")
    probe = ProbeSet(torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ConvVizLogger(diverged_net(), probe, logdir / RUN, layers=LAYERS, k=4, steps=[0, 5]) as logger:
            for step in range(6):
                logger.maybe_log(step)
    with tensorboard_server(str(logdir), load_fast=True) as url:
        yield url


def test_grid_marks_not_finite_units(watched, server):
    page = watched.open(server, f"run={RUN}&layer=features.2")
    page.wait_for_selector(f".cv-grid{IDLE}")
    marked = page.eval_on_selector_all(".cv-tile.cv-not-finite", "els => els.map(e => e.dataset.unit)")
    assert marked == ["3"]
    tile = page.locator(".cv-tile[data-unit='3']")
    assert "not finite" in tile.inner_text() and "dead" not in tile.inner_text()
    assert not tile.locator(".cv-mosaic").is_visible()
    assert page.locator(".cv-tile[data-unit='0'] .cv-mosaic").is_visible()
    assert "1 not finite" in page.locator(".cv-summary").inner_text()
    watched.assert_clean()


def test_unit_view_says_not_finite(watched, server):
    page = watched.open(server, f"run={RUN}&layer=features.6&view=unit&unit=0")
    page.wait_for_selector(".cv-facts")
    facts = page.locator(".cv-facts").inner_text()
    assert "not finite" in facts and "dead" not in facts
    assert page.locator(".cv-unit-current .cv-mosaic").count() == 0
    assert page.locator(".cv-evo-col .cv-chip-dead").count() == 2  # both checkpoints
    watched.assert_clean()
