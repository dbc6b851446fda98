"""Checkpoint cost vs a plain forward pass, and peak extra memory vs probe size.

Measured side by side in one run on the CPU, with the demo's AlexNet-style net
at 64x64 and batch size 128:

* one ConvVizLogger checkpoint over 1024 probe images (the probe pass and its
  records; ``projections.py`` adds projections) divided by a plain ``torch.no_grad()``
  eval forward over the same images: runs interleaved, a forward before and after
  each checkpoint, the median of the per-checkpoint ratios (so a machine whose speed
  drifts, as shared ones do, moves both sides of each ratio); the weights are
  perturbed before each checkpoint, so it stores new images as in training;
* the peak memory a checkpoint adds at 512 and at 4096 probe images, each size
  in a fresh subprocess, next to what a plain forward pass adds.

    python benchmarks/overhead.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from tb_convviz import ConvVizLogger, ProbeSet
from tb_convviz.demo.model import DemoAlexNet

BATCH = 128


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra(fn) -> int:
    """Peak resident memory above the level before ``fn()``, sampled every millisecond."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_bytes()) - base


def setup(n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = DemoAlexNet()
    probe = ProbeSet(torch.randn(n, 3, 64, 64))
    return model, probe


def plain_forward(model, probe) -> None:
    model.eval()
    with torch.no_grad():
        for _, batch in probe.batches(BATCH):
            model(batch)


def perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(model, probe, repeats: int, checkpoints: dict) -> dict:
    """Per name in ``checkpoints`` (``name: log(step)``), the median over steps of its time ÷ the forwards around it.

    Each step perturbs the weights, then times forward, each checkpoint, forward; returns
    medians of the forward, of each checkpoint and of each per-step ratio.
    """
    plain_forward(model, probe)
    forward_s, times, ratios = [], {n: [] for n in checkpoints}, {n: [] for n in checkpoints}
    for step in range(1, repeats + 1):
        perturb(model)
        before = timed(lambda: plain_forward(model, probe))
        spent = {name: timed(lambda: log(step) or _failed(name, step)) for name, log in checkpoints.items()}
        forward = (before + timed(lambda: plain_forward(model, probe))) / 2
        forward_s.append(forward)
        for name, s in spent.items():
            times[name].append(s)
            ratios[name].append(s / forward)
    return {"forward_s": statistics.median(forward_s), **{f"{n}_s": statistics.median(t) for n, t in times.items()},
            **{f"{n}_ratio": statistics.median(r) for n, r in ratios.items()}}


def timing(repeats: int) -> dict:
    model, probe = setup(1024)
    with tempfile.TemporaryDirectory() as log_dir:
        logger = ConvVizLogger(model, probe, log_dir, layers=DemoAlexNet.LOGGED_LAYERS, k=9, batch_size=BATCH,
                               projections=None)
        logger.log(0)  # first checkpoint: stores every winning image once
        result = paired(model, probe, repeats, {"checkpoint": logger.log})
        logger.close()
        size = sum(os.path.getsize(os.path.join(log_dir, f)) for f in os.listdir(log_dir))
    return {**result, "ratio": result.pop("checkpoint_ratio"), "log_bytes": size, "checkpoints": repeats + 1}


def _failed(name: str, step: int) -> None:
    raise RuntimeError(f"the {name} checkpoint at step {step} was not written")


def memory(n: int, mode: str) -> int:
    model, probe = setup(n)
    with tempfile.TemporaryDirectory() as log_dir:
        logger = ConvVizLogger(model, probe, log_dir, layers=DemoAlexNet.LOGGED_LAYERS, k=9, batch_size=BATCH,
                               projections=None)
        if mode == "forward":
            return peak_extra(lambda: plain_forward(model, probe))
        return peak_extra(lambda: logger.log(0))


def memory_in_subprocess(n: int, mode: str) -> int:
    # A fresh process per figure, so one measurement does not warm the allocator for the next.
    # A fixed mmap threshold makes glibc return freed activation buffers at once, so RSS
    # follows live memory; its default adaptive threshold keeps them (measured: 50 to 67 MiB
    # of noise between runs, 33 to 36 MiB with it).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--memory-child", f"{n}:{mode}"],
                         check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the text")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        n, mode = args.memory_child.split(":")
        print(memory(int(n), mode))
        return
    t = timing(args.repeats)
    mem = {n: {mode: memory_in_subprocess(n, mode) for mode in ("checkpoint", "forward")} for n in (512, 4096)}
    ratio = mem[4096]["checkpoint"] / max(mem[512]["checkpoint"], 1)
    if args.json:
        print(json.dumps({"benchmark": "overhead", "threads": torch.get_num_threads(), "repeats": args.repeats, **t,
                          "peak_extra_bytes": mem, "memory_ratio_4096_512": ratio}))
        return
    mib = 1 << 20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DemoAlexNet 64x64, batch {BATCH}, k=9")
    print(f"plain no_grad forward, 1024 images : {t['forward_s'] * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"convviz checkpoint, 1024 images    : {t['checkpoint_s'] * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"checkpoint / forward ratio         : {t['ratio']:8.3f}   (median of per-checkpoint ratios; target <= 1.15)")
    print(f"event file after {t['checkpoints']} checkpoints    : {t['log_bytes'] / 1024:8.1f} KiB")
    for n in (512, 4096):
        print(f"peak extra memory, {n:4d} images     : checkpoint {mem[n]['checkpoint'] / mib:7.1f} MiB, "
              f"plain forward {mem[n]['forward'] / mib:7.1f} MiB")
    print(f"checkpoint peak memory 4096 / 512   : {ratio:8.2f}   (target: flat, ~1)")


if __name__ == "__main__":
    main()
