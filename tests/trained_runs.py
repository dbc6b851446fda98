"""Two short real trainings of the demo net (seeds 0 and 1) and a TensorBoard over them.

Shared by the matching and tab tests through the session fixtures ``two_seeds`` and
``seeds_server`` of ``conftest.py`` (defined there so that a session trains once). The
runs are small (32-px synthetic shapes, width-8 net, 8 steps, 128 probe images) yet log
the demo net's five conv layers with their real receptive fields (7, 27, 51, 67, 83 px),
which the layout tests need.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Iterator

from tb_server import get, tensorboard_server, wait_for

SEEDS = (0, 1)
PROBE = 128


LAYERS = [f"features.relu{i}" for i in range(1, 6)]
STEPS = 8


def train_seeds(root: pathlib.Path) -> None:
    """Train the demo net for a few steps from each seed, logging its five conv layers at every step."""
    import torch
    import torch.nn.functional as F

    from tb_convviz import ConvVizLogger, ProbeSet
    from tb_convviz.demo.data import load_data
    from tb_convviz.demo.model import DemoAlexNet

    data = load_data("synthetic", size=32, limit=(512, PROBE))
    # The same probe images for both seeds, so that the runs compare.
    probe = ProbeSet.from_dataset(data.test, n=PROBE, seed=0, mean=data.mean, std=data.std, class_names=data.class_names)
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = DemoAlexNet(num_classes=len(data.class_names), width=8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        with ConvVizLogger(model, probe, root / f"seed{seed}", layers=LAYERS, k=9, every_n_steps=1) as logger:
            logger.maybe_log(0)
            for step, (images, labels) in enumerate(loader, start=1):
                model.train()
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                logger.maybe_log(step)
                if step == STEPS:
                    break


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
