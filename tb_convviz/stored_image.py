"""Decoding image bytes read back from an event file, with their size checked before any pixel is.

Every stored byte may be crafted: a 24 KB lossless WebP can declare 13000x13000 pixels
(2.5 GB once decoded). ``Image.open`` reads only the header, so the size it reports is
compared with what the record declares (the probe set's or the projection's size)
before ``convert`` decodes. numpy and Pillow only: the plugin, the reader and export share it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode(data: bytes, height: int, width: int, *, mode: str | None = None, what: str = "the image") -> np.ndarray:
    """uint8 pixels of ``data``, which must be ``width`` x ``height``; ValueError, before decoding, if it is not.

    ``mode`` is the Pillow mode to convert to; None keeps grey ("L") and RGB and makes anything else RGB.
    """
    with Image.open(io.BytesIO(data)) as pil:
        if pil.size != (width, height):
            raise ValueError(f"{what} is stored as {pil.width}x{pil.height} pixels, but its record declares "
                             f"{width}x{height}")
        target = mode or (pil.mode if pil.mode in ("L", "RGB") else "RGB")
        return np.asarray(pil if pil.mode == target else pil.convert(target), dtype=np.uint8)
