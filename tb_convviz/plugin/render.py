"""Receptive-field patches, mosaics and annotated probe images as PNG, with a byte-bounded cache."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from tb_convviz.geometry import ReceptiveField, crop
from tb_convviz.plugin.data import ByteLRU, ConvVizData, Layer, Probe, RunListing

# Range of the `size=` parameter: the longer side of a resampled patch, in pixels.
MIN_SIZE, MAX_SIZE = 8, 512
BOX_COLOR = (255, 40, 40)


def grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols) of the near-square grid for ``k`` patches: 3x3 for 9, 2x3 for 5."""
    cols = math.ceil(math.sqrt(k))
    return math.ceil(k / cols), cols


def record_box(field: ReceptiveField, positional: bool, y: int, x: int) -> tuple[int, int, int, int]:
    """Crop box of a record; records of fully connected layers (or y, x = -1) have no position."""
    if not positional or y < 0 or x < 0:
        return field.box(None, None)
    return field.box(y, x)


def resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resample so that the longer side is ``size``: nearest when enlarging keeps pixels crisp."""
    h, w = image.shape[:2]
    if size is None or max(h, w) == size:
        return image
    scale = size / max(h, w)
    shape = (max(round(w * scale), 1), max(round(h * scale), 1))
    method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize(shape, method))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def mosaic(tiles: list[np.ndarray | None], tile_shape: tuple[int, int]) -> np.ndarray:
    """RGBA grid of ``tiles`` (rank order, row-major) with 1-pixel transparent separators.

    Missing tiles (records without a stored image) and unused grid cells stay transparent.
    """
    rows, cols = grid_shape(len(tiles))
    th, tw = tile_shape
    out = np.zeros((rows * th + rows - 1, cols * tw + cols - 1, 4), np.uint8)
    for i, tile in enumerate(tiles):
        if tile is None:
            continue
        r, c = divmod(i, cols)
        top, left = r * (th + 1), c * (tw + 1)
        out[top:top + th, left:left + tw, :3] = _rgb(tile)
        out[top:top + th, left:left + tw, 3] = 255
    return out


def draw_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """RGB copy of ``image`` with the outline of ``box`` (which may run off the image) drawn in."""
    pil = Image.fromarray(_rgb(image))
    top, left, bottom, right = box
    width = max(1, min(pil.width, pil.height) // 64)
    ImageDraw.Draw(pil).rectangle((left, top, right - 1, bottom - 1), outline=BOX_COLOR, width=width)
    return np.asarray(pil)


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3]


class Renderer:
    """Encodes patches, mosaics and probe images, caching the PNG bytes.

    Keys name the content rather than the request: a mosaic is keyed by its run,
    receptive field, the unit's (image, y, x) records and the size, so a unit whose
    top-k did not change between checkpoints is encoded once for all of them.
    """

    def __init__(self, data: ConvVizData, *, cache_bytes: int = 64 << 20) -> None:
        self._data = data
        self.pngs = ByteLRU(cache_bytes)

    def patch(self, ctx, eid: str, listing: RunListing, probe: Probe, layer: Layer,
              record: np.void, size: int | None) -> bytes:
        image, y, x = int(record["image"]), int(record["y"]), int(record["x"])
        key = ("patch", eid, listing.name, record_box(layer.field, layer.positional, y, x), image, size)
        return self._cached(key, lambda: encode_png(self._patch(ctx, eid, listing, probe, layer, image, y, x, size)))

    def mosaic(self, ctx, eid: str, listing: RunListing, probe: Probe, layer: Layer,
               records: np.ndarray, size: int | None) -> bytes:
        content = np.stack([records["image"], records["y"].astype(np.int32), records["x"].astype(np.int32)])
        key = ("mosaic", eid, listing.name, layer.field, layer.positional, content.tobytes(), size)

        def render() -> bytes:
            self._data.prefetch(ctx, eid, listing, probe, records["image"].tolist())
            tiles = [
                self._patch(ctx, eid, listing, probe, layer, int(r["image"]), int(r["y"]), int(r["x"]), size)
                if int(r["image"]) in probe.blob_keys else None
                for r in records
            ]
            blank = np.zeros(layer.field.size, np.uint8)
            return encode_png(mosaic(tiles, resize(blank, size).shape[:2]))

        return self._cached(key, render)

    def probe_image(self, ctx, eid: str, listing: RunListing, probe: Probe, index: int,
                    box: tuple[int, int, int, int] | None) -> bytes:
        def render() -> bytes:
            image = self._data.image(ctx, eid, listing, probe, index)
            return encode_png(image if box is None else draw_box(image, box))

        return self._cached(("probe", eid, listing.name, index, box), render)

    def _patch(self, ctx, eid, listing, probe, layer, image, y, x, size) -> np.ndarray:
        pixels = self._data.image(ctx, eid, listing, probe, image)
        return resize(crop(pixels, record_box(layer.field, layer.positional, y, x)), size)

    def _cached(self, key, render) -> bytes:
        png = self.pngs.get(key)
        if png is None:
            png = render()
            self.pngs.put(key, png, len(png))
        return png
