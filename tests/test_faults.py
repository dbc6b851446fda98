"""Faults, with a real ``tensorboard`` under both loaders: live logging, cut files, killed and failing writers, resumes.

The runs are written by a real ConvVizLogger on a small net; a killed run and a
disk-full run are written by child processes (SIGKILL at a random moment; a
file-size limit that makes ``write`` fail half way through a checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_file_loader
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, metadata, read_run, summary
from tb_convviz.logger import ConvVizWarning
from tb_convviz.reader import event_files
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import PLUGIN_API, get, served_runs, tensorboard_server, wait_for

LAYERS = ["1", "4"]
LOADERS = pytest.mark.parametrize("load_fast", [True, False], ids=["rust_loader", "python_loader"])
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def make_probe(n: int = 48) -> ProbeSet:
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return ProbeSet(images, labels=torch.arange(n) % 3, class_names=["a", "b", "c"])


def perturb(model: nn.Module, step: int) -> None:
    """Move the weights, as training would, so that checkpoints rank new images."""
    torch.manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))


def record_spans(path: str) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each complete TFRecord in an event file."""
    with open(path, "rb") as f:
        data = f.read()
    spans, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            break
        spans.append((pos, end))
        pos = end
    return spans


def checkpoint_span(path: str, step: int) -> tuple[int, int]:
    """Byte span of the record holding the top-k summaries of ``step``."""
    events = list(event_file_loader.EventFileLoader(path).Load())
    spans = record_spans(path)
    assert len(events) == len(spans)
    for event, span in zip(events, spans):
        if event.step == step and any(metadata.layer_of_tag(v.tag) for v in event.summary.value):
            return span
    raise AssertionError(f"no checkpoint record at step {step} in {path}")


def assert_consistent(path: str) -> list[int]:
    """Every record's image is stored and probe chunks have increasing steps; returns the run's steps."""
    run = read_run(path)
    for layer in run.layers:
        for step in run.steps:
            images = run.topk(layer.name, step).image
            assert set(images[images >= 0].ravel().tolist()) <= run.stored_images, (layer.name, step)
    chunk_steps = [e.step for f in event_files(path) for e in event_file_loader.EventFileLoader(f).Load()
                   if any(v.tag == metadata.PROBE_CHUNK_TAG for v in e.summary.value)]
    assert chunk_steps == sorted(set(chunk_steps)), chunk_steps
    return run.steps


# A child process that logs checkpoints 0, 1, 2, ... with the model and probe set above.
# "kill": forever, until the parent kills it. "disk_full": at step 1 the file-size limit
# stops the write part way (EFBIG rather than SIGXFSZ), then the limit is lifted.
_CHILD = """
import resource, signal, sys, os, warnings
sys.path.insert(0, {tests!r})
from test_faults import make_model, make_probe, perturb, LAYERS
from tb_convviz import ConvVizLogger
mode, log_dir = sys.argv[1], sys.argv[2]
model = make_model()
logger = ConvVizLogger(model, make_probe(512 if mode == "kill" else 48), log_dir, layers=LAYERS, k=4)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
step = 0
while mode == "kill" or step < 3:
    perturb(model, step)
    if mode == "disk_full" and step == 1:
        size = sum(os.path.getsize(os.path.join(log_dir, f)) for f in os.listdir(log_dir))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, resource.RLIM_INFINITY))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = logger.log(step)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(step, ok, len(caught), *[str(w.message) for w in caught], flush=True)
    step += 1
logger.close()
"""


def run_child(mode: str, log_dir: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=TESTS_DIR), mode, log_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_killed_run(log_dir: str) -> list[int]:
    """Kill a logging child at a random moment after its second checkpoint, then resume; returns steps."""
    child = run_child("kill", log_dir)
    try:
        for line in child.stdout:
            if line.startswith("1 True"):
                break
        else:
            raise AssertionError("the logging child stopped early:\n" + child.stderr.read())
        time.sleep(np.random.default_rng().uniform(0, 0.5))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = assert_consistent(log_dir)
    assert before[:2] == [0, 1]
    model = make_model()
    with ConvVizLogger(model, make_probe(512), log_dir, layers=LAYERS, k=4) as logger:
        perturb(model, 1000)
        assert logger.log(1000)
    return before + [1000]


def write_disk_full_run(log_dir: str) -> list[int]:
    child = run_child("disk_full", log_dir)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    lines = out.splitlines()
    assert [line.split()[:3] for line in lines] == [["0", "True", "0"], ["1", "False", "1"], ["2", "True", "0"]]
    assert "could not write the checkpoint at step 1" in lines[1] and "File too large" in lines[1]
    (only,) = event_files(log_dir)  # the retry appended to the same file
    assert os.path.getsize(only) == record_spans(only)[-1][1]  # the failed write was cut back
    return [0, 2]


def write_interrupted_run(log_dir: str) -> list[int]:
    """A checkpoint cut after its probe-image chunks, in the middle of its own record; then resumed."""
    model, probe = make_model(), make_probe()
    with ConvVizLogger(model, probe, log_dir, layers=LAYERS, k=4) as logger:
        for step in (0, 1):
            perturb(model, step)
            assert logger.log(step)
    (path,) = event_files(log_dir)
    start, end = checkpoint_span(path, 1)
    assert record_spans(path)[-2][1] == start  # a chunk of new images came just before
    os.truncate(path, (start + end) // 2)
    run = read_run(log_dir)
    assert run.steps == [0] and run.last_chunk >= 1
    with ConvVizLogger(model, probe, log_dir, layers=LAYERS, k=4) as logger:
        assert logger.log(1) and logger.log(2)
    return [0, 1, 2]


def write_truncated_run(log_dir: str) -> list[int]:
    written = write_synthetic_run(log_dir, checkpoints=5, layers=2, units=4, k=3, probe_size=32, image_size=16)
    (path,) = event_files(log_dir)
    start, end = checkpoint_span(path, written.steps[-1])
    os.truncate(path, start + 20)  # inside the record's data
    return written.steps[:-1]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A log dir of runs hit by faults, and the steps each should still show."""
    root = tmp_path_factory.mktemp("faults")
    writers = {"truncated": write_truncated_run, "interrupted": write_interrupted_run,
               "killed": write_killed_run, "disk_full": write_disk_full_run}
    expected = {name: write(str(root / name)) for name, write in writers.items()}
    for name, steps in expected.items():
        assert assert_consistent(str(root / name)) == steps, name
    return str(root), expected


def _json(url: str) -> dict:
    status, content_type, body = get(url)
    assert status == 200 and content_type.startswith("application/json"), body[:300]
    return json.loads(body)


@LOADERS
def test_everything_before_a_fault_is_served(faulty, load_fast):
    root, expected = faulty
    with tensorboard_server(root, load_fast=load_fast) as url:
        api = url + PLUGIN_API
        runs = wait_for(lambda: (lambda r: all(
            name in r and r[name]["steps"] == steps for name, steps in expected.items()) and r)(served_runs(api)))
        for name, steps in expected.items():
            assert runs[name]["error"] is None, (name, runs[name]["error"])
            for layer in runs[name]["layers"]:
                for step in (steps[0], steps[-1]):
                    query = urllib.parse.urlencode({"run": name, "layer": layer["name"], "step": step})
                    units = _json(api + "topk?" + query)["units"]
                    # Labels come with stored images: every record's image is there to show.
                    assert all(r["label"] is not None for u in units for r in u["records"]), (name, step)
                    status, content_type, _ = get(api + "mosaic?" + query + "&unit=0")
                    assert (status, content_type) == (200, "image/png")


def test_read_run_reads_every_record_before_a_cut_or_a_corrupted_record(tmp_path):
    written = write_synthetic_run(str(tmp_path / "full"), checkpoints=3, layers=1, units=3, k=2, probe_size=12,
                                  image_size=8, chunk_bytes=300)
    (path,) = event_files(str(tmp_path / "full"))
    events = list(event_file_loader.EventFileLoader(path).Load())
    spans = record_spans(path)
    with open(path, "rb") as f:
        data = f.read()
    cuts = sorted({c for start, end in spans for c in (start, start + 1, start + 8, start + 13, (start + end) // 2,
                                                      end - 1)})
    os.makedirs(tmp_path / "cut")
    for cut in cuts:
        with open(tmp_path / "cut" / os.path.basename(path), "wb") as f:
            f.write(data[:cut])
        complete = [e for e, (_, end) in zip(events, spans) if end <= cut]
        run = read_run(str(tmp_path / "cut"))
        assert run.steps == [e.step for e in complete if any(metadata.layer_of_tag(v.tag) for v in e.summary.value)]
        assert run.last_chunk == max((e.step for e in complete
                                      if any(v.tag == metadata.PROBE_CHUNK_TAG for v in e.summary.value)), default=-1)
        for step in run.steps:
            np.testing.assert_array_equal(run.topk("conv1", step).image,
                                          written.records["conv1"][written.steps.index(step)]["image"])
    # A flipped byte fails the record's checksum: reading stops there, as TensorBoard's loaders do.
    start, end = checkpoint_span(path, written.steps[1])
    corrupt = bytearray(data)
    corrupt[(start + end) // 2] ^= 0xFF
    with open(tmp_path / "cut" / os.path.basename(path), "wb") as f:
        f.write(corrupt)
    assert read_run(str(tmp_path / "cut")).steps == written.steps[:1]


@LOADERS
def test_live_logging_partial_records_and_resume_at_a_lower_step(tmp_path, load_fast):
    log_dir = str(tmp_path / "live")
    model, probe = make_model(), make_probe()
    logger = ConvVizLogger(model, probe, log_dir, layers=LAYERS, k=4)
    assert logger.log(0)
    with tensorboard_server(str(tmp_path), load_fast=load_fast) as url:
        api = url + PLUGIN_API

        def steps():
            return served_runs(api).get("live", {}).get("steps")

        def topk(step):
            return _json(api + f"topk?run=live&layer=4&step={step}")["units"]

        wait_for(lambda: steps() == [0])
        for logged in ([0, 10], [0, 10, 20]):  # training goes on while TensorBoard serves
            perturb(model, logged[-1])
            assert logger.log(logged[-1])
            wait_for(lambda: steps() == logged)
        logger.close()
        at_20 = topk(20)
        assert [r["image"] for r in at_20[0]["records"]] == read_run(log_dir).topk("4", 20).image[0].tolist()

        # A record that reaches the disk in two parts: nothing, then all of it.
        (path,) = event_files(log_dir)
        event = list(event_file_loader.EventFileLoader(path).Load())[-1]  # the checkpoint at step 20
        event.step = 25
        record = summary.frame_record(event.SerializeToString())
        with open(path, "ab") as f:
            f.write(record[:len(record) // 2])
        time.sleep(3)  # a few of the server's 1-second reloads
        run = served_runs(api)["live"]
        assert (run["steps"], run["error"]) == ([0, 10, 20], None)
        with open(path, "ab") as f:
            f.write(record[len(record) // 2:])
        wait_for(lambda: steps() == [0, 10, 20, 25])

        # Resumed from a checkpoint before step 25: later data must survive.
        with ConvVizLogger(model, probe, log_dir, layers=LAYERS, k=4) as resumed:
            with pytest.warns(ConvVizWarning, match="not after the last logged step 25"):
                assert not resumed.log(15)
            perturb(model, 30)
            assert resumed.log(30)
        wait_for(lambda: steps() == [0, 10, 20, 25, 30])
        assert topk(20) == at_20
        assert served_runs(api)["live"]["error"] is None
