"""Two short real trainings of the demo net (seeds 0 and 1) and a TensorBoard over them.

Shared by the matching and tab tests through the session fixtures ``two_seeds`` and
``seeds_server`` of ``conftest.py`` (defined there so that a session trains once). The
runs are small (32-px synthetic shapes, width-8 net, one epoch of 8 steps, 128 probe
images) yet have the demo net's real receptive fields (7, 27, 51, 67, 83 px), which the
layout tests need.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Iterator

from tb_server import get, tensorboard_server, wait_for

SEEDS = (0, 1)
PROBE = 128


def train_seeds(root: pathlib.Path) -> None:
    import torch

    from tb_convviz.demo.data import load_data
    from tb_convviz.demo.model import DemoAlexNet
    from tb_convviz.demo.train import train

    data = load_data("synthetic", size=32, limit=(512, PROBE))
    for seed in SEEDS:
        torch.manual_seed(seed)
        train(DemoAlexNet(num_classes=len(data.class_names), width=8), data, root / f"seed{seed}",
              epochs=1, batch_size=64, probe_size=PROBE, seed=seed)


@contextlib.contextmanager
def serve_seeds(root: pathlib.Path) -> Iterator[str]:
    """A TensorBoard over ``root`` once it lists both runs with their probe sets and five layers."""
    with tensorboard_server(str(root), load_fast=True) as url:
        def loaded():
            status, _, body = get(url + "data/plugin/convviz/runs")
            runs = json.loads(body)["runs"] if status == 200 else []
            return len(runs) == 2 and all(r["probe"] and len(r["layers"]) == 5 for r in runs)

        wait_for(loaded)
        yield url
