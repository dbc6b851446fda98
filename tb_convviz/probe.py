"""ProbeSet: the fixed images every checkpoint ranks, and how to display them."""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np
import torch

# Images held in memory by ProbeSet.from_dataset up to this many bytes; larger
# probe sets (e.g. a 50,000-image validation set) are read from the dataset per batch.
IN_MEMORY_BYTES = 2 << 30
# Images hashed into the fingerprint of a dataset-backed probe set.
FINGERPRINT_SAMPLES = 64


class ProbeSet:
    """A fixed, ordered set of probe images, as fed to the model.

    ``images`` is an ``[N, C, H, W]`` tensor (already normalised for the model);
    ``mean``/``std`` undo that normalisation for display. ``labels`` (length N)
    and ``class_names`` are optional and only shown in the dashboard.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int] | torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
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
        self._init_common(len(images), tuple(images.shape[1:]), labels, class_names, mean, std)

    @classmethod
    def from_dataset(
        cls,
        dataset: torch.utils.data.Dataset,
        n: int = 1024,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
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
            return cls(torch.stack([p[0] for p in pairs]), [p[1] for p in pairs], class_names, mean, std)
        probe = cls.__new__(cls)
        probe._images, probe._dataset, probe._indices = None, dataset, indices
        labels = [_image_label(dataset[i])[1] for i in indices]
        probe._init_common(n, tuple(first.shape), labels, class_names, mean, std)
        return probe

    def _init_common(self, n, shape, labels, class_names, mean, std) -> None:
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
        self.fingerprint = self._fingerprint()

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
        img = self.image(index).detach().to(torch.float32).cpu()
        img = img * self.std.view(-1, 1, 1) + self.mean.view(-1, 1, 1)
        if float(img.max()) > 1.5:  # already in 0..255
            img = img / 255.0
        return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()

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


def _per_channel(values, channels: int, name: str, default: float) -> torch.Tensor:
    if values is None:
        return torch.full((channels,), default)
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if len(t) == 1:
        t = t.expand(channels)
    if len(t) != channels:
        raise ValueError(f"{name} has {len(t)} values for {channels}-channel images")
    return t.clone()
