"""`tb-convviz demo`: end to end as a user runs it, its datasets and its error messages."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from tb_convviz import read_run
from tb_convviz.cli import main
from tb_convviz.demo.data import DataError, load_data, parse_spec
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.demo.shapes import Shapes

CLI = Path(sys.executable).with_name("tb-convviz")
LAYERS = [f"features.relu{i}" for i in range(1, 6)]
# Requests to the demo's TensorBoard go straight to localhost, whatever proxy the environment sets.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    assert CLI.exists(), f"no {CLI}: install the package with `pip install -e .`"
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def get_json(url: str):
    with HTTP.open(url, timeout=10) as response:
        return json.load(response)


@dataclasses.dataclass
class ServedDemo:
    logdir: Path
    returncode: int
    stdout: str
    stderr: str
    tb_runs: dict  # data/plugin/convviz/runs once it listed every checkpoint
    tb_scalar_tags: dict  # data/plugin/scalars/tags
    tb_gone: bool  # TensorBoard's port refused connections after the demo exited


def _ignore_sigint() -> None:
    """Start the demo as `nohup` or a script's background job does: Ctrl-C must still stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> ServedDemo:
    """`tb-convviz demo --quick --serve`, queried over HTTP while it serves, then stopped by Ctrl-C.

    It starts with SIGINT ignored, as under `nohup`: Ctrl-C (SIGINT) stops it all the same.
    """
    assert CLI.exists(), f"no {CLI}: install the package with `pip install -e .`"
    tmp = tmp_path_factory.mktemp("demo")
    logdir, out_path, err_path = tmp / "runs", tmp / "stdout", tmp / "stderr"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    base = f"http://localhost:{port}/data"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [str(CLI), "demo", "--quick", "--serve", "--port", str(port), "--logdir", str(logdir), "--device", "cpu"],
            stdout=out, stderr=err, preexec_fn=_ignore_sigint,
        )
    try:
        deadline = time.monotonic() + 600
        while "Ctrl-C to stop" not in out_path.read_text():
            assert proc.poll() is None, f"demo exited early:\n{err_path.read_text()}"
            assert time.monotonic() < deadline, "demo did not finish training in 10 minutes"
            time.sleep(0.5)
        expected_steps = read_run(logdir / "seed0").steps
        while True:  # until TensorBoard's reload has picked up the last checkpoint
            try:
                runs = get_json(f"{base}/plugin/convviz/runs")
                if runs["runs"] and runs["runs"][0]["steps"] == expected_steps:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard never listed the run's checkpoints"
            time.sleep(1)
        scalar_tags = get_json(f"{base}/plugin/scalars/tags")
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        HTTP.open(f"{base}/runs", timeout=5).close()
        tb_gone = False
    except OSError:
        tb_gone = True
    return ServedDemo(logdir, returncode, out_path.read_text(), err_path.read_text(), runs, scalar_tags, tb_gone)


def test_quick_demo_serves_and_stops_on_ctrl_c(served):
    assert served.returncode == 0, served.stderr
    assert re.search(r"Test accuracy: \d+\.\d% on 512 images", served.stdout)
    assert served.stdout.count("#convviz") == 2  # live while training, and again when done
    assert "Traceback" not in served.stderr
    assert served.tb_gone


def test_readme_states_what_quick_reaches(served):
    """The README's --quick accuracy is what a real --quick run reaches (seeded, so it moves only with torch)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"`--quick`.*?reaches only about (\d+)% test accuracy", readme, re.S)
    assert stated, "the README must say what --quick reaches"
    measured = float(re.search(r"Test accuracy: (\d+\.\d)% on 512 images", served.stdout).group(1))
    assert abs(measured - int(stated.group(1))) <= 10, (measured, stated.group(1))


def test_quick_demo_convviz_data_reads_back(served):
    run = read_run(served.logdir / "seed0")
    assert [layer.name for layer in run.layers] == LAYERS
    assert [layer.index for layer in run.layers] == [1, 2, 3, 4, 5]
    assert len(run.steps) >= 5 and run.steps[0] == 0
    assert run.probe.class_names == list(Shapes.class_names)
    for layer in run.layers:
        records = run.topk(layer.name, run.steps[-1])
        assert records.image.shape == (layer.units, 9)
        image = run.probe_image(int(records.image[0, 0]))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 0 <= run.label(int(records.image[0, 0])) < len(Shapes.class_names)
    assert run.layer("features.relu1").receptive_field.size == (7, 7)


def test_quick_demo_in_real_tensorboard(served):
    [listed] = served.tb_runs["runs"]
    assert listed["run"] == "seed0" and listed["error"] is None
    assert [layer["name"] for layer in listed["layers"]] == LAYERS
    assert listed["probe"]["class_names"] == list(Shapes.class_names)
    assert {"loss/train", "accuracy/train", "loss/test", "accuracy/test"} <= set(served.tb_scalar_tags["seed0"])


def test_quick_demo_readable_by_tensorboard_event_loader(served):
    logdir = served.logdir
    acc = event_accumulator.EventAccumulator(
        str(logdir / "seed0"), size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/train", "accuracy/train", "loss/test", "accuracy/test"):
        assert tag in tags["scalars"], tags["scalars"]
    assert len(acc.Scalars("accuracy/test")) == 2  # one per epoch
    steps = read_run(logdir / "seed0").steps
    for layer in LAYERS:
        assert [e.step for e in acc.Tensors(f"convviz/topk/{layer}")] == steps
    assert acc.Tensors("convviz/probe/chunk")


def test_shapes_deterministic_by_seed():
    a, b = Shapes(300, seed=3), Shapes(700, seed=3)
    assert torch.equal(a.images, b.images[:300]) and torch.equal(a.targets, b.targets[:300])
    assert not torch.equal(a.images, Shapes(300, seed=4).images)
    assert not torch.equal(a.images, Shapes(300, seed=3, train=False).images)


def test_shapes_items_and_classes():
    ds = Shapes(500, seed=0, size=48)
    image, label = ds[7]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
    assert len(Shapes.class_names) >= 10 and isinstance(label, int)
    counts = torch.bincount(ds.targets, minlength=len(Shapes.class_names))
    assert counts.min() >= 40  # every class present, balanced


def test_synthetic_data_is_normalised():
    data = load_data("synthetic", limit=(1000, 200))
    images = torch.stack([data.train[i][0] for i in range(500)])
    assert images.mean().abs() < 0.1 and (images.std() - 1).abs() < 0.1
    assert (len(data.train), len(data.test), data.channels) == (1000, 200, 3)


def test_model_layers_and_output():
    model = DemoAlexNet(num_classes=7, in_channels=1)
    names = dict(model.named_modules())
    for i in range(1, 6):
        assert isinstance(names[f"features.conv{i}"], torch.nn.Conv2d)
        assert isinstance(names[f"features.relu{i}"], torch.nn.ReLU)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("spec,expected", [
    ("synthetic", ("synthetic", None)), ("CIFAR10", ("cifar10", None)),
    ("fashion-mnist", ("fashion-mnist", None)), ("imagefolder:/data/x:y", ("imagefolder", "/data/x:y")),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("mnist", "unknown --data 'mnist': use synthetic, imagefolder:PATH, cifar10 or fashion-mnist"),
    ("imagefolder", "imagefolder needs a folder"),
    ("synthetic:10", "unknown --data"),
])
def test_parse_spec_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


@pytest.mark.parametrize("spec,hint", [
    ("cifar10", "cifar-10-python.tar.gz into {root}"),
    ("fashion-mnist", "into {root}/FashionMNIST/raw"),
])
def test_missing_dataset_says_how_to_get_it(tmp_path, spec, hint):
    root = tmp_path / "datasets"
    # A dead proxy makes the download fail here and on machines with internet alike.
    proxy = "http://127.0.0.1:9"
    proc = run_cli("demo", "--data", spec, "--data-root", str(root), "--logdir", str(tmp_path / "runs"),
                   env={"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy})
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("tb-convviz demo: error:")]
    assert len(error) == 1, proc.stderr
    assert "could not be downloaded" in error[0] and hint.format(root=root) in error[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_data_exits_with_message(tmp_path, capsys):
    assert main(["demo", "--data", "imagenet", "--logdir", str(tmp_path)]) == 1
    assert "tb-convviz demo: error: unknown --data 'imagenet'" in capsys.readouterr().err


def test_missing_imagefolder_exits_with_message(tmp_path, capsys):
    assert main(["demo", "--data", f"imagefolder:{tmp_path / 'nope'}", "--logdir", str(tmp_path)]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_imagefolder_demo_and_second_runs(tmp_path, capsys):
    folder, classes = tmp_path / "images", ["apple", "kiwi", "plum"]
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 80, (40, 52, 3), dtype=np.uint8)
            pixels[..., c] += 150  # one dominant colour per class
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    logdir = tmp_path / "runs"
    common = ["demo", "--quick", "--data", f"imagefolder:{folder}", "--logdir", str(logdir), "--epochs", "1",
              "--probe-size", "3"]
    assert main(common) == 0
    assert main(common + ["--seed", "1"]) == 0
    assert main(common) == 0  # the same seed again: a new run, the first one kept
    assert "Test accuracy:" in capsys.readouterr().out
    assert sorted(p.name for p in logdir.iterdir()) == ["seed0", "seed0-2", "seed1"]
    runs = [read_run(logdir / name) for name in ("seed0", "seed0-2", "seed1")]
    for run in runs:
        assert [layer.name for layer in run.layers] == LAYERS
        assert run.probe.class_names == classes
        assert run.probe.n == 3  # of the 5 test images (20% of 24)
        assert run.steps[0] == 0
    assert len({run.probe.fingerprint for run in runs}) == 1  # same probe images: the runs compare


def test_serve_on_a_busy_port_fails_before_training(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--quick", "--serve", "--port", str(port), "--logdir", str(tmp_path)]) == 1
    assert f"--port {port} is in use" in capsys.readouterr().err
    assert not (tmp_path / "seed0").exists()


def test_fashion_mnist_files_present_locally(tmp_path, capsys):
    """Files already in --data-root are used as they are, with no download: grayscale, 10 classes."""
    raw = tmp_path / "datasets" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 32)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    logdir = tmp_path / "runs"
    args = ["demo", "--quick", "--epochs", "1", "--data", "fashion-mnist", "--data-root", str(tmp_path / "datasets"),
            "--logdir", str(logdir)]
    assert main(args) == 0, capsys.readouterr().err
    run = read_run(logdir / "seed0")
    assert [layer.name for layer in run.layers] == LAYERS
    assert run.probe.channels == 1 and run.probe.n == 32
    assert run.probe.class_names[0] == "T-shirt/top" and len(run.probe.class_names) == 10


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (TensorBoard's Rust data server), from /proc."""
    pids = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                pids += process_tree(int(child))
    return pids


def running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (nobody reaped it yet) has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_served_tensorboard_stops_when_the_demo_is_killed(tmp_path, signum):
    """`kill` (SIGTERM) or `kill -9` (SIGKILL, an OOM kill) of `tb-convviz demo --serve` ends its TensorBoard."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = (
        "import sys, time; from pathlib import Path; from tb_convviz.cli import _TensorBoard\n"
        f"with _TensorBoard(Path({str(tmp_path)!r}), {port}) as server:\n"
        "    print(server._proc.pid, flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    served = []
    try:
        tensorboard = int(proc.stdout.readline())
        deadline = time.monotonic() + 90
        while True:
            try:
                HTTP.open(f"http://localhost:{port}/data/runs", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "TensorBoard did not start"
                time.sleep(0.5)
        served = process_tree(tensorboard)
        assert len(served) >= 2, "expected TensorBoard and its data server"
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == (128 + signum if signum == signal.SIGTERM else -signum)
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in served) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in served if running(pid)], "TensorBoard outlived the demo"
        with pytest.raises(OSError):
            HTTP.open(f"http://localhost:{port}/data/runs", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in served:  # leave no orphan behind, even when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
