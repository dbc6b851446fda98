"""End to end: a real ``tensorboard`` process, with each data loader, serving a 120-checkpoint run.

``tensorboard_server`` also fails the module's last test if the TensorBoard process
imported torch at any point while serving these requests.
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import PLUGIN_API, get, served_runs, tensorboard_server, wait_for

CHECKPOINTS = 120  # more than the Rust loader's default of 100 points per series


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("e2e")
    return write_synthetic_run(str(logdir / "train"), checkpoints=CHECKPOINTS, layers=2, units=4, k=4,
                               probe_size=32, image_size=16, seed=3)


@pytest.fixture(scope="module", params=[True, False], ids=["load_fast", "python_loader"])
def api(request, written):
    """Base URL of the plugin's routes once TensorBoard has loaded every checkpoint."""
    with tensorboard_server(os.path.dirname(written.logdir), load_fast=request.param) as url:
        base = url + PLUGIN_API
        wait_for(lambda: (runs := list(served_runs(base).values()))
                 and all(len(layer["steps"]) == CHECKPOINTS for layer in runs[0]["layers"]))
        yield base


def _json(url: str, status: int = 200) -> dict:
    got, content_type, body = get(url)
    assert got == status and content_type.startswith("application/json"), body[:300]
    return json.loads(body)


def _png(url: str) -> np.ndarray:
    status, content_type, body = get(url)
    assert status == 200 and content_type == "image/png", body[:300]
    return np.asarray(Image.open(io.BytesIO(body)))


def test_plugin_is_listed_and_active(api):
    listing = _json(api.replace("data/plugin/convviz/", "data/plugins_listing"))
    assert listing["convviz"]["enabled"] is True
    assert listing["convviz"]["tab_name"] == "ConvViz"


def test_every_checkpoint_is_served(api, written):
    (run,) = _json(api + "runs")["runs"]
    assert run["run"] == "train" and run["error"] is None
    assert run["steps"] == written.steps
    assert [layer["steps"] for layer in run["layers"]] == [written.steps, written.steps]
    assert run["probe"]["stored_images"] == len(written.stored)
    evolution = _json(api + "evolution?run=train&layer=conv2&unit=3")
    assert [c["step"] for c in evolution["checkpoints"]] == written.steps


def test_patch_pixels_equal_the_crop_computed_from_the_receptive_field(api, written):
    c = 57
    for layer in ("conv1", "conv2"):
        rf = written.fields[layer]
        for unit, rank in ((0, 0), (2, 3)):
            rec = written.records[layer][c][unit, rank]
            image = written.images[rec["image"]]
            top = math.floor(rf.offset[0] + rec["y"] * rf.stride[0] - (rf.size[0] - 1) / 2 + 0.5)
            left = math.floor(rf.offset[1] + rec["x"] * rf.stride[1] - (rf.size[1] - 1) / 2 + 0.5)
            padded = np.pad(image, ((64, 64), (64, 64), (0, 0)), constant_values=128)
            expected = padded[top + 64:top + 64 + rf.size[0], left + 64:left + 64 + rf.size[1]]
            got = _png(api + f"patch?run=train&layer={layer}&step={written.steps[c]}&unit={unit}&rank={rank}")
            np.testing.assert_array_equal(got, expected)


def test_mosaics_decode(api, written):
    rf = written.fields["conv2"]
    for step in (written.steps[0], written.steps[-1]):
        mosaic = _png(api + f"mosaic?run=train&layer=conv2&step={step}&unit=1")
        assert mosaic.shape == (2 * rf.size[0] + 1, 2 * rf.size[1] + 1, 4)  # k=4: 2x2
    assert _png(api + "mosaic?run=train&layer=conv1&unit=0&size=48").shape == (97, 97, 4)


def test_errors_are_json_with_the_reason(api):
    bad = _json(api + "topk?run=train&layer=conv1&step=later", status=400)
    assert bad == {"error": "Invalid argument: parameter 'step' must be an integer, got 'later'"}
    missing = _json(api + "topk?run=train&layer=conv7", status=404)
    assert missing == {"error": "Not found: run 'train' has no readable layer 'conv7'; layers: 'conv1', 'conv2'"}
