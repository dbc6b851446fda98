"""Reusing a log dir: another model is refused at construction; a restart of the same one is marked, on the slider too."""

from __future__ import annotations

import pytest
from torch import nn

from browser_support import IDLE, hash_state
from tb_convviz import ConvVizLogger, read_run
from tb_server import tensorboard_server
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


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Run ``restarted``: a training that two later sessions of the same model resumed; run ``fresh``: one session."""
    root = tmp_path_factory.mktemp("restarts")
    probe = make_probe()
    with ConvVizLogger(trained_model(), probe, root / "restarted", layers=LAYERS, k=3) as logger:
        logger.log(0)
        logger.log(4)
    with ConvVizLogger(trained_model(seed=1), probe, root / "restarted", layers=LAYERS, k=3) as logger:
        assert not logger.maybe_log(2)  # the log dir holds step 4 already
        logger.log(6)
        logger.log(8)
    with ConvVizLogger(trained_model(seed=2), probe, root / "restarted", layers=LAYERS, k=3) as logger:
        logger.log(10)
    with ConvVizLogger(trained_model(), probe, root / "fresh", layers=LAYERS, k=3) as logger:
        logger.log(0)
        logger.log(1)
    return root


def test_a_restart_of_the_same_model_is_marked_in_the_run_and_its_listing(logs):
    run = read_run(logs / "restarted")
    assert run.steps == [0, 4, 6, 8, 10]
    assert run.restarts == [6, 10]  # each later session's first checkpoint
    runs = Served(logs).json("runs")["runs"]
    assert [(r["run"], r["restarts"]) for r in runs] == [("fresh", []), ("restarted", [6, 10])]


def test_a_fresh_log_dir_has_no_restarts(logs):
    assert read_run(logs / "fresh").restarts == []


def test_the_slider_marks_each_restart_at_its_step(watched, logs):
    with tensorboard_server(str(logs), load_fast=True) as server:
        page = watched.open(server, "run=restarted&layer=block1&step=0")
        page.wait_for_selector(f".cv-grid{IDLE}")
        track = page.locator(".cv-slider input[type='range']")
        readout = page.locator(".cv-step-readout")
        marks = page.locator(".cv-restart-mark")
        assert marks.count() == 2
        for mark, step in zip(marks.all(), (6, 10)):
            assert f"step {step} is the first checkpoint of a new session" in mark.get_attribute("title")
            # A click on the track just beside the mark moves the thumb to the restart's step.
            box, tick = track.bounding_box(), mark.bounding_box()
            page.mouse.click(tick["x"] + tick["width"] / 2 - 4, box["y"] + box["height"] / 2)
            page.wait_for_selector(f".cv-grid{IDLE}")
            assert hash_state(page)["step"] == str(step)
            assert readout.inner_text() == f"step {step} · restart"
        for index, step in enumerate([0, 4, 6, 8, 10]):
            track.fill(str(index))
            page.wait_for_selector(f".cv-grid{IDLE}")
            assert readout.inner_text() == f"step {step}" + (" · restart" if step in (6, 10) else "")
        # A click on a mark itself goes to its step too.
        marks.first.click()
        page.wait_for_selector(f".cv-grid{IDLE}")
        assert hash_state(page)["step"] == "6"
        # A run that never restarted has no marks, at any step.
        page.locator(".cv-run-select").select_option("fresh")
        for index, step in enumerate([0, 1]):
            track.fill(str(index))
            page.wait_for_selector(f".cv-grid{IDLE}")
            assert readout.inner_text() == f"step {step}" and marks.count() == 0
        watched.assert_clean()
