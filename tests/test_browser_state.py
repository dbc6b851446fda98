"""Crafted links and remembered state in real Chromium: the tab always comes back; names are bidi-isolated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from browser_support import IDLE, hash_state
from tb_convviz import ConvVizLogger, ProbeSet
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import tensorboard_server

RTL_LAYER = "\u202econv"  # a right-to-left override in a module name

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("state")
    write_synthetic_run(str(logdir / "a"), checkpoints=2, layers=1, units=4, k=4, probe_size=16, image_size=16)
    model = nn.Sequential()
    model.add_module(RTL_LAYER, nn.Conv2d(3, 4, 5, padding=2))
    torch.manual_seed(0)
    with ConvVizLogger(model, ProbeSet(torch.rand(8, 3, 16, 16)), str(logdir / "b"), layers=[RTL_LAYER], k=2,
                       steps=[0]) as logger:
        assert logger.log(0)
    with tensorboard_server(str(logdir), load_fast=True) as url:
        yield url


@pytest.mark.parametrize("view", ["toString", "__proto__", "constructor", "hasOwnProperty", "valueOf"])
def test_a_crafted_view_falls_back_to_the_grid_and_is_not_remembered(watched, server, view):
    page = watched.open(server, f"run=a&view={view}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert hash_state(page)["view"] == "grid"
    assert "view=grid" in page.evaluate("localStorage.getItem('convviz.state')")
    page.goto(server + "data/plugin_entry.html?name=convviz")  # TensorBoard's bare #convviz later
    page.wait_for_selector(f".cv-grid{IDLE}")
    watched.assert_clean()


def test_a_remembered_state_that_fails_to_render_is_forgotten(watched, server):
    page = watched.open(server, "run=a")
    page.wait_for_selector(f".cv-grid{IDLE}")
    # A state saved by an older version of the tab, which this one cannot show.
    page.evaluate("localStorage.setItem('convviz.state', 'view=__proto__&run=a&step=1e400&unit=-0')")
    page.goto(server + "data/plugin_entry.html?name=convviz")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert page.locator(".cv-loading").count() == 0
    assert "view=grid" in page.evaluate("localStorage.getItem('convviz.state')")
    watched.assert_clean()


def test_names_with_a_right_to_left_override_are_isolated(watched, server):
    page = watched.open(server, "run=b")
    page.wait_for_selector(f".cv-grid{IDLE}")
    tab = page.locator(".cv-tab-name", has_text="conv").first
    assert tab.evaluate("e => getComputedStyle(e).unicodeBidi") == "isolate"
    # The text after the name keeps its order: the field size still reads "RF 5×5".
    sub = page.locator(".cv-tab-sub", has=tab).first
    assert sub.inner_text().endswith("RF 5×5")
    watched.assert_clean()
