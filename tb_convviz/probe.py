"""ProbeSet: the fixed images every checkpoint ranks, and how to display them."""

from __future__ import annotations

import hashlib
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

# Images held in memory by ProbeSet.from_dataset up to this many bytes; larger
# probe sets (e.g. a 50,000-image validation set) are read from the dataset per batch.
IN_MEMORY_BYTES = 2 << 30
# Images hashed into the fingerprint of a dataset-backed probe set, and checked for display.
FINGERPRINT_SAMPLES = 64
# The display check warns when more than this fraction of sampled pixels is clipped, or when
# the displayed images vary by less than this standard deviation (of the 0..1 display range).
CLIPPED_FRACTION = 0.01
CONSTANT_STD = 0.02


class ProbeDisplayWarning(UserWarning):
    """Probe images that would display badly (clipped, near-constant) or hold NaN/inf pixels."""


class ProbeSet:
    """A fixed, ordered set of probe images, as fed to the model.

    ``images`` is an ``[N, C, H, W]`` tensor (already normalised for the model);
    ``mean``/``std`` undo that normalisation for display. ``value_range`` is the
    ``(low, high)`` of the de-normalised pixels; by default ``(0, 255)`` for integer
    images or a mean above 1.5 (normalised from 0..255), else ``(0, 1)``. ``labels``
    (length N) and ``class_names`` are optional and only shown in the dashboard.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int] | torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"ProbeSet images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(
                f"ProbeSet images must have shape [N, C, H, W], got {tuple(images.shape)}; "
                "add a batch or channel dimension (e.g. images.unsqueeze(1) for grayscale)"
            )
        self._images = images.detach().cpu()
        self._dataset = None
        self._indices: list[int] = []
        self._init_common(len(images), tuple(images.shape[1:]), labels, class_names, mean, std, value_range,
                          images.dtype)

    @classmethod
    def from_dataset(
        cls,
        dataset: torch.utils.data.Dataset,
        n: int = 1024,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> "ProbeSet":
        """``n`` images drawn without replacement (by ``seed``) from a dataset of (image, label) pairs."""
        if isinstance(dataset, torch.utils.data.DataLoader):
            raise TypeError("from_dataset takes a dataset, not a DataLoader (which yields batches): "
                            "pass loader.dataset")
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(f"from_dataset needs a dataset with len() and indexing (a map-style dataset), got "
                            f"{type(dataset).__name__}: draw the images yourself and pass them to ProbeSet(images)")
        size = len(dataset)
        if size == 0:
            raise ValueError("the dataset is empty: a probe set needs at least one image")
        n = min(int(n), size)
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        generator = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(size, generator=generator)[:n].tolist())
        first, _ = _image_label(dataset[indices[0]])
        if class_names is None:
            class_names = getattr(dataset, "classes", None) or getattr(dataset, "class_names", None)
        if n * first.numel() * first.element_size() <= IN_MEMORY_BYTES:
            pairs = [_image_label(dataset[i]) for i in indices]
            return cls(torch.stack([p[0] for p in pairs]), [p[1] for p in pairs], class_names, mean, std, value_range)
        probe = cls.__new__(cls)
        probe._images, probe._dataset, probe._indices = None, dataset, indices
        labels = [_image_label(dataset[i])[1] for i in indices]
        probe._init_common(n, tuple(first.shape), labels, class_names, mean, std, value_range, first.dtype)
        return probe

    def _init_common(self, n, shape, labels, class_names, mean, std, value_range, dtype) -> None:
        if n == 0:
            raise ValueError("the probe set is empty: pass at least one image (Zeiler & Fergus used ~50,000)")
        self.n, self.shape = n, shape
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
            if len(labels) != n:
                raise ValueError(f"got {len(labels)} labels for {n} probe images")
        self.labels = labels
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        channels = shape[0]
        self.mean = _per_channel(mean, channels, "mean", 0.0)
        self.std = _per_channel(std, channels, "std", 1.0)
        self.value_range = _value_range(value_range, dtype, self.mean)
        self.fingerprint = self._fingerprint()
        self._check_display()

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_index, images)`` for consecutive batches of images ``[start, stop)``."""
        stop = self.n if stop is None else stop
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            if self._images is not None:
                yield first, self._images[first:last]
            else:
                yield first, torch.stack([self.image(i) for i in range(first, last)])

    def image(self, index: int) -> torch.Tensor:
        """Probe image ``index`` as fed to the model, ``[C, H, W]``."""
        if self._images is not None:
            return self._images[index]
        return _image_label(self._dataset[self._indices[index]])[0]

    def label(self, index: int) -> int:
        """Label of image ``index``, or -1 without labels."""
        return int(self.labels[index]) if self.labels is not None else -1

    def display(self, index: int) -> np.ndarray:
        """Probe image ``index`` de-normalised for display: uint8 ``[H, W, C]``."""
        return self.show(self.image(index))

    def show(self, image: torch.Tensor) -> np.ndarray:
        """Any ``[C, H, W]`` image fed to the model, de-normalised as probe images are: uint8 ``[H, W, C]``."""
        shown = self._unit_range(image).nan_to_num(0.0).clamp(0, 1)
        return (shown * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()

    def _unit_range(self, image: torch.Tensor) -> torch.Tensor:
        # The same scale for every image, decided once: a per-image rule (say, "max above
        # 1.5 means 0..255") turns a 0..1 image with one bright outlier near black.
        low, high = self.value_range
        image = image.detach().to(torch.float32).cpu() * self.std.view(-1, 1, 1) + self.mean.view(-1, 1, 1)
        return (image - low) / (high - low)

    def _samples(self) -> list[int]:
        return sorted({int(i) for i in np.linspace(0, self.n - 1, min(self.n, FINGERPRINT_SAMPLES))})

    def _check_display(self) -> None:
        """Warn about NaN/inf pixels, and displays that would be clipped or near-constant."""
        samples = self._samples()
        if self._images is not None:
            bad = [first + int(i) for first, batch in self.batches(256) if batch.is_floating_point()
                   for i in (~batch.isfinite()).flatten(1).any(dim=1).nonzero().flatten()]
        else:  # a dataset too large to scan at construction: its sample, and the logger checks each batch
            bad = [i for i in samples if not self.image(i).isfinite().all()]
        if bad:
            warnings.warn(
                f"ProbeSet: probe image(s) {_some(bad)} have NaN or infinite pixels. The model's activations "
                "on them are then usually not finite, and every unit that sees such an activation is "
                "recorded as 'not finite' instead of ranked. Replace the pixels (torch.nan_to_num) or "
                "leave those images out.", ProbeDisplayWarning, stacklevel=4,
            )
        shown = torch.stack([self._unit_range(self.image(i)) for i in samples])
        shown = shown[shown.isfinite()]
        if shown.numel() == 0:
            return
        clipped = float(((shown < -0.02) | (shown > 1.02)).float().mean())
        spread = float(shown.clamp(0, 1).std()) if shown.numel() > 1 else 0.0
        low, high = self.value_range
        how = (f"de-normalised with mean={self.mean.tolist()}, std={self.std.tolist()} and shown as "
               f"{low:g}..{high:g}")
        fix = ("pass the mean= and std= the images were normalised with, and value_range=(0, 255) for "
               "images in 0..255")
        if clipped > CLIPPED_FRACTION:
            warnings.warn(f"ProbeSet: {clipped:.0%} of the sampled probe pixels fall outside the display "
                          f"range ({how}), so the dashboard shows them clipped: {fix}",
                          ProbeDisplayWarning, stacklevel=4)
        elif spread < CONSTANT_STD:
            warnings.warn(f"ProbeSet: the probe images would display as near-constant ({how}; pixel "
                          f"std {spread:.3f} of the range): {fix}", ProbeDisplayWarning, stacklevel=4)

    def _fingerprint(self) -> str:
        # Full hash for in-memory sets; dataset-backed sets hash an evenly spaced
        # sample so that constructing the logger does not read 50,000 images.
        h = hashlib.sha256(repr((self.n, self.shape)).encode())
        if self.labels is not None:
            h.update(self.labels.numpy().astype("<i8").tobytes())
        if self._images is not None:
            h.update(self._images.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
        else:
            for i in np.linspace(0, self.n - 1, min(self.n, FINGERPRINT_SAMPLES)).astype(int):
                h.update(self.image(int(i)).to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
        return h.hexdigest()[:16]


def _image_label(item) -> tuple[torch.Tensor, int]:
    if isinstance(item, (tuple, list)):
        image, label = item[0], (item[1] if len(item) > 1 else -1)
    else:
        image, label = item, -1
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"dataset items must be tensors [C, H, W] (add transforms.ToTensor()), got {type(image).__name__}"
        )
    return image, int(label) if not isinstance(label, torch.Tensor) else int(label.item())


def _value_range(value_range, dtype: torch.dtype, mean: torch.Tensor) -> tuple[float, float]:
    if value_range is not None:
        try:
            low, high = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise ValueError(f"value_range must be a (low, high) pair such as (0, 1) or (0, 255), "
                             f"got {value_range!r}") from None
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise ValueError(f"value_range must have finite low < high, got {value_range!r}")
        return low, high
    if not dtype.is_floating_point or float(mean.abs().max()) > 1.5:
        return 0.0, 255.0
    return 0.0, 1.0


def _some(indices: list[int], shown: int = 8) -> str:
    return ", ".join(map(str, indices[:shown])) + (f", ... ({len(indices)} in all)" if len(indices) > shown else "")


def _per_channel(values, channels: int, name: str, default: float) -> torch.Tensor:
    if values is None:
        return torch.full((channels,), default)
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if len(t) == 1:
        t = t.expand(channels)
    if len(t) != channels:
        raise ValueError(f"{name} has {len(t)} values for {channels}-channel images")
    return t.clone()
