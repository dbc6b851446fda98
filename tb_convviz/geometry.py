"""Receptive-field geometry and padded crops, in numpy only (safe for the TensorBoard process)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tb_convviz import plugin_data_pb2

# Neutral grey for the parts of a receptive field that lie outside the image.
PAD_VALUE = 128


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Where a layer's units look in the input, in input pixels.

    ``size`` is the field's (h, w) extent, ``stride`` the distance between
    neighbouring units, ``offset`` the centre of unit (0, 0) (0-indexed, may be
    fractional), ``method`` how it was found: "analytic", "gradient" or "global".
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[float, float]
    method: str = "analytic"

    def center(self, y: int, x: int) -> tuple[float, float]:
        """Centre of unit (y, x) in input pixels."""
        return (self.offset[0] + y * self.stride[0], self.offset[1] + x * self.stride[1])

    def box(self, y: int | None, x: int | None) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), bottom/right exclusive; may extend past the image.

        Units without a position (fully connected outputs) get the field of unit (0, 0),
        which for a "global" field is the whole input. Every unit of a "global" field sees
        the whole input, wherever it sits in the feature map.
        """
        if self.method == "global":
            y = x = None
        cy, cx = self.center(y or 0, x or 0)
        top = math.floor(cy - (self.size[0] - 1) / 2 + 0.5)
        left = math.floor(cx - (self.size[1] - 1) / 2 + 0.5)
        return top, left, top + self.size[0], left + self.size[1]

    def to_proto(self) -> plugin_data_pb2.ReceptiveField:
        return plugin_data_pb2.ReceptiveField(
            size_h=self.size[0], size_w=self.size[1], stride_h=self.stride[0], stride_w=self.stride[1],
            center_h=self.offset[0], center_w=self.offset[1], method=self.method,
        )

    @classmethod
    def from_proto(cls, proto: plugin_data_pb2.ReceptiveField) -> "ReceptiveField":
        return cls(
            size=(proto.size_h, proto.size_w), stride=(proto.stride_h, proto.stride_w),
            offset=(proto.center_h, proto.center_w), method=proto.method,
        )

    @classmethod
    def whole_input(cls, height: int, width: int) -> "ReceptiveField":
        """The field of a unit that sees the whole input (fully connected, global pooling)."""
        return cls(size=(height, width), stride=(height, width),
                   offset=((height - 1) / 2, (width - 1) / 2), method="global")


def record_box(field: ReceptiveField, positional: bool, y: int, x: int) -> tuple[int, int, int, int]:
    """Crop box of a record; records of fully connected layers (or y, x = -1) have no position."""
    if not positional or y < 0 or x < 0:
        return field.box(None, None)
    return field.box(y, x)


@dataclasses.dataclass(frozen=True)
class CropField:
    """How a layer's records are cropped: ``field``'s box, moved inside an ``inside`` (h, w) image when given."""

    field: ReceptiveField
    inside: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.field.size

    def box(self, positional: bool, y: int, x: int) -> tuple[int, int, int, int]:
        """The crop box of a record at (y, x) (see :func:`record_box`)."""
        box = record_box(self.field, positional, y, x)
        return box if self.inside is None else kept_inside(box, *self.inside)


def effective_crop(field: ReceptiveField, size: tuple[int, int] | None, image: tuple[int, int]) -> CropField:
    """The crop of a layer whose effective field is ``size`` (h, w; None: not measured, the theoretical field as is).

    An effective box is centred on the record and moved inside the ``image`` (h, w): it shows only image.
    """
    if size is None:
        return CropField(field)
    size = (max(1, min(size[0], field.size[0], image[0])), max(1, min(size[1], field.size[1], image[1])))
    return CropField(dataclasses.replace(field, size=size), image)


def kept_inside(box: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """``box`` moved (not resized) to lie inside a ``height`` x ``width`` image; centred on an axis it is longer than."""
    top, left, bottom, right = box
    h, w = bottom - top, right - left
    top = min(max(top, 0), height - h) if h <= height else -((h - height) // 2)
    left = min(max(left, 0), width - w) if w <= width else -((w - width) // 2)
    return top, left, top + h, left + w


def crop(image: np.ndarray, box: tuple[int, int, int, int], fill: int = PAD_VALUE) -> np.ndarray:
    """Crop ``image`` ([H, W] or [H, W, C]) to ``box``, padding with ``fill`` where it runs off."""
    top, left, bottom, right = box
    h, w = image.shape[:2]
    out = np.full((bottom - top, right - left) + image.shape[2:], fill, dtype=image.dtype)
    t, l, b, r = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    if t < b and l < r:
        out[t - top:b - top, l - left:r - left] = image[t:b, l:r]
    return out
