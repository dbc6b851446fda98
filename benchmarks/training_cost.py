"""What a checkpoint costs in training steps, on real nets, with the default options.

Side by side in one run, per net (torchvision resnet18, efficientnet_b0 and convnext_tiny,
random init, 10 classes, SIZE px): the median wall time of a training step (SGD with
momentum, cross-entropy, a batch of --batch random images), and of a checkpoint
(``ConvVizLogger.log``: layers="auto", k=9, --probe probe images) with the default top-1
projections and with ``projections=None``; the ratio of each to the training step; the
stored projection bytes per unit per checkpoint; and the process's peak resident memory.
The weights move between checkpoints as training would move them. Checkpoint times are
the median over --repeats checkpoints after the first (which also stores most probe images;
its time is printed apart).

    python benchmarks/training_cost.py [--probe 1024] [--size 64] [--batch 64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

import torch
import torchvision

from projections import stored_bytes
from tb_convviz import ConvVizLogger, ProbeSet, read_run

NETS = ("resnet18", "efficientnet_b0", "convnext_tiny")


def train_step_seconds(model: torch.nn.Module, batch: int, size: int, repeats: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    times = []
    model.train()
    for i in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def checkpoint_seconds(model: torch.nn.Module, probe: ProbeSet, log_dir: str, repeats: int,
                       projections: str | None) -> tuple[float, float]:
    """(first checkpoint, median of the next ``repeats``) in seconds."""
    times = []
    with ConvVizLogger(model, probe, log_dir, projections=projections, overhead_budget=None) as logger:
        for step in range(repeats + 1):
            start = time.perf_counter()
            logger.log(step)
            times.append(time.perf_counter() - start)
            with torch.no_grad():  # as an update would move them
                for p in model.parameters():
                    p.mul_(1.01)
        logger.close(final_checkpoint=False)
    return times[0], statistics.median(times[1:])


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    probe = ProbeSet(torch.rand(args.probe, 3, args.size, args.size))
    step = train_step_seconds(model, args.batch, args.size, args.repeats)
    row = {"net": name, "train_step_s": step}
    with tempfile.TemporaryDirectory() as root:
        for key, projections in (("top1", "top1"), ("none", None)):
            first, median = checkpoint_seconds(model, probe, f"{root}/{key}", args.repeats, projections)
            row[f"{key}_first_s"], row[f"{key}_s"], row[f"{key}_ratio"] = first, median, median / step
        row["projection_bytes_per_unit"] = stored_bytes(read_run(f"{root}/top1"))["bytes_per_unit"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, default=1024, help="probe images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="training batch size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps and checkpoints (default: %(default)s)")
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(name, args) for name in args.nets]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"settings": vars(args), "threads": torch.get_num_threads(), "rows": rows, "peak_rss_bytes": peak}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.probe} probe images at {args.size} px, training batch {args.batch}, "
          f"{torch.get_num_threads()} threads; checkpoint times: median of {args.repeats} after the first")
    print(f"{'net':<16}{'train step':>11}{'top-1 ckpt':>12}{'ratio':>7}{'no proj':>9}{'ratio':>7}"
          f"{'first ckpt':>11}{'proj B/unit':>12}")
    for r in rows:
        print(f"{r['net']:<16}{r['train_step_s']:>10.3f}s{r['top1_s']:>11.2f}s{r['top1_ratio']:>7.1f}"
              f"{r['none_s']:>8.2f}s{r['none_ratio']:>7.1f}{r['top1_first_s']:>10.2f}s"
              f"{r['projection_bytes_per_unit']:>12.0f}")
    print(f"peak resident memory: {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
