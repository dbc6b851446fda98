"""Failed writes, retries and two writers: never a wrong probe image, never a pile of files.

A child process logs checkpoints while a file-size limit (RLIMIT_FSIZE) or a full tmpfs
makes some writes fail part way; every probe image that a real ``tensorboard`` then serves
(both loaders) must equal the probe image itself.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tb_convviz import ConvVizLogger, read_run
from tb_convviz.logger import ConvVizWarning
from tb_convviz.reader import event_files
from tb_server import PLUGIN_API, get, served_runs, tensorboard_server, wait_for
from test_faults import LAYERS, make_model, make_probe, perturb, record_spans

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LOADERS = pytest.mark.parametrize("load_fast", [True, False], ids=["rust_loader", "python_loader"])

# Logs checkpoints 0..7 with small probe chunks (many records per checkpoint). Before the
# checkpoints named in argv[3] ("step:bytes,..."), the file-size limit is set that many bytes
# above the log dir's size, so the write fails part way; it is lifted after.
_CHILD = """
import json, os, resource, signal, sys, warnings
sys.path.insert(0, {tests!r})
from test_faults import make_model, make_probe, perturb, LAYERS
from tb_convviz import ConvVizLogger, summary
summary.split_chunks.__defaults__ = (1500,)
log_dir, limits = sys.argv[1], dict(map(int, p.split(":")) for p in sys.argv[2].split(",") if p)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
model = make_model()
logger = ConvVizLogger(model, make_probe(96), log_dir, layers=LAYERS, k=4)
for step in range(8):
    perturb(model, step)
    if step in limits:
        size = sum(os.path.getsize(os.path.join(log_dir, f)) for f in os.listdir(log_dir))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + limits[step], resource.RLIM_INFINITY))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = logger.log(step)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps([step, ok, [str(w.message) for w in caught]]), flush=True)
logger.close()
"""


def log_with_failures(log_dir: str, limits: str) -> list[list]:
    child = subprocess.run([sys.executable, "-c", _CHILD.format(tests=TESTS_DIR), log_dir, limits],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    return [json.loads(line) for line in child.stdout.splitlines()]


def truth(index: int) -> np.ndarray:
    """Probe image ``index`` as the logger stores it (lossless PNG at 16x16)."""
    probe = make_probe(96)
    return np.asarray(Image.fromarray(probe.display(index)).convert("RGB"))


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("failed_writes")
    log_dir = str(root / "run")
    # Steps 1 and 2 fail after a complete chunk (2 is the same kind: no new warning); 4 fails late or not at all.
    lines = log_with_failures(log_dir, "1:2000,2:2500,4:5000")
    return str(root), log_dir, lines


def test_failed_writes_warn_once_and_retry_in_the_same_file(failed_run):
    _, log_dir, lines = failed_run
    ok = {step: logged for step, logged, _ in lines}
    assert not ok[1] and not ok[2] and ok[3] and ok[5]
    messages = {step: caught for step, _, caught in lines}
    assert len(messages[1]) == 1 and "File too large" in messages[1][0]
    assert messages[2] == [] and messages[3] == []  # one warning until the writes recover
    assert len(messages[4]) == (0 if ok[4] else 1)  # a new failure after recovering warns again
    files = event_files(log_dir)
    assert len(files) == 1, files  # retries append to the same file
    # The failed writes were cut back: the file is whole records, nothing else.
    assert record_spans(files[0])[-1][1] == os.path.getsize(files[0])
    run = read_run(log_dir)
    assert run.errors == []
    assert run.steps == [step for step, logged, _ in lines if logged]
    # Each image is stored once: the retry did not rewrite what reached the disk.
    assert len(run.stored_images) == len(set(run.stored_images))
    for layer in run.layers:
        for step in run.steps:
            images = run.topk(layer.name, step).image
            assert set(images[images >= 0].ravel().tolist()) <= run.stored_images
    for index in run.stored_images:
        np.testing.assert_array_equal(run.probe_image(index), truth(index))


@LOADERS
def test_every_served_probe_image_is_the_right_one_after_failed_writes(failed_run, load_fast):
    root, log_dir, _ = failed_run
    run = read_run(log_dir)
    with tensorboard_server(root, load_fast=load_fast) as url:
        api = url + PLUGIN_API
        served = wait_for(lambda: (runs := list(served_runs(api).values())) and runs[0]["steps"] == run.steps
                          and runs[0])
        assert served["error"] is None
        assert served["probe"]["stored_images"] == len(run.stored_images)
        for index in sorted(run.stored_images):
            status, content_type, body = get(api + f"probe_image?run=run&index={index}")
            assert (status, content_type) == (200, "image/png"), body[:200]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), truth(index),
                                          err_msg=f"probe image {index}")


def test_a_full_tmpfs_neither_multiplies_files_nor_corrupts_images(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE tests cover the same path")
    try:
        log_dir = str(mount / "run")
        model, probe = make_model(), make_probe(96)
        filler = mount / "filler"
        with ConvVizLogger(model, probe, log_dir, layers=LAYERS, k=4) as logger:
            assert logger.log(0)
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the disk, then free a page
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, b"\0" * 1024)
            os.ftruncate(fd, max(os.lseek(fd, 0, os.SEEK_END) - 4096, 0))
            os.close(fd)
            logged = {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(1, 5):
                    perturb(model, step)
                    logged[step] = logger.log(step)
            assert not any(logged.values())
            assert len([w for w in caught if issubclass(w.category, ConvVizWarning)]) == 1
            assert len(event_files(log_dir)) == 1
            filler.unlink()  # space again
            perturb(model, 5)
            assert logger.log(5)
        (path,) = event_files(log_dir)
        assert record_spans(path)[-1][1] == os.path.getsize(path)
        run = read_run(log_dir)
        assert run.steps == [0, 5] and run.errors == []
        for index in run.stored_images:
            np.testing.assert_array_equal(run.probe_image(index), truth(index))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_second_logger_on_the_same_log_dir_is_refused(tmp_path):
    model, probe = make_model(), make_probe()
    first = ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=4)
    with pytest.raises(RuntimeError, match=rf"another ConvVizLogger \(pid {os.getpid()} on .*\) is writing"):
        ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=4)
    assert first.log(0)
    first.close()
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=4) as second:  # free again after close()
        perturb(model, 1)
        assert second.log(1)


def test_a_killed_loggers_lock_is_not_stale(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {TESTS_DIR!r})
from test_faults import make_model, make_probe, LAYERS
from tb_convviz import ConvVizLogger
logger = ConvVizLogger(make_model(), make_probe(), {str(tmp_path)!r}, layers=LAYERS, k=4)
print("locked", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"pid {child.pid}"):
            ConvVizLogger(make_model(), make_probe(), tmp_path, layers=LAYERS, k=4)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with ConvVizLogger(make_model(), make_probe(), tmp_path, layers=LAYERS, k=4) as logger:
        assert logger.log(0)


@pytest.mark.parametrize("step", [11.7, 3.0, "4", True, torch.tensor(2.5), None])
def test_non_integer_steps_are_refused(tmp_path, step):
    with ConvVizLogger(make_model(), make_probe(), tmp_path, layers=LAYERS, k=4) as logger:
        with pytest.raises(TypeError, match="step must be an integer"):
            logger.log(step)
        with pytest.raises(TypeError, match="step must be an integer"):
            logger.maybe_log(step)
        assert logger.last_step == -1


def test_integer_steps_of_any_kind_are_accepted(tmp_path):
    with ConvVizLogger(make_model(), make_probe(), tmp_path, layers=LAYERS, k=4, every_n_steps=1) as logger:
        assert logger.log(np.int64(1)) and logger.log(torch.tensor(2)) and logger.maybe_log(np.int32(3))
    assert read_run(tmp_path).steps == [1, 2, 3]


class _Flaky(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.broken = make_model(), False

    def forward(self, x):
        if self.broken and not self.training:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.net(x)


def test_a_failing_probe_pass_warns_once_until_it_recovers(tmp_path):
    model = _Flaky()
    with ConvVizLogger(model, make_probe(), tmp_path, layers=["net.1", "net.4"], k=4) as logger:
        assert logger.log(0)
        model.broken = True
        with pytest.warns(ConvVizWarning, match="probe pass .* step 1 failed") as caught:
            assert not logger.log(1) and not logger.log(2) and not logger.log(3)
        assert len(caught) == 1
        model.broken = False
        assert logger.log(4)
        model.broken = True
        with pytest.warns(ConvVizWarning, match="step 5 failed"):  # failing again after recovering
            assert not logger.log(5)


def test_a_resumed_run_warns_when_maybe_log_replays_logged_steps(tmp_path):
    model, probe = make_model(), make_probe()
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=4, every_n_steps=5) as logger:
        for step in range(11):
            logger.maybe_log(step)
    assert read_run(tmp_path).steps == [0, 5, 10]
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=4, every_n_steps=5) as resumed:
        with pytest.warns(ConvVizWarning, match="not after the last logged step 10") as caught:
            for step in range(16):  # training restarted from step 0
                resumed.maybe_log(step)
        assert len(caught) == 1
    assert read_run(tmp_path).steps == [0, 5, 10, 15]


@pytest.mark.parametrize("name", ['say "hi"', "back\\slash", "tab\there"])
def test_run_names_the_rust_loader_cannot_serve_images_for_are_warned_about(tmp_path, name):
    with pytest.warns(ConvVizWarning, match="failed to parse blob key"):
        ConvVizLogger(make_model(), make_probe(), tmp_path / name, layers=LAYERS, k=4).close()
