"""A checkpoint's records, encoded and written: top-k records, winning probe images, projections, filters, scalars."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from tensorboard.compat.proto import summary_pb2
from torch import nn

from tb_convviz import metadata, plugin_data_pb2, summary
from tb_convviz.probe import ProbeSet
from tb_convviz.projection import LayerProjections
from tb_convviz.projection_format import DOMINANT_RATIO, ENCODING, LEVELS, NEAR_ZERO_RATIO, encode_index, filter_flags
from tb_convviz.reader import Run
from tb_convviz.topk import TopK


class RecordWriter:
    """Writes checkpoints into ``log_dir`` (or into a torch ``SummaryWriter``, ``user_writer``), on rank 0.

    Each probe image some record names is stored once in the run; ``resume`` picks up
    where an earlier logger into the same log dir left off.
    """

    def __init__(self, log_dir: str, user_writer: Any, *, net: nn.Module, probe: ProbeSet,
                 layer_infos: dict[str, plugin_data_pb2.LayerInfo], first_conv: str | None,
                 projection_rule: str) -> None:
        self.log_dir, self.user_writer, self.net, self.probe = log_dir, user_writer, net, probe
        self.layer_infos, self.first_conv, self.projection_rule = layer_infos, first_conv, projection_rule
        self.probe_info = plugin_data_pb2.ProbeInfo(
            n=len(probe), channels=probe.shape[0], height=probe.shape[1], width=probe.shape[2],
            class_names=probe.class_names or [], fingerprint=probe.fingerprint,
        )
        self._writer: summary.EventWriter | None = None
        self._chunk = -1
        self._stored: set[int] = set()
        self._previous: dict[str, np.ndarray] = {}

    def resume(self, run: Run, last_step: int) -> None:
        """Continue ``run``, whose last checkpoint is ``last_step`` (-1: none): its stored images and chunk steps."""
        if last_step >= 0:
            for layer in run.layers:
                if layer.name in self.layer_infos:
                    try:
                        self._previous[layer.name] = run.topk(layer.name, last_step).image
                    except KeyError:  # a layer missing at that step
                        pass
        self._stored, self._chunk = run.stored_images, run.last_chunk

    def write(self, step: int, results: dict[str, TopK],
              projections: dict[str, LayerProjections] | None = None) -> None:
        """Write one checkpoint: the new winning probe images first, then its records in one event at ``step``."""
        writer = self._writer or self._open()
        self._write_images(writer, results)
        values, scalars, images = [], {}, {}
        for name, topk in results.items():
            info = self.layer_infos[name]
            position = topk.position.numpy()
            has_position = info.fmap_w > 0
            y = np.where(position >= 0, position // max(info.fmap_w, 1), -1) if has_position else -1
            x = np.where(position >= 0, position % max(info.fmap_w, 1), -1) if has_position else -1
            image = topk.image.numpy()
            payload = metadata.encode_records(topk.values.numpy(), image, y, x)
            values.extend(summary.topk_pb(info, payload).value)
            scalars.update(self._layer_scalars(name, topk.values.numpy(), image))
            images[name] = image
        values.extend(self._projection_values(projections or {}))
        values.extend(self._filter_values(scalars))
        values.extend(summary.scalars_pb(scalars).value)
        writer.write(summary_pb2.Summary(value=values), step)
        writer.flush()
        self._previous = images

    def _write_images(self, writer: summary.EventWriter, results: dict[str, TopK]) -> None:
        winners = set()
        for topk in results.values():
            winners.update(topk.image[topk.image >= 0].unique().tolist())
        new = sorted(winners - self._stored)
        encoded = [summary.encode_image(self.probe.display(i)) for i in new]
        for part in summary.split_chunks([len(b) for b in encoded]):
            # A chunk step is used once, even by a write that fails: a reader must never meet two
            # different chunks at one step. Images of a chunk that was written are not written again.
            self._chunk += 1
            labels = [self.probe.label(i) for i in new[part]]
            writer.write(summary.probe_chunk_pb(self.probe_info, new[part], labels, encoded[part]), self._chunk)
            self._stored.update(new[part])

    def _layer_scalars(self, name: str, values: np.ndarray, image: np.ndarray) -> dict[str, float]:
        # Not-finite units are neither dead nor counted in the means; a layer of only those
        # gets a NaN mean peak (the Scalars dashboard shows the gap).
        peak, finite = values[:, 0], ~metadata.not_finite(values, image)
        out = {
            metadata.scalar_tag(name, "dead_fraction"): float(np.mean(finite & ~(peak > 0))),
            metadata.scalar_tag(name, "mean_peak"): float(np.mean(peak[finite])) if finite.any() else float("nan"),
        }
        previous = self._previous.get(name)
        if previous is not None and previous.shape == image.shape:
            both = finite & (previous >= 0).any(axis=1)
            if both.any():
                overlap = metadata.topk_overlap(image[both], previous[both]).mean().item()
                out[metadata.scalar_tag(name, "topk_overlap")] = overlap
        return out

    def _projection_values(self, projections: dict[str, LayerProjections]) -> list[summary_pb2.Summary.Value]:
        values = []
        channels, height, width = self.probe.shape
        for name, layer in projections.items():
            rf = self.layer_infos[name].receptive_field
            info = plugin_data_pb2.ProjectionInfo(
                layer=name, rule=self.projection_rule, channels=channels, height=rf.size_h, width=rf.size_w,
                uncovered=layer.uncovered, encoding=ENCODING, levels=LEVELS, clipped=True, image_height=height,
                image_width=width,
            )
            values.extend(summary.projections_pb(info, encode_index(layer.index), layer.images).value)
        return values

    def _filter_values(self, scalars: dict[str, float]) -> list[summary_pb2.Summary.Value]:
        if self.first_conv is None:
            return []
        weight = dict(self.net.named_modules())[self.first_conv].weight.detach().float().cpu().numpy()
        dominant, near_zero = filter_flags(weight)
        scalars[metadata.scalar_tag(self.first_conv, "dominant_filters")] = float(dominant.sum())
        scalars[metadata.scalar_tag(self.first_conv, "near_zero_filters")] = float(near_zero.sum())
        info = plugin_data_pb2.FilterInfo(module=self.first_conv, dominant_ratio=DOMINANT_RATIO,
                                          near_zero_ratio=NEAR_ZERO_RATIO)
        return list(summary.filters_pb(info, weight).value)

    def _open(self) -> summary.EventWriter:
        if self.user_writer is not None:
            target = getattr(self.user_writer, "_get_file_writer", lambda: self.user_writer)()
        else:
            os.makedirs(self.log_dir, exist_ok=True)
            target = self.log_dir
        self._writer = summary.EventWriter(target)
        return self._writer

    def failed(self) -> None:
        """After a failed write: drop a writer that cannot go on, so that the next checkpoint opens a new file.

        That is a file that could not be cut back to its last record, or a torch writer,
        whose thread dies on an I/O error.
        """
        writer = self._writer
        if writer is None or (self.user_writer is None and not writer.broken):
            return
        self._writer = None
        if self.user_writer is None:
            try:
                writer.close()
            except Exception:
                pass

    def close(self) -> None:
        """Flush and close the event file (a passed-in writer is flushed, not closed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
