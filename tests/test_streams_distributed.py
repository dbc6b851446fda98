"""Streams under DDP: 2 gloo ranks, each ranking its own batches, record what one process fed the union records."""

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, read_run

WORLD = 2
LAYERS = ["conv1", "relu2"]
STEPS = [1, 3]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.conv1(x))).mean(dim=(2, 3)))


def probe():
    return ProbeSet(torch.rand(10, 3, 10, 10, generator=torch.Generator().manual_seed(7)))


def batches(rank, step):
    """Rank ``rank``'s training and validation batches at ``step``; one image is on both ranks."""
    g = torch.Generator().manual_seed(10 * step + rank)
    train, val = torch.rand(4, 3, 10, 10, generator=g), torch.rand(3, 3, 10, 10, generator=g)
    train[0] = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(99 + step))
    return train, val


def run(model, logger, ranks):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the single process sees the same weights
    for step in range(4):
        for rank in ranks:
            train, val = batches(rank, step)
            model.train()
            model(train).sum().backward()
            model.eval()
            with torch.no_grad():
                model(val)
        optimizer.step()
        optimizer.zero_grad()
        logger.maybe_log(step)
    logger.close(final_checkpoint=False)


def _worker(rank, root):
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Net())
        logger = ConvVizLogger(model, probe(), os.path.join(root, "ddp"), layers=LAYERS, k=3, steps=STEPS,
                               stream=("train", "eval"))
        run(model, logger, [rank])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_fed_the_union(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
    torch.manual_seed(0)
    model = Net()
    run(model, ConvVizLogger(model, probe(), tmp_path / "single", layers=LAYERS, k=3, steps=STEPS,
                             stream=("train", "eval")), range(WORLD))
    ddp, single = read_run(tmp_path / "ddp"), read_run(tmp_path / "single")
    assert ddp.streams == single.streams == ["train", "eval"]
    for source in ("train", "eval"):
        for layer in LAYERS:
            for step in STEPS:
                a, b = ddp.topk(layer, step, source=source), single.topk(layer, step, source=source)
                np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(a.image, b.image, err_msg=f"{source} {layer} {step}")
                assert (a.image >= 0).all()
                for number in np.unique(a.image):
                    np.testing.assert_array_equal(ddp.stream_image(source, int(number)),
                                                  single.stream_image(source, int(number)))
                np.testing.assert_array_equal(ddp.projection_pixels(layer, step, 0, source=source),
                                              single.projection_pixels(layer, step, 0, source=source))
