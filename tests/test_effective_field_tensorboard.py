"""Deep layers of modern nets show image, not padding: default patches served by a real TensorBoard.

torchvision resnet18 at 64 px, efficientnet_b0 and convnext_tiny at 96 px (random init): the
last logged layer's theoretical field is many times the image, so its theoretical crops are
nearly all padding; the default crops (the effective field, kept inside the image) must be at
most 25% padding. Padding is measured honestly: each served patch is checked pixel for pixel
against the crop of its box, and the padding is the share of the box's pixels outside the image.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_server import PLUGIN_API, get, served_runs, tensorboard_server, wait_for

MODELS = {"resnet18": 64, "efficientnet_b0": 96, "convnext_tiny": 96}
UNITS, K = 8, 3  # 24 patches per model
MAX_PADDING = 0.25


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("erf_zoo")
    for name, side in MODELS.items():
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        probe = ProbeSet(torch.rand(16, 3, side, side, generator=torch.Generator().manual_seed(1)))
        with ConvVizLogger(model, probe, root / name, k=K, projections=None, steps=[0]) as logger:
            assert logger.log(0)
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["load_fast", "python_loader"])
def api(request, logdir):
    with tensorboard_server(str(logdir), load_fast=request.param) as url:
        base = url + PLUGIN_API
        wait_for(lambda: len(runs := served_runs(base)) == len(MODELS)
                 and all(layer["steps"] for r in runs.values() for layer in r["layers"]))
        yield base


def _png(url: str) -> np.ndarray:
    status, content_type, body = get(url)
    assert status == 200 and content_type == "image/png", body[:300]
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def _box(run, layer, size, y, x, side, inside):
    """The crop box, computed here from scratch: centred on the unit, then (effective) moved inside the image."""
    rf = run.layer(layer).receptive_field
    box = []
    for axis, pos in ((0, y), (1, x)):
        centre = rf.offset[axis] + pos * rf.stride[axis]
        start = math.floor(centre - (size[axis] - 1) / 2 + 0.5)
        if inside:
            start = min(max(start, 0), side - size[axis])
        box.append(start)
    return box[0], box[1], box[0] + size[0], box[1] + size[1]


def _padding(box, side) -> tuple[int, int]:
    """(pixels of the box outside a side x side image, pixels of the box)."""
    top, left, bottom, right = box
    inside = max(0, min(bottom, side) - max(top, 0)) * max(0, min(right, side) - max(left, 0))
    area = (bottom - top) * (right - left)
    return area - inside, area


@pytest.mark.parametrize("name", list(MODELS))
def test_deepest_layer_patches_are_mostly_image(api, logdir, name):
    side = MODELS[name]
    run = read_run(logdir / name)
    layer = run.layers[-1].name
    step = run.steps[-1]
    effective = run.effective_field(layer, step)
    theoretical = run.layer(layer).receptive_field.size
    assert effective is not None and effective[0] <= theoretical[0] and effective[1] <= theoretical[1]
    records = run.topk(layer, step)
    counts = {"effective": [0, 0], "theoretical": [0, 0]}
    for unit in range(UNITS):
        for rank in range(K):
            y, x, image = int(records.y[unit, rank]), int(records.x[unit, rank]), int(records.image[unit, rank])
            for field in counts:
                size = theoretical if field == "theoretical" else (min(effective[0], side), min(effective[1], side))
                box = _box(run, layer, size, y, x, side, inside=field == "effective")
                url = f"{api}patch?run={name}&layer={layer}&step={step}&unit={unit}&rank={rank}"
                got = _png(url if field == "effective" else url + "&field=theoretical")
                pixels = run.probe_image(image)
                padded = np.full((box[2] - box[0], box[3] - box[1], 3), 128, np.uint8)
                t, l, b, r = max(box[0], 0), max(box[1], 0), min(box[2], side), min(box[3], side)
                padded[t - box[0]:b - box[0], l - box[1]:r - box[1]] = pixels[t:b, l:r]
                if max(got.shape[:2]) == max(padded.shape[:2]):  # the served patch is the box's crop exactly
                    np.testing.assert_array_equal(got, padded)
                else:  # downscaled to the server's pixel budget: the box's shape is kept
                    assert got.shape[0] * padded.shape[1] == pytest.approx(got.shape[1] * padded.shape[0], rel=0.05)
                outside, area = _padding(box, side)
                counts[field][0] += outside
                counts[field][1] += area
    share = {field: outside / area for field, (outside, area) in counts.items()}
    assert share["effective"] <= MAX_PADDING, share
    assert share["theoretical"] > 0.5, share  # what the switch still shows: today's mostly grey tiles
