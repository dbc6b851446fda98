"""Receptive-field patches, mosaics and annotated probe images as PNG, with a byte-bounded cache."""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import math
import threading
from typing import Callable, Hashable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tensorboard import errors

from tb_convviz.geometry import PAD_VALUE, CropField, crop, record_box
from tb_convviz.plugin.data import ByteLRU, ConvVizData, Layer, Probe, RunListing

# Range of the `size=` parameter: the longer side of a resampled patch, in pixels.
MIN_SIZE, MAX_SIZE = 8, 512
BOX_COLOR = (255, 40, 40)
# The effective field's box, drawn inside the theoretical one's on the whole-image view.
EFFECTIVE_BOX_COLOR = (40, 200, 255)
# "Where the unit fires": the image keeps its colours where the top-1 projection is strong and fades to
# grey at this brightness where it is not. No overlay colour, so nothing in the image can be mistaken
# for it (a red heatmap over a red object was).
SPOTLIGHT_FADE = 0.3
# The projection's magnitude is blurred by this share of the patch's side first: deconvnet projections
# are sparse edges, and the question is where the unit fires, not which pixel.
SPOTLIGHT_BLUR = 1 / 32
MISSING_COLOR = (200, 60, 60)
# The work one request may ask for: pixels of the PNG it gets (larger requests are
# downscaled to fit) and pixels of probe images decoded for it (more answers 400).
MAX_OUTPUT_PIXELS = 1 << 21
MAX_DECODED_PIXELS = 1 << 26
# Renders at once: each holds up to MAX_OUTPUT_PIXELS of RGBA plus its decoded images.
CONCURRENT_RENDERS = 2
# How long a request waits for its turn before it is answered 503 (try again).
RENDER_WAIT_S = 60.0
_renders = threading.BoundedSemaphore(CONCURRENT_RENDERS)
# After a render this large, freed memory is handed back to the system (glibc keeps it otherwise).
TRIM_ABOVE_BYTES = 256 << 10
_libc = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols) of the near-square grid for ``k`` patches: 3x3 for 9, 2x3 for 5."""
    cols = math.ceil(math.sqrt(k))
    return math.ceil(k / cols), cols


def resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resample so that the longer side is ``size``: nearest when enlarging keeps pixels crisp."""
    h, w = image.shape[:2]
    if size is None or max(h, w) == size:
        return image
    scale = size / max(h, w)
    shape = (max(round(w * scale), 1), max(round(h * scale), 1))
    method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize(shape, method))


def fit_size(shape: tuple[int, int], size: int | None, cells: int = 1) -> int:
    """The longer side for patches of ``shape`` (h, w) at ``size`` (None: natural) so that ``cells`` fit the budget."""
    side = max(shape) if size is None else size
    rows, cols = grid_shape(cells)
    while side > 1:
        h, w = (max(round(n * side / max(shape)), 1) for n in shape)
        if (rows * h + rows - 1) * (cols * w + cols - 1) <= MAX_OUTPUT_PIXELS:
            break
        side = max(1, min(side - 1, math.floor(side * math.sqrt(MAX_OUTPUT_PIXELS / ((rows * h) * (cols * w))))))
    return side


def crop_resized(image: np.ndarray, box: tuple[int, int, int, int], size: int | None) -> np.ndarray:
    """``resize(crop(image, box), size)``, without building the padded crop when it is much larger than the image."""
    top, left, bottom, right = box
    h, w = image.shape[:2]
    if size is None or size >= max(bottom - top, right - left) or (bottom - top) * (right - left) <= 4 * h * w:
        return resize(crop(image, box), size)
    out_h, out_w = resize(np.zeros((bottom - top, right - left), np.uint8), size).shape
    scale_h, scale_w = out_h / (bottom - top), out_w / (right - left)
    out = np.full((out_h, out_w) + image.shape[2:], PAD_VALUE, image.dtype)
    t, l, b, r = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    if t < b and l < r:
        y0, x0 = round((t - top) * scale_h), round((l - left) * scale_w)
        y1, x1 = max(round((b - top) * scale_h), y0 + 1), max(round((r - left) * scale_w), x0 + 1)
        part = np.asarray(Image.fromarray(image[t:b, l:r]).resize((x1 - x0, y1 - y0), Image.Resampling.BOX))
        out[y0:y1, x0:x1] = part
    return out


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def mosaic(tiles: list[np.ndarray | bool | None], tile_shape: tuple[int, int]) -> np.ndarray:
    """RGBA grid of ``tiles`` (rank order, row-major) with 1-pixel transparent separators.

    None (a record without a stored image) and unused grid cells stay transparent; False
    (a stored image that cannot be shown) is drawn as a "missing" cross.
    """
    rows, cols = grid_shape(len(tiles))
    th, tw = tile_shape
    out = np.zeros((rows * th + rows - 1, cols * tw + cols - 1, 4), np.uint8)
    for i, tile in enumerate(tiles):
        if tile is None:
            continue
        r, c = divmod(i, cols)
        top, left = r * (th + 1), c * (tw + 1)
        out[top:top + th, left:left + tw, :3] = _rgb(tile) if tile is not False else _missing(th, tw)
        out[top:top + th, left:left + tw, 3] = 255
    return out


def _missing(h: int, w: int) -> np.ndarray:
    pil = Image.new("RGB", (w, h), (PAD_VALUE,) * 3)
    draw = ImageDraw.Draw(pil)
    width = max(1, min(h, w) // 16)
    draw.line((0, 0, w - 1, h - 1), fill=MISSING_COLOR, width=width)
    draw.line((0, h - 1, w - 1, 0), fill=MISSING_COLOR, width=width)
    return np.asarray(pil)


def draw_boxes(image: np.ndarray, boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> np.ndarray:
    """RGB copy of ``image`` with the outline of each (box, colour) drawn in, in order (boxes may run off the image)."""
    pil = Image.fromarray(_rgb(image))
    width = max(1, min(pil.width, pil.height) // 64)
    draw = ImageDraw.Draw(pil)
    for (top, left, bottom, right), color in boxes:
        draw.rectangle((left, top, right - 1, bottom - 1), outline=color, width=width)
    return np.asarray(pil)


def heatmap(image: np.ndarray, q: np.ndarray) -> np.ndarray:
    """RGB ``image`` ([h, w] or [h, w, C]) spotlit by the magnitude of projection ``q`` (uint8 ``[C, h, w]``, 128 is zero).

    With ``s`` the blurred magnitude (summed over channels) as a share of its peak, each pixel
    is ``s * image + (1 - s) * SPOTLIGHT_FADE * luminance``: in colour where the unit fires, dark grey elsewhere.
    """
    strength = np.abs(q.astype(np.float64) - 128).sum(axis=0)
    radius = SPOTLIGHT_BLUR * max(strength.shape)
    if radius >= 0.5 and strength.max() > 0:
        level = Image.fromarray(np.rint(strength * (255 / strength.max())).astype(np.uint8), "L")
        strength = np.asarray(level.filter(ImageFilter.GaussianBlur(radius)), np.float64)
    peak = float(strength.max())
    share = (strength / peak if peak > 0 else strength)[:, :, None]
    rgb = _rgb(image).astype(np.float64)
    grey = (rgb @ np.array([0.299, 0.587, 0.114]))[:, :, None] * SPOTLIGHT_FADE
    return np.rint(rgb * share + grey * (1 - share)).astype(np.uint8)


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
              record: np.void, size: int | None, field: CropField, heat: tuple[Hashable, Callable] | None = None) -> bytes:
        """The record's crop by ``field`` (see ``Layer.crop``); ``heat`` (key, load) draws the projection ``load()``
        (uint8 ``[C, h, w]`` on the same crop) over it, see :func:`heatmap`."""
        image, y, x = int(record["image"]), int(record["y"]), int(record["x"])
        size = fit_size(field.size, size)
        box = field.box(layer.positional, y, x)
        key = ("patch", eid, listing.key, box, image, size, None if heat is None else heat[0])

        def render() -> bytes:
            if heat is None:
                return encode_png(self._patch(ctx, eid, listing, probe, layer, field, image, y, x, size))
            return encode_png(resize(heatmap(crop(self._data.image(ctx, eid, listing, probe, image), box), heat[1]()),
                                     size))

        return self._cached(key, render)

    def mosaic(self, ctx, eid: str, listing: RunListing, probe: Probe, layer: Layer,
               records: np.ndarray, size: int | None, field: CropField) -> bytes:
        size = fit_size(field.size, size, len(records))
        content = np.stack([records["image"], records["y"].astype(np.int32), records["x"].astype(np.int32)])
        key = ("mosaic", eid, listing.key, field, layer.positional, content.tobytes(), size)

        def render() -> bytes:
            stored = sorted({int(i) for i in records["image"].tolist() if int(i) in probe.blob_keys})
            check_decoded(probe, len(stored))
            self._data.prefetch(ctx, eid, listing, probe, stored)
            tiles = [
                self._tile(ctx, eid, listing, probe, layer, field, int(r["image"]), int(r["y"]), int(r["x"]), size)
                if int(r["image"]) in probe.blob_keys else None
                for r in records
            ]
            blank = np.zeros(field.size, np.uint8)
            return encode_png(mosaic(tiles, resize(blank, size).shape[:2]))

        return self._cached(key, render)

    def probe_image(self, ctx, eid: str, listing: RunListing, probe: Probe, index: int,
                    boxes: tuple[tuple[int, int, int, int], ...], heat: tuple[Hashable, Callable] | None = None) -> bytes:
        """Probe image ``index`` with ``boxes`` drawn in: the theoretical field's (red), then the effective one's (blue);
        ``heat`` (key, load) first draws the projection ``load()`` (uint8 ``[C, H, W]`` on the whole image) over it."""
        def render() -> bytes:
            image = self._data.image(ctx, eid, listing, probe, index)
            if heat is not None:
                image = heatmap(image, heat[1]())
            h, w = image.shape[:2]
            side = fit_size((h, w), None)
            scale = side / max(h, w)
            if scale < 1:  # shown within the budget; the boxes follow the image
                image = resize(image, side)
            scaled = [tuple(round(v * min(scale, 1)) for v in box) for box in boxes]
            return encode_png(draw_boxes(image, list(zip(scaled, (BOX_COLOR, EFFECTIVE_BOX_COLOR)))) if boxes else image)

        return self._cached(("probe", eid, listing.key, index, boxes, None if heat is None else heat[0]), render)

    def _tile(self, ctx, eid, listing, probe, layer, field, image, y, x, size) -> np.ndarray | bool:
        """A mosaic tile, or False for a stored image that cannot be shown (drawn as missing)."""
        try:
            return self._patch(ctx, eid, listing, probe, layer, field, image, y, x, size)
        except errors.NotFoundError:
            return False

    def _patch(self, ctx, eid, listing, probe, layer, field, image, y, x, size) -> np.ndarray:
        pixels = self._data.image(ctx, eid, listing, probe, image)
        return crop_resized(pixels, field.box(layer.positional, y, x), size)

    def _cached(self, key, render) -> bytes:
        png = self.pngs.get(key)
        if png is None:
            # Renders wait their turn, so concurrent large requests do not multiply memory,
            # and the memory of a large one goes back to the system after it.
            if not _renders.acquire(timeout=RENDER_WAIT_S):
                raise Busy(f"the convviz plugin is busy rendering other images (waited {RENDER_WAIT_S:.0f} s); "
                           "try again")
            try:
                png = self.pngs.get(key)
                if png is None:
                    png = render()
                    if len(png) > TRIM_ABOVE_BYTES and _libc is not None and hasattr(_libc, "malloc_trim"):
                        _libc.malloc_trim(0)
            finally:
                _renders.release()
            self.pngs.put(key, png, len(png))
        return png


class Busy(errors.PublicError):
    """Every render slot stayed taken for RENDER_WAIT_S: 503, try again."""

    error_code = "Unavailable"
    http_code = 503


def check_decoded(probe: Probe, images: int) -> None:
    """InvalidArgumentError (400) when ``images`` probe images are more pixels than one request may decode."""
    info = probe.info
    pixels = images * (info.height * info.width if info is not None else 0)
    if pixels > MAX_DECODED_PIXELS:
        raise errors.InvalidArgumentError(
            f"this mosaic needs {images} probe images of {info.height}x{info.width} decoded "
            f"({pixels} pixels), more than the {MAX_DECODED_PIXELS} one request may decode; "
            "use the patch route for single records"
        )
