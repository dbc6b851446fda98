"""How projections and first-layer filters are stored: quantisation, image encoding, index blobs, filter flags.

numpy and Pillow only: the TensorBoard side, the reader and the logger share it.

A layer's projections at one checkpoint are one BLOB_SEQUENCE value: blob 0 is the
index (``INDEX_DTYPE`` rows: unit, rank, probe image, y, x, and the normalisation
constant of each projection), blobs 1.. the images in index order. Everything a
reader needs is in that one value, never paired with another record by step.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from tb_convviz import stored_image
from tb_convviz.geometry import crop

INDEX_DTYPE = np.dtype([("unit", "<i4"), ("rank", "<i4"), ("image", "<i4"), ("y", "<i2"), ("x", "<i2"),
                        ("scale", "<f4")])
# Chosen for size at equal fidelity (benchmarks/projections.py measures every candidate against
# the float projections): at PSNR >= 40 dB on the display scale, LEVELS levels on each side of zero
# in lossless WebP are the smallest. Lossy WebP stays below 30 dB (its 4:2:0 chroma smears the
# colour edges), JPEG 4:4:4 needs quality 98 and 1.7x the bytes, PNG 1.2x, and all 127 levels
# of 8 bits 1.75x, for detail the display does not show.
ENCODING = "webp"
LEVELS = 21  # max error 1/42 of the projection's peak
# A filter is flagged dominant when its RMS is this many times the layer's median (the
# paper's Fig. 6(b)), and near zero below this fraction of it.
DOMINANT_RATIO = 4.0
NEAR_ZERO_RATIO = 0.05


def quantize_many(projections: np.ndarray, levels: int = LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Contrast-normalise each of ``[n, ...]`` projections to ``levels`` steps each side of zero.

    Returns uint8 of the same shape and each one's max|p| (0 for all-zero, NaN for non-finite
    projections, both stored as all 128). Step s is stored as 128 + round(s * 127 / levels):
    128 is zero and 128 ± 127 is ± max|p| whatever ``levels``, so :func:`dequantize` needs only the scale.
    """
    n = len(projections)
    flat = projections.reshape(n, -1).astype(np.float32, copy=False)
    scale = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(n, np.float32)
    usable = np.isfinite(scale) & (scale > 0)
    steps = np.rint(levels * (flat / np.where(usable, scale, 1)[:, None]))
    q = np.clip(np.rint(128 + steps * (127 / levels)), 1, 255)
    q[~usable] = 128
    return q.astype(np.uint8).reshape(projections.shape), np.where(np.isfinite(scale), scale, np.nan)


def quantize(projection: np.ndarray, levels: int = LEVELS) -> tuple[np.ndarray, float]:
    """:func:`quantize_many` of one projection: uint8 and max|p|."""
    q, scale = quantize_many(projection[None], levels)
    return q[0], float(scale[0])


def display(q: np.ndarray) -> np.ndarray:
    """``[C, h, w]`` -> ``[h, w, 3]`` or ``[h, w]``: RGB as stored, one channel grey, others their mean around 128."""
    if q.shape[0] == 3:
        return np.ascontiguousarray(q.transpose(1, 2, 0))
    if q.shape[0] == 1:
        return q[0]
    return np.rint(q.astype(np.float32).mean(axis=0)).astype(np.uint8)


def levels_of(info) -> int:
    """The quantisation levels of a ``ProjectionInfo`` (runs before the field: 8 bits, 127)."""
    return info.levels or 127


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    """The inverse of :func:`quantize`, float32 (zeros stay exactly zero)."""
    return ((q.astype(np.float32) - 128) / 127) * np.float32(scale)


def rescale(q: np.ndarray, scale: float, common: float) -> np.ndarray:
    """A quantised projection redrawn on a common scale (``common`` ≥ ``scale``), still uint8 around 128."""
    if not common > 0 or not np.isfinite(scale):
        return np.full_like(q, 128)
    return np.clip(np.rint(128 + (q.astype(np.float32) - 128) * (scale / common)), 1, 255).astype(np.uint8)


def encode_pixels(q: np.ndarray, encoding: str = ENCODING) -> bytes:
    """Encode a uint8 ``[C, h, w]`` projection losslessly: RGB for 3 channels, else channels stacked in grey.

    WebP's method 1 is as small as method 2 on quantised projections, in 60% of the time.
    """
    image = q.transpose(1, 2, 0) if q.shape[0] == 3 else q.reshape(-1, q.shape[2])
    buf = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    if encoding == "webp":
        pil.save(buf, format="WEBP", lossless=True, quality=25, method=1)
    elif encoding == "png":
        pil.save(buf, format="PNG", compress_level=9)
    else:
        raise ValueError(f"unknown projection encoding {encoding!r}")
    return buf.getvalue()


def encode_many(ones: list[np.ndarray], encoding: str = ENCODING) -> list[bytes]:
    """:func:`encode_pixels` of each uint8 ``[C, h, w]`` of ``ones``, on up to 4 threads.

    Pillow's encoders release the GIL, and training waits for the checkpoint: on 2 cores the
    demo's projections encode 1.7-2.2x faster on 2 threads than on one.
    """
    workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers < 2 or len(ones) < 8:
        return [encode_pixels(one, encoding) for one in ones]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda one: encode_pixels(one, encoding), ones))


def decode_pixels(data: bytes, channels: int, height: int, width: int) -> np.ndarray:
    """Decode :func:`encode_pixels` output back to uint8 ``[channels, height, width]``; ValueError if it does not fit.

    The size is checked from the image's header, before its pixels are decoded.
    """
    # WebP has no grey mode: grey projections come back as RGB with equal channels.
    if channels == 3:
        return stored_image.decode(data, height, width, mode="RGB", what="the projection").transpose(2, 0, 1)
    image = stored_image.decode(data, channels * height, width, mode="L", what="the projection")
    return image.reshape(channels, height, width)


def stored_region(box: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int] | None:
    """The part of a record's box (top, left, bottom, right) inside a ``height`` x ``width`` image, or None.

    Only that part of a projection is stored: outside the image it is zero, and a deep
    layer's box can be many times the image (851 px for EfficientNet-B0 at 96 px).
    """
    top, left, bottom, right = box
    region = (max(top, 0), max(left, 0), min(bottom, height), min(right, width))
    return region if region[0] < region[2] and region[1] < region[3] else None


def decode_projection(data: bytes, info, box: tuple[int, int, int, int]) -> np.ndarray:
    """A stored projection as uint8 ``[C, h, w]`` on its record's ``box``: 128 (zero) where it was not stored.

    ``info`` is the layer's ``ProjectionInfo``; ValueError if the image does not fit it.
    """
    if not info.clipped:
        return decode_pixels(data, info.channels, info.height, info.width)
    top, left, bottom, right = box
    out = np.full((info.channels, bottom - top, right - left), 128, np.uint8)
    region = stored_region(box, info.image_height, info.image_width)
    if region is not None:
        t, l, b, r = region
        out[:, t - top:b - top, l - left:r - left] = decode_pixels(data, info.channels, b - t, r - l)
    return out


def on_box(q: np.ndarray, box: tuple[int, int, int, int], target: tuple[int, int, int, int]) -> np.ndarray:
    """A projection ``q`` (``[C, h, w]`` on ``box``) cut to ``target`` (both top, left, bottom, right in image pixels).

    128 (zero) where ``target`` leaves ``box``: a projection is zero outside its record's field.
    """
    if target == box:
        return q
    shifted = (target[0] - box[0], target[1] - box[1], target[2] - box[0], target[3] - box[1])
    return np.ascontiguousarray(crop(q.transpose(1, 2, 0), shifted, fill=128).transpose(2, 0, 1))


def unusable(info, field: tuple[int, int]) -> str | None:
    """Why projections described by ``info`` (a ``ProjectionInfo``) cannot be drawn on a layer whose receptive
    field is ``field`` (h, w); None if they can. Unclipped projections are stored on the whole box."""
    if info.clipped or (info.height, info.width) == tuple(field):
        return None
    return (f"they are stored at {info.height}x{info.width} pixels (height x width), but the layer's receptive "
            f"field is {field[0]}x{field[1]}: the run's projection data is inconsistent")


def encode_index(rows: np.ndarray) -> bytes:
    return np.ascontiguousarray(rows, INDEX_DTYPE).tobytes()


def decode_index(data: bytes) -> np.ndarray:
    if len(data) % INDEX_DTYPE.itemsize:
        raise ValueError(f"a projection index of {len(data)} bytes is not whole {INDEX_DTYPE.itemsize}-byte rows")
    return np.frombuffer(data, INDEX_DTYPE)


def filter_rms(weights: np.ndarray) -> np.ndarray:
    """Per filter of ``[out, in, kh, kw]`` weights, the root mean square."""
    w = weights.astype(np.float64).reshape(weights.shape[0], -1)
    return np.sqrt((w * w).mean(axis=1)) if w.shape[1] else np.zeros(len(w))


def filter_flags(weights: np.ndarray, dominant_ratio: float = DOMINANT_RATIO,
                 near_zero_ratio: float = NEAR_ZERO_RATIO) -> tuple[np.ndarray, np.ndarray]:
    """(dominant, near_zero) boolean masks over filters, relative to the layer's median RMS."""
    rms = filter_rms(weights)
    median = float(np.median(rms)) if rms.size else 0.0
    if not np.isfinite(median) or median == 0.0:
        return np.zeros(rms.shape, bool), rms == 0
    return rms > dominant_ratio * median, rms < near_zero_ratio * median


def filter_tiles(weights: np.ndarray) -> np.ndarray:
    """uint8 ``[out, kh, kw, 3]`` tiles, each filter contrast-normalised to 0..255 on its own.

    3 input channels are shown as RGB; any other number as grey (their mean).
    """
    w = weights.astype(np.float32)
    w = w if w.shape[1] == 3 else np.repeat(w.mean(axis=1, keepdims=True), 3, axis=1)
    low = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - low
    span[~(span > 0)] = 1.0
    tiles = np.rint(255 * (w - low) / span)
    return np.nan_to_num(tiles, nan=0).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
