"""DDP faults with 2 gloo ranks (issue 19): one rank's failure skips the checkpoint on every rank and
training goes on; misuse (log or close on one rank, different steps per rank) is a clear error, never
a C++ abort or a hang past the process group's timeout; a log dir that rank 0 refuses is the same error on
every rank."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import pathlib
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tb_convviz import ConvVizLogger, read_run
from tb_convviz.logdir_lock import LogDirLock
from tb_convviz.ranking import RULE, RankMismatch
from test_distributed import BATCH, K, LAYERS, Net, make_probe

WORLD = 2


def _init(root: str, rank: int, timeout_s: float) -> nn.Module:
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.manual_seed(0)
    return nn.parallel.DistributedDataParallel(Net())


def _train_step(model: nn.Module, rank: int, step: int) -> None:
    torch.manual_seed(100 * rank + step)
    loss = model(torch.rand(8, 3, 12, 12)).logsumexp(1).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None


def _save(root: str, rank: int, out: dict) -> None:
    pathlib.Path(root, f"rank{rank}.json").write_text(json.dumps(out))


def _faults_worker(rank: int, root: str) -> None:
    model = _init(root, rank, timeout_s=30)
    out: dict = {"logged": [], "warnings": []}
    fault = {"probe": False, "projections": False}

    def forward(net, images):
        # The probe pass runs without gradients, the projections with them.
        if rank == 1 and fault["projections" if torch.is_grad_enabled() else "probe"]:
            raise RuntimeError("injected fault on rank 1")
        return net(images)

    # Rank 0 alone takes and reads a log dir: "other" holds _Wider's checkpoints, the test holds "locked".
    for log_dir in ("other", "locked"):
        try:
            ConvVizLogger(model, make_probe(), os.path.join(root, log_dir), layers=LAYERS, k=K, batch_size=BATCH)
        except Exception as e:
            out[log_dir] = f"{type(e).__name__}: {e}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = ConvVizLogger(model, make_probe(), os.path.join(root, "run"), layers=LAYERS, k=K,
                               batch_size=BATCH, every_n_steps=1, forward=forward)
        for step in range(4):
            fault["probe"], fault["projections"] = step == 1, step == 2
            out["logged"].append(logger.maybe_log(step))
            _train_step(model, rank, step)  # training goes on, through DDP's own collectives
        try:  # maybe_log with different steps per rank
            logger.maybe_log(4 + rank)
        except RankMismatch as e:
            out["mismatch"] = str(e)
        _train_step(model, rank, 4)
        if rank == 0:  # close() on rank 0 only
            try:
                logger.close()
            except RankMismatch as e:
                out["close"] = str(e)
    out["warnings"] = [str(w.message) for w in caught if "convviz" in str(w.message)]
    _save(root, rank, out)
    dist.destroy_process_group()


def _log_on_rank_0_only_worker(rank: int, root: str) -> None:
    model = _init(root, rank, timeout_s=6)
    logger = ConvVizLogger(model, make_probe(), os.path.join(root, "run"), layers=LAYERS, k=K, batch_size=BATCH)
    out = {}
    try:
        if rank == 0:
            logger.log(0)
        else:
            _train_step(model, rank, 0)  # DDP waits for rank 0, which waits for rank 1 in the logger
    except RuntimeError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    _save(root, rank, out)
    while not all(pathlib.Path(root, f"rank{r}.json").exists() for r in range(WORLD)):
        time.sleep(0.1)  # neither leaves while the other may still be in a collective


class _Wider(Net):
    """Net with 10 units in conv1: another model for the same layer names."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.conv2 = nn.Conv2d(10, 8, 3, padding=1)


# Only a hang runs into these (each rank's own waits end after the process group's timeout):
# generous, since starting torch on a busy machine can take minutes.
HANG_S = 600


def _spawn(worker, root: pathlib.Path) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker, args=(rank, str(root))) for rank in range(WORLD)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + HANG_S
    for p in processes:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert [p.exitcode for p in processes] == [0] * WORLD  # not -6: no C++ abort
    return [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_faults")
    with ConvVizLogger(_Wider(), make_probe(), root / "other", layers=LAYERS, k=K, batch_size=BATCH) as logger:
        logger.log(0)
    lock = LogDirLock(str(root / "locked"))
    try:
        return root, _spawn(_faults_worker, root)
    finally:
        lock.release()


def test_a_probe_pass_failing_on_one_rank_skips_the_checkpoint_everywhere(faults):
    root, (zero, one) = faults
    assert zero["logged"] == one["logged"] == [True, False, True, True]
    assert any("probe pass of the checkpoint at step 1 failed (RuntimeError: injected fault on rank 1)" in w
               for w in one["warnings"])
    assert any("probe pass of the checkpoint at step 1 failed (Skipped: the probe pass failed on another rank"
               in w for w in zero["warnings"])
    assert read_run(root / "run").steps == [0, 2, 3]


def test_projections_failing_on_one_rank_keep_the_checkpoint_s_records(faults):
    root, (zero, one) = faults
    assert any("projections of the checkpoint at step 2 failed (RuntimeError: injected fault on rank 1)" in w
               for w in one["warnings"])
    assert any("projections of the checkpoint at step 2 failed (Skipped: the projections failed on another rank"
               in w for w in zero["warnings"])
    run = read_run(root / "run")
    for layer in LAYERS:
        assert run.projection_steps(layer) == [0, 3]
        records = run.topk(layer, 2)
        assert (records.image >= 0).any() and {int(i) for i in records.image.ravel() if i >= 0} <= run.stored_images


def test_different_steps_per_rank_are_a_clear_error_on_every_rank(faults):
    _, ranks = faults
    for out in ranks:
        assert "log() was called at different steps on different ranks (from 4 to 5)" in out["mismatch"]
        assert RULE in out["mismatch"]


def test_close_on_rank_0_only_is_a_clear_error(faults):
    _, (zero, one) = faults
    assert "waited in close()" in zero["close"] and RULE in zero["close"]
    assert "close" not in one


def test_log_on_rank_0_only_is_a_clear_error_not_an_abort(tmp_path):
    zero, one = _spawn(_log_on_rank_0_only_worker, tmp_path)
    assert zero["error"].startswith("RankMismatch: convviz: rank 0 waited in log() at step 0")
    assert RULE in zero["error"]
    assert "error" in one  # DDP's own wait for rank 0 ended with an error of its own, not an abort


def test_a_log_dir_refused_on_rank_0_is_the_same_error_on_every_rank(faults):
    # Neither rank waits on: both went on to log into "run" together.
    root, (zero, one) = faults
    assert zero["other"].startswith("ValueError: ")
    assert "already holds convviz checkpoints of another model" in zero["other"]
    assert "conv1: 10 units, 12×12 maps, k=6, 12×12 input there, 6 units" in zero["other"]
    assert zero["locked"].startswith("RuntimeError: another ConvVizLogger (pid")
    assert (one["other"], one["locked"]) == (zero["other"], zero["locked"])
    assert read_run(root / "other").steps == [0]
