"""Warnings name the user's line, not tb-convviz's: the filename of each is this test file."""

from __future__ import annotations

import warnings

import torch

from tb_convviz import ConvVizLogger, ProbeSet
from tb_convviz.logger import ConvVizWarning
from tb_convviz.probe import ProbeDisplayWarning
from test_logger import LAYERS, make_probe, trained_model


def caught(action, category) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        action()
    got = [w for w in got if issubclass(w.category, category)]
    assert got, f"no {category.__name__}"
    return got


def test_probe_display_warnings_name_the_callers_line():
    images = torch.rand(8, 3, 16, 16) * 4  # far outside the display range
    for w in caught(lambda: ProbeSet(images), ProbeDisplayWarning):
        assert w.filename == __file__, (w.filename, w.lineno)
    dataset = [(image, 0) for image in images]
    for w in caught(lambda: ProbeSet.from_dataset(dataset, n=8), ProbeDisplayWarning):
        assert w.filename == __file__, (w.filename, w.lineno)


def test_logger_warnings_name_the_callers_line(tmp_path):
    logger = ConvVizLogger(trained_model(), make_probe(), tmp_path, layers=LAYERS, k=3)
    logger.maybe_log(0)
    logger.maybe_log(5)
    backwards = caught(lambda: logger.maybe_log(3), ConvVizWarning)  # a step counter that restarts
    repeated = caught(lambda: logger.log(5), ConvVizWarning)  # a step already logged
    for w in backwards + repeated:
        assert w.filename == __file__, (w.filename, w.lineno)
    logger.close()


def test_not_finite_warning_from_inside_the_probe_pass_names_the_callers_line(tmp_path):
    model = trained_model()
    with torch.no_grad():
        model.stem[0].weight[0] = float("nan")
    with ConvVizLogger(model, make_probe(), tmp_path, layers=LAYERS, k=3) as logger:
        got = caught(lambda: logger.log(0), ConvVizWarning)
    assert any("NaN or infinite activations" in str(w.message) for w in got)
    for w in got:
        assert w.filename == __file__, (w.filename, w.lineno)

