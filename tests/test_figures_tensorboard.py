"""Projections and filters through a real ``tensorboard`` process, with each data loader."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz import projection_format as fmt
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import PLUGIN_API, get, served_runs, tensorboard_server, wait_for

STEPS = [0, 3, 7]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures_tb")
    torch.manual_seed(1)
    model = DemoAlexNet(width=8)
    probe = ProbeSet(torch.rand(16, 3, 64, 64))
    with ConvVizLogger(model, probe, root / "new", layers=["features.relu1", "features.relu3"], k=3,
                       steps=STEPS, projection_rule="guided", projections_topk_every=2) as logger:
        for step in STEPS:
            with torch.no_grad():
                model.features.conv1.weight.mul_(1.2)
            assert logger.log(step)
    write_synthetic_run(str(root / "old"), checkpoints=2, units=4, k=3, probe_size=16)
    return root


@pytest.fixture(scope="module", params=[True, False], ids=["load_fast", "python_loader"])
def api(request, logdir):
    with tensorboard_server(str(logdir), load_fast=request.param) as url:
        base = url + PLUGIN_API

        def loaded():
            runs = served_runs(base)
            return len(runs) == 2 and runs["new"]["filters"] and runs["new"]["filters"]["steps"] == STEPS and all(
                (layer["projections"] or {}).get("steps") == STEPS for layer in runs["new"]["layers"])

        wait_for(loaded)
        yield base


def _get(url, status=200):
    got, content_type, body = get(url)
    assert got == status, body[:300]
    return np.asarray(Image.open(io.BytesIO(body))) if content_type == "image/png" else json.loads(body)


def test_listing(api):
    runs = {r["run"]: r for r in _get(api + "runs")["runs"]}
    for layer in runs["new"]["layers"]:
        assert layer["projections"]["rule"] == "guided"
        assert layer["projections"]["topk_steps"] == [0, 7]  # every 2nd checkpoint, from the first
    assert runs["old"]["filters"] is None
    assert all(layer["projections"] is None for layer in runs["old"]["layers"])


def test_projections_and_filters_match_read_run(api, logdir):
    run = read_run(logdir / "new")
    for layer in run.layers:
        for step in STEPS:
            for unit, rank in [(0, 0), (layer.units - 1, 0)] + ([(1, 2)] if step != 3 else []):
                query = f"projection?run=new&layer={layer.name}&step={step}&unit={unit}&rank={rank}"
                whole = _get(api + query + "&field=theoretical")
                want = fmt.quantize(run.projection(layer.name, step, unit, rank))[0]
                np.testing.assert_array_equal(whole.transpose(2, 0, 1), want)
                # By default, on the crop the tab shows: the effective field, kept inside the image.
                image = _get(api + query)
                np.testing.assert_array_equal(image.transpose(2, 0, 1), run.projection_pixels(
                    layer.name, step, unit, rank, field=run.crop(layer.name, step)))
    data = _get(api + "filters?run=new&step=3")
    np.testing.assert_allclose(data["rms"], fmt.filter_rms(run.filters(3)), rtol=1e-6)
    assert data["module"] == "features.conv1"


def test_old_run_says_not_logged(api):
    old = {r["run"]: r for r in _get(api + "runs")["runs"]}["old"]
    layer = old["layers"][0]["name"]
    assert "not logged in this run" in _get(api + f"projection?run=old&layer={layer}&unit=0", 404)["error"]
    assert "not logged in this run" in _get(api + "filters?run=old", 404)["error"]
    assert _get(api + f"topk?run=old&layer={layer}")["units"]  # still opens
