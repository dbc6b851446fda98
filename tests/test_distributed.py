"""torch.distributed: 2 gloo processes on the CPU log exactly what one process logs, ties included."""

import datetime
import os
import pathlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz import projection_format as fmt
from tb_convviz.reader import event_files

WORLD = 2
LAYERS = ["conv1", "relu2", "fc"]
K = 6
BATCH = 7
STEPS = [0, 1, 3]
FINAL = 3  # the trained model after the first phase's 3 updates
RESUMED = [2, 3, 4, 6]
LOGGED = [0, 1, 3, 4, 6]  # 3 is the first phase's final checkpoint; 6 the second's


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.pool(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def make_probe(n=45):
    images = torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    # Copies of one bright, flat image tie on every unit (and over space); they sit in both
    # ranks' shares, as do two duplicated random images.
    images[[3, 9, 30, 41]] = 1.5
    images[[25, 38]] = images[[2, 20]]
    return ProbeSet(images, labels=torch.arange(n) % 4)


def _worker(rank, root):
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    if rank == 0:
        (pathlib.Path(root) / "rank0.pid").write_text(str(os.getpid()))
    try:
        # The second phase resumes a multi-node job whose log dir is on node 0's disk only:
        # rank 1 sees an empty directory, yet must skip exactly what rank 0 skips. Each phase
        # ends with close() logging the trained model, one step after the last maybe_log.
        for phase, log_dir, steps, first in (("train", "ddp", STEPS, 0),
                                              ("resume", "ddp" if rank == 0 else "empty", RESUMED, FINAL)):
            torch.manual_seed(0)
            net = Net()
            if phase == "resume":
                net.load_state_dict(torch.load(os.path.join(root, f"{FINAL}.pt")))
            model = nn.parallel.DistributedDataParallel(net)
            logger = ConvVizLogger(model, make_probe(), os.path.join(root, log_dir), layers=LAYERS, k=K,
                                   batch_size=BATCH, steps=steps)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            for step in range(first, first + 3):
                logger.maybe_log(step)
                if rank == 0:
                    torch.save(model.module.state_dict(), os.path.join(root, f"{step}.pt"))
                # Each rank trains on a batch of its own, so its BatchNorm statistics differ from rank 0's
                # until DDP's next forward.
                torch.manual_seed(100 * rank + step)
                loss = model(torch.rand(8, 3, 12, 12)).logsumexp(1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if rank == 0:
                torch.save(model.module.state_dict(), os.path.join(root, f"{first + 3}.pt"))
            logger.close()
        # Both ranks finish their collectives before the group goes: a rank that tears gloo down
        # while the other still talks to it can abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(root),), nprocs=WORLD)
    return root


def single_process_run(root, log_dir, steps):
    model = Net()
    with ConvVizLogger(model, make_probe(), log_dir, layers=LAYERS, k=K, batch_size=BATCH, steps=steps) as logger:
        for step in steps:
            model.load_state_dict(torch.load(root / f"{step}.pt"))
            assert logger.log(step)
    return read_run(log_dir)


def test_two_gloo_ranks_with_ddp_equal_one_process_exactly(spawned, tmp_path):
    ddp = read_run(spawned / "ddp")
    single = single_process_run(spawned, tmp_path, LOGGED)
    assert ddp.steps == single.steps == LOGGED
    assert [l.name for l in ddp.layers] == LAYERS
    for layer in LAYERS:
        for step in ddp.steps:
            a, b = ddp.topk(layer, step), single.topk(layer, step)
            for field in ("values", "image", "y", "x", "label"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{layer} {field}")
    assert ddp.stored_images == single.stored_images
    assert ddp.scalars == single.scalars
    # Rank 0 measures the effective fields (with its own buffers, which it writes about): one process's boxes.
    for layer in ("conv1", "relu2"):
        assert all(ddp.effective_field(layer, s) == single.effective_field(layer, s) is not None for s in LOGGED)
    # The tie rule was exercised across ranks: the flat copies rank together, in index order.
    tied = [row[np.isin(row, [3, 9, 30, 41])] for row in ddp.topk("conv1", 0).image]
    assert any(list(row) == [3, 9, 30, 41] for row in tied)
    assert all((np.diff(row) > 0).all() for row in tied)
    # Ranks split the records to project; rank 0 writes them all, as one process would.
    for layer in LAYERS:
        assert ddp.projection_steps(layer) == single.projection_steps(layer) == ddp.steps
        for step in ddp.steps:
            for unit in range(ddp.layer(layer).units):
                # A rank may round a value the other way: one quantisation step, ceil(127 / levels) of 127.
                step_size = np.ceil(127 / fmt.levels_of(single.projection_info(layer))) / 127
                scale = float(single.projection_record(layer, step, unit)["scale"])
                np.testing.assert_allclose(ddp.projection(layer, step, unit), single.projection(layer, step, unit),
                                           rtol=0, atol=1.01 * scale * step_size + 1e-12, err_msg=f"{layer} {unit}")


def test_only_rank_0_writes_and_a_resume_follows_rank_0(spawned):
    pid = (spawned / "rank0.pid").read_text()
    files = event_files(str(spawned / "ddp"))
    assert len(files) == 2 and all(os.path.basename(f).split(".")[-3] == pid for f in files)  # one per phase
    assert not os.path.exists(spawned / "empty") or not os.listdir(spawned / "empty")
    # The resumed phase, from step 3, skipped 3 (already logged by rank 0) and logged 4 and the final 6 on
    # both ranks; had rank 1 logged 3, the gathers would have mismatched and the job failed.
    assert read_run(spawned / "ddp").steps == LOGGED
