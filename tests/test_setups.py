"""The training setups people use: each logs the records of the same model in plain float32 eval.

channels_last, autocast (bfloat16 on CPU, float16 on CUDA), .half()/.bfloat16() models,
torch.compile, nn.DataParallel, ReLU(inplace=True) everywhere, models that take more than
one tensor (``forward=``), and diverged models whose activations hold NaN or inf.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, export, read_run, receptive_field
from tb_convviz.logger import ConvVizWarning
from tb_convviz.probe import ProbeDisplayWarning
from tb_convviz.receptive_field import receptive_fields
from test_plugin_http import Served

LAYERS = ["features.2", "features.6", "features.9", "fc"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# channels_last picks other conv kernels, which sum in another order (float32 rounding).
CHANNELS_LAST_ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace), nn.MaxPool2d(2),
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(inplace),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def make_net(seed: int = 0, inplace: bool = False) -> Net:
    torch.manual_seed(seed)
    net = Net(inplace)
    for m in net.modules():  # BatchNorm statistics as after some training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def probe() -> ProbeSet:
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return ProbeSet(images, labels=torch.arange(40) % 5)


def log_once(model, probe, path, *, step: int = 0, layers=LAYERS, **kwargs):
    with ConvVizLogger(model, probe, path, layers=layers, k=4, batch_size=16, steps=[step], **kwargs) as logger:
        assert logger.log(step)
        return logger.layers


def reference(net: nn.Module, probe, path, layers=LAYERS):
    """Records of ``net`` copied to plain float32 and contiguous memory, on its device."""
    device = next(net.parameters()).device
    plain = copy.deepcopy(net).float().to(device, memory_format=torch.contiguous_format)
    log_once(plain, probe, path, layers=layers)
    return read_run(path)


def assert_same_records(got, want, layers=LAYERS, *, prefix="", atol=0.0):
    """Equal records; with ``atol``, images may swap only between values closer than 2 * atol."""
    for name in layers:
        a, b = got.topk(prefix + name, 0), want.topk(name, 0)
        if atol == 0:
            for field in ("values", "image", "y", "x"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{name} {field}")
            continue
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=atol, err_msg=name)
        gaps = np.abs(b.values[:, :, None] - b.values[:, None, :])
        gaps[:, np.eye(b.values.shape[1], dtype=bool)] = np.inf
        near_tie = gaps.min(axis=2) <= 2 * atol
        np.testing.assert_array_equal(np.where(near_tie, -2, a.image), np.where(near_tie, -2, b.image), err_msg=name)
        same = a.image == b.image
        np.testing.assert_array_equal(a.y[same], b.y[same])
        np.testing.assert_array_equal(a.x[same], b.x[same])


def test_channels_last_model(probe, tmp_path):
    net = make_net().to(memory_format=torch.channels_last)
    assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    log_once(net, probe, tmp_path / "got")
    assert_same_records(read_run(tmp_path / "got"), reference(net, probe, tmp_path / "ref"), atol=CHANNELS_LAST_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_log_inside_autocast_ranks_as_float32_eval(probe, tmp_path, device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    net = make_net().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with ConvVizLogger(net, probe, tmp_path / "got", layers=LAYERS, k=4, batch_size=16, steps=[1]) as logger:
        with torch.autocast(device, dtype=dtype):  # a training step and the checkpoint, as in a loop
            loss = net(torch.rand(4, 3, 16, 16, device=device)).float().pow(2).mean()
            at_checkpoint = copy.deepcopy(net)  # BatchNorm statistics moved in the forward
            assert logger.log(1)
        loss.backward()
        optimizer.step()
    got = read_run(tmp_path / "got")
    want = reference(at_checkpoint, probe, tmp_path / "ref")
    for name in LAYERS:
        a, b = got.topk(name, 1), want.topk(name, 0)
        for field in ("values", "image", "y", "x"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{name} {field}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_models_run_the_probe_pass_in_float32(probe, tmp_path, dtype):
    net = make_net().to(dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    log_once(net, probe, tmp_path / "got")
    # Equal to the same (rounded) weights in float32: nothing of the probe pass is rounded.
    assert_same_records(read_run(tmp_path / "got"), reference(net, probe, tmp_path / "ref"))
    assert all(p.dtype == dtype for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training


def test_model_converted_to_bfloat16_after_the_logger_was_built(probe, tmp_path):
    net = make_net()
    with ConvVizLogger(net, probe, tmp_path / "got", layers=LAYERS, k=4, batch_size=16, steps=[0]) as logger:
        net.bfloat16()  # as a trainer's precision setting may do after callbacks are set up
        assert logger.log(0)
    assert_same_records(read_run(tmp_path / "got"), reference(net, probe, tmp_path / "ref"))


def test_torch_compiled_model(probe, tmp_path):
    net = make_net().eval()
    # Dynamo with the eager backend: the same OptimizedModule wrapper and guards, without a
    # minute of inductor code generation here; the logger runs the eager module either way.
    compiled = torch.compile(net, backend="eager")
    x = torch.rand(2, 3, 16, 16)
    before = compiled(x)  # compiled and run, as in training, before the first checkpoint
    assert "_orig_mod.features.2" in dict(compiled.named_modules())
    layers = log_once(compiled, probe, tmp_path / "got", layers=["_orig_mod." + n for n in LAYERS])
    assert layers == LAYERS
    torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)  # the compiled model still runs, unchanged
    assert_same_records(read_run(tmp_path / "got"), reference(net, probe, tmp_path / "ref"))
    with ConvVizLogger(compiled, probe, tmp_path / "auto", k=4) as auto:
        assert auto.layers == ConvVizLogger(net, probe, tmp_path / "auto_ref", k=4).layers


def test_data_parallel_model(probe, tmp_path):
    net = make_net()
    layers = log_once(nn.DataParallel(net), probe, tmp_path / "got", layers=["module." + n for n in LAYERS])
    assert layers == LAYERS
    assert_same_records(read_run(tmp_path / "got"), reference(net, probe, tmp_path / "ref"))


def test_inplace_relu_everywhere(probe, tmp_path):
    inplace, plain = make_net(inplace=True), make_net(inplace=False)
    assert all(m.inplace for m in inplace.modules() if isinstance(m, nn.ReLU))
    for net in (inplace, plain):  # a unit negative everywhere: its ReLU overwrites it with zeros
        with torch.no_grad():
            net.features[0].bias[0] = -100.0
    # Layers 1 and 2 are convs whose output the next in-place ReLU overwrites.
    layers = ["features.0", "features.2", "features.4", "features.9"]
    log_once(inplace, probe, tmp_path / "got", layers=layers)
    assert_same_records(read_run(tmp_path / "got"), reference(plain, probe, tmp_path / "ref", layers), layers)
    assert (read_run(tmp_path / "got").topk("features.0", 0).values[0] < -90).all()  # the conv's, not the ReLU's
    assert receptive_fields(inplace, layers, 16) == receptive_fields(plain, layers, 16)


class TwoInputs(nn.Module):
    """A model whose forward takes a dict of an image and a mask."""

    def __init__(self, body: Net) -> None:
        super().__init__()
        self.body = body

    def forward(self, batch: dict) -> torch.Tensor:
        return self.body(batch["image"] * batch["mask"])


def with_mask(model, images):
    return model({"image": images, "mask": torch.ones_like(images[:, :1])})


def test_forward_argument_for_models_with_more_inputs(probe, tmp_path):
    net = make_net()
    model = TwoInputs(net)
    layers = log_once(model, probe, tmp_path / "got", layers=["body." + n for n in LAYERS], forward=with_mask)
    assert layers == ["body." + n for n in LAYERS]
    assert_same_records(read_run(tmp_path / "got"), reference(net, probe, tmp_path / "ref"), prefix="body.")
    # The layer rule sees the model inside, as it would the bare network.
    with ConvVizLogger(model, probe, tmp_path / "auto", k=4, forward=with_mask) as auto:
        assert auto.layers == ["body." + n for n in ConvVizLogger(net, probe, tmp_path / "bare", k=4).layers]
    got = read_run(tmp_path / "got")
    assert [l.receptive_field for l in got.layers] == [l.receptive_field for l in read_run(tmp_path / "ref").layers]
    for method in ("analytic", "gradient"):
        assert receptive_field(model, "body.features.6", 16, forward=with_mask, method=method) == \
            receptive_field(net, "features.6", 16, method=method)


def test_forward_errors_say_what_to_do(probe, tmp_path):
    model = TwoInputs(make_net())
    with pytest.raises(ValueError, match=r"forward=lambda model, images"):
        ConvVizLogger(model, probe, tmp_path / "a", layers=["body.fc"])
    with pytest.raises(ValueError, match=r"forward\(model, images\) failed .*KeyError"):
        ConvVizLogger(model, probe, tmp_path / "b", layers=["body.fc"], forward=lambda m, x: m({"image": x}))
    with pytest.raises(TypeError, match="forward must be a callable"):
        ConvVizLogger(model, probe, tmp_path / "c", layers=["body.fc"], forward="image")


def diverged_net() -> Net:
    """Unit 3 of layer 1 is NaN, unit 5 of layer 3 is +inf; layer 2 is NaN throughout (it reads unit 3)."""
    net = make_net()
    with torch.no_grad():
        net.features[0].weight[3, 0, 0, 0] = float("nan")
        net.features[8].bias[5] = float("inf")
        net.features[4].weight[:, 3] = 0.0  # 0 * NaN is NaN: layer 2 still sees it
    return net


def test_diverged_model_records_units_as_not_finite(probe, tmp_path):
    net = diverged_net()
    healthy = make_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ConvVizLogger(net, probe, tmp_path / "got", layers=LAYERS, k=4, batch_size=16) as logger:
            assert logger.log(0) and logger.log(1)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvVizWarning)]
    # One warning per layer with such units, at the first checkpoint only; fc reads layer 3's inf.
    assert len(messages) == 4, messages
    assert "layer 'features.2': 1 of 8 units had NaN or infinite activations at step 0" in messages[0]
    assert "layer 'features.6': 12 of 12 units" in messages[1]
    run = read_run(tmp_path / "got")
    first = run.topk("features.2", 0)
    assert first.not_finite.tolist() == [u == 3 for u in range(8)]
    assert np.isnan(first.values[3]).all() and (first.image[3] == -1).all() and (first.y[3] == -1).all()
    # The finite units of layer 1 are ranked exactly as in the healthy model (they do not read unit 3).
    log_once(healthy, probe, tmp_path / "ref", layers=["features.2"])
    want = read_run(tmp_path / "ref").topk("features.2", 0)
    keep = ~first.not_finite
    np.testing.assert_array_equal(first.values[keep], want.values[keep])
    np.testing.assert_array_equal(first.image[keep], want.image[keep])
    assert run.topk("features.6", 0).not_finite.all()
    assert run.topk("features.9", 0).not_finite.all()  # layer 2's NaN reaches every unit
    # Not-finite units are not dead, and do not count in the mean peak.
    scalars = run.scalars
    assert scalars["convviz/features.6/dead_fraction"][0] == 0.0
    assert np.isnan(scalars["convviz/features.6/mean_peak"][0])
    peaks = first.values[keep, 0]
    assert scalars["convviz/features.2/dead_fraction"][0] == pytest.approx(np.sum(peaks <= 0) / 8)
    assert scalars["convviz/features.2/mean_peak"][0] == pytest.approx(peaks.mean(), rel=1e-6)

    served = Served(tmp_path)
    units = served.json("topk?run=got&layer=features.2&step=0")["units"]
    assert [u["not_finite"] for u in units] == [u == 3 for u in range(8)]
    assert units[3]["records"] == [] and units[3]["dead"] is False and units[3]["peak"] is None
    assert all(u["records"] and not u["not_finite"] for i, u in enumerate(units) if i != 3)
    evolution = served.json("evolution?run=got&layer=features.6&unit=0")["checkpoints"]
    assert [c["not_finite"] for c in evolution] == [True, True]
    mosaic = served.png("mosaic?run=got&layer=features.2&step=0&unit=3")
    assert (mosaic[..., 3] == 0).all()  # no patch drawn
    # The exported figure draws no patches for it either.
    crop = run.crop("features.2", 0)
    blank = np.asarray(export._mosaic(run, run.layer("features.2"), crop, first, 3, 4, 16))
    assert (blank == export.BACKGROUND).all()
    assert not (np.asarray(export._mosaic(run, run.layer("features.2"), crop, first, 0, 4, 16)) == export.BACKGROUND).all()


def test_nan_probe_pixel_warns_and_marks_units_instead_of_dropping_the_image(tmp_path):
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[5, :, 8, 8] = float("nan")
    with pytest.warns(ProbeDisplayWarning, match=r"probe image\(s\) 5 have NaN"):
        probe = ProbeSet(images)
    with pytest.warns(ConvVizWarning, match=r"probe image\(s\) \[5\] have NaN or infinite pixels"):
        log_once(make_net(), probe, tmp_path / "got", layers=["features.0"])
    assert read_run(tmp_path / "got").topk("features.0", 0).not_finite.all()
