"""Streaming per-unit top-k over probe images, with exact, deterministic ties."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class TopK:
    """Per-unit top-k records, each ``[units, k]``: value, probe image, flat spatial position.

    Rows are sorted by value, descending; equal values by image index, ascending.
    ``position`` is the raster index y * width + x of the first spatial maximum,
    -1 for units without a position. Unused slots have image -1 and value -inf.
    """

    values: torch.Tensor
    image: torch.Tensor
    position: torch.Tensor

    @classmethod
    def empty(cls, units: int, k: int, device: torch.device | str = "cpu") -> "TopK":
        return cls(
            values=torch.full((units, k), float("-inf"), device=device),
            image=torch.full((units, k), -1, dtype=torch.int64, device=device),
            position=torch.full((units, k), -1, dtype=torch.int64, device=device),
        )

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def to(self, device: torch.device | str) -> "TopK":
        return TopK(self.values.to(device), self.image.to(device), self.position.to(device))


def spatial_max(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and unit, the maximum over space and its first raster position.

    ``activations`` is ``[B, C, ...]``; returns float32 values and int64 positions,
    both ``[B, C]`` (positions -1 for ``[B, C]`` inputs). max() returns the first maximal
    index and propagates NaN, so a value is NaN or +inf if any activation of it was.
    """
    if activations.dim() == 2:
        values = activations.float()
        return values, torch.full_like(values, -1, dtype=torch.int64)
    values, positions = activations.flatten(2).max(dim=2)
    return values.float(), positions


def emptied(topk: TopK, units: torch.Tensor) -> TopK:
    """``topk`` with the rows of ``units`` (a bool mask) as not-finite records: value NaN, image and position -1."""
    rows = units.to(topk.values.device).unsqueeze(1)
    return TopK(topk.values.masked_fill(rows, float("nan")), topk.image.masked_fill(rows, -1),
                topk.position.masked_fill(rows, -1))


def merge(a: TopK, b: TopK, k: int | None = None) -> TopK:
    """The top-k of the union of two record sets (same units), ties to the lower image index."""
    k = a.k if k is None else k
    values = torch.cat([a.values, b.values], dim=1)
    image = torch.cat([a.image, b.image], dim=1)
    position = torch.cat([a.position, b.position], dim=1)
    # Unused slots (image -1) must lose every tie, so they sort after real images.
    order_key = torch.where(image < 0, torch.iinfo(torch.int64).max, image)
    by_image = order_key.argsort(dim=1, stable=True)
    values, image, position = (t.gather(1, by_image) for t in (values, image, position))
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return TopK(values.gather(1, by_value), image.gather(1, by_value), position.gather(1, by_value))


class TopKAccumulator:
    """Accumulates a layer's top-k batch by batch, on the activations' device.

    Memory is ``O(units * (k + batch))`` whatever the number of probe images.
    ``not_finite`` marks the units whose spatial maximum was NaN or infinite on some
    image: their ranks mean nothing, so callers report them instead (see ``emptied``).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.result: TopK | None = None
        self.not_finite: torch.Tensor | None = None

    def update(self, activations: torch.Tensor, first_image: int) -> None:
        """Add a batch whose images are ``first_image .. first_image + B - 1``."""
        values, positions = spatial_max(activations)
        finite = values.isfinite()
        bad = ~finite.all(dim=0)
        self.not_finite = bad if self.not_finite is None else self.not_finite | bad
        values = values.masked_fill(values.isnan(), float("-inf"))  # NaN ranks lowest, +inf highest
        batch, units = values.shape
        image = torch.arange(first_image, first_image + batch, device=values.device)
        candidates = TopK(values.t(), image.unsqueeze(0).expand(units, batch), positions.t())
        if self.result is None:
            self.result = TopK.empty(units, self.k, values.device)
        self.result = merge(self.result, candidates, self.k)
