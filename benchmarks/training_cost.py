"""What a checkpoint costs in training steps, on real nets, with the default options.

Side by side in one run, per net (torchvision resnet18, efficientnet_b0 and convnext_tiny,
random init, 10 classes, --size px): two loggers on the same model, one with the default
top-1 projections and one with ``projections=None`` (both otherwise default: layers="auto",
k=9, effective fields, --probe probe images). Each timed checkpoint (``log``) sits between
two training steps (SGD with momentum, cross-entropy, a batch of --batch random images),
and its ratio is its time ÷ the mean of those two steps, so machine load hits both alike;
the median of --repeats such ratios is printed, with the first checkpoint's time apart (it
also stores most probe images). The weights move between checkpoints as training moves
them. Also printed: the stored projection bytes per unit per checkpoint, and the process's
peak resident memory.

    python benchmarks/training_cost.py [--probe 1024] [--size 64] [--batch 64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import warnings

import torch
import torchvision

from overhead import timed
from projections import stored_bytes
from tb_convviz import ConvVizLogger, ProbeSet, read_run

NETS = ("resnet18", "efficientnet_b0", "convnext_tiny")


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    probe = ProbeSet(torch.rand(args.probe, 3, args.size, args.size))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.rand(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))

    def train_step() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()  # warm-up
    row: dict = {"net": name}
    steps: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        loggers = {"top1": ConvVizLogger(model, probe, f"{root}/top1", overhead_budget=None),
                   "none": ConvVizLogger(model, probe, f"{root}/none", projections=None, overhead_budget=None)}
        for key, logger in loggers.items():
            row[f"{key}_first_s"] = timed(lambda: logger.log(0))
        for key, logger in loggers.items():
            seconds, ratios = [], []
            for step in range(1, args.repeats + 1):
                before = timed(train_step)
                seconds.append(timed(lambda: logger.log(step)))
                after = timed(train_step)
                steps += [before, after]
                ratios.append(seconds[-1] / ((before + after) / 2))
            row[f"{key}_s"], row[f"{key}_ratio"] = statistics.median(seconds), statistics.median(ratios)
        for logger in loggers.values():
            logger.close(final_checkpoint=False)
        row["projection_bytes_per_unit"] = stored_bytes(read_run(f"{root}/top1"))["bytes_per_unit"]
    row["train_step_s"] = statistics.median(steps)
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
    say = (lambda *_: None) if args.json else lambda text: print(text, flush=True)
    say(f"{args.probe} probe images at {args.size} px, training batch {args.batch}, {torch.get_num_threads()} "
        f"threads; medians of {args.repeats} checkpoints after the first, each ÷ the training steps around it")
    say(f"{'net':<16}{'train step':>11}{'top-1 ckpt':>12}{'ratio':>7}{'no proj':>9}{'ratio':>7}"
        f"{'first ckpt':>11}{'proj B/unit':>12}")
    rows = []
    for name in args.nets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers="auto" says convnext_tiny has 4 stages
            r = measure(name, args)
        rows.append(r)
        say(f"{r['net']:<16}{r['train_step_s']:>10.3f}s{r['top1_s']:>11.2f}s{r['top1_ratio']:>7.1f}"
            f"{r['none_s']:>8.2f}s{r['none_ratio']:>7.1f}{r['top1_first_s']:>10.2f}s"
            f"{r['projection_bytes_per_unit']:>12.0f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json:
        print(json.dumps({"settings": vars(args), "threads": torch.get_num_threads(), "rows": rows,
                          "peak_rss_bytes": peak}))
        return
    say(f"peak resident memory: {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
