"""timm's data pipeline: a real timm dataset on a generated ImageFolder (nothing downloaded).

With timm's prefetcher (its train.py default) the dataset yields uint8 images and the loader
normalises them on the device, so a probe drawn from that dataset is raw 0..255 pixels: the
logger refuses it and shows the fix. The fix's two routes rank the same images the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from tb_convviz import ConvVizLogger, ProbeSet, read_run

CLASSES = ["cat", "dog", "fox"]


def image_folder(root, splits=("validation",), per_class: int = 4) -> None:
    """ImageNet's layout with generated images: ``root/<split>/<class>/<i>.png``, a class per brightness."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def dataset_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    image_folder(root)
    return timm.data.create_dataset("", root=str(root), split="validation")


@pytest.fixture(scope="module")
def model_and_config():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(CLASSES)).eval()
    data_config = {**timm.data.resolve_data_config(model=model), "input_size": (3, 32, 32), "crop_pct": 1.0}
    return model, data_config


def test_a_prefetcher_probe_of_uint8_pixels_is_refused_with_the_fix(dataset_eval, model_and_config, tmp_path):
    model, data_config = model_and_config
    dataset_eval.transform = timm.data.create_transform(**data_config, is_training=False, use_prefetcher=True)
    probe = ProbeSet.from_dataset(dataset_eval, n=12)
    assert probe.dtype == torch.uint8
    assert probe.class_names == CLASSES  # from the reader's class_to_idx, not "class 2"
    with pytest.raises(ValueError, match=r"uint8, not normalised floats") as refused:
        ConvVizLogger(model, probe, tmp_path, k=2)
    assert "create_transform(**data_config, is_training=False)" in str(refused.value)
    assert "forward=lambda model, x: model((x / 255 - MEAN) / STD)" in str(refused.value)


def test_both_routes_of_the_fix_rank_the_probe_as_the_model_sees_it(dataset_eval, model_and_config, tmp_path):
    model, data_config = model_and_config
    mean, std = data_config["mean"], data_config["std"]
    # Route 1: the eval transform, as the message shows it.
    dataset_eval.transform = timm.data.create_transform(**data_config, is_training=False)
    normalised = ProbeSet.from_dataset(dataset_eval, n=12, mean=mean, std=std)
    assert normalised.dtype == torch.float32 and normalised.class_names == CLASSES
    with ConvVizLogger(model, normalised, tmp_path / "transform", k=2) as logger:
        logger.log(0)
    # Route 2: the prefetcher's uint8 images, normalised in the probe pass as the prefetcher does.
    dataset_eval.transform = timm.data.create_transform(**data_config, is_training=False, use_prefetcher=True)
    raw = ProbeSet.from_dataset(dataset_eval, n=12)
    shape = (1, -1, 1, 1)
    MEAN, STD = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
    with ConvVizLogger(model, raw, tmp_path / "forward", k=2,
                       forward=lambda model, x: model((x / 255 - MEAN) / STD)) as logger:
        logger.log(0)
    a, b = read_run(tmp_path / "transform"), read_run(tmp_path / "forward")
    assert [l.name for l in a.layers] == [l.name for l in b.layers] and len(a.layers) == 5
    for layer in (l.name for l in a.layers):
        np.testing.assert_array_equal(a.topk(layer, 0).image, b.topk(layer, 0).image)
        np.testing.assert_allclose(a.topk(layer, 0).values, b.topk(layer, 0).values, rtol=1e-5, atol=1e-6)
