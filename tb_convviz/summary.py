"""TensorFlow-free Summary protos for the convviz log format, and the writer.

Events are framed as TFRecords exactly as tensorboard's ``RecordWriter`` does
(tests compare), so logs need no TensorFlow. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import socket
import struct
import time
from typing import Any, Sequence

import google_crc32c
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.util import tensor_util

from tb_convviz import metadata, plugin_data_pb2
from tb_convviz.logdir_lock import still_at

# Above this many pixels an image is stored as JPEG: PNG of photos at 224x224 is
# ~100 KB, JPEG q90 ~20 KB; small synthetic images compress better losslessly. Small colour
# images are lossless WebP at its fastest method: on the demo's 64x64 images 3x faster to
# encode than PNG and 20% smaller. WebP has no grey mode, so grey images stay PNG.
JPEG_ABOVE_PIXELS = 96 * 96
JPEG_QUALITY = 90
# Cap on the encoded bytes of one probe-image chunk (one event record): TensorBoard's
# Python loader copies a whole chunk to serve one image from it, and a huge first
# checkpoint should not become one giant record.
CHUNK_BYTES = 256 << 10


def encode_image(image: np.ndarray) -> bytes:
    """Encode a uint8 ``[H, W]`` or ``[H, W, C]`` image: JPEG if large, else lossless WebP (colour) or PNG (grey)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    pil = Image.fromarray(np.ascontiguousarray(image))
    buf = io.BytesIO()
    if image.shape[0] * image.shape[1] > JPEG_ABOVE_PIXELS:
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif pil.mode == "RGB":
        pil.save(buf, format="WEBP", lossless=True, quality=0, method=0)
    else:
        pil.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def topk_pb(info: plugin_data_pb2.LayerInfo, records: bytes, tag: str | None = None) -> summary_pb2.Summary:
    """One layer's packed top-k records at one checkpoint (``tag``: a stream's, see ``metadata.stream_tag``)."""
    md = metadata.create_summary_metadata(info, summary_pb2.DATA_CLASS_TENSOR)
    tensor = tensor_util.make_tensor_proto(np.array(records, dtype=object))
    return summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag or metadata.topk_tag(info.name), metadata=md, tensor=tensor)]
    )


def probe_chunk_pb(
    info: plugin_data_pb2.ProbeInfo, indices: Sequence[int], labels: Sequence[int], images: Sequence[bytes],
    tag: str = metadata.PROBE_CHUNK_TAG,
) -> summary_pb2.Summary:
    """A chunk of stored probe images, self-describing: its index blob, then each image naming itself."""
    if not (len(indices) == len(labels) == len(images)):
        raise ValueError("indices, labels and images must have the same length")
    blobs = [metadata.encode_chunk_index(indices, labels)]
    blobs += [metadata.encode_image_blob(i, image) for i, image in zip(indices, images)]
    md = metadata.create_summary_metadata(info, summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    tensor = tensor_util.make_tensor_proto(np.array(blobs, dtype=object), shape=[len(blobs)])
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=md, tensor=tensor)])


def projections_pb(info: plugin_data_pb2.ProjectionInfo, index: bytes, images: Sequence[bytes],
                   tag: str | None = None) -> summary_pb2.Summary:
    """One layer's projections at one checkpoint: blob 0 the index, then the images (see ``projection_format``)."""
    md = metadata.create_summary_metadata(info, summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    blobs = tensor_util.make_tensor_proto(np.array([index, *images], dtype=object), shape=[len(images) + 1])
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag or metadata.projection_tag(info.layer),
                                                                metadata=md, tensor=blobs)])


def filters_pb(info: plugin_data_pb2.FilterInfo, weights: np.ndarray) -> summary_pb2.Summary:
    """The first convolution's weights, float32 ``[out, in, kh, kw]``."""
    md = metadata.create_summary_metadata(info, summary_pb2.DATA_CLASS_TENSOR)
    tensor = tensor_util.make_tensor_proto(np.asarray(weights, np.float32))
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=metadata.filters_tag(info.module),
                                                                metadata=md, tensor=tensor)])


def effective_field_pb(info: plugin_data_pb2.EffectiveFieldInfo, size: tuple[int, int]) -> summary_pb2.Summary:
    """A layer's effective field at a checkpoint: int32 ``[height, width]``."""
    md = metadata.create_summary_metadata(info, summary_pb2.DATA_CLASS_TENSOR)
    tensor = tensor_util.make_tensor_proto(np.asarray(size, np.int32))
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=metadata.effective_field_tag(info.layer),
                                                                metadata=md, tensor=tensor)])


def restart_pb(previous_step: int) -> summary_pb2.Summary:
    """The marker of a resumed session's first checkpoint: the last step the log dir held before it."""
    md = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME,
            content=plugin_data_pb2.PluginData(version=metadata.PROTO_VERSION).SerializeToString()),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    tensor = tensor_util.make_tensor_proto(np.array(previous_step, np.int64))
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=metadata.RESTART_TAG, metadata=md, tensor=tensor)])


def scalars_pb(values: dict[str, float]) -> summary_pb2.Summary:
    """Scalars as ``SummaryWriter.add_scalar`` writes them, for every reader of event files.

    ``simple_value`` is what ``EventAccumulator.Scalars`` and tbparse list (they file a
    tensor-valued scalar under tensors); the metadata names the Scalars dashboard.
    """
    md = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )
    return summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, metadata=md, simple_value=float(v)) for tag, v in values.items()]
    )


def split_chunks(sizes: Sequence[int], limit: int = CHUNK_BYTES) -> list[slice]:
    """Split consecutive items into slices of at most ``limit`` bytes (at least one item each)."""
    chunks, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            chunks.append(slice(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        chunks.append(slice(start, len(sizes)))
    return chunks


class EventWriter:
    """Writes Summary protos as events, into an event file of its own or an existing writer.

    ``target`` is a log dir, or any object with ``add_summary(summary, global_step)``
    such as the ``FileWriter`` behind ``torch.utils.tensorboard.SummaryWriter``.
    Unlike tensorboard's ``EventFileWriter``, writes to its own file are synchronous,
    so a failed write (disk full) raises here, in the caller, and not in a thread,
    and checksums use C code (a checkpoint can carry megabytes of images).

    A write that fails part way is cut off again, so the file ends with its last
    complete record and later writes append to the same file; ``broken`` says whether
    that failed too (then the file must not be written again).
    """

    def __init__(self, target: str | Any, *, filename_suffix: str = ".convviz") -> None:
        self._summaries = None if isinstance(target, str) else target
        self._fd: int | None = None
        self._end = 0  # where the last complete record ends
        self.broken = False
        if self._summaries is None:
            # The name format of tensorboard's EventFileWriter, which TensorBoard globs for.
            name = "events.out.tfevents.%010d.%s.%s.%s%s" % (
                _file_time(target), socket.gethostname(), os.getpid(), next(_file_ids), filename_suffix)
            self.path = os.path.join(target, name)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
            except OSError:
                # Nothing readable in it: leave no file behind, so retries on a full disk add none.
                self.close()
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise

    def _add(self, event: event_pb2.Event) -> None:
        if self.broken:
            raise OSError(f"{self.path} could not be repaired after a failed write; open a new file")
        record = memoryview(frame_record(event.SerializeToString()))
        try:
            written = 0
            while written < len(record):
                written += os.write(self._fd, record[written:])
        except OSError:
            self._cut()
            raise
        self._end += len(record)

    def _cut(self) -> None:
        # Loaders stop before an incomplete record and read on from there, so removing it keeps
        # the file valid for them; a record they have read is never touched.
        try:
            os.ftruncate(self._fd, self._end)
            os.lseek(self._fd, self._end, os.SEEK_SET)
        except OSError:
            self.broken = True

    def unlinked(self) -> bool:
        """Whether this writer's own file is no longer at its path (its log dir was deleted or moved)."""
        return self._fd is not None and not still_at(self._fd, self.path)

    def write(self, summary: summary_pb2.Summary, step: int) -> None:
        if self._summaries is not None:
            self._summaries.add_summary(summary, step)
        else:
            self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        if self._summaries is not None:
            self._summaries.flush()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        elif self._summaries is not None:
            self._summaries.flush()


_file_ids = itertools.count()
_FILE_TIME = re.compile(r"tfevents\.(\d+)\.")


def _file_time(log_dir: str) -> int:
    """Now, in seconds, but later than every event file already in ``log_dir``.

    TensorBoard reads a run's files in name order, and the Rust loader lets a record at
    step s replace that series' records at steps >= s. A new file (a resumed run, a retry
    after a write error) must therefore sort after the old ones, which a file from the
    same second may not do (its pid or counter decides, as text).
    """
    times = [int(m.group(1)) for name in os.listdir(log_dir) if (m := _FILE_TIME.search(name))]
    return max([int(time.time())] + [t + 1 for t in times])


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


def masked_crc(data: bytes) -> int:
    """The masked CRC-32C of TFRecord framing."""
    # google_crc32c is C code; tensorboard's own crc32c is pure Python at ~1 s per MB.
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
