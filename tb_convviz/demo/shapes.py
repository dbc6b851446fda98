"""Shapes: a synthetic, seeded image-classification dataset that needs no download.

Each image is one shape or textured patch (10 classes) in a random colour,
position, scale and rotation over a gradient background with smooth noise, so a
ConvNet trained on it learns colour blobs and oriented edges in layer 1 and shape
parts and whole shapes higher up. Shapes are drawn as signed distance fields in
numpy, vectorised over chunks of images: anti-aliased, and about 5,000 images a
second on one core; each (size, seed, split) is generated once per process.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

CLASS_NAMES = (
    "disc", "ring", "square", "triangle", "star", "cross", "crescent", "stripes", "checkerboard", "dots",
)
# Images are generated in whole chunks with their own random stream, so the
# first n images of a larger dataset equal a dataset of n images with the same seed.
_CHUNK = 256
_NOISE_GRID = 5


class Shapes(Dataset):
    """``size`` x ``size`` RGB images of 10 shape and texture classes, deterministic by seed.

    Items are ``(image, label)`` with ``image`` a float ``[3, size, size]`` tensor in
    [0, 1] (or ``transform(image)``). ``train`` selects one of two disjoint random
    streams, so train and test sets of the same seed never share images.
    """

    class_names = CLASS_NAMES

    def __init__(
        self,
        n: int = 10000,
        *,
        seed: int = 0,
        train: bool = True,
        size: int = 64,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if n < 1 or size < 16:
            raise ValueError(f"Shapes needs n >= 1 and size >= 16, got n={n}, size={size}")
        images, labels = _generate(n, seed, train, size)
        self.images = images  # [N, 3, size, size] uint8, shared with the per-seed cache
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


@functools.lru_cache(maxsize=4)
def _generate(n: int, seed: int, train: bool, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.empty((n, 3, size, size), np.uint8)
    labels = np.empty(n, np.int64)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        rng = np.random.default_rng([seed, int(train), start // _CHUNK])
        chunk_images, chunk_labels = _draw_chunk(rng, _CHUNK, size)
        images[start:stop], labels[start:stop] = chunk_images[: stop - start], chunk_labels[: stop - start]
    return torch.from_numpy(images), torch.from_numpy(labels)


def _draw_chunk(rng: np.random.Generator, b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(b) % len(CLASS_NAMES))
    out, bg_mean = _background(rng, b, size)
    ink = _contrasting(rng, bg_mean)
    ink2 = _contrasting(rng, ink)

    s = rng.uniform(0.17, 0.4, b) * size  # shape radius in pixels
    margin = 0.8 * s
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    theta = rng.uniform(0, 2 * np.pi, b)
    period = rng.uniform(0.07, 0.13, b) * size  # texture period in pixels
    extra = rng.uniform(0, 1, b)  # one free shape parameter per image (thickness, pointiness...)
    region_is_disc = rng.random(b) < 0.5

    grid = np.arange(size, dtype=np.float32) + 0.5
    alpha = np.empty((b, size, size), np.float32)
    pattern = np.zeros((b, size, size), np.float32)
    for c, draw in enumerate(_CLASSES):
        idx = np.flatnonzero(labels == c)
        p = lambda a: a[idx, None, None].astype(np.float32)  # noqa: E731 - per-image scalars broadcast over pixels
        dx, dy = grid[None, None, :] - p(cx), grid[None, :, None] - p(cy)
        cos, sin = np.cos(p(theta)), np.sin(p(theta))
        scale = p(s)
        u, v = (cos * dx + sin * dy) / scale, (cos * dy - sin * dx) / scale
        dist, texture = draw(u, v, p(extra), scale, p(period), p(region_is_disc))
        alpha[idx] = np.clip(0.5 - dist * scale, 0, 1)
        if texture is not None:
            pattern[idx] = texture

    alpha, pattern = alpha[:, None], pattern[:, None]
    ink, ink2 = ink[:, :, None, None], ink2[:, :, None, None]
    out += (ink + (ink2 - ink) * pattern - out) * alpha
    out += (rng.random((b, 1, size, size), dtype=np.float32) - 0.5) * 0.07  # luminance grain
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), labels


def _background(rng: np.random.Generator, b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[b, 3, size, size] two-colour gradients at random angles plus smooth colour noise, and their mean colours."""
    c0, c1 = rng.uniform(0, 1, (2, b, 3)).astype(np.float32)
    c1 = c0 + 0.5 * (c1 - c0)  # keep gradients gentle so shapes stand out
    angle = rng.uniform(0, 2 * np.pi, (b, 1, 1, 1)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = np.cos(angle) * t + np.sin(angle) * t[:, None] + 0.5
    noise = rng.normal(0, 0.08, (b, 3, _NOISE_GRID, _NOISE_GRID)).astype(np.float32)
    interp = _interp_matrix(_NOISE_GRID, size)
    out = interp @ noise @ interp.T
    out += c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp
    return out, (c0 + c1) / 2


@functools.lru_cache(maxsize=8)
def _interp_matrix(n: int, size: int) -> np.ndarray:
    """[size, n] linear-interpolation weights from an n-point grid to size pixels."""
    pos = np.linspace(0, n - 1, size)
    lo = np.minimum(pos.astype(int), n - 2)
    frac = pos - lo
    w = np.zeros((size, n), np.float32)
    w[np.arange(size), lo] = 1 - frac
    w[np.arange(size), lo + 1] = frac
    return w


def _contrasting(rng: np.random.Generator, ref: np.ndarray) -> np.ndarray:
    """One colour per row of ``ref`` [b, 3]: the farthest of 4 random candidates."""
    cand = rng.uniform(0, 1, (4,) + ref.shape).astype(np.float32)
    best = np.linalg.norm(cand - ref, axis=-1).argmax(axis=0)
    return cand[best, np.arange(len(ref))]


# np.hypot and np.mod are several times slower than these.
def _hypot(x, y):
    return np.sqrt(x * x + y * y)


def _frac(x):
    return x - np.floor(x)


# Signed distance functions in shape units (radius 1), negative inside; after
# https://iquilezles.org/articles/distfunctions2d/.
def _sd_box(u, v, hx, hy):
    qx, qy = np.abs(u) - hx, np.abs(v) - hy
    return _hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _sd_triangle(u, v, r):
    k = np.sqrt(3.0)
    x, y = np.abs(u) - r, v + r / k
    fold = x + k * y > 0
    x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * r, 0)
    return -_hypot(x, y) * np.sign(y)


def _sd_star(u, v, r, n, m):
    an, en = np.pi / n, np.pi / m
    acx, acy = np.cos(an), np.sin(an)
    ecx, ecy = np.cos(en), np.sin(en)
    bn = _frac(np.arctan2(u, v) / (2 * an)) * (2 * an) - an
    rad = _hypot(u, v)
    x, y = rad * np.cos(bn) - r * acx, rad * np.abs(np.sin(bn)) - r * acy
    t = np.clip(-(x * ecx + y * ecy), 0, r * acy / ecy)
    x, y = x + ecx * t, y + ecy * t
    return _hypot(x, y) * np.sign(x)


def _region(u, v, is_disc):
    return np.where(is_disc > 0, _hypot(u, v) - 1, _sd_box(u, v, 0.85, 0.85))


def _band(w, period):
    """Anti-aliased [-1, 1] square wave of ``w`` (pixels) with the given period."""
    d = (np.abs(_frac(w / period) - 0.5) - 0.25) * period
    return np.clip(0.5 - d, 0, 1) * 2 - 1


def _disc(u, v, extra, scale, period, is_disc):
    return _hypot(u, v) - 1, None


def _ring(u, v, extra, scale, period, is_disc):
    half = 0.15 + 0.15 * extra
    return np.abs(_hypot(u, v) - (1 - half)) - half, None


def _square(u, v, extra, scale, period, is_disc):
    return _sd_box(u, v, 0.8, 0.8), None


def _triangle(u, v, extra, scale, period, is_disc):
    return _sd_triangle(u, v, 0.95), None


def _star(u, v, extra, scale, period, is_disc):
    return _sd_star(u, v, 1.0, 5, 2.6 + 0.8 * extra), None


def _cross(u, v, extra, scale, period, is_disc):
    arm = 0.25 + 0.12 * extra
    return np.minimum(_sd_box(u, v, 0.95, arm), _sd_box(u, v, arm, 0.95)), None


def _crescent(u, v, extra, scale, period, is_disc):
    bite = _hypot(u - 0.35 - 0.2 * extra, v) - 0.85
    return np.maximum(_hypot(u, v) - 1, -bite), None


def _stripes(u, v, extra, scale, period, is_disc):
    return _region(u, v, is_disc), _band(u * scale, period) * 0.5 + 0.5


def _checkerboard(u, v, extra, scale, period, is_disc):
    return _region(u, v, is_disc), 0.5 - 0.5 * _band(u * scale, period) * _band(v * scale, period)


def _dots(u, v, extra, scale, period, is_disc):
    gu = (_frac(u * scale / period) - 0.5) * period
    gv = (_frac(v * scale / period) - 0.5) * period
    return _region(u, v, is_disc), np.clip(0.5 - (_hypot(gu, gv) - 0.3 * period), 0, 1)


_CLASSES = (_disc, _ring, _square, _triangle, _star, _cross, _crescent, _stripes, _checkerboard, _dots)
