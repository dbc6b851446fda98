"""Integer labels without class names (FakeData, a Subset) show as "class N" in real Chromium, not as "–"."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet
from browser_support import IDLE
from tb_server import get, tensorboard_server, wait_for

LAYER = "0"
UNIT = 2

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("labels")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    images = torch.rand(24, 3, 12, 12)
    for run, labels in (("numbers", [i % 5 for i in range(24)]), ("unlabelled", None)):
        with ConvVizLogger(model, ProbeSet(images, labels=labels), logdir / run, layers=[LAYER], k=6) as logger:
            assert logger.log(0)
    with tensorboard_server(str(logdir), load_fast=True) as url:
        wait_for(lambda: len(json.loads(get(url + "data/plugin/convviz/runs")[2])["runs"]) == 2)
        yield url


def records(server, run):
    status, _, body = get(f"{server}data/plugin/convviz/topk?run={run}&layer={LAYER}&step=0")
    assert status == 200
    return json.loads(body)["units"][UNIT]["records"]


def test_integer_labels_show_in_the_unit_view_and_the_probe_image(watched, server):
    shown = records(server, "numbers")
    assert all(r["label"] is not None and r["label_name"] is None for r in shown)  # what the API gives
    expected = collections.Counter(f"class {r['label']}" for r in shown)

    page = watched.open(server, f"view=unit&run=numbers&layer={LAYER}&unit={UNIT}")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    names = page.locator(".cv-hist-label").all_inner_texts()
    counts = [int(c) for c in page.locator(".cv-hist-count").all_inner_texts()]
    assert dict(zip(names, counts)) == expected
    assert "without class labels" not in page.locator(".cv-unit-body").inner_text()
    alt = page.locator(".cv-unit-current .cv-mosaic").get_attribute("alt")
    assert "1: " in alt and f"class {shown[0]['label']}" in alt

    page.locator(".cv-evo-patch").first.click()
    dialog = page.locator("dialog.cv-dialog")
    dialog.wait_for()
    facts = dict(zip(dialog.locator("dt").all_inner_texts(), dialog.locator("dd").all_inner_texts()))
    assert facts["Label"] == f"class {shown[0]['label']}"
    watched.assert_clean()


def test_a_probe_set_without_labels_says_so(watched, server):
    assert all(r["label"] is None for r in records(server, "unlabelled"))
    page = watched.open(server, f"view=unit&run=unlabelled&layer={LAYER}&unit={UNIT}")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert "The probe set was logged without class labels." in page.locator(".cv-unit-body").inner_text()
    page.locator(".cv-evo-patch").first.click()
    dialog = page.locator("dialog.cv-dialog")
    dialog.wait_for()
    facts = dict(zip(dialog.locator("dt").all_inner_texts(), dialog.locator("dd").all_inner_texts()))
    assert facts["Label"] == "–"
    watched.assert_clean()
