"""A long run of wide layers through a real ``tensorboard``, with each loader: functional results only.

120 checkpoints (more than the Rust loader's default 100 points per series) of two
512-unit layers; timings are in ``benchmarks/scale.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import PLUGIN_API, get, served_runs, tensorboard_server, wait_for

CHECKPOINTS, UNITS, K = 120, 512, 9
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return write_synthetic_run(str(root / "wide"), checkpoints=CHECKPOINTS, layers=2, units=UNITS, k=K,
                               probe_size=1024, image_size=16, seed=5)


def _json(url: str) -> dict:
    status, content_type, body = get(url)
    assert status == 200 and content_type.startswith("application/json"), body[:300]
    return json.loads(body)


@pytest.mark.parametrize("load_fast", [True, False], ids=["rust_loader", "python_loader"])
def test_every_checkpoint_and_unit_of_a_long_wide_run_is_served(written, load_fast):
    with tensorboard_server(os.path.dirname(written.logdir), load_fast=load_fast) as url:
        api = url + PLUGIN_API
        run = wait_for(lambda: (runs := list(served_runs(api).values()))
                       and all(len(layer["steps"]) == CHECKPOINTS for layer in runs[0]["layers"]) and runs[0])
        assert run["steps"] == written.steps and run["error"] is None
        assert [(layer["name"], layer["units"]) for layer in run["layers"]] == [("conv1", UNITS), ("conv2", UNITS)]
        assert run["probe"]["stored_images"] == len(written.stored)

        evolution = _json(api + "evolution?run=wide&layer=conv2&unit=511")
        assert [c["step"] for c in evolution["checkpoints"]] == written.steps
        logged = written.records["conv2"][:, 511]["image"].tolist()
        assert [[r["image"] for r in c["records"]] for c in evolution["checkpoints"]] == logged

        step = written.steps[77]
        pages = [_json(api + f"topk?run=wide&layer=conv1&step={step}&offset={offset}&limit=200")
                 for offset in (0, 200, 400)]
        assert [len(p["units"]) for p in pages] == [200, 200, 112]
        assert [u["unit"] for p in pages for u in p["units"]] == list(range(UNITS))
        assert all(p["total_units"] == UNITS for p in pages)
        whole = _json(api + f"topk?run=wide&layer=conv1&step={step}")["units"]
        assert whole == [u for p in pages for u in p["units"]]
        assert [[r["image"] for r in u["records"]] for u in whole] == written.records["conv1"][77]["image"].tolist()

        status, content_type, _ = get(api + f"mosaic?run=wide&layer=conv2&step={written.steps[-1]}&unit=300")
        assert (status, content_type) == (200, "image/png")
