"""Probe display: one 0..1 / 0..255 decision per set, and warnings for displays that would mislead."""

import warnings

import numpy as np
import pytest
import torch

from tb_convviz import ProbeSet
from tb_convviz import probe as probe_module
from tb_convviz.probe import ProbeDisplayWarning

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _images(n=6, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _quiet(*args, **kwargs) -> ProbeSet:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeDisplayWarning)
        return ProbeSet(*args, **kwargs)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def test_one_bright_pixel_does_not_black_out_a_0_1_image():
    images = _images()
    images[2, 0, 0, 0] = 1.6  # e.g. an augmentation overshoot
    shown = _quiet(images).display(2)
    expected = np.clip(_hwc(images[2]), 0, 1) * 255
    np.testing.assert_allclose(shown, expected, atol=0.51)
    assert shown.mean() > 60  # not the near-black of a /255 rescale


def test_the_scale_comes_from_the_dtype_the_mean_or_the_argument():
    raw = _images()
    as_bytes = (raw * 255).round().to(torch.uint8)
    assert _quiet(as_bytes).value_range == (0.0, 255.0)
    np.testing.assert_array_equal(_quiet(as_bytes).display(1), _hwc(as_bytes[1]))
    # Normalised from 0..255 with mean/std in 0..255 units (as some codebases do).
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    pixels = raw * 255
    normalised = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    np.testing.assert_allclose(_quiet(normalised, mean=mean, std=std).display(3), _hwc(pixels[3]), atol=0.51)
    # Explicit: float 0..255 images without normalisation.
    explicit = _quiet(pixels, value_range=(0, 255))
    np.testing.assert_allclose(explicit.display(0), _hwc(pixels[0]), atol=0.51)
    # ImageNet normalisation of 0..1 images.
    normalised = (raw - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    probe = _quiet(normalised, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert probe.value_range == (0.0, 1.0)
    np.testing.assert_allclose(probe.display(5), _hwc(raw[5]) * 255, atol=1.0)


def test_standardised_probes_without_mean_std_warn_at_construction():
    raw = _images(n=20)
    normalised = (raw - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with pytest.warns(ProbeDisplayWarning, match=r"clipped: pass the mean= and std="):
        ProbeSet(normalised)


def test_0_255_floats_without_value_range_warn():
    with pytest.warns(ProbeDisplayWarning, match=r"outside the display range .*value_range=\(0, 255\)"):
        ProbeSet(_images() * 255)


def test_a_display_that_would_be_near_constant_warns():
    with pytest.warns(ProbeDisplayWarning, match="near-constant"):
        ProbeSet(_images(), value_range=(0, 255))


def test_nan_pixels_warn_naming_the_images():
    images = _images(n=10)
    images[3, 1, 2, 2] = float("nan")
    images[7, 0, 0, 0] = float("inf")
    with pytest.warns(ProbeDisplayWarning, match=r"probe image\(s\) 3, 7 have NaN or infinite pixels"):
        probe = ProbeSet(images)
    assert probe.display(3).dtype == np.uint8  # displayable, the NaN pixel as black


def test_dataset_backed_probe_sets_check_their_sample(monkeypatch):
    monkeypatch.setattr(probe_module, "IN_MEMORY_BYTES", 100)
    images = _images(n=12)
    images[0, 0, 0, 0] = float("nan")  # image 0 is always sampled
    data = [(images[i], 0) for i in range(12)]
    with pytest.warns(ProbeDisplayWarning, match=r"probe image\(s\) 0 have NaN"):
        ProbeSet.from_dataset(data, n=12)


@pytest.mark.parametrize("value_range", [(1, 1), (0, float("nan")), "0..1", (0, 1, 2)])
def test_bad_value_range_says_what_to_pass(value_range):
    with pytest.raises(ValueError, match="value_range"):
        ProbeSet(_images(), value_range=value_range)
