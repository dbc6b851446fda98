"""Plugin name, tags and the versioned PluginData of the convviz log format.

A convviz run is a TensorBoard log dir holding, per checkpoint step:

* ``convviz/topk/<layer>`` (TENSOR): one DT_STRING scalar, the layer's top-k
  records packed as ``RECORD_DTYPE`` in ``[units, k]`` order (12 bytes each).
  Its PluginData carries a ``LayerInfo``. A unit whose activations were NaN or
  infinite on some probe image has no ranks: all its k records are value NaN,
  image -1, y = x = -1 (format v2; an empty slot is value -inf, image -1).
* ``convviz/<layer>/{topk_overlap,dead_fraction,mean_peak}`` (SCALAR, written
  for the Scalars dashboard as ``simple_value``, as ``SummaryWriter.add_scalar``
  does, so that ``EventAccumulator`` and tbparse list them too; a float32 tensor
  before format v2).

and, at steps of their own (a chunk counter that a writer never reuses):

* ``convviz/probe/chunk`` (BLOB_SEQUENCE, carries a ``ProbeInfo``): m + 1
  blobs. Blob 0 is the chunk's index (``encode_chunk_index``: int32 rows of
  probe index and label); blob i is image i - 1 of that index, prefixed with
  its own probe index (``encode_image_blob``). A chunk is one record, so its
  index and images cannot be paired across records or files, and each image
  names itself, so a reader that resolves a blob to the wrong record (two
  records at one step) sees the mismatch instead of showing wrong pixels.

Each probe image is stored once, in the first chunk written after the first
checkpoint whose records name it. Format v1 (before the chunk tag) paired a
``convviz/probe/index`` tensor with a ``convviz/probe/images`` blob sequence
by step; it is still read where that pairing is unambiguous.

With projections on, in the checkpoint's event as well (older readers skip these tags):

* ``convviz/projection/<layer>`` (BLOB_SEQUENCE): the layer's projections, blob 0
  an index, the rest quantised images (see ``projection_format``); self-contained.
  Its PluginData carries a ``ProjectionInfo``.
* ``convviz/filters/<module>`` (TENSOR): float32 ``[out, in, kh, kw]`` weights of
  the first convolution, with a ``FilterInfo``; and the SCALARs
  ``convviz/<module>/{dominant_filters,near_zero_filters}``.

With streams on (``"train"``, ``"eval"``; older readers skip these tags), per stream ``<s>``:

* ``convviz/stream/<s>/topk/<layer>``: the stream's records, as ``convviz/topk/<layer>``;
  an image is named by its number among the stream's stored images.
* ``convviz/stream/<s>/chunk``: the stream's stored images, as ``convviz/probe/chunk``
  (numbers for probe indices, label -1 when unlabelled), at the stream's own chunk steps.
* ``convviz/stream/<s>/projection/<layer>``: projections of the stream's records.

This module imports no torch.
"""

from __future__ import annotations

import numpy as np
from tensorboard.compat.proto import summary_pb2

from tb_convviz import plugin_data_pb2

PLUGIN_NAME = "convviz"
# Bump on changes an older reader would misread; keep in step with plugin_data.proto.
# v2: probe chunks as one self-describing blob sequence (PROBE_CHUNK_TAG); not-finite
# units (NaN records, see above; a v1 reader would call them dead); simple_value scalars.
PROTO_VERSION = 2

TOPK_TAG_PREFIX = "convviz/topk/"
PROBE_CHUNK_TAG = "convviz/probe/chunk"
# Format v1 probe chunks, read for runs written before v2.
PROBE_INDEX_TAG = "convviz/probe/index"
PROBE_IMAGES_TAG = "convviz/probe/images"
PROJECTION_TAG_PREFIX = "convviz/projection/"
FILTERS_TAG_PREFIX = "convviz/filters/"
STREAM_TAG_PREFIX = "convviz/stream/"
SOURCES = ("probe", "train", "eval")
_INDEX_MAGIC = b"CVZX"
_IMAGE_MAGIC = b"CVZI"
SCALAR_NAMES = ("topk_overlap", "dead_fraction", "mean_peak")
FILTER_SCALAR_NAMES = ("dominant_filters", "near_zero_filters")

RECORD_DTYPE = np.dtype([("value", "<f4"), ("image", "<i4"), ("y", "<i2"), ("x", "<i2")])


class UnsupportedVersionError(ValueError):
    """Plugin data written by a newer tb-convviz than the one installed."""


def topk_tag(layer: str) -> str:
    return TOPK_TAG_PREFIX + layer


def layer_of_tag(tag: str) -> str | None:
    return tag[len(TOPK_TAG_PREFIX):] if tag.startswith(TOPK_TAG_PREFIX) else None


def stream_tag(source: str, kind: str, layer: str | None = None) -> str:
    """The tag of a stream's ``kind`` ("topk", "chunk" or "projection") series."""
    return f"{STREAM_TAG_PREFIX}{source}/{kind}" + (f"/{layer}" if layer is not None else "")


def parse_stream_tag(tag: str) -> tuple[str, str, str | None] | None:
    """(source, kind, layer or None) of a stream tag; None for any other tag."""
    if not tag.startswith(STREAM_TAG_PREFIX):
        return None
    parts = tag[len(STREAM_TAG_PREFIX):].split("/", 2)
    if len(parts) < 2 or parts[0] not in SOURCES[1:]:
        return None
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def projection_tag(layer: str) -> str:
    return PROJECTION_TAG_PREFIX + layer


def filters_tag(module: str) -> str:
    return FILTERS_TAG_PREFIX + module


def scalar_tag(layer: str, name: str) -> str:
    return f"convviz/{layer}/{name}"


def create_summary_metadata(
    content: plugin_data_pb2.LayerInfo | plugin_data_pb2.ProbeInfo | plugin_data_pb2.ProjectionInfo
    | plugin_data_pb2.FilterInfo,
    data_class: int,
) -> summary_pb2.SummaryMetadata:
    """SummaryMetadata for a convviz series; ``data_class`` is a summary_pb2.DATA_CLASS_*."""
    data = plugin_data_pb2.PluginData(version=PROTO_VERSION)
    field = {plugin_data_pb2.LayerInfo: data.layer, plugin_data_pb2.ProbeInfo: data.probe,
             plugin_data_pb2.ProjectionInfo: data.projection, plugin_data_pb2.FilterInfo: data.filters}
    field[type(content)].CopyFrom(content)
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=data.SerializeToString()
        ),
        data_class=data_class,
    )


def parse_plugin_metadata(content: bytes) -> plugin_data_pb2.PluginData:
    """Parse ``plugin_data.content``; raise ValueError with a readable reason if unusable."""
    if not isinstance(content, (bytes, bytearray)):
        raise ValueError(f"plugin data must be bytes, got {type(content).__name__}")
    data = plugin_data_pb2.PluginData()
    try:
        data.ParseFromString(bytes(content))
    except Exception as e:  # protobuf raises DecodeError, but also others on garbage
        raise ValueError(f"corrupted convviz plugin data ({len(content)} bytes): {e}") from None
    if data.version > PROTO_VERSION:
        raise UnsupportedVersionError(
            f"convviz data format v{data.version} was written by a newer tb-convviz; "
            f"this one reads up to v{PROTO_VERSION}: upgrade with `pip install -U tb-convviz`"
        )
    if data.version < 1 or data.WhichOneof("content") is None:
        raise ValueError("corrupted convviz plugin data: no version or content")
    return data


def encode_chunk_index(indices, labels) -> bytes:
    """Blob 0 of a probe chunk: a magic, then little-endian int32 (probe index, label) rows."""
    rows = np.stack([np.asarray(indices, "<i4"), np.asarray(labels, "<i4")], axis=1)
    return _INDEX_MAGIC + rows.tobytes()


def decode_chunk_index(blob: bytes) -> np.ndarray:
    """The int ``[m, 2]`` rows of a chunk's index blob; ValueError if it is not one."""
    if not isinstance(blob, bytes) or not blob.startswith(_INDEX_MAGIC) or (len(blob) - 4) % 8:
        raise ValueError("the chunk's first blob is not a convviz probe index")
    return np.frombuffer(blob, "<i4", offset=4).reshape(-1, 2).astype(np.int64)


def encode_image_blob(index: int, image: bytes) -> bytes:
    """A stored probe image, prefixed with the probe index it shows."""
    return _IMAGE_MAGIC + int(index).to_bytes(4, "little", signed=True) + image


def decode_image_blob(blob: bytes, index: int) -> bytes:
    """The encoded image of ``blob``; ValueError unless the blob says it shows probe image ``index``."""
    if not isinstance(blob, bytes) or not blob.startswith(_IMAGE_MAGIC) or len(blob) < 8:
        raise ValueError(f"the blob stored for probe image {index} is not a convviz probe image")
    named = int.from_bytes(blob[4:8], "little", signed=True)
    if named != index:
        raise ValueError(
            f"the blob stored for probe image {index} holds probe image {named}: the run's probe chunks "
            "are inconsistent (two records at one step?), so the image is not shown"
        )
    return blob[8:]


def encode_records(values: np.ndarray, image: np.ndarray, y: np.ndarray, x: np.ndarray) -> bytes:
    """Pack ``[units, k]`` arrays into the tensor payload."""
    rec = np.empty(values.shape, RECORD_DTYPE)
    rec["value"], rec["image"], rec["y"], rec["x"] = values, image, y, x
    return rec.tobytes()


def decode_records(payload: bytes, units: int, k: int) -> np.ndarray:
    """Unpack a tensor payload into a ``[units, k]`` structured array."""
    expected = units * k * RECORD_DTYPE.itemsize
    if len(payload) != expected:
        raise ValueError(
            f"top-k payload has {len(payload)} bytes, expected {expected} for {units} units x k={k}"
        )
    return np.frombuffer(payload, RECORD_DTYPE).reshape(units, k)


def not_finite(values: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Per unit of ``[..., units, k]`` records, whether it is recorded as not finite (NaN, no image)."""
    return np.isnan(values[..., 0]) & (image[..., 0] < 0)


def topk_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per unit, the fraction of the k images in row ``a[u]`` also in row ``b[u]`` (``[units, k]`` arrays)."""
    hits = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)
    return hits.any(axis=2).sum(axis=1) / a.shape[1]
