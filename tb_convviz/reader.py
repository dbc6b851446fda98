"""Read a convviz run (one log dir) back into numpy arrays, without TensorBoard or torch."""

from __future__ import annotations

import dataclasses
import glob
import os
import struct
from typing import Iterator

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from tb_convviz import metadata, plugin_data_pb2, stored_image, summary
from tb_convviz import projection_format as fmt
from tb_convviz.geometry import CropField, ReceptiveField, effective_crop, record_box


@dataclasses.dataclass(frozen=True)
class Layer:
    """A logged layer: its module name, 1-based index, units, k and where its units look."""

    name: str
    index: int
    units: int
    k: int
    receptive_field: ReceptiveField
    fmap: tuple[int, int] | None
    input_size: tuple[int, int]
    probe_fingerprint: str

    @classmethod
    def from_proto(cls, info: plugin_data_pb2.LayerInfo) -> "Layer":
        return cls(
            name=info.name, index=info.index, units=info.units, k=info.k,
            receptive_field=ReceptiveField.from_proto(info.receptive_field),
            fmap=(info.fmap_h, info.fmap_w) if info.fmap_h else None,
            input_size=(info.input_h, info.input_w), probe_fingerprint=info.probe_fingerprint,
        )


@dataclasses.dataclass(frozen=True)
class Probe:
    """What the run stored about its probe set."""

    n: int
    height: int
    width: int
    channels: int
    class_names: list[str]
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class TopKRecords:
    """One layer's records at one step, each ``[units, k]``; y = x = -1 without a position.

    A unit whose activations were NaN or infinite has no ranks: values NaN, image -1.
    """

    values: np.ndarray
    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    label: np.ndarray

    @property
    def not_finite(self) -> np.ndarray:
        """``[units]`` bool: the units recorded as not finite at this step."""
        return metadata.not_finite(self.values, self.image)


class Run:
    """A convviz run read from its event files."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.layers: list[Layer] = []
        self.probe: Probe | None = None
        self.scalars: dict[str, dict[int, float]] = {}
        self.last_chunk = -1
        # Probe chunks that could not be used, each saying why (their images are not shown).
        self.errors: list[str] = []
        # Whether probe chunks of format v1 (index tensor + image blobs paired by step) were read.
        self.legacy_chunks = False
        self._payloads: dict[str, dict[int, bytes]] = {}
        self._images: dict[int, bytes] = {}
        self._labels: dict[int, int] = {}
        # source -> layer -> step -> (info, index rows, image blobs): one self-contained record each.
        self._projections: dict[str, dict[str, dict[int, tuple[plugin_data_pb2.ProjectionInfo, np.ndarray, list]]]] = {}
        self.filter_module: str | None = None
        self._effective: dict[str, dict[int, tuple[int, int]]] = {}
        self._filters: dict[int, np.ndarray] = {}
        # Streams ("train", "eval"): per source, like the probe's records, images and labels.
        self._stream_payloads: dict[str, dict[str, dict[int, bytes]]] = {}
        self._stream_images: dict[str, dict[int, bytes]] = {}
        self._stream_labels: dict[str, dict[int, int]] = {}
        self.stream_chunks: dict[str, int] = {}
        # The first step of each session that resumed this log dir (a restarted training).
        self.restarts: list[int] = []

    @property
    def steps(self) -> list[int]:
        """Steps at which any layer was logged, ascending."""
        return sorted({s for per_step in self._payloads.values() for s in per_step})

    @property
    def stored_images(self) -> set[int]:
        return set(self._images)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in {self.path}; logged layers: {[l.name for l in self.layers]}")

    @property
    def streams(self) -> list[str]:
        """The streams ("train", "eval") this run logged records of."""
        return [s for s in metadata.SOURCES[1:] if s in self._stream_payloads]

    def topk(self, layer: str, step: int | None = None, source: str = "probe") -> TopKRecords:
        """Records of ``layer`` at ``step`` (the latest if None), over the probe set or a stream ("train", "eval")."""
        info = self.layer(layer)
        if source not in metadata.SOURCES:
            raise ValueError(f"source must be one of {metadata.SOURCES}, got {source!r}")
        per_step = (self._payloads if source == "probe" else self._stream_payloads.get(source, {})).get(info.name, {})
        if not per_step:
            raise KeyError(f"layer {layer!r} has no {source!r} records in {self.path}")
        step = max(per_step) if step is None else step
        if step not in per_step:
            raise KeyError(f"layer {layer!r} has no {source} checkpoint at step {step}; steps: {sorted(per_step)}")
        rec = metadata.decode_records(per_step[step], info.units, info.k)
        image = rec["image"].astype(np.int64)
        labels = self._labels if source == "probe" else self._stream_labels.get(source, {})
        label = np.vectorize(lambda i: labels.get(int(i), -1), otypes=[np.int64])(image)
        return TopKRecords(rec["value"].copy(), image, rec["y"].astype(np.int64), rec["x"].astype(np.int64), label)

    def effective_field(self, layer: str, step: int | None = None) -> tuple[int, int] | None:
        """(h, w) of ``layer``'s effective receptive field at ``step`` (the latest if None); None if not measured.

        Runs logged before tb-convviz measured it have none.
        """
        per_step = self._effective.get(self.layer(layer).name, {})
        if step is None:
            return per_step[max(per_step)] if per_step else None
        return per_step.get(step)

    def crop(self, layer: str, step: int, theoretical: bool = False) -> CropField:
        """How ``layer``'s records at ``step`` are cropped: the effective field's box kept inside the image where
        it was measured, else (or if ``theoretical``) the theoretical field's box."""
        info = self.layer(layer)
        size = None if theoretical else self.effective_field(layer, step)
        return effective_crop(info.receptive_field, size, info.input_size)

    def probe_image(self, index: int) -> np.ndarray:
        """Probe image ``index`` as displayed, uint8 ``[H, W, 3]``; only images some record names are stored."""
        if index not in self._images:
            raise KeyError(f"probe image {index} is not stored: only images named by a top-k record are kept")
        return self._decode(self._images[index], f"probe image {index}")

    def _decode(self, blob: bytes, what: str) -> np.ndarray:
        if self.probe is None:
            raise ValueError(f"{self.path} stores images without describing the probe set: the run is damaged")
        # Checked from the header against the probe set's size, before any pixel is decoded.
        return stored_image.decode(blob, self.probe.height, self.probe.width, mode="RGB", what=what)

    def label(self, index: int) -> int:
        return self._labels.get(index, -1)

    def stream_image(self, source: str, index: int) -> np.ndarray:
        """Image ``index`` of stream ``source`` as displayed, uint8 ``[H, W, 3]`` (numbered as its records name it)."""
        blob = self._stream_images.get(source, {}).get(index)
        if blob is None:
            raise KeyError(f"{source} image {index} is not stored in {self.path}")
        return self._decode(blob, f"{source} image {index}")

    def stream_images(self, source: str) -> set[int]:
        """The numbers of the images stored for stream ``source``."""
        return set(self._stream_images.get(source, {}))

    def stream_label(self, source: str, index: int) -> int:
        """The label of stream image ``index``, -1 if unlabelled."""
        return self._stream_labels.get(source, {}).get(index, -1)

    def projection_steps(self, layer: str, source: str = "probe") -> list[int]:
        """Steps at which ``layer``'s projections were logged, ascending (empty if never)."""
        return sorted(self._projections.get(source, {}).get(self.layer(layer).name, {}))

    def projection_info(self, layer: str, source: str = "probe") -> plugin_data_pb2.ProjectionInfo | None:
        """How ``layer``'s projections were made (rule, crop size, uncovered nonlinearities), or None."""
        per_step = self._projections.get(source, {}).get(self.layer(layer).name)
        return next(iter(per_step.values()))[0] if per_step else None

    def projection(self, layer: str, step: int, unit: int, rank: int = 0, source: str = "probe") -> np.ndarray:
        """The stored projection of a record, float32 ``[C, h, w]`` on its receptive-field box (zero-padded).

        De-quantised with its normalisation constant; KeyError if that record was not projected.
        """
        return fmt.dequantize(self.projection_pixels(layer, step, unit, rank, source),
                              float(self.projection_record(layer, step, unit, rank, source)["scale"]))

    def projection_pixels(self, layer: str, step: int, unit: int, rank: int = 0, source: str = "probe",
                          field: CropField | None = None) -> np.ndarray:
        """The stored uint8 ``[C, h, w]`` of a record's projection, as drawn: 128 is zero, 1 and 255 ∓ its peak.

        On ``field``'s crop (see :meth:`crop`); by default on the record's theoretical box.
        """
        info, index, blobs = self._projections_at(layer, step, source)
        position = self._projection_position(layer, step, index, unit, rank)
        found = self.layer(layer)
        problem = fmt.unusable(info, found.receptive_field.size)
        if problem:
            raise ValueError(f"projections of layer {found.name!r} in {self.path}: {problem}")
        y, x = int(index[position]["y"]), int(index[position]["x"])
        box = record_box(found.receptive_field, found.fmap is not None, y, x)
        q = fmt.decode_projection(blobs[position], info, box)
        return q if field is None else fmt.on_box(q, box, field.box(found.fmap is not None, y, x))

    def projection_record(self, layer: str, step: int, unit: int, rank: int = 0, source: str = "probe") -> np.void:
        """The index row (unit, rank, image, y, x, scale) of a stored projection."""
        index = self._projections_at(layer, step, source)[1]
        return index[self._projection_position(layer, step, index, unit, rank)]

    def _projections_at(self, layer: str, step: int,
                        source: str) -> tuple[plugin_data_pb2.ProjectionInfo, np.ndarray, list]:
        per_step = self._projections.get(source, {}).get(self.layer(layer).name, {})
        if step not in per_step:
            raise KeyError(f"layer {layer!r} has no projections at step {step}; "
                           f"steps with projections: {sorted(per_step) or 'none (not logged in this run)'}")
        return per_step[step]

    @staticmethod
    def _projection_position(layer: str, step: int, index: np.ndarray, unit: int, rank: int) -> int:
        found = np.flatnonzero((index["unit"] == unit) & (index["rank"] == rank))
        if not found.size:
            raise KeyError(f"unit {unit} rank {rank} of layer {layer!r} was not projected at step {step}")
        return int(found[-1])

    @property
    def filter_steps(self) -> list[int]:
        """Steps at which the first convolution's weights were logged."""
        return sorted(self._filters)

    def filters(self, step: int | None = None) -> np.ndarray:
        """The first convolution's weights ``[out, in, kh, kw]`` at ``step`` (the latest if None)."""
        if not self._filters:
            raise KeyError(f"no filters were logged in {self.path} (not logged in this run)")
        step = max(self._filters) if step is None else step
        if step not in self._filters:
            raise KeyError(f"no filters at step {step}; steps with filters: {sorted(self._filters)}")
        return self._filters[step].copy()

    def _add(self, event) -> None:
        legacy_index = None  # a v1 chunk's index rows, paired only with images of the same event
        for value in event.summary.value:
            content = value.metadata.plugin_data.content if value.HasField("metadata") else None
            if value.metadata.plugin_data.plugin_name == "scalars" and value.tag.startswith("convviz/"):
                # simple_value since format v2; a float32 tensor before.
                scalar = value.simple_value if value.WhichOneof("value") == "simple_value" else \
                    float(tensor_util.make_ndarray(value.tensor))
                self.scalars.setdefault(value.tag, {})[event.step] = scalar
                continue
            if value.tag.startswith(metadata.EFFECTIVE_FIELD_TAG_PREFIX):
                size = tensor_util.make_ndarray(value.tensor).reshape(-1)
                if size.shape == (2,) and size.dtype.kind in "iu" and (size > 0).all():
                    layer = value.tag[len(metadata.EFFECTIVE_FIELD_TAG_PREFIX):]
                    self._effective.setdefault(layer, {})[event.step] = (int(size[0]), int(size[1]))
                continue
            if value.tag.startswith((metadata.PROJECTION_TAG_PREFIX, metadata.FILTERS_TAG_PREFIX)):
                self._add_figure_data(value, event.step)
                continue
            stream = metadata.parse_stream_tag(value.tag)
            if stream is not None:
                self._add_stream(value, event.step, *stream)
                continue
            if value.tag == metadata.RESTART_TAG:
                self.restarts = sorted({*self.restarts, event.step})
                continue
            layer = metadata.layer_of_tag(value.tag)
            if layer is None and value.tag not in _PROBE_TAGS:
                continue
            data = metadata.parse_plugin_metadata(content) if content else None
            if layer is not None:
                if data is not None and layer not in self._payloads:
                    self.layers.append(Layer.from_proto(data.layer))
                    self._payloads[layer] = {}
                if layer in self._payloads:
                    self._payloads[layer][event.step] = tensor_util.make_ndarray(value.tensor).item()
                continue
            if data is not None and self.probe is None and data.WhichOneof("content") == "probe":
                p = data.probe
                self.probe = Probe(p.n, p.height, p.width, p.channels, list(p.class_names), p.fingerprint)
            self.last_chunk = max(self.last_chunk, event.step)
            if value.tag == metadata.PROBE_INDEX_TAG:
                self.legacy_chunks = True
                legacy_index = tensor_util.make_ndarray(value.tensor).reshape(-1, 2)
                continue
            blobs = tensor_util.make_ndarray(value.tensor).reshape(-1).tolist()
            try:
                if value.tag == metadata.PROBE_CHUNK_TAG:
                    rows, images = _decode_chunk(blobs)
                else:
                    rows, images = (legacy_index if legacy_index is not None else np.zeros((0, 2))), blobs
                    if len(rows) != len(images):
                        raise ValueError(f"{len(rows)} index rows but {len(images)} images")
            except ValueError as e:
                self.errors.append(f"probe chunk at step {event.step}: {e}; its images are not used")
                continue
            for (index, label), blob in zip(rows.tolist(), images):
                self._images.setdefault(index, blob)
                self._labels.setdefault(index, label)

    def _add_stream(self, value, step: int, source: str, kind: str, layer: str | None) -> None:
        """A stream's records or image chunk; its records' layers are the probe records' layers."""
        if kind == "projection" and layer is not None:
            self._add_figure_data(value, step, layer, source)
        elif kind == "topk" and layer is not None:
            payload = tensor_util.make_ndarray(value.tensor).item()
            self._stream_payloads.setdefault(source, {}).setdefault(layer, {})[step] = payload
        elif kind == "chunk":
            self.stream_chunks[source] = max(self.stream_chunks.get(source, -1), step)
            blobs = tensor_util.make_ndarray(value.tensor).reshape(-1).tolist()
            try:
                rows, images = _decode_chunk(blobs)
            except ValueError as e:
                self.errors.append(f"{source} chunk at step {step}: {e}; its images are not used")
                return
            for (index, label), blob in zip(rows.tolist(), images):
                self._stream_images.setdefault(source, {}).setdefault(index, blob)
                self._stream_labels.setdefault(source, {}).setdefault(index, label)

    def _add_figure_data(self, value, step: int, layer: str | None = None, source: str = "probe") -> None:
        """A projections blob sequence or a filters tensor; a series' metadata comes with its first value."""
        content = value.metadata.plugin_data.content if value.HasField("metadata") else None
        data = metadata.parse_plugin_metadata(content) if content else None
        if value.tag.startswith(metadata.FILTERS_TAG_PREFIX):
            if data is not None:
                self.filter_module = data.filters.module
            if self.filter_module == value.tag[len(metadata.FILTERS_TAG_PREFIX):]:
                self._filters[step] = tensor_util.make_ndarray(value.tensor).astype(np.float32)
            return
        layer = layer or value.tag[len(metadata.PROJECTION_TAG_PREFIX):]
        per_step = self._projections.setdefault(source, {}).setdefault(layer, {})
        info = data.projection if data is not None else next(iter(per_step.values()))[0] if per_step else None
        if info is None:
            return
        blobs = list(tensor_util.make_ndarray(value.tensor).reshape(-1))
        if not blobs:
            return
        try:
            index = fmt.decode_index(blobs[0])
            if len(index) != len(blobs) - 1:
                raise ValueError(f"{len(index)} index rows but {len(blobs) - 1} images")
        except ValueError as e:
            self.errors.append(f"projections of {layer!r} at step {step}: {e}; not used")
            return
        per_step[step] = (info, index, blobs[1:])


_PROBE_TAGS = (metadata.PROBE_CHUNK_TAG, metadata.PROBE_INDEX_TAG, metadata.PROBE_IMAGES_TAG)
# No record tb-convviz writes comes near this (a chunk is at most a few MB, a checkpoint's
# records 12 bytes per unit and rank); a larger length is damage, not a record to allocate.
MAX_RECORD_BYTES = 1 << 30


class DamagedEventFile(ValueError):
    """An event file whose framing cannot be a real record (e.g. a crafted record length)."""


def event_files(path: str) -> list[str]:
    """Event files directly in ``path`` (one TensorBoard run), in TensorBoard's reading order."""
    return sorted(f for f in glob.glob(os.path.join(glob.escape(path), "*")) if "tfevents" in os.path.basename(f))


def read_events(path: str) -> Iterator[event_pb2.Event]:
    """The events of one event file, up to a record that is cut short or fails its checksum.

    Stops there quietly, as TensorBoard's loaders do; unlike tensorboard's
    ``EventFileLoader``, checksums use C code rather than pure Python (~1 s per MB).
    Raises :class:`DamagedEventFile` for a record length no real record has.
    """
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12 or struct.unpack("<I", header[8:])[0] != summary.masked_crc(header[:8]):
                return
            (length,) = struct.unpack("<Q", header[:8])
            if length > MAX_RECORD_BYTES:
                raise DamagedEventFile(
                    f"{path} is damaged: the record at byte {f.tell() - 12} claims {length} bytes (more than "
                    f"{MAX_RECORD_BYTES}); move the file out of the log dir to read the rest of the run"
                )
            data = f.read(length + 4)
            if len(data) < length + 4 or struct.unpack("<I", data[length:])[0] != summary.masked_crc(data[:length]):
                return
            yield event_pb2.Event.FromString(data[:length])


def read_run(path: str | os.PathLike) -> Run:
    """Read the convviz data of the run in log dir ``path`` (its event files, not subdirectories)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no log dir at {path!r}")
    files = event_files(path)
    if not files:
        raise FileNotFoundError(f"{path!r} has no TensorBoard event files")
    run = Run(path)
    for file in files:
        for event in read_events(file):
            if event.HasField("summary"):
                try:
                    run._add(event)
                except ValueError as e:  # unusable plugin data: say where
                    raise type(e)(f"{file}, step {event.step}: {e}") from None
    run.layers.sort(key=lambda l: l.index)
    return run


def _decode_chunk(blobs: list[bytes]) -> tuple[np.ndarray, list[bytes]]:
    """An image chunk's (index, label) rows and image blobs; ValueError if they do not match."""
    rows = metadata.decode_chunk_index(blobs[0] if blobs else b"")
    images = [metadata.decode_image_blob(blob, i) for i, blob in zip(rows[:, 0].tolist(), blobs[1:])]
    if len(rows) != len(images):
        raise ValueError(f"{len(rows)} index rows but {len(images)} images")
    return rows, images
