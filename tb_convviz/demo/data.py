"""Datasets named by a ``--data`` spec: ``synthetic``, ``imagefolder:PATH``, ``cifar10``, ``fashion-mnist``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset

from tb_convviz.demo.shapes import Shapes

SPECS = "synthetic, imagefolder:PATH, cifar10 or fashion-mnist"
# Share of an unsplit image folder held out as the test set.
IMAGEFOLDER_TEST_FRACTION = 0.2
SYNTHETIC_SIZES = (10000, 2000)
# Images of the synthetic training set that its mean/std are measured on.
STATS_SAMPLE = 2000

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(Exception):
    """A ``--data`` spec that cannot be loaded; the message says what to do about it."""


@dataclasses.dataclass(frozen=True)
class DemoData:
    """Train and test sets yielding ``(image, label)``, images normalised by ``mean``/``std``."""

    name: str
    train: Dataset
    test: Dataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)


def default_root() -> Path:
    """Where downloaded datasets are cached: ``$XDG_CACHE_HOME/tb-convviz/datasets``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tb-convviz" / "datasets"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a ``--data`` spec into (kind, path); raise DataError for an unknown one."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "imagefolder":
        if not path:
            raise DataError("--data imagefolder needs a folder: use imagefolder:PATH, with one subfolder per class")
        return kind, path
    if kind in ("synthetic", "cifar10", "fashion-mnist") and not sep:
        return kind, None
    raise DataError(f"unknown --data {spec!r}: use {SPECS}")


def load_data(
    spec: str,
    *,
    size: int = 64,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    limit: tuple[int, int] | None = None,
) -> DemoData:
    """Load the train and test sets named by ``spec``, resized to ``size`` x ``size``.

    ``root`` is where cifar10 and fashion-mnist are found or downloaded to (default
    ``default_root()``). ``seed`` fixes the synthetic images and the split of an image
    folder without ``train``/``test`` subfolders. ``limit`` caps the (train, test) sizes
    with a sample drawn by ``seed``; the synthetic sets are generated at that size
    (default ``SYNTHETIC_SIZES``).
    """
    kind, path = parse_spec(spec)
    if kind == "synthetic":
        return _synthetic(size, seed, limit or SYNTHETIC_SIZES)
    if kind == "imagefolder":
        data = _imagefolder(Path(path), size, seed)
    else:
        data = _torchvision(kind, Path(root) if root is not None else default_root(), size)
    if limit is None:
        return data
    return dataclasses.replace(data, train=_sample(data.train, limit[0], seed), test=_sample(data.test, limit[1], seed))


def _sample(dataset: Dataset, n: int, seed: int) -> Dataset:
    # Random, not the first n: image folders list their images class by class.
    if len(dataset) <= n:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:n].tolist()))


class Normalize:
    """``(image - mean) / std`` per channel, for ``[C, H, W]`` float tensors."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def _synthetic(size: int, seed: int, sizes: tuple[int, int]) -> DemoData:
    train = Shapes(sizes[0], seed=seed, train=True, size=size)
    sample = train.images[:STATS_SAMPLE].float().div_(255)
    mean = tuple(sample.mean(dim=(0, 2, 3)).tolist())
    std = tuple(sample.std(dim=(0, 2, 3)).tolist())
    train.transform = Normalize(mean, std)
    test = Shapes(sizes[1], seed=seed, train=False, size=size, transform=Normalize(mean, std))
    return DemoData("synthetic", train, test, list(Shapes.class_names), mean, std)


def _pil_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std),
    ])


def _imagefolder(path: Path, size: int, seed: int) -> DemoData:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DataError(f"--data imagefolder:{path}: no such folder; point it at a folder with one subfolder per class")
    transform = _pil_transform(size, _IMAGENET_MEAN, _IMAGENET_STD)
    train_dir = path / "train"
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    try:
        if train_dir.is_dir() and test_dir is not None:
            train, test = ImageFolder(str(train_dir), transform=transform), ImageFolder(str(test_dir), transform=transform)
            if train.classes != test.classes:
                raise DataError(
                    f"--data imagefolder:{path}: {train_dir} and {test_dir} have different class subfolders; "
                    "give both the same ones"
                )
            classes = train.classes
        else:
            full = ImageFolder(str(path), transform=transform)
            if len(full) < 2:
                raise DataError(f"--data imagefolder:{path}: found {len(full)} image; it needs at least 2")
            classes = full.classes
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, round(len(full) * IMAGEFOLDER_TEST_FRACTION))
            train, test = Subset(full, sorted(order[n_test:])), Subset(full, sorted(order[:n_test]))
    except FileNotFoundError:
        raise DataError(
            f"--data imagefolder:{path} holds no images in class subfolders: it needs one subfolder of "
            ".jpg or .png images per class (optionally inside train/ and test/ subfolders)"
        ) from None
    return DemoData(f"imagefolder:{path}", train, test, list(classes), _IMAGENET_MEAN, _IMAGENET_STD)


@dataclasses.dataclass(frozen=True)
class _Hosted:
    title: str
    cls: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how_to_get: str  # completes "download ... into ROOT"


_HOSTED = {
    "cifar10": _Hosted(
        "CIFAR-10", "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {root}",
    ),
    "fashion-mnist": _Hosted(
        "Fashion-MNIST", "FashionMNIST", (0.2860,), (0.3530,),
        "the four *-ubyte.gz files of https://github.com/zalandoresearch/fashion-mnist into {root}/FashionMNIST/raw",
    ),
}


def _torchvision(kind: str, root: Path, size: int) -> DemoData:
    from torchvision import datasets

    hosted = _HOSTED[kind]
    cls = getattr(datasets, hosted.cls)
    transform = _pil_transform(size, hosted.mean, hosted.std)
    try:
        train, test = (cls(str(root), train=t, transform=transform, download=True) for t in (True, False))
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError; torchvision raises RuntimeError
        reason = getattr(e, "reason", None) or str(e).strip().splitlines()[-1].removeprefix("<urlopen error ").rstrip(">")
        raise DataError(
            f"{hosted.title} is not in {root} and could not be downloaded ({reason}): "
            f"download {hosted.how_to_get.format(root=root)}, then run again"
        ) from None
    return DemoData(kind, train, test, list(train.classes), hosted.mean, hosted.std)
