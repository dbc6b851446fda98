"""Effective receptive fields: exact on a net known in closed form, never beyond the theoretical field, stored per checkpoint."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, metadata, read_run
from tb_convviz.effective_field import MASS_SHARE, SCALAR_NAME, centre_unit, measure, smallest_box
from tb_convviz.geometry import CropField, ReceptiveField, kept_inside, record_box
from tb_convviz.receptive_field import receptive_fields


def box_stack(depth: int, side: int = 33) -> nn.Sequential:
    """``depth`` 3x3 convs with all weights 1, no bias, no nonlinearity: the gradient is a 2D trinomial."""
    convs = [nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(depth)]
    for conv in convs:
        nn.init.constant_(conv.weight, 1.0)
    return nn.Sequential(*convs).double()


def closed_form_mass(depth: int, side: int, y: int, x: int) -> np.ndarray:
    """|d out[y, x] / d input|: ones(3) convolved ``depth`` times (a row of trinomial coefficients), outer product, at (y, x)."""
    row = np.ones(1)
    for _ in range(depth):
        row = np.convolve(row, np.ones(3))
    mass = np.zeros((side, side))
    mass[y - depth:y + depth + 1, x - depth:x + depth + 1] = np.outer(row, row)
    return mass


def brute_force_box(mass: np.ndarray, field: ReceptiveField, y: int, x: int, share: float) -> tuple[int, int]:
    """Every centred box from 1 px up, the first holding ``share`` of the mass, summed pixel by pixel."""
    for side in range(1, max(field.size) + 1):
        size = (min(side, field.size[0]), min(side, field.size[1]))
        top, left, bottom, right = dataclasses.replace(field, size=size).box(y, x)
        inside = sum(mass[i, j] for i in range(max(top, 0), min(bottom, mass.shape[0]))
                     for j in range(max(left, 0), min(right, mass.shape[1])))
        if inside >= share * mass.sum():
            return size
    return field.size


def layer_infos(net, probe, layers, log_dir):
    """The LayerInfo the logger builds for ``layers`` (nothing is logged)."""
    logger = ConvVizLogger(net, probe, log_dir, layers=layers, k=1, projections=None)
    logger.close(final_checkpoint=False)
    return logger._layer_infos


@pytest.mark.parametrize("share", [0.5, MASS_SHARE, 0.99])
def test_box_stack_matches_closed_form_exactly(share, tmp_path):
    side, net = 33, box_stack(5)
    layers = ["0", "2", "4"]
    probe = ProbeSet(torch.rand(4, 1, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    logger_infos = layer_infos(net, probe, layers, tmp_path)
    measured = measure(net, probe, logger_infos, share=share)
    for name in layers:
        depth = int(name) + 1
        info = logger_infos[name]
        field = ReceptiveField.from_proto(info.receptive_field)
        assert field.size == (2 * depth + 1,) * 2
        y, x = centre_unit(field, (info.fmap_h, info.fmap_w), (side, side))
        assert (y, x) == (16, 16)
        # Linear with positive weights: every probe image has the same gradient, so the summed mass is a multiple of it.
        expected = brute_force_box(closed_form_mass(depth, side, y, x), field, y, x, share)
        assert measured[name] == expected
        assert measured[name][0] <= field.size[0] and measured[name][1] <= field.size[1]
    # The trinomial spreads slower than the field grows: the deepest layer's box is a strict fraction of its field.
    assert measured["4"][0] < 11 or share == 0.99


def test_smallest_box_is_capped_at_the_field_and_handles_zero_mass():
    field = ReceptiveField(size=(5, 7), stride=(1, 1), offset=(0.0, 0.0))
    flat = np.ones((20, 20))
    assert smallest_box(flat, field, 10, 10, 0.999) == (5, 7)  # mass outside the field: capped, never larger
    assert smallest_box(np.zeros((20, 20)), field, 10, 10) == (5, 7)
    spike = np.zeros((20, 20))
    spike[10, 10] = 1
    assert smallest_box(spike, field, 10, 10) == (1, 1)


class ReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.r2 = nn.ReLU()
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.r3 = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.r3(self.c3(self.r2(self.c2(self.r1(self.bn(self.c1(x)))))))
        return self.fc(x.mean(dim=(2, 3)))


def test_logged_every_checkpoint_within_the_theoretical_field_with_scalars(tmp_path):
    torch.manual_seed(0)
    net = ReluNet()
    probe = ProbeSet(torch.randn(12, 3, 24, 24, generator=torch.Generator().manual_seed(1)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with ConvVizLogger(net, probe, tmp_path, layers=["r1", "r2", "r3", "fc"], k=3, steps=[0, 2]) as logger:
        for step in range(3):
            logger.maybe_log(step)
            loss = net(torch.randn(4, 3, 24, 24)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = read_run(tmp_path)
    assert run.steps == [0, 2, 3]
    for name in ["r1", "r2", "r3"]:
        field = run.layer(name).receptive_field
        for step in run.steps:
            size = run.effective_field(name, step)
            assert size is not None and 1 <= size[0] <= field.size[0] and 1 <= size[1] <= field.size[1]
            assert run.scalars[metadata.scalar_tag(name, SCALAR_NAME)][step] == max(size)
            assert run.crop(name, step).size == size and run.crop(name, step).inside == (24, 24)
            assert run.crop(name, step, theoretical=True) == CropField(field)
            records = run.topk(name, step)
            for y, x in zip(records.y.ravel().tolist(), records.x.ravel().tolist()):
                top, left, bottom, right = run.crop(name, step).box(True, y, x)
                cy, cx = field.center(y, x)
                assert 0 <= top and 0 <= left and bottom <= 24 and right <= 24  # every record's crop: image only
                assert top - 0.5 <= cy <= bottom - 0.5 and left - 0.5 <= cx <= right - 0.5  # and its centre
    assert run.effective_field("fc") is None  # fully connected: its units see the whole input
    assert run.crop("fc", 3) == CropField(run.layer("fc").receptive_field)


def test_measure_leaves_training_state_untouched(tmp_path):
    torch.manual_seed(0)
    net = ReluNet().train()
    net(torch.randn(4, 3, 24, 24)).sum().backward()
    probe = ProbeSet(torch.randn(6, 3, 24, 24))
    infos = layer_infos(net, probe, ["r1", "r3"], tmp_path)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    rng = torch.get_rng_state()
    measure(net, probe, infos)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.requires_grad for p in net.parameters())


@settings(max_examples=300, deadline=None)
@given(size=st.tuples(st.integers(1, 80), st.integers(1, 80)), image=st.tuples(st.integers(8, 64), st.integers(8, 64)),
       stride=st.integers(1, 32), offset=st.floats(-3, 20), fmap=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       data=st.data())
def test_kept_inside_boxes_lie_in_the_image_and_hold_the_centre(size, image, stride, offset, fmap, data):
    size = (min(size[0], image[0]), min(size[1], image[1]))  # effective fields are measured inside the image
    field = ReceptiveField(size=size, stride=(stride, stride), offset=(offset, offset))
    y, x = data.draw(st.integers(0, fmap[0] - 1)), data.draw(st.integers(0, fmap[1] - 1))
    cy, cx = field.center(y, x)
    top, left, bottom, right = kept_inside(record_box(field, True, y, x), *image)
    assert 0 <= top and bottom <= image[0] and 0 <= left and right <= image[1]
    assert (bottom - top, right - left) == size
    # Pixel i covers [i - 0.5, i + 0.5]: a centre on the image stays on the crop.
    if -0.5 <= cy <= image[0] - 0.5 and -0.5 <= cx <= image[1] - 0.5:
        assert top - 0.5 <= cy <= bottom - 0.5 and left - 0.5 <= cx <= right - 0.5
