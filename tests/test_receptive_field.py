"""Receptive fields: the analytic walk against gradient measurements and published figures."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.resnet import BasicBlock

from tb_convviz.geometry import ReceptiveField
from tb_convviz.receptive_field import receptive_field, receptive_fields


def geometry(field: ReceptiveField) -> tuple:
    return field.size, field.stride, field.offset


class Branches(nn.Module):
    """Inception-style: 'same'-padded convs of several kernel sizes and a max pool, concatenated."""

    def __init__(self, channels: int, kernels: list[int], dilation: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, 2, k, padding="same", dilation=dilation)
                                   for k in kernels)

    def forward(self, x):
        return torch.cat([F.relu(conv(x)) for conv in self.convs] + [F.max_pool2d(x, 3, 1, 1)], dim=1)


@st.composite
def layer(draw, channels: int) -> tuple[nn.Module, int]:
    """One block of a random ConvNet and its output channel count."""
    kind = draw(st.sampled_from(["conv", "maxpool", "avgpool", "pad", "residual", "branches"]))
    if kind == "conv":
        kernel, stride = draw(st.integers(1, 5)), draw(st.integers(1, 3))
        dilation = draw(st.integers(1, 3))
        choices = [st.integers(0, dilation * (kernel - 1) // 2 + 1), st.just("valid")]
        padding = draw(st.one_of(*choices, *([st.just("same")] if stride == 1 else [])))
        mode = draw(st.sampled_from(["zeros", "reflect"])) if padding == 1 else "zeros"
        out = draw(st.integers(2, 4))
        block = [nn.Conv2d(channels, out, kernel, stride, padding, dilation, padding_mode=mode)]
        if draw(st.booleans()):
            block += [nn.BatchNorm2d(out), nn.ReLU(inplace=draw(st.booleans()))]
        return nn.Sequential(*block), out
    if kind in ("maxpool", "avgpool"):
        kernel = draw(st.integers(1, 4))
        stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, kernel // 2))
        ceil = draw(st.booleans())
        if kind == "avgpool":
            return nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil), channels
        return nn.MaxPool2d(kernel, stride, padding, draw(st.integers(1, 2)), ceil_mode=ceil), channels
    if kind == "pad":
        return nn.ZeroPad2d(tuple(draw(st.lists(st.integers(0, 3), min_size=4, max_size=4)))), channels
    if kind == "residual":
        out, stride = draw(st.integers(2, 4)), draw(st.integers(1, 2))
        downsample = None
        if stride != 1 or out != channels:  # the strided 1x1 shortcut of ResNet
            downsample = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False),
                                       nn.BatchNorm2d(out))
        return BasicBlock(channels, out, stride, downsample), out
    kernels = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    return Branches(channels, kernels, draw(st.integers(1, 2))), 2 * len(kernels) + channels


@st.composite
def convnets(draw) -> nn.Sequential:
    blocks, channels = [], 3
    for _ in range(draw(st.integers(1, 4))):
        block, channels = draw(layer(channels))
        blocks.append(block)
    return nn.Sequential(*blocks)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(net=convnets(), size=st.tuples(st.integers(24, 48), st.integers(24, 48)))
def test_analytic_matches_gradient_on_random_convnets(net, size):
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(1, 3, *size))
    except RuntimeError:  # the blocks shrank the input away
        assume(False)
    assume(min(out.shape[-2:]) >= 2)
    names = [name for name, _ in net.named_children()]
    analytic = receptive_fields(net, names, size, method="analytic")
    gradient = receptive_fields(net, names, size, method="gradient")
    assert receptive_fields(net, names, size) == analytic
    for name in names:
        assert analytic[name].method == "analytic"
        if gradient[name].method == "global":
            # Documented: fields too large to measure on a 4x larger input count as global.
            a = analytic[name]
            assert max(a.size[i] + 2 * a.stride[i] - 2 * size[i] for i in (0, 1)) > 0, name
        else:
            assert geometry(analytic[name]) == geometry(gradient[name]), name


def test_residual_block_takes_the_larger_branch():
    net = nn.Sequential(BasicBlock(3, 4, 2, nn.Sequential(nn.Conv2d(3, 4, 1, 2), nn.BatchNorm2d(4))))
    # Main branch: 3x3/2 then 3x3/1 -> 3 + 2 * 2 = 7; the 1x1/2 shortcut sees 1 pixel.
    for method in ("analytic", "gradient"):
        rf = receptive_field(net, "0", 32, method=method)
        assert geometry(rf) == ((7, 7), (2, 2), (0.0, 0.0))


def test_concatenated_branches_take_their_union():
    net = nn.Sequential(Branches(3, [2, 5], dilation=1))
    # 'same' puts the odd pixel of the even kernel on the far side: it covers [0, 1], the
    # 5x5 covers [-2, 2] around each unit, so the union is [-2, 2] (5 pixels).
    assert geometry(receptive_field(net, "0", 16)) == ((5, 5), (1, 1), (0.0, 0.0))
    assert geometry(receptive_field(net, "0", 16, method="gradient")) == ((5, 5), (1, 1), (0.0, 0.0))


def test_torchvision_alexnet_and_vgg16_match_published_figures():
    # Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural Networks",
    # Distill 2019, Table 1: AlexNet (v2) r = 195, S = 32 at pool5; VGG-16 r = 212, S = 32 at
    # pool5. Padding differences between implementations do not change r or S, and the
    # conv1..conv5 values (11, 51, 99, 131, 163) follow from the same recursion.
    alexnet = torchvision.models.alexnet(weights=None)
    fields = receptive_fields(alexnet, ["features.1", "features.4", "features.7", "features.9",
                                        "features.11", "features.12"], (224, 224))
    assert [f.size[0] for f in fields.values()] == [11, 51, 99, 131, 163, 195]
    assert [f.stride[0] for f in fields.values()] == [4, 8, 16, 16, 16, 32]
    vgg = torchvision.models.vgg16(weights=None)
    rf = receptive_field(vgg, "features.30", (224, 224))
    assert (rf.size, rf.stride, rf.method) == ((212, 212), (32, 32), "analytic")


def test_torchvision_resnets_match_gradient_measurements():
    # Distill's ResNet-50 figure (r = 483) is for TF-slim's resnet_v1_50, which strides in the
    # last unit of each stage; torchvision strides in the first, so its fields differ. These
    # values were measured with method="gradient" at 224 px (which enlarged the input to
    # 896 px) and agree with the analytic walk; they take minutes, so are not rerun here.
    expected = {
        torchvision.models.resnet18: [(7, 2), (43, 4), (99, 8), (211, 16), (435, 32)],
        torchvision.models.resnet50: [(7, 2), (35, 4), (91, 8), (267, 16), (427, 32)],
    }
    for build, figures in expected.items():
        fields = receptive_fields(build(weights=None), ["relu", "layer1", "layer2", "layer3", "layer4"],
                                  (224, 224))
        assert [(f.size[0], f.stride[0]) for f in fields.values()] == figures
        assert {f.offset for f in fields.values()} == {(0.0, 0.0)}


class Rescaled(nn.Module):
    """A conv net with an op the analytic walk does not follow."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.interpolate(self.conv1(x), scale_factor=self.scale, mode="nearest"))


def test_unfollowable_op_falls_back_to_gradient():
    # Nearest downsampling by 2 keeps every other unit: a 1x1 stride-2 step, so conv2's
    # field is 3 + 2 * 2 = 7 with stride 2.
    rf = receptive_field(Rescaled(0.5), "conv2", 32)
    assert (rf.method, rf.size, rf.stride, rf.offset) == ("gradient", (7, 7), (2, 2), (0.0, 0.0))
    with pytest.raises(ValueError, match=r"stops at `interpolate`.*method='auto'"):
        receptive_field(Rescaled(0.5), "conv2", 32, method="analytic")


class Overwrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv5 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 5, padding=2)

    def forward(self, x):
        y = self.conv1(x)
        y[:, :1] = self.conv5(x)[:, :1]  # channel 0 now sees 5x5 pixels
        return y


def test_in_place_writes_fall_back_to_gradient():
    rf = receptive_field(nn.Sequential(Overwrite()), "0", 24)
    assert (rf.method, rf.size, rf.stride) == ("gradient", (5, 5), (1, 1))


def test_upsampled_units_without_a_stride_raise():
    with pytest.raises(ValueError, match="regular grid"):
        receptive_field(Rescaled(2.0), "conv2", 32)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        return x * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1)))


def test_fully_connected_and_globally_pooled_layers_see_the_whole_input():
    resnet = torchvision.models.resnet18(weights=None)
    fields = receptive_fields(resnet, ["avgpool", "fc"], (64, 48))
    assert fields["fc"] == ReceptiveField.whole_input(64, 48)
    assert fields["avgpool"] == ReceptiveField.whole_input(64, 48)



def test_a_gate_from_a_global_pool_does_not_widen_the_field():
    # As published tables count them: the gated units see what the conv sees.
    for method in ("analytic", "gradient"):
        rf = receptive_field(nn.Sequential(SqueezeExcite()), "0", 32, method=method)
        assert (rf.method, rf.size, rf.stride, rf.offset) == (method, (3, 3), (1, 1), (1.0, 1.0))


def test_stops_before_a_head_that_fails_on_other_input_sizes():
    # The classifier expects 6x6 maps (224 px); at 64 px it would fail, but never runs.
    alexnet = torchvision.models.alexnet(weights=None)
    alexnet.avgpool = nn.Identity()
    assert receptive_field(alexnet, "features.4", 64).size == (51, 51)
    assert receptive_field(alexnet, "features.4", 64, method="gradient").size == (51, 51)


def test_data_parallel_wrapper_and_prefix():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    expected = receptive_field(net, "1", 16)
    wrapped = nn.DataParallel(net)
    assert receptive_field(wrapped, "module.1", 16) == expected
    assert receptive_field(wrapped, "1", 16) == expected
    assert receptive_field(net, "module.1", 16) == expected


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3), nn.ReLU()

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(self.relu(x))))


def test_errors_are_clear():
    alexnet = torchvision.models.alexnet(weights=None)
    listing = r"unknown layer 'features\.99'.*Did you mean.*Available layers: features, avgpool, classifier, features\.0"
    with pytest.raises(ValueError, match=listing):
        receptive_field(alexnet, "features.99", 224)
    with pytest.raises(ValueError, match="runs more than once"):
        receptive_fields(Twice(), ["relu", "conv2"], 16)
    with pytest.raises(ValueError, match=r"outputs \(1, 3, 196\).*4-D"):
        receptive_field(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Flatten(2)), "1", 16)
    with pytest.raises(ValueError, match="method must be one of"):
        receptive_field(alexnet, "features.1", 224, method="guess")
    with pytest.raises(ValueError, match="input_size"):
        receptive_field(alexnet, "features.1", (224, 0))
    with pytest.raises(RuntimeError, match=r"failed on a \(1, 1, 64, 64\) input.*in_channels"):
        receptive_field(alexnet, "features.1", 64, in_channels=1)


class Noisy(nn.Module):
    """Uses randomness in its forward pass, like stochastic augmentation or noise layers."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x + 0.1 * torch.randn_like(x))))


@pytest.mark.parametrize("method", ["auto", "gradient"])
def test_model_parameters_flags_gradients_and_rng_are_untouched(method):
    torch.manual_seed(0)
    net = nn.Sequential(Noisy(), nn.Conv2d(4, 4, 3))
    net.train()
    net[1].eval()
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    grads = [p.grad.clone() for p in params]
    flags = [m.training for m in net.modules()]
    rng = torch.get_rng_state()

    rf = receptive_field(net, "0", 16, method=method)
    with pytest.raises(RuntimeError, match="failed"):  # in the second conv: 4 px is too small
        receptive_fields(net, ["0", "1"], 4, method=method)

    assert rf.size == (3, 3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in net.modules()] == flags
    assert list(net.parameters()) == params
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert not any(m._forward_hooks for m in net.modules())


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, permute to (N, H, W, C), LayerNorm and Linears, back, residual."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm, self.up, self.down = nn.LayerNorm(channels), nn.Linear(channels, 8), nn.Linear(8, channels)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def test_channels_last_blocks_are_followed():
    net = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), ChannelsLastBlock(), ChannelsLastBlock())
    analytic = receptive_field(net, "2", 64, method="analytic")
    assert (analytic.size, analytic.stride) == ((52, 52), (4, 4))
    assert geometry(receptive_field(net, "2", 64, method="gradient")) == geometry(analytic)


def test_gradient_method_sees_through_saturated_relu6():
    # MobileNetV2's residual sums saturate ReLU6 under constant weights; it used to say that
    # features.10 "does not depend on the input".
    net = torchvision.models.mobilenet_v2(weights=None)
    analytic = receptive_field(net, "features.10", 64, method="analytic")
    measured = receptive_field(net, "features.10", 64, method="gradient")
    assert measured.method == "gradient"
    assert geometry(measured) == geometry(analytic)
