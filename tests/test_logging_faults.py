"""Logging keeps a checkpoint when part of it fails (issue 19): a frozen backbone, failed projections,
a log dir deleted during training or read-only, and a layer whose projections would cost hours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.logger import ConvVizWarning
from tb_convviz.reader import event_files

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8, 3)


class Frozen(Backbone):
    """The usual fine-tuning pattern: the backbone runs without gradients, inside ``forward``."""

    def forward(self, x):
        with torch.no_grad():
            f = self.features(x)
        return self.head(f.mean(dim=(2, 3)))


class Plain(Backbone):
    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class Inference(Backbone):
    def forward(self, x):
        with torch.inference_mode():
            f = self.features(x)
        return self.head(f.clone().mean(dim=(2, 3)))


LAYERS = ["features.1", "features.4"]


def probe(n: int = 24) -> ProbeSet:
    return ProbeSet(torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


def log_once(model: nn.Module, log_dir, **options) -> tuple[bool, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = ConvVizLogger(model, probe(), log_dir, layers=LAYERS, k=3, batch_size=8, **options)
        logged = logger.log(0)
        logger.close(final_checkpoint=False)
    return logged, [w for w in caught if issubclass(w.category, ConvVizWarning)]


def test_a_frozen_backbone_is_projected_as_if_it_were_not(tmp_path):
    torch.manual_seed(0)
    frozen = Frozen()
    plain = Plain()
    plain.load_state_dict(frozen.state_dict())
    logged, caught = log_once(frozen, tmp_path / "frozen")
    assert logged and not caught, [str(w.message) for w in caught]
    assert log_once(plain, tmp_path / "plain")[0]
    a, b = read_run(tmp_path / "frozen"), read_run(tmp_path / "plain")
    for layer in LAYERS:
        assert a.projection_steps(layer) == [0]
        for unit in range(a.layer(layer).units):
            np.testing.assert_array_equal(a.projection_pixels(layer, 0, unit), b.projection_pixels(layer, 0, unit))
            assert a.projection_record(layer, 0, unit)["scale"] == b.projection_record(layer, 0, unit)["scale"]
    assert any(a.projection_record(LAYERS[0], 0, u)["scale"] > 0 for u in range(6))
    # The model, and grad mode, are as they were.
    assert all(p.grad is None for p in frozen.parameters()) and torch.is_grad_enabled()


def test_projections_leave_other_threads_grad_mode_alone(tmp_path):
    logger = ConvVizLogger(Frozen(), probe(), tmp_path, layers=LAYERS, k=3, batch_size=8)
    seen, stop = [], threading.Event()

    def watch():
        with torch.no_grad():
            while not stop.is_set():
                seen.append(torch.is_grad_enabled())
                with torch.no_grad():  # switching grad mode here goes through the same function
                    seen.append(torch.is_grad_enabled())

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        assert logger.log(0)
    finally:
        stop.set()
        thread.join()
        logger.close(final_checkpoint=False)
    assert seen and not any(seen)


def test_failed_projections_keep_the_records_and_probe_images(tmp_path):
    logged, caught = log_once(Inference(), tmp_path)
    assert logged
    # The effective fields need the same gradient: they fail with their own one warning.
    (warning,) = [w for w in caught if "effective fields" not in str(w.message)]
    (field_warning,) = [w for w in caught if "effective fields" in str(w.message)]
    assert "inference_mode" in str(field_warning.message) and "logged without them" in str(field_warning.message)
    text = str(warning.message)
    assert "projections of the checkpoint at step 0 failed" in text and "inference_mode" in text
    assert "projections=None" in text and "probe pass" not in text
    run = read_run(tmp_path)
    assert run.steps == [0] and all(run.projection_steps(layer) == [] for layer in LAYERS)
    records = run.topk(LAYERS[1], 0)
    for image in set(records.image[records.image >= 0].tolist()):
        assert run.probe_image(image).shape == (16, 16, 3)


def _logger(log_dir, **options) -> ConvVizLogger:
    return ConvVizLogger(Plain(), probe(), log_dir, layers=LAYERS, k=3, batch_size=8, projections=None, **options)


def _stored_everything(run) -> bool:
    """Whether every probe image a record names is stored in ``run``."""
    named = {int(i) for layer in LAYERS for step in run.steps for i in run.topk(layer, step).image.ravel() if i >= 0}
    return named <= run.stored_images


def test_a_log_dir_deleted_during_training_is_noticed_and_written_anew(tmp_path):
    log_dir = tmp_path / "run"
    logger = _logger(log_dir)
    assert logger.log(0)
    shutil.rmtree(log_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert logger.log(1) and logger.log(2)
    (warning,) = [w for w in caught if issubclass(w.category, ConvVizWarning)]
    assert "was deleted or moved during training" in str(warning.message) and "step 1" in str(warning.message)
    run = read_run(log_dir)
    assert run.steps == [1, 2] and _stored_everything(run)
    with pytest.raises(RuntimeError, match="another ConvVizLogger"):  # the lock was taken again
        _logger(log_dir)
    logger.close(final_checkpoint=False)


def test_a_recreated_log_dir_taken_by_another_logger_is_not_written(tmp_path):
    log_dir = tmp_path / "run"
    logger = _logger(log_dir)
    assert logger.log(0)
    shutil.rmtree(log_dir)
    other = _logger(log_dir)  # the recreated dir is free: the new logger takes it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not logger.log(1)
    assert any("another ConvVizLogger" in str(w.message) for w in caught)
    assert other.log(5)
    other.close(final_checkpoint=False)
    assert logger.log(6)  # free again: written, with its probe images
    logger.close(final_checkpoint=False)
    run = read_run(log_dir)
    assert run.steps == [5, 6] and _stored_everything(run)
    assert len(event_files(str(log_dir))) == 2


_READ_ONLY = """
import sys
from tb_convviz import ConvVizLogger
import torch
try:
    ConvVizLogger(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.rand(4, 3, 8, 8), sys.argv[1], k=2)
except OSError as e:
    print(e)
"""


def test_a_read_only_log_dir_says_what_to_do(tmp_path):
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    command = [sys.executable, "-c", _READ_ONLY, str(log_dir)]
    if os.geteuid() == 0:  # root writes anywhere: mount a read-only file system there, in a namespace of its own
        if not shutil.which("unshare"):
            pytest.skip("running as root, and no `unshare` to make a read-only file system")
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                   'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"', "sh", str(log_dir), *command]
    else:
        os.chmod(log_dir, 0o555)
    done = subprocess.run(command, capture_output=True, text=True, cwd=TESTS_DIR, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cannot create" in done.stdout and ".convviz.lock" in done.stdout, done.stdout
    assert "[Errno 30]" in done.stdout or "[Errno 13]" in done.stdout
    assert "Pass a log dir you can write to, or make" in done.stdout


def test_a_layer_whose_projections_would_dwarf_the_probe_pass_is_warned_about_when_built(tmp_path):
    wide = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 100_000))
    with pytest.warns(ConvVizWarning, match=r"100008 backward rows per checkpoint .*'4': 100000 units") as caught:
        logger = ConvVizLogger(wide, probe(), tmp_path / "wide", layers=["1", "4"], k=3)
    assert "projections=None" in str(caught[0].message)
    logger.close(final_checkpoint=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same net without projections, and a small net with them: no warning
        ConvVizLogger(wide, probe(), tmp_path / "off", layers=["1", "4"], k=3, projections=None).close()
        ConvVizLogger(Plain(), probe(), tmp_path / "small", layers=LAYERS, k=3, projections="topk").close()
