"""Projections are exact: each rule against an independent implementation, zero outside the field, batch = one by one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tb_convviz.projection import RULES, check_options, project, stored_crops
from tb_convviz.receptive_field import receptive_fields


class Net(nn.Module):
    """Inplace nn.ReLU, BatchNorm, a max-pool, functional and in-place ReLUs around a residual add, an overlapping pool."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.skip = nn.Conv2d(4, 6, 1)
        self.block = nn.Identity()  # marks the block's output for the logger
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 5, 3, padding=1)
        self.relu3 = nn.ReLU()

    def forward(self, x):
        p1 = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        s = F.relu(self.conv2(p1)) + self.skip(p1)
        b = self.block(torch.relu_(s))
        return self.relu3(self.conv3(self.pool2(b)))


LAYERS = ["relu1", "block", "relu3"]


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
    return net.eval()


def reference(net, image, layer, unit, y, x, rule):
    """A hand-written deconvnet / guided backprop / gradient of ``Net``: explicit switches, transposed filters."""
    x0 = image[None]
    a1 = net.conv1(x0)
    b1 = net.bn1(a1)
    r1 = torch.relu(b1)
    p1, i1 = F.max_pool2d(r1, 2, return_indices=True)
    a2 = net.conv2(p1)
    s = torch.relu(a2) + net.skip(p1)
    r2 = torch.relu(s)
    p2, i2 = F.max_pool2d(r2, 3, 2, 1, return_indices=True)
    a3 = net.conv3(p2)
    r3 = torch.relu(a3)

    def relu_back(g, pre):
        if rule == "deconvnet":
            return g.clamp_min(0)
        if rule == "guided":
            return g.clamp_min(0) * (pre > 0)
        return g * (pre > 0)

    def unpool(g, switches, shape):  # every pooled value goes back to its switch; overlaps add up
        out = torch.zeros(shape).flatten(2)
        return out.scatter_add_(2, switches.flatten(2), g.flatten(2)).view(shape)

    def conv_back(g, conv, shape):  # the transposed filters
        s, p, k = conv.stride[0], conv.padding[0], conv.kernel_size[0]
        extra = shape[-1] - ((g.shape[-1] - 1) * s - 2 * p + k)
        return F.conv_transpose2d(g, conv.weight, stride=s, padding=p, output_padding=extra)

    target = {"relu1": r1, "block": r2, "relu3": r3}[layer]
    g = torch.zeros_like(target)
    g[0, unit, y, x] = 1
    if layer == "relu3":
        g = conv_back(relu_back(g, a3), net.conv3, p2.shape)
        g = unpool(g, i2, r2.shape)
    if layer in ("relu3", "block"):
        g = relu_back(g, s)
        g_main = conv_back(relu_back(g, a2), net.conv2, p1.shape)
        g = g_main + conv_back(g, net.skip, p1.shape)
        g = unpool(g, i1, r1.shape)
    g = relu_back(g, b1)
    bn = net.bn1
    g = g * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
    return conv_back(g, net.conv1, x0.shape)[0]


def records(net, images, layer, count, seed):
    """``count`` records (unit, flat position) of ``layer`` like the logger's: row b's image, a random
    unit that is positive somewhere on it, at its spatial maximum."""
    out = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: out.setdefault("o", o.clone()))
    with torch.no_grad():
        net(images)
    handle.remove()
    o = out["o"]
    gen = torch.Generator().manual_seed(seed)
    units, positions = [], []
    for b in range(count):
        alive = (o[b].flatten(1).amax(1) > 0).nonzero().flatten()
        unit = int(alive[torch.randint(0, len(alive), (1,), generator=gen)])
        units.append(unit)
        positions.append(int(o[b, unit].flatten().argmax()))
    return units, positions, o.shape


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layer", LAYERS)
def test_rule_matches_hand_written_reference(rule, layer):
    net = make_net()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    unit, position, shape = records(net, images, layer, 6, seed=2)
    got = project(net, [layer], images, [0] * 6, unit, position, rule).pixels
    for b in range(6):
        y, x = divmod(position[b], shape[3])
        with torch.no_grad():
            want = reference(net, images[b], layer, unit[b], y, x, rule)
        assert want.abs().max() > 0, "a record whose projection is all zero tests nothing"
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", LAYERS)
def test_gradient_rule_is_autograd_grad(layer):
    net = make_net(3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    unit, position, shape = records(net, images, layer, 4, seed=5)
    got = project(net, [layer], images, [0] * 4, unit, position, "gradient").pixels
    for b in range(4):
        x = images[b:b + 1].clone().requires_grad_(True)
        out = {}
        handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: out.setdefault("o", o.clone()))
        net(x)
        handle.remove()
        (want,) = torch.autograd.grad(out["o"].flatten(2)[0, unit[b], position[b]], x)
        torch.testing.assert_close(got[b], want[0], rtol=1e-5, atol=1e-7)


def test_guided_is_autograd_grad_with_masks():
    """Guided backprop = the gradient with ReLU's backward masked also by the sign of the incoming signal."""
    net = make_net(6)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    unit, position, _ = records(net, images, "relu3", 3, seed=8)
    got = project(net, ["relu3"], images, [0] * 3, unit, position, "guided").pixels

    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.relu()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x > 0) * (g > 0)

    for b in range(3):
        x = images[b:b + 1].clone().requires_grad_(True)
        p1 = net.pool1(Masked.apply(net.bn1(net.conv1(x))))
        s = Masked.apply(net.conv2(p1)) + net.skip(p1)
        out = Masked.apply(net.conv3(net.pool2(Masked.apply(s))))
        (want,) = torch.autograd.grad(out.flatten(2)[0, unit[b], position[b]], x)
        torch.testing.assert_close(got[b], want[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", RULES)
def test_batched_single_pass_equals_one_pass_per_record(rule):
    net = make_net(9)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    rows, layer_of_row, units, positions = [], [], [], []
    for i, layer in enumerate(LAYERS):
        unit, position, _ = records(net, images, layer, 3, seed=11 + i)
        for b in range(3):  # each layer's records on each image: images repeat in the batch
            rows.append(b)
            layer_of_row.append(i)
            units.append(unit[b])
            positions.append(position[b])
    batch = images[rows]
    together = project(net, LAYERS, batch, layer_of_row, units, positions, rule).pixels
    for r in range(len(rows)):
        alone = project(net, [LAYERS[layer_of_row[r]]], batch[r:r + 1], [0], [units[r]], [positions[r]], rule).pixels
        torch.testing.assert_close(together[r], alone[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layer", LAYERS)
def test_zero_outside_the_receptive_field(rule, layer):
    net = make_net(12)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    field = receptive_fields(net, [layer], input_size=(32, 32), in_channels=3)[layer]
    unit, position, shape = records(net, images, layer, 8, seed=14)
    pixels = project(net, [layer], images, [0] * 8, unit, position, rule).pixels.numpy()
    for b in range(8):
        y, x = divmod(position[b], shape[3])
        top, left, bottom, right = field.box(y, x)
        outside = pixels[b].copy()
        outside[:, max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = 0
        assert not outside.any(), f"record {b} leaks outside its receptive field {field.box(y, x)}"
        # What is stored, the box inside the image, holds all of it.
        (stored,) = stored_crops(pixels[b:b + 1], np.array([field.box(y, x)]))
        assert stored.shape == (3, min(bottom, 32) - max(top, 0), min(right, 32) - max(left, 0))
        np.testing.assert_array_equal(np.sort(stored[stored != 0]), np.sort(pixels[b][pixels[b] != 0]))


def test_leaves_the_model_alone():
    net = make_net(15)
    net.train()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    from tb_convviz.isolation import preserved
    rng = torch.get_rng_state()
    with preserved(net, no_grad=False):
        project(net, LAYERS, torch.randn(2, 3, 32, 32), [0, 2], [1, 2], [3, 4], "deconvnet")
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())


def test_uncovered_activations_are_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    result = project(net, ["1", "3"], torch.randn(2, 3, 12, 12), [0, 1], [0, 1], [5, 5], "deconvnet")
    assert result.uncovered == {"1": ["gelu"], "3": ["gelu"]}
    assert project(net, ["3"], torch.randn(1, 3, 12, 12), [0], [0], [5], "gradient").uncovered == {"3": ["gelu"]}


def test_fully_connected_records():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU()).eval()
    images = torch.randn(2, 3, 2, 2)
    got = project(net, ["2"], images, [0, 0], [1, 3], [-1, -1], "gradient").pixels
    w = net[1].weight
    pre = net[1](images.flatten(1))
    for b, u in enumerate([1, 3]):
        want = (w[u] * (pre[b, u] > 0)).view(3, 2, 2)
        torch.testing.assert_close(got[b], want.detach())


def test_bad_options_say_what_is_valid():
    with pytest.raises(ValueError, match="'top1', 'topk' or None"):
        check_options("all", "deconvnet", None)
    with pytest.raises(ValueError, match="'deconvnet', 'guided', 'gradient'"):
        check_options("top1", "lrp", None)
    with pytest.raises(ValueError, match="positive int"):
        check_options("top1", "guided", 0)
    with pytest.raises(ValueError, match="no effect"):
        check_options(None, "guided", 2)


def test_every_unit_of_a_global_field_sees_the_whole_input():
    """A "global" field (e.g. after squeeze-and-excitation) on a 2x2 map: unit (0, 1) once got a box off the image."""
    from tb_convviz.geometry import ReceptiveField

    field = ReceptiveField.whole_input(32, 32)
    assert {field.box(y, x) for y in range(2) for x in range(2)} == {(0, 0, 32, 32)}
