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

    def columns(self, index: torch.Tensor) -> "TopK":
        """The records at ``index`` (``[units, n]`` slot indices), row by row."""
        return TopK(self.values.gather(1, index), self.image.gather(1, index), self.position.gather(1, index))

    @staticmethod
    def joined(a: "TopK", b: "TopK") -> "TopK":
        """``a``'s slots, then ``b``'s, side by side."""
        return TopK(torch.cat([a.values, b.values], dim=1), torch.cat([a.image, b.image], dim=1),
                    torch.cat([a.position, b.position], dim=1))


def peaks(activations: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and unit of ``[B, C, ...]`` activations, the float32 spatial maximum and its first raster position.

    ``held``: the values a per-unit top-k holds before this batch (``[C, k]``, sorted, -inf in
    free slots). Positions are found only for the maps that reach :func:`entry_bar`, -1
    elsewhere: ``amax`` is ~3x faster than ``max`` with indices (which is ~3x faster than
    ``argmax`` on the CPU). -1 for ``[B, C]`` inputs.
    """
    values = peak_values(activations)
    return values, peak_positions(activations, values, entry_bar(values, held))


def peak_values(activations: torch.Tensor) -> torch.Tensor:
    """Per image and unit of ``[B, C, ...]`` activations, the float32 spatial maximum (``[B, C]`` as they are).

    ``amax`` propagates NaN, so a value is NaN or +inf if any activation of it was.
    """
    if activations.dim() == 2:
        return activations.float()
    # Reductions over the spatial dims, not a flattened view, which channels-last maps would copy.
    return activations.amax(dim=tuple(range(2, activations.dim()))).float()


def entry_bar(values: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Per unit, the least value with which a map of this batch's ``[B, C]`` maxima can hold a slot (``[C]``).

    A value below ``held``'s k-th is beaten by k images held, one below the batch's own k-th
    by k of the batch's maps. Those maps are k different images where the k values differ and
    the batch holds no image twice, so the batch's k-th serves only where the values differ (an
    image fed twice in eval mode repeats its values); a caller whose batch may repeat an image
    that scored differently checks its ids. Once ``held`` is full, few maps reach its k-th:
    the batch's is needed only while ``held`` has free slots. About ``C * k`` maps reach the
    bar, not ``B * C``.
    """
    held = held.to(values.device)
    k = held.shape[1]
    bar = held[:, -1]
    if len(values) >= k and bool(bar.isneginf().any()):
        best = values.t().topk(k, dim=1).values
        bar = torch.where((best[:, :-1] > best[:, 1:]).all(dim=1), torch.maximum(bar, best[:, -1]), bar)
    return bar


def peak_positions(activations: torch.Tensor, values: torch.Tensor, bar: torch.Tensor) -> torch.Tensor:
    """The first raster positions of the :func:`peak_values` ``values`` that reach ``bar`` (``[C]``), -1 elsewhere."""
    if activations.dim() == 2:
        return torch.full_like(values, -1, dtype=torch.int64)
    above = values >= bar
    at = above.flatten().nonzero().flatten()  # image * C + unit
    if 2 * len(at) > values.numel():  # most maps (ties): one pass over all is cheaper than gathering them
        return activations.flatten(2).max(dim=2).indices.masked_fill(~above, -1)
    if activations.is_contiguous():  # whole maps copied row by row, not element by element
        maps = activations.flatten(0, 1).index_select(0, at)
    else:
        maps = activations[at // values.shape[1], at % values.shape[1]]
    positions = torch.full((values.numel(),), -1, dtype=torch.int64, device=values.device)
    positions[at] = maps.flatten(1).max(dim=1).indices
    return positions.view_as(values)


def emptied(topk: TopK, units: torch.Tensor) -> TopK:
    """``topk`` with the rows of ``units`` (a bool mask) as not-finite records: value NaN, image and position -1."""
    rows = units.to(topk.values.device).unsqueeze(1)
    return TopK(topk.values.masked_fill(rows, float("nan")), topk.image.masked_fill(rows, -1),
                topk.position.masked_fill(rows, -1))


def merge(a: TopK, b: TopK, k: int | None = None) -> TopK:
    """The top-k of the union of two record sets (same units), ties to the lower image index."""
    both = TopK.joined(a, b)
    # Unused slots (image -1) must lose every tie, so they sort after real images.
    order_key = torch.where(both.image < 0, torch.iinfo(torch.int64).max, both.image)
    return _best(both.columns(order_key.argsort(dim=1, stable=True)), a.k if k is None else k)


def distinct(records: TopK, k: int) -> TopK:
    """Each row's ``k`` best records, an image at most once (its best record), ties to the lower image.

    For records that name images by content, where one image may come more than once.
    """
    by_image = _best(records, records.k)  # each image's best record first among its own
    key = torch.where(by_image.image < 0, torch.iinfo(torch.int64).max, by_image.image)
    by_image = by_image.columns(key.argsort(dim=1, stable=True))
    image = by_image.image
    repeat = torch.zeros_like(image, dtype=torch.bool)
    repeat[:, 1:] = (image[:, 1:] == image[:, :-1]) & (image[:, 1:] >= 0)
    return _best(TopK(by_image.values.masked_fill(repeat, float("-inf")), image.masked_fill(repeat, -1),
                      by_image.position.masked_fill(repeat, -1)), k)


def _append(a: TopK, b: TopK, k: int) -> TopK:
    """:func:`merge` where ``a`` has no unused slot and ``b``'s images, ascending in each row, all follow ``a``'s.

    Only candidates above a row's k-th value can enter (ties go to ``a``'s lower images), and
    after the first batches they are few: the sort is over those, in image order, not the batch.
    """
    enter = b.values > a.values[:, -1:]
    m = int(enter.sum(dim=1).max())
    if m == 0:
        return a
    b = TopK(b.values.masked_fill(~enter, float("-inf")), b.image, b.position)
    if m < b.values.shape[1]:
        b = b.columns(b.values.topk(m, dim=1).indices.sort(dim=1).values)
    return _best(TopK.joined(a, b), k)


def _best(records: TopK, k: int) -> TopK:
    """Each row's ``k`` highest values; a stable sort, so equal values keep their slot order."""
    return records.columns(records.values.argsort(dim=1, descending=True, stable=True)[:, :k])


class TopKAccumulator:
    """Accumulates the top-k of a set of units batch by batch, on the activations' device.

    Memory is ``O(units * (k + batch))`` whatever the number of probe images.
    ``not_finite`` marks the units whose spatial maximum was NaN or infinite on some
    image: their ranks mean nothing, so callers report them instead (see ``emptied``).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.result: TopK | None = None
        self.not_finite: torch.Tensor | None = None
        self._seen = 0

    def held(self, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """The values units ``lo:hi`` hold so far (``[hi - lo, k]``, -inf in free slots), for :func:`peaks`."""
        if self.result is None:
            return torch.full((hi - lo, self.k), float("-inf"), device=device)
        return self.result.values[lo:hi]

    def update(self, activations: torch.Tensor, first_image: int) -> None:
        """Add a batch of activations whose images are ``first_image ..``, after all earlier ones."""
        self.add(*peaks(activations, self.held(0, activations.shape[1], activations.device)), first_image)

    def add(self, values: torch.Tensor, positions: torch.Tensor, first_image: int | torch.Tensor) -> None:
        """Add :func:`peaks` ``[B, units]`` of images ``first_image .. first_image + B - 1``, after all earlier ones.

        ``first_image`` may instead be the ``[B]`` image ids, ascending and above all earlier ones.
        Several layers' peaks may come concatenated along units, so one merge serves them all.
        """
        bad = ~values.isfinite().all(dim=0)
        self.not_finite = bad if self.not_finite is None else self.not_finite | bad
        values = values.masked_fill(values.isnan(), float("-inf"))  # NaN ranks lowest, +inf highest
        batch, units = values.shape
        image = first_image.to(values.device) if isinstance(first_image, torch.Tensor) else \
            torch.arange(first_image, first_image + batch, device=values.device)
        candidates = TopK(values.t(), image.unsqueeze(0).expand(units, batch), positions.t())
        if self.result is None:
            self.result = TopK.empty(units, self.k, values.device)
        full = self._seen >= self.k
        self.result = _append(self.result, candidates, self.k) if full else merge(self.result, candidates, self.k)
        self._seen += batch
