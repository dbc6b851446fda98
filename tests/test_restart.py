"""Reusing a log dir: another model is refused at construction; a restart of the same one is marked."""

from __future__ import annotations

import pytest
from torch import nn

from tb_convviz import ConvVizLogger, read_run
from test_logger import LAYERS, TinyResNet, make_probe, trained_model
from test_plugin_http import Served


def test_another_model_in_a_used_log_dir_is_refused_at_construction(tmp_path):
    probe = make_probe()
    with ConvVizLogger(trained_model(), probe, tmp_path, layers=LAYERS, k=3) as logger:
        logger.log(0)
        logger.log(4)
    wider = TinyResNet()
    wider.block2 = nn.Sequential(nn.Conv2d(12, 24, 3, 2, 1), nn.ReLU())
    wider.fc = nn.Linear(24, 5)
    with pytest.raises(ValueError, match=r"already holds convviz checkpoints of another model") as refused:
        ConvVizLogger(wider, probe, tmp_path, layers=LAYERS, k=3)
    message = str(refused.value)
    assert "block2: 16 units, 4×4 maps, k=3, 16×16 input there, 24 units, 4×4 maps, k=3, 16×16 input here" in message
    assert "log into a new directory" in message
    with pytest.raises(ValueError, match=r"block2: 16 units.* there, not logged here"):  # another layer choice
        ConvVizLogger(trained_model(), probe, tmp_path, layers=["stem.2", "block1"], k=3)
    with pytest.raises(ValueError, match=r"k=3, 16×16 input there, 8 units, 16×16 maps, k=4"):
        ConvVizLogger(trained_model(), probe, tmp_path, layers=LAYERS, k=4)
    assert read_run(tmp_path).steps == [0, 4]  # nothing was written by the refused loggers


def test_a_restart_of_the_same_model_is_marked_in_the_run_and_its_listing(tmp_path):
    probe = make_probe()
    with ConvVizLogger(trained_model(), probe, tmp_path / "run", layers=LAYERS, k=3) as logger:
        logger.log(0)
        logger.log(4)
    with ConvVizLogger(trained_model(seed=1), probe, tmp_path / "run", layers=LAYERS, k=3) as logger:
        assert not logger.maybe_log(2)  # the log dir holds step 4 already
        logger.log(6)
        logger.log(8)
    with ConvVizLogger(trained_model(seed=2), probe, tmp_path / "run", layers=LAYERS, k=3) as logger:
        logger.log(10)
    run = read_run(tmp_path / "run")
    assert run.steps == [0, 4, 6, 8, 10]
    assert run.restarts == [6, 10]  # each later session's first checkpoint
    runs = Served(tmp_path).json("runs")["runs"]
    assert [(r["run"], r["restarts"]) for r in runs] == [("run", [6, 10])]


def test_a_fresh_log_dir_has_no_restarts(tmp_path):
    with ConvVizLogger(trained_model(), make_probe(), tmp_path / "run", layers=LAYERS, k=3) as logger:
        logger.log(0)
        logger.log(1)
    assert read_run(tmp_path / "run").restarts == []
    assert Served(tmp_path).json("runs")["runs"][0]["restarts"] == []
