"""The model zoo: what layers="auto" picks, and their receptive fields, on torchvision and timm ConvNets.

Random-init models at small inputs, nothing downloaded. Per model: the picked layers are the
expected stage outputs, with strictly increasing stride; each is a cut of the network (zeroing
its output makes the model's output independent of the input, so it is on the main path, not
in a gating branch nor a conv before its residual add); each analytic field equals the one
measured by gradient where the field fits the measured input (``-m slow``, with top-k records against a brute-force sort).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision

from tb_convviz import ConvVizLogger, ProbeSet
from tb_convviz.reader import read_run
from tb_convviz.receptive_field import receptive_fields
from test_logger import full_activations
from test_topk import brute_force

SIZE = 96

# model: (input size, the stages layers="auto" logs). Stage outputs end each resolution, after
# the activation and residual add: torchvision's published layouts, timm's feature_info, or the
# downsampling points of one traced forward; 5 spread over the depth when there are more.
ZOO = {
    "torchvision.alexnet": (SIZE, ["features.1", "features.4", "features.7", "features.9", "features.11"]),
    "torchvision.vgg11_bn": (SIZE, ["features.3", "features.7", "features.14", "features.21", "features.28"]),
    "torchvision.vgg16": (SIZE, ["features.4", "features.9", "features.16", "features.23", "features.30"]),
    "torchvision.resnet18": (SIZE, ["relu", "layer1", "layer2", "layer3", "layer4"]),
    "torchvision.resnet50": (SIZE, ["relu", "layer1", "layer2", "layer3", "layer4"]),
    "torchvision.resnext50_32x4d": (SIZE, ["relu", "layer1", "layer2", "layer3", "layer4"]),
    "torchvision.wide_resnet50_2": (SIZE, ["relu", "layer1", "layer2", "layer3", "layer4"]),
    "torchvision.densenet121": (SIZE, ["features.relu0", "features.denseblock1", "features.denseblock2",
                                       "features.denseblock3", "features.norm5"]),
    "torchvision.googlenet": (SIZE, ["conv1", "conv3", "inception3b", "inception4e", "inception5b"]),
    # Unpadded: at 96 px its last stage would be 1×1.
    "torchvision.inception_v3": (128, ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"]),
    "torchvision.mobilenet_v2": (SIZE, ["features.1", "features.3", "features.6", "features.13", "features.18"]),
    "torchvision.mobilenet_v3_small": (SIZE, ["features.0", "features.1", "features.3", "features.8", "features.12"]),
    "torchvision.efficientnet_b0": (SIZE, ["features.1", "features.2", "features.3", "features.5", "features.8"]),
    "torchvision.efficientnet_v2_s": (SIZE, ["features.1", "features.2", "features.3", "features.5", "features.7"]),
    "torchvision.regnet_x_400mf": (SIZE, ["stem", "trunk_output.block1", "trunk_output.block2",
                                          "trunk_output.block3", "trunk_output.block4"]),
    "torchvision.regnet_y_400mf": (SIZE, ["stem", "trunk_output.block1", "trunk_output.block2",
                                          "trunk_output.block3", "trunk_output.block4"]),
    "torchvision.convnext_tiny": (SIZE, ["features.1", "features.3", "features.5", "features.7"]),
    "torchvision.shufflenet_v2_x1_0": (SIZE, ["conv1", "maxpool", "stage2", "stage3", "conv5"]),
    "torchvision.squeezenet1_0": (SIZE, ["features.1", "features.5", "features.10", "features.12"]),
    "torchvision.mnasnet0_5": (SIZE, ["layers.7", "layers.8", "layers.9", "layers.11", "layers.16"]),
    "timm.resnet50": (SIZE, ["act1", "layer1", "layer2", "layer3", "layer4"]),
    "timm.efficientnet_b0": (SIZE, ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
    "timm.convnext_nano": (SIZE, ["stages.0", "stages.1", "stages.2", "stages.3"]),
    "timm.regnetx_002": (SIZE, ["stem", "s1", "s2", "s3", "s4"]),
    "timm.mobilenetv3_small_100": (SIZE, ["bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5"]),
    # Six stages in feature_info: the first, the last and three spread between.
    "timm.cspdarknet53": (SIZE, ["stem.conv1", "stages.0", "stages.1", "stages.3", "stages.4"]),
}
# Published receptive fields (size, stride): AlexNet's conv ReLUs, VGG16's pools, ResNet-50's stages.
PUBLISHED = {
    "torchvision.alexnet": [(11, 4), (51, 8), (99, 16), (131, 16), (163, 16)],
    "torchvision.vgg16": [(6, 2), (16, 4), (44, 8), (100, 16), (212, 32)],
    "torchvision.resnet50": [(7, 2), (35, 4), (91, 8), (267, 16), (427, 32)],
    "timm.resnet50": [(7, 2), (35, 4), (91, 8), (267, 16), (427, 32)],
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    source, model = name.split(".", 1)
    if source == "timm":
        return timm.create_model(model, pretrained=False).eval()
    extra = {"aux_logits": False, "init_weights": False} if model in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, model)(weights=None, **extra).eval()


def geometry(field) -> tuple:
    return field.size, field.stride, field.offset


def is_cut(model: torch.nn.Module, layer: str, size: int) -> bool:
    """Whether every path from input to output runs through ``layer``: zeroing it makes the output constant."""
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        with torch.no_grad():  # eval mode: the two images do not meet in the batch
            out = model(torch.rand(2, 3, size, size))
    finally:
        handle.remove()
    return torch.equal(out[0], out[1])


@pytest.mark.parametrize("name", ZOO)
def test_auto_layers_are_the_stages(name, tmp_path):
    size, expected = ZOO[name]
    model = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = ConvVizLogger(model, ProbeSet(torch.rand(4, 3, size, size)), tmp_path, k=2)
    fewer = [w for w in caught if "stage" in str(w.message)]
    assert logger.layers == expected
    assert len(fewer) == (len(expected) < 5)
    if fewer:
        assert f"has {len(expected)} stage(s)" in str(fewer[0].message)
    fields = receptive_fields(model, expected, size, method="analytic")  # the walk follows every layer
    strides = [fields[n].stride[0] for n in expected]
    if name == "torchvision.alexnet":  # the paper's layers 3-5 share stride 16
        assert strides == [4, 8, 16, 16, 16]
    else:
        assert all(a < b for a, b in zip(strides, strides[1:])), strides
    if name in PUBLISHED:
        assert [(fields[n].size[0], fields[n].stride[0]) for n in expected] == PUBLISHED[name]
    for layer in expected:
        assert is_cut(model, layer, size), f"{layer} is not on the main path"


# Deeper fields of the blocks the walk had to learn, measured on inputs that hold them.
LARGER = {"torchvision.convnext_tiny": ("features.3", 256), "timm.convnext_nano": ("stages.1", 192),
          "torchvision.efficientnet_b0": ("features.3", 112), "torchvision.densenet121": ("features.denseblock1", 96),
          "torchvision.shufflenet_v2_x1_0": ("stage2", 96), "torchvision.inception_v3": ("Mixed_5d", 160)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_analytic_fields_equal_gradient_measurements(name):
    """Gates from a global pool count as constants in both (the README's rule)."""
    size, layers = ZOO[name]
    model = build(name)
    fields = receptive_fields(model, layers, size, method="analytic")
    # Where a central unit's field and its neighbours' fit the input with a margin.
    fit = [n for n in layers if fields[n].size[0] + 4 * fields[n].stride[0] < size]
    assert fit, "no field small enough to measure"
    checks = [(fit, size)] + ([([LARGER[name][0]], LARGER[name][1])] if name in LARGER else [])
    for names, side in checks:
        analytic = receptive_fields(model, names, side, method="analytic")
        measured = receptive_fields(model, names, side, method="gradient")
        for layer in names:
            assert measured[layer].method == "gradient", layer
            assert geometry(measured[layer]) == geometry(analytic[layer]), layer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision.mobilenet_v3_small", "torchvision.shufflenet_v2_x1_0",
                                  "timm.regnetx_002"])
def test_topk_equals_a_full_sort(name, tmp_path):
    size, layers = ZOO[name]
    torch.manual_seed(1)
    images = torch.rand(24, 3, size, size)
    images[5] = images[3]  # a tie: the lower image index ranks first
    model = build(name)
    with ConvVizLogger(model, ProbeSet(images), tmp_path, k=4, batch_size=10) as logger:
        assert logger.log(0)
    run = read_run(tmp_path)
    acts = full_activations(model, images, layers)
    for layer in layers:
        values, top, positions = brute_force(acts[layer].float().numpy(), 4)
        got = run.topk(layer=layer, step=0)
        np.testing.assert_array_equal(got.image, top)
        np.testing.assert_array_equal(got.values, values)
        np.testing.assert_array_equal(got.y * acts[layer].shape[3] + got.x, positions)


def test_a_vision_transformer_is_refused_with_what_was_found(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    with pytest.raises(ValueError, match=r"no ConvNet stages in VisionTransformer: its \(N, C, H, W\) feature maps "
                                         r"end at 'patch_embed.proj' .*token tensors.*pass layers=\[\.\.\.\]"):
        ConvVizLogger(model, ProbeSet(torch.rand(4, 3, 64, 64)), tmp_path, k=2)
    logger = ConvVizLogger(model, ProbeSet(torch.rand(4, 3, 64, 64)), tmp_path, k=2, layers=["patch_embed.proj"])
    assert logger.layers == ["patch_embed.proj"]
