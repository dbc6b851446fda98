"""Crafted runs for the red-team findings of issue 19, written with tb-convviz's own writer.

Each run is a valid one-layer synthetic run (``BASE``) plus the crafted records: a
projection index with absurd ranks, image bombs (small files that declare huge
sizes), projections whose size disagrees with their layer, a zero-size filter tensor.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile

import numpy as np
from PIL import Image

from tb_convviz import plugin_data_pb2, summary
from tb_convviz import projection_format as fmt
from tb_convviz.synthetic_run import SyntheticRun, write_synthetic_run

# conv1 of this run has a 4x4 receptive field (stride 2) on 16x16 probe images.
BASE = dict(checkpoints=1, layers=1, units=2, k=4, probe_size=16, image_size=16)
FIELD = 4
BOMB_SIDE = 13000
BIG_PROBE_SIDE = 4096


@functools.cache
def webp(width: int, height: int) -> bytes:
    """A flat lossless WebP of ``width`` x ``height``: under 100 bytes whatever the size."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buf, format="WEBP", lossless=True, method=0)
    return buf.getvalue()


@functools.cache
def png(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 100).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def write_event(logdir: str, pb, step: int, suffix: str) -> None:
    writer = summary.EventWriter(logdir, filename_suffix=suffix)
    writer.write(pb, step)
    writer.close()


def add_projections(logdir: str, written: SyntheticRun, rows: list[tuple[int, int]], images: list[bytes], *,
                    height: int = FIELD, width: int = FIELD, clipped: bool = False, step: int = 0,
                    checkpoint: int = 0) -> None:
    """Projections of conv1 at ``step`` (the run's ``checkpoint``-th): index rows ``(unit, rank)``, each with its
    unit's top-1 probe image and position."""
    info = plugin_data_pb2.ProjectionInfo(layer="conv1", rule="deconvnet", channels=3, height=height, width=width,
                                          encoding="webp", levels=fmt.LEVELS, clipped=clipped,
                                          image_height=BASE["image_size"], image_width=BASE["image_size"])
    index = np.zeros(len(rows), fmt.INDEX_DTYPE)
    records = written.records["conv1"][checkpoint]
    for i, (unit, rank) in enumerate(rows):
        record = records[unit % len(records), 0]
        index[i] = (unit, rank, record["image"], record["y"], record["x"], 1.0)
    write_event(logdir, summary.projections_pb(info, fmt.encode_index(index), images), step, f".projections{step}")


def field_image(height: int = FIELD, width: int = FIELD) -> bytes:
    """A valid unclipped projection image of ``height`` x ``width``."""
    q = np.full((3, height, width), 128, np.uint8)
    q[:, 0, 0] = 255
    return fmt.encode_pixels(q)


def write_probe_run(logdir: str, replace, **options) -> SyntheticRun:
    """A run like ``BASE`` (with ``options``) whose stored probe images are ``replace(written)``'s bytes where it names them."""
    with tempfile.TemporaryDirectory() as source:
        written = write_synthetic_run(source, **{**BASE, **options})
    replace = replace(written)
    os.makedirs(logdir)
    writer = summary.EventWriter(logdir)
    images = [replace.get(i, summary.encode_image(written.images[i])) for i in written.stored]
    writer.write(summary.probe_chunk_pb(written.probe, written.stored, written.labels[written.stored].tolist(),
                                        images), 0)
    for info in written.layers:
        writer.write(summary.topk_pb(info, written.records[info.name][0].tobytes()), 0)
    writer.close()
    return written


def write_crafted_runs(root: str) -> dict[str, SyntheticRun]:
    """Every crafted run of issue 19 under ``root``, by name."""
    runs = {}
    path = lambda name: os.path.join(root, name)  # noqa: E731

    runs["ranks"] = written = write_synthetic_run(path("ranks"), **BASE)
    # Unit 0: ranks 0 and 2^31-1; unit 1: only negative ranks.
    add_projections(path("ranks"), written, [(0, 0), (0, 2**31 - 1), (1, -1), (1, -5)], [field_image()] * 4)

    runs["projection_bomb"] = written = write_synthetic_run(path("projection_bomb"), **BASE)
    add_projections(path("projection_bomb"), written, [(0, 0), (1, 0)], [webp(BOMB_SIDE, BOMB_SIDE), field_image()])

    runs["wrong_size"] = written = write_synthetic_run(path("wrong_size"), **BASE)
    add_projections(path("wrong_size"), written, [(0, 0), (1, 0)], [field_image(7, 5)] * 2, height=7, width=5)

    runs["unclipped4096"] = written = write_synthetic_run(path("unclipped4096"), **BASE, field_size=4096)
    add_projections(path("unclipped4096"), written, [(0, 0)], [webp(4096, 4096)], height=4096, width=4096)

    runs["filters0"] = written = write_synthetic_run(path("filters0"), **BASE)
    write_event(path("filters0"), summary.filters_pb(plugin_data_pb2.FilterInfo(module="conv1"),
                                                     np.zeros((4, 3, 0, 5), np.float32)), 0, ".filters")

    # A 13000^2 grey PNG in place of a 16x16 probe image, and nine 4096^2 ones for a unit's k=9.
    runs["probe_bomb"] = write_probe_run(path("probe_bomb"), lambda w: {probe_bomb_index(w): png(BOMB_SIDE, BOMB_SIDE)})
    runs["big_probe"] = write_probe_run(path("big_probe"), lambda w: {
        int(i): png(BIG_PROBE_SIDE, BIG_PROBE_SIDE, "RGB") for i in records_of(w, 0)["image"]}, k=9)
    return runs


def records_of(written: SyntheticRun, unit: int) -> np.ndarray:
    return written.records["conv1"][0, unit]


def probe_bomb_index(written: SyntheticRun) -> int:
    return int(records_of(written, 0)[0]["image"])

