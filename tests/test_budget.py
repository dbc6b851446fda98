"""The overhead budget, on a clock the test controls: a training step costs 1 s, a checkpoint's probe pass what the test says."""

from __future__ import annotations

import logging

import pytest
import torch

from tb_convviz import ConvVizLogger, budget
from tb_convviz.schedule import spaced_steps
from test_logger import TinyResNet, make_probe

GRACE_SECONDS = budget.GRACE_SECONDS  # read at import, before conftest lifts it for the other tests


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

PROBE_IMAGES = 12


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(budget, "clock", fake)
    monkeypatch.setattr(budget, "GRACE_SECONDS", GRACE_SECONDS)
    return fake


def slowed_model(clock: FakeClock, checkpoint_seconds: float) -> torch.nn.Module:
    """A model whose probe pass (one eval-mode batch of the whole probe set per checkpoint) takes ``checkpoint_seconds``.

    The checkpoint's other passes (effective fields, on a few probe images) cost nothing on this clock.
    """
    torch.manual_seed(0)
    model = TinyResNet().train()

    def cost(module, inputs):
        if not module.training and inputs[0].shape[0] == PROBE_IMAGES:
            clock.now += checkpoint_seconds

    model.register_forward_pre_hook(cost)
    return model


def train(clock: FakeClock, steps: int, checkpoint_seconds: float, tmp_path, **options) -> tuple[list[int], list]:
    """``steps`` training steps of 1 s each; the steps checkpointed, and each checkpoint's (step, cost, training time)."""
    model = slowed_model(clock, checkpoint_seconds)
    logger = ConvVizLogger(model, make_probe(n=PROBE_IMAGES), tmp_path, layers=["block1", "block2"], k=2, batch_size=64,
                           projections=None, **options)
    start, spent, costs = clock.now, 0.0, []
    for step in range(steps):
        before = clock.now
        if logger.maybe_log(step):
            costs.append((step, clock.now - before, before - start - spent))
            spent += clock.now - before
        with torch.no_grad():
            model.fc.bias.add_(0.0)  # an update: the final checkpoint is the model after it
        clock.now += 1.0
    logger.close()
    return logger.last_step, costs


def test_a_short_run_keeps_only_step_0_and_the_final_checkpoint(clock, tmp_path, caplog):
    # 102 steps of 1 s; a checkpoint costs 25 steps. 16 checkpoints would take 400 s beside 102 s of training.
    with caplog.at_level(logging.WARNING, logger="tb_convviz"):
        last, costs = train(clock, 102, 25.0, tmp_path, total_steps=102)
    assert [step for step, _, _ in costs] == [0] and last == 102  # close() logged the trained model
    lines = [r.getMessage() for r in caplog.records if r.name == "tb_convviz"]
    assert len(lines) == 2
    assert "one checkpoint took 25.00 s, as long as 25 training steps" in lines[0]
    assert "overhead_budget=0.1 keeps all checkpoints within that share of training time" in lines[0]
    assert "deferred or left out the checkpoints scheduled at steps 1, 2, 4, 7, 11, 16, 22, 29, 37, 45, 55, 65, ..." in lines[1]
    assert "overhead_budget=None to log every scheduled checkpoint" in lines[1]


def test_a_longer_run_is_thinned_to_the_budget_keeping_the_dense_early_spacing(clock, tmp_path):
    # 2000 s of training: 10% of it and the 10 s of grace afford 8 checkpoints of 25 s, the final one included.
    last, costs = train(clock, 2000, 25.0, tmp_path, total_steps=2000)
    logged = [step for step, _, _ in costs] + [last]
    assert logged == spaced_steps(2000, 8)
    assert 25.0 * len(logged) <= 0.1 * 2000 + GRACE_SECONDS


def test_cheap_checkpoints_keep_the_whole_schedule(clock, tmp_path):
    last, costs = train(clock, 2000, 0.5, tmp_path, total_steps=2000)
    assert [step for step, _, _ in costs] + [last] == spaced_steps(2000, 16)


def test_without_a_budget_every_scheduled_checkpoint_is_logged(clock, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tb_convviz"):
        last, costs = train(clock, 102, 25.0, tmp_path, total_steps=102, overhead_budget=None)
    assert [step for step, _, _ in costs] + [last] == spaced_steps(102, 16)
    lines = [r.getMessage() for r in caplog.records if r.name == "tb_convviz"]
    assert len(lines) == 1 and "as long as 25 training steps" in lines[0]  # the cost, and nothing deferred
    assert "overhead_budget=None logs every scheduled checkpoint; a fraction such as 0.1 keeps" in lines[0]


def test_without_total_steps_a_due_checkpoint_waits_until_the_budget_affords_it(clock, tmp_path):
    # The default schedule (0, 1, 2, 5, 10, 20, 50, 100, 200) with 5 s checkpoints: each waits until
    # the checkpoints so far and it take at most 10% of the training time so far, plus the grace.
    last, costs = train(clock, 200, 5.0, tmp_path)
    assert [step for step, _, _ in costs] == [0, 1, 50, 100] and last == 200
    spent = costs[0][1]
    for step, cost, training in costs[1:]:
        assert spent + cost <= 0.1 * training + GRACE_SECONDS, step
        spent += cost


def test_a_bad_budget_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="overhead_budget must be a positive fraction"):
        ConvVizLogger(TinyResNet(), make_probe(), tmp_path, layers=["block1"], overhead_budget=-1)
