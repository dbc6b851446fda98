"""Write a complete, valid convviz run from random numpy data, without torch or training.

Used by tests, benchmarks and the scale checks: the result is deterministic for a
given ``seed``, and :class:`SyntheticRun` returns everything that was written so
that callers can compute expected answers independently of the plugin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np
from tensorboard.compat.proto import summary_pb2

from tb_convviz import metadata, plugin_data_pb2, summary
from tb_convviz.geometry import ReceptiveField


@dataclasses.dataclass
class SyntheticRun:
    """What :func:`write_synthetic_run` wrote.

    ``records[layer]`` is a ``[checkpoints, units, k]`` RECORD_DTYPE array aligned with
    ``steps``; ``images`` the uint8 ``[n, H, W, C]`` probe set (stored losslessly when
    ``H * W <= summary.JPEG_ABOVE_PIXELS``); ``stored`` the probe indices in the log.
    """

    logdir: str
    steps: list[int]
    layers: list[plugin_data_pb2.LayerInfo]
    fields: dict[str, ReceptiveField]
    records: dict[str, np.ndarray]
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    probe: plugin_data_pb2.ProbeInfo
    stored: list[int]


def layer_geometry(index: int, image_size: int) -> tuple[ReceptiveField, int]:
    """Receptive field and feature-map side of layer ``index`` (1-based) of a conv3x3 + pool2 chain."""
    size, stride, center = 1, 1, 0.0
    for _ in range(index):
        size += 2 * stride  # conv 3x3, padding 1
        size += stride  # max-pool 2x2, stride 2
        center += 0.5 * stride
        stride *= 2
    fmap = max(image_size // stride, 1)
    return ReceptiveField(size=(size, size), stride=(stride, stride), offset=(center, center)), fmap


def write_synthetic_run(
    logdir: str,
    *,
    checkpoints: int = 3,
    layers: int = 2,
    units: int = 8,
    k: int = 9,
    probe_size: int = 64,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 4,
    step_every: int = 10,
    fc_layer: bool = False,
    chunk_bytes: int = summary.CHUNK_BYTES,
    field_size: int | None = None,
    seed: int = 0,
) -> SyntheticRun:
    """Write ``checkpoints`` x ``layers`` top-k records over a random probe set into ``logdir``.

    Layers are named ``conv1``..``convL`` with receptive fields of a conv3x3 + pool2
    chain; ``fc_layer`` adds a fully connected ``fc`` layer (records without a
    position); ``chunk_bytes`` caps each probe-image chunk; ``field_size`` gives every
    conv layer a square receptive field of that many pixels instead (e.g. a huge one). Units change their top-k
    at a rate that decays over checkpoints, slower for higher layers, as in Zeiler &
    Fergus Fig. 4. A few units are dead (all values 0).
    """
    if k > probe_size:
        raise ValueError(f"k={k} must not exceed probe_size={probe_size}")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(probe_size, image_size, image_size, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=probe_size).astype(np.int32)
    class_names = [f"class {c}" for c in range(num_classes)]
    fingerprint = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    probe = plugin_data_pb2.ProbeInfo(
        n=probe_size, height=image_size, width=image_size, channels=channels,
        class_names=class_names, fingerprint=fingerprint,
    )

    infos, fields = [], {}
    for index in range(1, layers + 1 + int(fc_layer)):
        if index <= layers:
            name = f"conv{index}"
            rf, fmap = layer_geometry(index, image_size)
            if field_size is not None:
                rf = dataclasses.replace(rf, size=(field_size, field_size))
        else:
            name, rf, fmap = "fc", ReceptiveField.whole_input(image_size, image_size), 0
        fields[name] = rf
        infos.append(plugin_data_pb2.LayerInfo(
            name=name, index=index, units=units, k=k, receptive_field=rf.to_proto(),
            fmap_h=fmap, fmap_w=fmap, input_h=image_size, input_w=image_size,
            probe_fingerprint=fingerprint,
        ))

    steps = [i * step_every for i in range(checkpoints)]
    records = {info.name: np.empty((checkpoints, units, k), metadata.RECORD_DTYPE) for info in infos}
    os.makedirs(logdir, exist_ok=True)
    writer = summary.EventWriter(logdir)
    stored: set[int] = set()
    chunk_step = 0
    try:
        for c, step in enumerate(steps):
            for info in infos:
                rec = records[info.name][c]
                rec[...] = _records(rng, records[info.name][c - 1] if c else None, info, c, probe_size)
            # Chunks first, so that every image a top-k tensor names is already stored.
            named = np.unique(np.concatenate([records[i.name][c]["image"].ravel() for i in infos]))
            new = [int(i) for i in named if i >= 0 and int(i) not in stored]
            encoded = [summary.encode_image(images[i]) for i in new]
            for part in summary.split_chunks([len(e) for e in encoded], chunk_bytes):
                writer.write(
                    summary.probe_chunk_pb(probe, new[part], labels[new[part]].tolist(), encoded[part]),
                    chunk_step,
                )
                chunk_step += 1
            stored.update(new)
            values, scalars = [], {}
            for info in infos:
                rec = records[info.name][c]
                values.extend(summary.topk_pb(info, rec.tobytes()).value)
                peaks = rec["value"][:, 0]
                scalars[metadata.scalar_tag(info.name, "dead_fraction")] = float(np.mean(~(peaks > 0)))
                scalars[metadata.scalar_tag(info.name, "mean_peak")] = float(peaks.mean())
                if c:
                    scalars[metadata.scalar_tag(info.name, "topk_overlap")] = float(
                        metadata.topk_overlap(rec["image"], records[info.name][c - 1]["image"]).mean()
                    )
            values.extend(summary.scalars_pb(scalars).value)
            writer.write(summary_pb2.Summary(value=values), step)
    finally:
        writer.close()
    return SyntheticRun(
        logdir=logdir, steps=steps, layers=infos, fields=fields, records=records, images=images,
        labels=labels, class_names=class_names, probe=probe, stored=sorted(stored),
    )


def _records(
    rng: np.random.Generator, previous: np.ndarray | None, info: plugin_data_pb2.LayerInfo,
    checkpoint: int, probe_size: int,
) -> np.ndarray:
    units, k = info.units, info.k
    # Distinct images per unit: a random start plus k-1 positive gaps that sum to < n.
    gap = max(probe_size // k, 1)
    offsets = np.concatenate(
        [np.zeros((units, 1), np.int64), np.cumsum(rng.integers(1, gap + 1, (units, k - 1)), axis=1)], axis=1
    )
    image = (rng.integers(0, probe_size, (units, 1)) + offsets) % probe_size
    value = -np.sort(-rng.random((units, k)).astype(np.float32) * (1 + checkpoint), axis=1)
    value[rng.random(units) < 0.1] = 0.0
    if info.fmap_h:
        y = rng.integers(0, info.fmap_h, (units, k))
        x = rng.integers(0, info.fmap_w, (units, k))
    else:
        y = x = np.full((units, k), -1)
    rec = np.empty((units, k), metadata.RECORD_DTYPE)
    rec["value"], rec["image"], rec["y"], rec["x"] = value, image, y, x
    if previous is not None:
        keep = rng.random(units) >= math.exp(-checkpoint / (2.0 * info.index))
        rec[keep] = previous[keep]
    return rec
