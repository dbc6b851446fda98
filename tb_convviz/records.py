"""A checkpoint's records, encoded and written: top-k records, winning probe images, projections, filters, scalars."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np
import torch
from tensorboard.compat.proto import summary_pb2
from torch import nn

from tb_convviz import effective_field, metadata, plugin_data_pb2, summary
from tb_convviz.probe import ProbeSet
from tb_convviz.projection import LayerProjections
from tb_convviz.projection_format import DOMINANT_RATIO, ENCODING, LEVELS, NEAR_ZERO_RATIO, encode_index, filter_flags
from tb_convviz.reader import Run
from tb_convviz.topk import TopK


@dataclasses.dataclass
class StreamRecords:
    """A stream's part of a checkpoint: records naming images by number, and the images numbered at it."""

    topk: dict[str, TopK]
    projections: dict[str, LayerProjections]
    images: dict[int, torch.Tensor]  # number -> the image as fed, [C, H, W]
    labels: dict[int, int]


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
        self._chunks: dict[str, int] = {}  # tag -> its last chunk step
        self._stored: set[int] = set()
        self._previous: dict[str, np.ndarray] = {}
        self._restart_after: int | None = None  # the log dir's last step, until this session's first checkpoint

    def resume(self, run: Run, last_step: int) -> None:
        """Continue ``run``, whose last checkpoint is ``last_step`` (-1: none): its stored images and chunk steps."""
        if last_step >= 0:
            self._restart_after = last_step
            for layer in run.layers:
                if layer.name in self.layer_infos:
                    try:
                        self._previous[layer.name] = run.topk(layer.name, last_step).image
                    except KeyError:  # a layer missing at that step
                        pass
        self._stored = run.stored_images
        self._chunks = {metadata.PROBE_CHUNK_TAG: run.last_chunk}
        self._chunks.update({metadata.stream_tag(source, "chunk"): c for source, c in run.stream_chunks.items()})

    def write(self, step: int, results: dict[str, TopK], projections: dict[str, LayerProjections] | None = None,
              streams: dict[str, StreamRecords] | None = None, fields: dict[str, tuple[int, int]] | None = None) -> None:
        """Write one checkpoint: the new winning images first, then its records (and ``fields``, the layers'
        effective fields) in one event at ``step``."""
        writer = self._writer or self._open()
        new = sorted(self._winners(results) - self._stored)
        self._write_chunks(writer, metadata.PROBE_CHUNK_TAG, new, self.probe.display, self.probe.label, self._stored)
        for source, stream in (streams or {}).items():
            self._write_chunks(writer, metadata.stream_tag(source, "chunk"), sorted(stream.images),
                               lambda i, s=stream: self.probe.show(s.images[i]), lambda i, s=stream: s.labels.get(i, -1))
        values, scalars, images = [], {}, {}
        for name, topk in results.items():
            values.append(self._records_value(name, topk))
            scalars.update(self._layer_scalars(name, topk.values.numpy(), topk.image.numpy()))
            images[name] = topk.image.numpy()
        values.extend(self._projection_values(projections or {}))
        for source, stream in (streams or {}).items():
            values.extend(self._records_value(name, topk, metadata.stream_tag(source, "topk", name))
                          for name, topk in stream.topk.items())
            values.extend(self._projection_values(stream.projections, source))
        values.extend(self._filter_values(scalars))
        values.extend(effective_field.summary_values(fields or {}, scalars))
        values.extend(summary.scalars_pb(scalars).value)
        if self._restart_after is not None:
            values.extend(summary.restart_pb(self._restart_after).value)
        writer.write(summary_pb2.Summary(value=values), step)
        writer.flush()
        self._previous, self._restart_after = images, None

    @staticmethod
    def _winners(results: dict[str, TopK]) -> set[int]:
        return {i for topk in results.values() for i in topk.image[topk.image >= 0].unique().tolist()}

    def _write_chunks(self, writer: summary.EventWriter, tag: str, new: list[int], show: Callable[[int], np.ndarray],
                      label: Callable[[int], int], stored: set[int] | None = None) -> None:
        """Store images ``new`` in ``tag``'s chunks, at its next chunk steps; those written join ``stored``."""
        encoded = [summary.encode_image(show(i)) for i in new]
        for part in summary.split_chunks([len(b) for b in encoded]):
            # A chunk step is used once, even by a write that fails: a reader must never meet two
            # different chunks at one step. Images of a chunk that was written are not written again.
            self._chunks[tag] = self._chunks.get(tag, -1) + 1
            labels = [label(i) for i in new[part]]
            writer.write(summary.probe_chunk_pb(self.probe_info, new[part], labels, encoded[part], tag),
                         self._chunks[tag])
            if stored is not None:
                stored.update(new[part])

    def _records_value(self, name: str, topk: TopK, tag: str | None = None) -> summary_pb2.Summary.Value:
        info = self.layer_infos[name]
        position = topk.position.numpy()
        has_position = info.fmap_w > 0
        y = np.where(position >= 0, position // max(info.fmap_w, 1), -1) if has_position else -1
        x = np.where(position >= 0, position % max(info.fmap_w, 1), -1) if has_position else -1
        payload = metadata.encode_records(topk.values.numpy(), topk.image.numpy(), y, x)
        return summary.topk_pb(info, payload, tag).value[0]

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

    def _projection_values(self, projections: dict[str, LayerProjections],
                           source: str = "probe") -> list[summary_pb2.Summary.Value]:
        values = []
        channels, height, width = self.probe.shape
        for name, layer in projections.items():
            rf = self.layer_infos[name].receptive_field
            info = plugin_data_pb2.ProjectionInfo(
                layer=name, rule=self.projection_rule, channels=channels, height=rf.size_h, width=rf.size_w,
                uncovered=layer.uncovered, encoding=ENCODING, levels=LEVELS, clipped=True, image_height=height,
                image_width=width,
            )
            tag = metadata.stream_tag(source, "projection", name) if source != "probe" else None
            values.extend(summary.projections_pb(info, encode_index(layer.index), layer.images, tag).value)
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

    def moved(self) -> bool:
        """Whether the event file this writes was deleted or moved (with its log dir) since it was opened."""
        return self._writer is not None and self.user_writer is None and self._writer.unlinked()

    def restart(self) -> None:
        """Write into a new event file from the next checkpoint on, storing again every probe image it names."""
        writer, self._writer = self._writer, None
        self._stored = set()
        if writer is not None:
            writer.close()

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
