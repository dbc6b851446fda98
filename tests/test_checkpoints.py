"""Saved checkpoints logged after the fact: `log_checkpoints` and `tb-convviz checkpoints`, errors included."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.checkpoints import log_checkpoints, resolve_model

CLI = Path(sys.executable).with_name("tb-convviz")
NETS = '''
from torch import nn


def tiny(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
'''
LAYERS = ["1", "4"]


def tiny(num_classes=10, seed=0):
    torch.manual_seed(seed)
    namespace = {}
    exec(NETS, namespace)
    return namespace["tiny"](num_classes)


def make_probe():
    return ProbeSet(torch.rand(24, 3, 12, 12, generator=torch.Generator().manual_seed(1)))


def save(path, seed, wrap=lambda state: state):
    state = tiny(seed=seed).state_dict()
    torch.save(wrap(state), path)
    return state


def plain_records(state, step, tmp_path):
    model = tiny()
    model.load_state_dict(state)
    log_dir = tmp_path / f"plain{step}"
    with ConvVizLogger(model, make_probe(), log_dir, layers=LAYERS, k=4) as logger:
        logger.log(step)
    return read_run(log_dir)


def run_cli(*args, cwd):
    return subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_steps_from_names_any_wrapping_and_resume(tmp_path):
    states = {
        # Lightning: under state_dict, behind the LightningModule's attribute.
        1200: save(tmp_path / "epoch=3-step=1200.ckpt", 1,
                   lambda s: {"epoch": 3, "global_step": 1200, "state_dict": {f"model.{k}": v for k, v in s.items()}}),
        90: save(tmp_path / "ckpt_90.pt", 2, lambda s: {"model": {f"module.{k}": v for k, v in s.items()}}),
        500: save(tmp_path / "ckpt_500.pt", 3),
    }
    log_dir = tmp_path / "run"
    results = log_checkpoints(lambda: tiny(), str(tmp_path / "*[0-9].*"), make_probe(), log_dir,
                              layers=LAYERS, k=4, progress=False)

    assert results.logged == [90, 500, 1200] and not results.failed
    run = read_run(log_dir)
    assert run.steps == [90, 500, 1200]
    for step, state in states.items():
        expected = plain_records(state, step, tmp_path)
        for layer in LAYERS:
            np.testing.assert_array_equal(run.topk(layer, step).image, expected.topk(layer, step).image)
            np.testing.assert_array_equal(run.topk(layer, step).values, expected.topk(layer, step).values)

    # Re-running skips what is logged; a later checkpoint is added, an earlier one cannot be.
    save(tmp_path / "ckpt_2000.pt", 4)
    save(tmp_path / "ckpt_7.pt", 5)
    again = log_checkpoints(tiny, str(tmp_path / "*[0-9].*"), make_probe(), log_dir, layers=LAYERS, k=4,
                            progress=False)
    assert again.logged == [2000]
    assert again.skipped[90] == again.skipped[1200] == "already logged"
    assert "step 7 comes before step 1200" in again.skipped[7]
    assert read_run(log_dir).steps == [90, 500, 1200, 2000]


def test_step_rules(tmp_path):
    for name, seed in (("b.pt", 1), ("a.pt", 2), ("c.pt", 3)):
        save(tmp_path / name, seed)
    files = [tmp_path / n for n in ("b.pt", "a.pt", "c.pt")]
    kwargs = dict(probe=make_probe(), layers=LAYERS, k=4, progress=False)
    assert log_checkpoints(tiny, files, log_dir=tmp_path / "order", **kwargs).logged == [0, 1, 2]
    assert log_checkpoints(tiny, files, log_dir=tmp_path / "explicit", steps=[30, 10, 20], **kwargs).logged == [10, 20, 30]
    # b.pt is step 30, logged last.
    expected = plain_records(torch.load(tmp_path / "b.pt"), 30, tmp_path)
    np.testing.assert_array_equal(read_run(tmp_path / "explicit").topk("4", 30).image, expected.topk("4", 30).image)

    save(tmp_path / "ckpt_5.pt", 4)
    with pytest.raises(ValueError, match="cannot tell the step of .*a.pt: its name has no number"):
        log_checkpoints(tiny, str(tmp_path / "*.pt"), log_dir=tmp_path / "mixed", **kwargs)
    save(tmp_path / "run2_ckpt_5.pt", 5)
    with pytest.raises(ValueError, match="several checkpoint files map to step 5; pass the steps"):
        log_checkpoints(tiny, str(tmp_path / "*ckpt_5.pt"), log_dir=tmp_path / "twice", **kwargs)
    with pytest.raises(ValueError, match="got 2 steps for 3 checkpoint files"):
        log_checkpoints(tiny, files, log_dir=tmp_path / "short", steps=[1, 2], **kwargs)


def test_torchvision_models_by_name():
    model = resolve_model("torchvision:squeezenet1_1", num_classes=3)()
    assert type(model).__name__ == "SqueezeNet" and model.classifier[1].out_channels == 3
    with pytest.raises(ValueError, match="unknown torchvision model 'alexnett'; classification models: alexnet,"):
        resolve_model("torchvision:alexnett")


@pytest.fixture
def project(tmp_path):
    """A user's folder: their model module and a checkpoints folder, some of them bad."""
    (tmp_path / "nets.py").write_text(textwrap.dedent(NETS))
    (tmp_path / "ckpts").mkdir()
    for step in (100, 20, 5):
        save(tmp_path / "ckpts" / f"step{step}.pt", step)
    return tmp_path


def test_cli_logs_checkpoints_names_bad_files_and_skips_on_rerun(project):
    ckpts = project / "ckpts"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 5), nn.Linear(4, 2)).state_dict(), ckpts / "step50.pt")
    (ckpts / "step60.pt").write_bytes(b"truncated download")
    args = ["checkpoints", "--model", "nets:tiny", "--weights", "ckpts/*.pt", "--data", "synthetic",
            "--image-size", "16", "--probe-size", "30", "--k", "4", "--logdir", "runs/ckpts"]

    first = run_cli(*args, cwd=project)
    assert first.returncode == 1, first.stderr
    assert "logged steps 5, 20, 100 to runs/ckpts" in first.stdout
    assert "checkpoints: 100%" in first.stderr  # the tqdm bar
    assert "2 of 5 files failed" in first.stderr
    assert "ckpts/step50.pt does not fit the model" in first.stderr
    assert "Is it a checkpoint of another architecture? Check --model" in first.stderr
    assert "ckpts/step60.pt is not a PyTorch checkpoint" in first.stderr
    run = read_run(project / "runs" / "ckpts")
    assert run.steps == [5, 20, 100] and run.probe.n == 30

    (ckpts / "step50.pt").unlink()
    (ckpts / "step60.pt").unlink()
    save(ckpts / "step400.pt", 400)
    again = run_cli(*args, cwd=project)
    assert again.returncode == 0, again.stderr
    assert "logged steps 400 to runs/ckpts; skipped 3 already logged or out of order" in again.stdout
    assert read_run(project / "runs" / "ckpts").steps == [5, 20, 100, 400]


@pytest.mark.parametrize("model, weights, message", [
    ("nets:tiny", "ckpt/*.pt", "no checkpoint files match 'ckpt/*.pt'"),
    ("torchvision:alexnett", "ckpts/*.pt", "unknown torchvision model 'alexnett'; classification models: alexnet,"),
])
def test_cli_errors_before_any_work(project, model, weights, message):
    done = run_cli("checkpoints", "--model", model, "--weights", weights, "--logdir", "runs/x", cwd=project)
    assert done.returncode == 1
    assert done.stderr.startswith(f"tb-convviz checkpoints: error: {message}")
    assert not (project / "runs").exists()
