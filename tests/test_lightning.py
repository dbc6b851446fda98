"""ConvVizCallback with a real lightning.Trainer on the CPU: one device, no TensorBoardLogger, and DDP."""

import copy
import os
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_file_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.checkpoints import log_checkpoints
from tb_convviz.lightning import ConvVizCallback
from tb_convviz.reader import event_files

LAYERS = ["net.1", "net.4"]
TRAINER = dict(accelerator="cpu", max_steps=4, log_every_n_steps=1, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False)


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Dropout(0.5), nn.Linear(8, 3),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def make_probe():
    images = torch.rand(20, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    return ProbeSet(images, labels=torch.arange(20) % 3)


def train_loader():
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.rand(64, 3, 10, 10, generator=g), torch.randint(0, 3, (64,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))


def fit(callbacks, logger, **options):
    torch.manual_seed(0)
    module = TinyModule()
    L.Trainer(**{**TRAINER, **options}, logger=logger, callbacks=callbacks).fit(module, train_loader())
    return module


def assert_logged_like_a_plain_logger(run, module, step, tmp_path):
    """The records at ``step`` (logged with the final weights) equal ConvVizLogger's on those weights."""
    with ConvVizLogger(copy.deepcopy(module.net), make_probe(), tmp_path / "plain", layers=["1", "4"], k=3,
                        batch_size=5) as plain:
        plain.log(step)
    expected = read_run(tmp_path / "plain")
    for name, plain_name in zip(LAYERS, ["1", "4"]):
        np.testing.assert_array_equal(run.topk(name, step).image, expected.topk(plain_name, step).image)
        np.testing.assert_array_equal(run.topk(name, step).values, expected.topk(plain_name, step).values)


def test_shares_the_tensorboard_loggers_run_and_leaves_training_alone(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="exp")
    module = fit([ConvVizCallback(make_probe(), layers=LAYERS, k=3, batch_size=5, every_n_steps=2)], logger)

    run = read_run(logger.log_dir)
    assert logger.log_dir == str(tmp_path / "exp" / "version_0")
    assert run.steps == [0, 2, 4]  # trainer.global_step, initial weights included
    assert [l.name for l in run.layers] == LAYERS
    tags = {v.tag for f in event_files(logger.log_dir)
            for e in event_file_loader.EventFileLoader(f).Load() for v in e.summary.value}
    assert "train_loss" in tags and "convviz/topk/net.1" in tags
    assert_logged_like_a_plain_logger(run, module, 4, tmp_path)
    # Dropout, shuffling and weights came out exactly as without the callback.
    reference = fit([], TensorBoardLogger(tmp_path, name="reference"))
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_a_tensorboard_logger_it_says_where_it_writes(tmp_path):
    with pytest.warns(UserWarning, match="no TensorBoardLogger, so convviz writes to .*convviz_logs.version_0"):
        L.Trainer(**TRAINER, logger=False, default_root_dir=tmp_path,
                  callbacks=[ConvVizCallback(make_probe(), layers=LAYERS, k=3, steps=[1, 3])]).fit(
            TinyModule(), train_loader())
    assert read_run(tmp_path / "convviz_logs" / "version_0").steps == [1, 3, 4]  # and the trained model


@pytest.mark.parametrize("schedule", [{"every_n_steps": 3}, {"total_steps": 16}])
def test_training_ends_with_the_trained_model_at_the_final_global_step(tmp_path, schedule):
    """Whatever the schedule, the last checkpoint is the trained model at the last global step."""
    logger = TensorBoardLogger(tmp_path, name="exp")
    callback = ConvVizCallback(make_probe(), layers=LAYERS, k=3, batch_size=5, **schedule)
    module = fit([callback], logger, max_steps=-1, max_epochs=2)  # 8 batches an epoch: global steps 1 to 16
    run = read_run(logger.log_dir)
    assert run.steps[0] == 0 and run.steps[-1] == 16 and run.steps.count(16) == 1, run.steps
    assert_logged_like_a_plain_logger(run, module, 16, tmp_path)


def test_lightning_checkpoint_files_log_after_the_fact(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
    module = fit([saver], False, enable_checkpointing=True)
    results = log_checkpoints(lambda: TinyModule().net, str(tmp_path / "ckpts" / "*.ckpt"), make_probe(),
                              tmp_path / "run", layers=["1", "4"], k=3, batch_size=5, progress=False)
    assert results.logged == [2, 4]  # from epoch=0-step=N.ckpt
    run = read_run(tmp_path / "run")
    for name in ("1", "4"):
        expected = run.topk(name, 4)
        with ConvVizLogger(copy.deepcopy(module.net), make_probe(), tmp_path / f"plain{name}", layers=[name], k=3,
                           batch_size=5) as plain:
            plain.log(4)
        np.testing.assert_array_equal(expected.image, read_run(tmp_path / f"plain{name}").topk(name, 4).image)


def test_bad_schedule_fails_when_the_callback_is_made():
    with pytest.raises(ValueError, match="at most one of"):
        ConvVizCallback(make_probe(), every_n_steps=2, total_steps=100)
    with pytest.raises(ValueError, match="projection_rule must be one of"):
        ConvVizCallback(make_probe(), projection_rule="lrp")


DDP_SCRIPT = """
import sys
import torch
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, {tests!r})
from test_lightning import TRAINER, TinyModule, make_probe, train_loader, LAYERS
from tb_convviz.lightning import ConvVizCallback

torch.manual_seed(0)
module = TinyModule()
trainer = L.Trainer(**TRAINER, devices=2, strategy="ddp", logger=TensorBoardLogger({root!r}, name="ddp"),
                    callbacks=[ConvVizCallback(make_probe(), layers=LAYERS, k=3, batch_size=5, every_n_steps=2)])
trainer.fit(module, train_loader())
if trainer.global_rank == 0:
    torch.save(module.state_dict(), {final!r})
"""


def test_ddp_strategy_with_two_cpu_processes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(
        tests=os.path.dirname(__file__), root=str(tmp_path), final=str(tmp_path / "final.pt"))))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "ddp" / "version_0"
    assert sorted(os.listdir(tmp_path / "ddp")) == ["version_0"]  # rank 1 made no run of its own
    run = read_run(run_dir)
    assert run.steps == [0, 2, 4]
    assert len([f for f in event_files(str(run_dir)) if f.endswith(".convviz")]) == 1
    module = TinyModule()
    module.load_state_dict(torch.load(tmp_path / "final.pt"))
    assert_logged_like_a_plain_logger(run, module, 4, tmp_path)


class ValidatedModule(TinyModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


def test_streams_rank_training_and_validation_batches_with_their_labels(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    val = DataLoader(TensorDataset(torch.rand(16, 3, 10, 10, generator=g), torch.full((16,), 2)), batch_size=8)
    callback = ConvVizCallback(make_probe(), layers=LAYERS, k=3, steps=[0, 2], stream=("train", "eval"),
                               projections=None)
    L.Trainer(**{**TRAINER, "val_check_interval": 2, "num_sanity_val_steps": 0}, logger=False,
              default_root_dir=tmp_path, callbacks=[callback]).fit(ValidatedModule(), train_loader(), val)
    run = read_run(tmp_path / "convviz_logs" / "version_0")
    assert run.streams == ["train", "eval"]
    train = run.topk("net.4", 2, source="train")
    assert (train.image >= 0).all() and (train.label >= 0).all()
    # The validation pass at step 2 ran before the step-4 checkpoint: all its winners are labelled 2.
    evaluation = run.topk("net.4", run.steps[-1], source="eval")
    assert (evaluation.image >= 0).all() and (evaluation.label == 2).all()
