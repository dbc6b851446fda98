"""The unit view says when a receptive field is the whole probe image (real logger, TensorBoard, Chromium)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet
from browser_support import IDLE
from tb_server import get, tensorboard_server, wait_for

RUN = "fields"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("fields")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 7, padding=3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    torch.manual_seed(0)
    probe = ProbeSet(torch.rand(8, 3, 8, 8))
    # Fields 3×3 (local), 9×9 (more than the 8×8 images) and global (fully connected).
    with ConvVizLogger(model, probe, str(logdir / RUN), layers=["1", "3", "6"], k=2, steps=[0]) as logger:
        assert logger.log(0)
    with tensorboard_server(str(logdir), load_fast=False) as url:
        wait_for(lambda: get(url + "data/plugin/convviz/runs")[0] == 200 and json.loads(
            get(url + "data/plugin/convviz/runs")[2])["runs"])
        yield url


@pytest.mark.parametrize("layer, note", [
    ("1", None),
    ("3", "The receptive field (9×9 px) covers the whole 8×8 probe image"),
    ("6", "Every unit of this layer sees the whole probe image (a global receptive field)"),
])
def test_unit_view_says_when_the_field_is_the_whole_image(watched, server, layer, note):
    page = watched.open(server, f"view=unit&run={RUN}&layer={layer}&step=0&unit=0")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    notes = page.locator(".cv-unit-head .cv-field-note")
    if note is None:
        assert notes.count() == 0
    else:
        assert note in notes.inner_text()
    watched.assert_clean()
