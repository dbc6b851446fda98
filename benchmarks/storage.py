"""Bytes per checkpoint: convviz's log vs the same top-9 crops logged as ``SummaryWriter.add_image`` grids.

Side by side in one run: the demo's AlexNet-style net at 64x64 over 1024 Shapes
probe images, its five ReLU layers, k=9; weights are perturbed between checkpoints,
as training would move them. ConvVizLogger writes its own log dir; for the same
checkpoints, each unit's top-9 receptive-field crops (read back from that log) are
tiled into a 3x3 grid and logged with torch's ``SummaryWriter.add_image``, one image
per unit, into a second log dir. Prints the bytes each needs per checkpoint (all
checkpoints, and those after the first, which stores most winning probe images) and
the ratio, and convviz's bytes without probe images: each image is stored once, so in
a long run the records are what each further checkpoint costs. The grids hold patches only,
so the comparison counts the probe images and records; the projections and layer-1 filters
logged beside them are printed apart.

With ``--run DIR`` it instead replays the checkpoints of a run logged by real
training (all of them, the first included) as ``add_image`` grids.

    python benchmarks/storage.py [--checkpoints 4] [--run runs/demo/seed0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch
from tensorboard.backend.event_processing import event_file_loader
from torch.utils.tensorboard import SummaryWriter

from tb_convviz import ConvVizLogger, ProbeSet, metadata, read_run
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.demo.shapes import Shapes
from tb_convviz.geometry import crop
from tb_convviz.plugin import render
from tb_convviz.reader import event_files

LAYERS = [f"features.relu{i}" for i in range(1, 6)]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def log_grids(writer: SummaryWriter, run, image, step: int) -> None:
    """Each unit's top-k crops at ``step`` as one ``add_image`` grid (what one would log by hand).

    ``image(i)`` gives probe image i as displayed.
    """
    for name in [layer.name for layer in run.layers]:
        layer, records = run.layer(name), run.topk(name, step)
        positional = layer.fmap is not None
        for unit in range(layer.units):
            tiles = [
                crop(image(int(i)), render.record_box(layer.receptive_field, positional, int(y), int(x)))
                for i, y, x in zip(records.image[unit], records.y[unit], records.x[unit]) if i >= 0
            ]
            grid = render.mosaic(tiles, layer.receptive_field.size)[:, :, :3]
            writer.add_image(f"{name}/unit{unit}", grid, step, dataformats="HWC")


PARTS = ("probe images", "records", "projections", "filters")


def _part(tag: str) -> str:
    if tag in (metadata.PROBE_CHUNK_TAG, metadata.PROBE_INDEX_TAG, metadata.PROBE_IMAGES_TAG):
        return "probe images"
    if tag.startswith(metadata.PROJECTION_TAG_PREFIX):
        return "projections"
    return "filters" if tag.startswith(metadata.FILTERS_TAG_PREFIX) else "records"


def checkpoint_parts(log_dir: str) -> list[dict[str, int]]:
    """Per checkpoint, in order, the bytes of each of ``PARTS`` (TFRecord framing included).

    Probe-image chunks count toward the checkpoint they precede; "records" are the top-k
    records and scalars, what a reader needs besides the images to draw the patches.
    """
    out, pending = [], dict.fromkeys(PARTS, 0)
    for path in event_files(log_dir):
        for event in event_file_loader.EventFileLoader(path).Load():
            values = event.summary.value
            if not values:
                continue
            for v in values:
                pending[_part(v.tag)] += v.ByteSize()
            framing = event.ByteSize() - sum(v.ByteSize() for v in values) + 16
            if any(v.tag.startswith(metadata.TOPK_TAG_PREFIX) for v in values):
                pending["records"] += framing
                out.append(pending)
                pending = dict.fromkeys(PARTS, 0)
            else:
                pending["probe images"] += framing
    return out


def _summary(parts: list[dict[str, int]], grids: np.ndarray) -> dict:
    """Per-checkpoint means: the patches' bytes (probe images + records) against the grids', and the extras."""
    patches = np.array([p["probe images"] + p["records"] for p in parts], float)
    records = np.mean([p["records"] for p in parts])
    return {
        "checkpoints": len(parts),
        "convviz_bytes_per_checkpoint": float(patches.mean()),
        "add_image_bytes_per_checkpoint": float(grids.mean()),
        "ratio": float(grids.mean() / patches.mean()),
        "convviz_bytes_per_later_checkpoint": float(patches[1:].mean()),
        "add_image_bytes_per_later_checkpoint": float(grids[1:].mean()),
        "later_ratio": float(grids[1:].mean() / patches[1:].mean()),
        "convviz_record_bytes_per_checkpoint": float(records),
        "records_ratio": float(grids.mean() / records),
        "projection_bytes_per_checkpoint": float(np.mean([p["projections"] for p in parts])),
        "filter_bytes_per_checkpoint": float(np.mean([p["filters"] for p in parts])),
    }


def measure(checkpoints: int) -> dict:
    torch.manual_seed(0)
    model = DemoAlexNet()
    probe = ProbeSet.from_dataset(Shapes(1024, seed=0), n=1024, class_names=Shapes.class_names)
    with tempfile.TemporaryDirectory() as convviz_dir, tempfile.TemporaryDirectory() as images_dir:
        image_sizes = []
        writer = SummaryWriter(images_dir)
        with ConvVizLogger(model, probe, convviz_dir, layers=LAYERS, k=9) as logger:
            for step in range(checkpoints):
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1 + 0.05 * torch.randn_like(p))
                assert logger.log(step)
                log_grids(writer, read_run(convviz_dir), probe.display, step)
                writer.flush()
                image_sizes.append(dir_bytes(images_dir))
        writer.close()
        units = sum(read_run(convviz_dir).layer(name).units for name in LAYERS)
        parts = checkpoint_parts(convviz_dir)
    return {"units": units, **_summary(parts, np.diff([0] + image_sizes))}


def measure_run(run_dir: str) -> dict:
    """The same comparison over the checkpoints of a run logged by real training."""
    run = read_run(run_dir)
    grids = []
    with tempfile.TemporaryDirectory() as images_dir:
        with SummaryWriter(images_dir) as writer:
            for step in run.steps:
                log_grids(writer, run, run.probe_image, step)
                writer.flush()
                grids.append(dir_bytes(images_dir))
    return {"run": run_dir, "units": sum(layer.units for layer in run.layers),
            **_summary(checkpoint_parts(run_dir), np.diff([0] + grids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=4, help="at least 2")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the text")
    parser.add_argument("--run", help="instead, compare over the checkpoints of this logged run "
                        "(e.g. runs/demo/seed0 from `tb-convviz demo`)")
    args = parser.parse_args()
    result = measure_run(args.run) if args.run else measure(max(args.checkpoints, 2))
    if args.json:
        print(json.dumps({"benchmark": "storage_run" if args.run else "storage", **result}))
        return
    kib = 1024
    if args.run:
        print(f"{args.run}: {result['checkpoints']} checkpoints of real training, {result['units']} units")
    else:
        print(f"DemoAlexNet 64x64, {result['units']} units in 5 layers, k=9, 1024 Shapes probe images, "
              f"{result['checkpoints']} checkpoints")
    print(f"{'':34s} {'convviz':>12s} {'add_image':>12s} {'ratio':>8s}")
    print(f"{'KiB per checkpoint, all':34s} {result['convviz_bytes_per_checkpoint'] / kib:12.1f} "
          f"{result['add_image_bytes_per_checkpoint'] / kib:12.1f} {result['ratio']:8.1f}")
    print(f"{'KiB per checkpoint, after the first':34s} {result['convviz_bytes_per_later_checkpoint'] / kib:12.1f} "
          f"{result['add_image_bytes_per_later_checkpoint'] / kib:12.1f} {result['later_ratio']:8.1f}   "
          "(target >= 50)")
    print(f"{'KiB per checkpoint, records only':34s} {result['convviz_record_bytes_per_checkpoint'] / kib:12.1f} "
          f"{result['add_image_bytes_per_checkpoint'] / kib:12.1f} {result['records_ratio']:8.1f}   "
          "(once every probe image is stored)")
    print(f"beside them, per checkpoint: projections {result['projection_bytes_per_checkpoint'] / kib:.1f} KiB, "
          f"layer-1 filters {result['filter_bytes_per_checkpoint'] / kib:.1f} KiB (not in the grids)")


if __name__ == "__main__":
    main()
