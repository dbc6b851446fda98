"""The logger in training loops as users write them: the trained model is always logged, steps must not go back."""

import copy
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.logger import ConvVizWarning

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["1", "4"]


def readme_loop() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## In your own training loop\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 12, 12, generator=g), torch.randint(0, 3, (n,), generator=g))


def sgd_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def train_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return train_step


def logged_now(model, probe, log_dir, step, like):
    """What a fresh logger records for ``model`` as it is now, with the layers and k of run ``like``."""
    layers = [layer.name for layer in like.layers]
    with ConvVizLogger(copy.deepcopy(model), probe, log_dir, layers=layers, k=like.layers[0].k) as logger:
        assert logger.log(step)
    return read_run(log_dir)


def assert_same_records(a, b, step):
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    for layer in (layer.name for layer in a.layers):
        np.testing.assert_array_equal(a.topk(layer, step).image, b.topk(layer, step).image)
        np.testing.assert_array_equal(a.topk(layer, step).values, b.topk(layer, step).values)


def test_the_readme_loop_ends_with_the_trained_model(tmp_path, monkeypatch):
    """The README's loop, run as written: 48 updates, and the last checkpoint is the model after all of them."""
    monkeypatch.chdir(tmp_path)
    model, epochs = make_model(), 4
    loader = DataLoader(make_data(96, seed=1), batch_size=8)  # 12 batches an epoch: 48 steps in all
    namespace = {
        "val_set": make_data(40, seed=2), "MEAN": [0.5] * 3, "STD": [0.25] * 3, "model": model,
        "loader": loader, "epochs": epochs, "batches": [b for _ in range(epochs) for b in loader],
        "train_step": sgd_step(model),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(readme_loop(), namespace)
    # A plain loop warns about nothing but this small net having 2 stages, not 5 (layers="auto").
    messages = [str(w.message) for w in caught]
    assert [m for m in messages if "stage(s), not 5" not in m] == [], messages
    assert len(messages) == 1, messages
    run = read_run(tmp_path / "runs" / "exp1")
    assert run.steps[0] == 0 and run.steps[-1] == 48, run.steps  # step s: the model after s updates
    assert_same_records(run, logged_now(model, namespace["probe"], tmp_path / "now", 48, run), 48)


@pytest.mark.parametrize("schedule", [{"total_steps": 30}, {"every_n_steps": 10}, {"steps": [0, 29]}, {}])
def test_loop_that_logs_after_each_update_gets_no_extra_checkpoint(tmp_path, schedule):
    """maybe_log(step) after the step's update (as the demo and Lightning do): the last step is logged once."""
    model, probe = make_model(), ProbeSet(make_data(20, seed=2).tensors[0])
    train_step = sgd_step(model)
    data = make_data(8, seed=3).tensors
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=3, **schedule) as logger:
        logger.maybe_log(0)
        for step in range(1, 31):
            train_step(*data)
            logger.maybe_log(step)
        model.eval()(data[0])  # evaluation changes nothing
    run = read_run(tmp_path)
    assert run.steps[-1] == 30 and run.steps.count(30) == 1 and 31 not in run.steps
    assert_same_records(run, logged_now(model, probe, tmp_path / "now", 30, run), 30)


def test_final_checkpoint_only_when_training_ended_normally(tmp_path):
    model, probe = make_model(), ProbeSet(make_data(20, seed=2).tensors[0])
    with pytest.raises(KeyboardInterrupt):
        with ConvVizLogger(model, probe, tmp_path / "interrupted", layers=LAYERS, k=3, every_n_steps=10) as logger:
            for step in range(15):
                logger.maybe_log(step)
            raise KeyboardInterrupt
    assert read_run(tmp_path / "interrupted").steps == [0, 10]
    # Steps logged by hand only: close() adds nothing.
    with ConvVizLogger(model, probe, tmp_path / "by_hand", layers=LAYERS, k=3) as logger:
        logger.log(3)
    assert read_run(tmp_path / "by_hand").steps == [3]
    # Nothing trained after the last maybe_log, which was not due: the model is logged at that step.
    logger = ConvVizLogger(model, probe, tmp_path / "unchanged", layers=LAYERS, k=3)
    for step in range(8):
        logger.maybe_log(step)
    logger.close()
    logger.close()  # a second close logs nothing more
    assert read_run(tmp_path / "unchanged").steps == [0, 1, 2, 5, 7]


def test_a_step_counter_that_restarts_every_epoch_gets_one_warning(tmp_path):
    model, probe = make_model(), ProbeSet(make_data(20, seed=2).tensors[0])
    steps_per_epoch, epochs = 60, 3
    logger = ConvVizLogger(model, probe, tmp_path / "restarting", layers=LAYERS, k=3,
                           total_steps=steps_per_epoch * epochs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(epochs):
            for i in range(steps_per_epoch):
                logger.maybe_log(i)  # the mistake: the batch index, not a global step
    [warning] = caught
    assert warning.category is ConvVizWarning and warning.filename == __file__
    message = str(warning.message)
    assert "maybe_log(0) came after maybe_log(59)" in message and "`epoch * steps_per_epoch + i`" in message
    logger.close()

    # As the warning says: checkpoints through all epochs, to the last step, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ConvVizLogger(model, probe, tmp_path / "global", layers=LAYERS, k=3,
                           total_steps=steps_per_epoch * epochs) as logger:
            for epoch in range(epochs):
                for i in range(steps_per_epoch):
                    logger.maybe_log(epoch * steps_per_epoch + i)
    steps = read_run(tmp_path / "global").steps
    assert len(steps) == 16 and [s for s in steps if s >= 2 * steps_per_epoch] == [135, 157, 179]

