"""Effective receptive fields (Luo et al., 2016), measured at each checkpoint with the current weights.

The input-gradient magnitude of a unit is close to Gaussian and fills only a fraction of
its theoretical field, and it grows during training. Per logged conv layer, one forward and
one backward pass through the logger's own float32 call seed every channel of the unit
nearest the image centre on the first ``images`` probe images; the absolute input gradient,
summed over images and input channels, is the unit's mass. The effective field is the
smallest box centred like the unit's theoretical box (``ReceptiveField.box``) that holds
``share`` of that mass: its side grows one pixel at a time, capped per axis at the theoretical
field, so it is never larger. Mass outside the image cannot be measured (there are no pixels
there), so the box is the part of the field that the probe images can show.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from tb_convviz import metadata, plugin_data_pb2, summary
from tb_convviz.geometry import ReceptiveField
from tb_convviz.isolation import preserved
from tb_convviz.projection import project

# The share of the gradient mass the box holds, and the probe images it is summed over.
MASS_SHARE = 0.9
IMAGES = 4
SCALAR_NAME = "effective_field"


def centre_unit(field: ReceptiveField, fmap: tuple[int, int], image: tuple[int, int]) -> tuple[int, int]:
    """The unit (y, x) of a ``fmap`` feature map whose field centre is nearest the centre of an ``image`` (h, w) input."""
    return tuple(int(np.argmin(np.abs(field.offset[a] + np.arange(fmap[a]) * field.stride[a] - (image[a] - 1) / 2)))
                 for a in (0, 1))


def smallest_box(mass: np.ndarray, field: ReceptiveField, y: int, x: int, share: float = MASS_SHARE) -> tuple[int, int]:
    """(h, w) of the smallest box centred as ``field.box(y, x)`` holding ``share`` of ``mass`` ([H, W], non-negative).

    Sides grow together, one pixel at a time, each capped at the field's; a zero mass gives the field's size.
    """
    total = float(mass.sum())
    table = np.zeros((mass.shape[0] + 1, mass.shape[1] + 1), np.float64)
    table[1:, 1:] = mass.astype(np.float64).cumsum(0).cumsum(1)
    height, width = mass.shape
    for side in range(1, max(field.size) + 1):
        size = (min(side, field.size[0]), min(side, field.size[1]))
        top, left, bottom, right = dataclasses.replace(field, size=size).box(y, x)
        t, l, b, r = (min(max(v, 0), limit) for v, limit in
                      ((top, height), (left, width), (bottom, height), (right, width)))
        inside = table[b, r] - table[t, r] - table[b, l] + table[t, l] if t < b and l < r else 0.0
        if total > 0 and inside >= share * total:
            return size
    return field.size


def gradient_mass(net: nn.Module, layer: str, images: torch.Tensor, y: int, x: int, fmap_w: int,
                  call: Callable[[torch.Tensor], object] | None = None) -> np.ndarray:
    """``[H, W]`` float64: |d (sum over channels of ``layer``'s output at (y, x)) / d input|, summed over images and channels."""
    rows = len(images)
    result = project(net, [layer], images, [0] * rows, [-1] * rows, [y * fmap_w + x] * rows, "gradient", call)
    return result.pixels.abs().sum(dim=(0, 1)).double().cpu().numpy()


def measure(net: nn.Module, probe, infos: Mapping[str, plugin_data_pb2.LayerInfo], *,
            call: Callable[[torch.Tensor], object] | None = None, device: torch.device | None = None,
            share: float = MASS_SHARE, images: int = IMAGES) -> dict[str, tuple[int, int]]:
    """Per conv layer of ``infos`` (name -> LayerInfo), the (h, w) of its effective field now.

    In eval mode, with the model's training state (modes, RNG, BatchNorm statistics, ``.grad``)
    left as it was. Fully connected layers and layers whose units see the whole input have none.
    """
    batch = torch.stack([probe.image(i) for i in range(min(images, len(probe)))])
    if device is not None:
        batch = batch.to(device)
    out = {}
    with preserved(net, no_grad=False):
        for name, info in infos.items():
            field = ReceptiveField.from_proto(info.receptive_field)
            if info.fmap_w <= 0 or field.method == "global":
                continue
            y, x = centre_unit(field, (info.fmap_h, info.fmap_w), (info.input_h, info.input_w))
            mass = gradient_mass(net, name, batch, y, x, info.fmap_w, call)
            out[name] = smallest_box(mass, field, y, x, share)
    return out


def summary_values(fields: Mapping[str, tuple[int, int]], scalars: dict[str, float], *,
                   share: float = MASS_SHARE, images: int = IMAGES):
    """The checkpoint's ``convviz/effective_field/<layer>`` tensors; the larger side of each goes into ``scalars``."""
    values = []
    for name, size in fields.items():
        info = plugin_data_pb2.EffectiveFieldInfo(layer=name, mass_share=share, images=images)
        values.extend(summary.effective_field_pb(info, size).value)
        scalars[metadata.scalar_tag(name, SCALAR_NAME)] = float(max(size))
    return values
