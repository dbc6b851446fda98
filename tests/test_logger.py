"""ConvVizLogger end to end on small nets: exact top-k, log format, non-interference, errors."""

import os
import warnings

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz import metadata
from tb_convviz.logger import ConvVizWarning
from test_topk import brute_force


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, 1, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = Block(8, 12, 1)
        self.block2 = Block(12, 16, 2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


LAYERS = ["stem.2", "block1", "block2", "fc"]


def make_probe(n=60, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    # Duplicated images give exact ties that must go to the lower index.
    images[n // 2:n // 2 + 5] = images[:5]
    labels = torch.arange(n) % 5
    return ProbeSet(images, labels=labels, class_names=list("vwxyz"), mean=[0.5] * 3, std=[0.5] * 3)


def trained_model(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # non-trivial BatchNorm statistics
        loss = model(torch.rand(8, 3, 16, 16)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def full_activations(model, images, names):
    acts, modules = {}, dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.clone()))
               for n in names]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return acts


def test_logged_topk_equals_full_sort(tmp_path):
    model, probe = trained_model(), make_probe()
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=7, batch_size=13) as logger:
        assert logger.log(step=3)
    run = read_run(tmp_path)
    assert run.steps == [3]
    assert [layer.name for layer in run.layers] == LAYERS
    assert [layer.index for layer in run.layers] == [1, 2, 3, 4]
    acts = full_activations(model, torch.stack([probe.image(i) for i in range(len(probe))]), LAYERS)
    for name in LAYERS:
        values, images, positions = brute_force(acts[name].numpy(), 7)
        got = run.topk(layer=name, step=3)
        np.testing.assert_array_equal(got.image, images)
        np.testing.assert_array_equal(got.values, values)
        layer = run.layer(name)
        if acts[name].dim() == 4:
            width = acts[name].shape[3]
            np.testing.assert_array_equal(got.y * width + got.x, positions)
            assert layer.fmap == tuple(acts[name].shape[2:])
        else:
            assert (got.y == -1).all() and layer.fmap is None
            assert layer.receptive_field.method == "global"
        np.testing.assert_array_equal(got.label, images % 5)


def test_each_winning_image_is_stored_once_and_only_winners(tmp_path):
    model, probe = trained_model(), make_probe()
    logger = ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=4)
    for step in (0, 1, 2):
        logger.log(step)
        with torch.no_grad():  # change the model so new images win
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    logger.close()
    run = read_run(tmp_path)
    winners = set()
    for step in run.steps:
        for layer in run.layers:
            winners |= set(run.topk(layer.name, step).image.ravel().tolist())
    assert run.stored_images == winners
    stored_rows = []
    for f in os.listdir(tmp_path):
        for event in event_file_loader.EventFileLoader(str(tmp_path / f)).Load():
            for v in event.summary.value:
                if v.tag == metadata.PROBE_CHUNK_TAG:
                    index_blob = tensor_util.make_ndarray(v.tensor)[0]
                    stored_rows += metadata.decode_chunk_index(index_blob)[:, 0].tolist()
    assert len(stored_rows) == len(set(stored_rows)) == len(winners)
    # Stored as displayed: de-normalised with mean/std.
    index = min(winners)
    expected = (probe.image(index) * 0.5 + 0.5).permute(1, 2, 0).numpy() * 255
    assert np.abs(run.probe_image(index).astype(float) - expected).max() <= 1.0


def test_scalars_overlap_dead_and_peak(tmp_path):
    model, probe = trained_model(), make_probe()
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=5) as logger:
        logger.log(0)
        logger.log(10)  # unchanged model: identical top-k
    run = read_run(tmp_path)
    for name in LAYERS:
        assert run.scalars[metadata.scalar_tag(name, "topk_overlap")] == {10: 1.0}
        peaks = run.topk(name, 10).values[:, 0]
        assert run.scalars[metadata.scalar_tag(name, "dead_fraction")][0] == pytest.approx(np.mean(peaks <= 0))
        assert run.scalars[metadata.scalar_tag(name, "mean_peak")][10] == pytest.approx(peaks.mean(), rel=1e-6)


def snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state().clone(),
    }


@pytest.mark.parametrize("train_mode", [True, False])
def test_logging_does_not_touch_training_state(tmp_path, train_mode):
    model, probe = trained_model(), make_probe()
    model.train(train_mode)
    model.block1.bn1.eval()  # mixed flags must come back exactly
    model(torch.rand(4, 3, 16, 16)).sum().backward()  # live gradients
    torch.manual_seed(123)
    before = snapshot(model)
    logger = ConvVizLogger(model, probe, tmp_path, layers="auto", k=3)
    logger.log(0)
    logger.close()
    after = snapshot(model)
    assert after["training"] == before["training"]
    for key, value in before["state"].items():  # BatchNorm running stats, num_batches_tracked, weights
        assert torch.equal(after["state"][key], value), key
    for g0, g1 in zip(before["grad"], after["grad"]):
        assert torch.equal(g0, g1)
    assert torch.equal(after["rng"], before["rng"])
    # The next random number is the one training would have drawn anyway.
    torch.set_rng_state(before["rng"])
    expected = torch.rand(3)
    torch.set_rng_state(after["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_round_trip_through_tensorboard_data_provider(tmp_path):
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.compat.proto import summary_pb2
    from tensorboard import context
    from tensorboard.data import provider

    model, probe = trained_model(), make_probe()
    with ConvVizLogger(model, probe, tmp_path / "run1", layers=LAYERS, k=3) as logger:
        for step in range(12):
            logger.log(step)
    mux = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance={metadata.PLUGIN_NAME: 0, "scalars": 0}
    )
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    dp = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    ctx = context.RequestContext()
    tensors = dp.list_tensors(ctx, experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run1"]
    assert set(tensors) == ({metadata.topk_tag(n) for n in LAYERS} | {metadata.filters_tag("stem.0")}
                            | {metadata.effective_field_tag(n) for n in LAYERS if n != "fc"})  # fc: the whole input
    blobs = dp.list_blob_sequences(ctx, experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run1"]
    assert set(blobs) == {metadata.PROBE_CHUNK_TAG} | {metadata.projection_tag(n) for n in LAYERS}
    scalars = dp.list_scalars(ctx, experiment_id="", plugin_name="scalars")["run1"]
    assert {metadata.scalar_tag(n, s) for n in LAYERS for s in metadata.SCALAR_NAMES} <= set(scalars)
    read = dp.read_tensors(ctx, experiment_id="", plugin_name=metadata.PLUGIN_NAME, downsample=1000,
                           run_tag_filter=provider.RunTagFilter(["run1"], [metadata.topk_tag("block1")]))
    series = read["run1"][metadata.topk_tag("block1")]
    assert [d.step for d in series] == list(range(12))
    info = metadata.parse_plugin_metadata(tensors[metadata.topk_tag("block1")].plugin_content).layer
    records = metadata.decode_records(series[-1].numpy.item(), info.units, info.k)
    np.testing.assert_array_equal(records["image"], read_run(tmp_path / "run1").topk("block1", 11).image)
    md = mux.SummaryMetadata("run1", metadata.topk_tag("block1"))
    assert md.data_class == summary_pb2.DATA_CLASS_TENSOR
    assert mux.SummaryMetadata("run1", metadata.PROBE_CHUNK_TAG).data_class == summary_pb2.DATA_CLASS_BLOB_SEQUENCE


def test_shares_a_log_dir_with_the_users_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    model, probe = trained_model(), make_probe()
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("loss", 1.5, 0)
    logger = ConvVizLogger(model, probe, writer=writer, layers=LAYERS[:2], k=2)
    assert logger.log(0)
    writer.add_scalar("loss", 1.0, 1)
    logger.close()
    writer.close()
    run = read_run(tmp_path)
    assert run.steps == [0] and len(run.layers) == 2
    assert len([f for f in os.listdir(tmp_path) if "tfevents" in f]) == 1


def test_schedule_dense_early_and_every_n(tmp_path):
    model, probe = trained_model(), make_probe(n=12)
    logger = ConvVizLogger(model, probe, tmp_path / "a", layers=["block1"], k=2)
    logged = [s for s in range(0, 120) if logger.maybe_log(s)]
    assert logged == [0, 1, 2, 5, 10, 20, 50, 100]
    logger = ConvVizLogger(model, probe, tmp_path / "b", layers=["block1"], k=2, every_n_steps=25)
    assert [s for s in range(0, 101, 5) if logger.maybe_log(s)] == [0, 25, 50, 75, 100]
    logger = ConvVizLogger(model, probe, tmp_path / "c", layers=["block1"], k=2, steps=[3, 7, 8])
    # A step skipped over by the caller is made up at the next one asked about.
    assert [s for s in range(0, 20, 2) if logger.maybe_log(s)] == [4, 8]


def test_resumed_run_does_not_overwrite_later_checkpoints(tmp_path):
    model, probe = trained_model(), make_probe()
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=3) as logger:
        logger.log(0)
        logger.log(100)
    before = read_run(tmp_path).topk("block1", 100).image
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=3) as logger:
        with pytest.warns(ConvVizWarning, match="not after the last logged step 100"):
            assert not logger.log(50)
        assert logger.log(150)
    run = read_run(tmp_path)
    assert run.steps == [0, 100, 150]
    np.testing.assert_array_equal(run.topk("block1", 100).image, before)
    # Images stored in the first session are not stored again.
    assert run.scalars[metadata.scalar_tag("block1", "topk_overlap")][150] == 1.0


def test_resume_with_another_probe_set_is_refused(tmp_path):
    model = trained_model()
    with ConvVizLogger(model, make_probe(seed=0), tmp_path, layers=LAYERS, k=3) as logger:
        logger.log(0)
    with pytest.raises(ValueError, match="another probe set"):
        ConvVizLogger(model, make_probe(seed=1), tmp_path, layers=LAYERS, k=3)


def test_write_error_warns_once_training_goes_on_and_retries(tmp_path, monkeypatch):
    from tb_convviz import summary

    model, probe = trained_model(), make_probe()
    logger = ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=3)
    assert logger.log(0)
    real_frame = summary.frame_record

    def disk_full(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(summary, "frame_record", disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not logger.log(1)
        assert not logger.log(2)
    assert len([w for w in caught if issubclass(w.category, ConvVizWarning)]) == 1
    assert "No space left" in str(caught[0].message)
    monkeypatch.setattr(summary, "frame_record", real_frame)
    assert logger.log(3)
    logger.close()
    run = read_run(tmp_path)
    assert run.steps == [0, 3]
    for layer in LAYERS:  # every record's image can be shown
        assert set(run.topk(layer, 3).image.ravel()) <= run.stored_images


# -- errors at construction ------------------------------------------------------------

def test_unknown_layer_lists_available(tmp_path):
    with pytest.raises(ValueError, match=r"unknown layer 'blok1'. Did you mean 'block1'.*Available layers: stem, block1, block2"):
        ConvVizLogger(trained_model(), make_probe(), tmp_path, layers=["blok1"])


def test_module_prefix_of_wrappers_is_accepted(tmp_path):
    model = nn.DataParallel(trained_model())
    logger = ConvVizLogger(model, make_probe(), tmp_path, layers=["module.block1"], k=2)
    assert logger.layers == ["block1"]


def test_empty_probe_set():
    with pytest.raises(ValueError, match="probe set is empty"):
        ProbeSet(torch.zeros(0, 3, 16, 16))


def test_wrong_image_shape():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ProbeSet(torch.zeros(5, 16, 16))


def test_k_larger_than_probe(tmp_path):
    with pytest.raises(ValueError, match="k=9 is larger than the probe set \\(4 images\\)"):
        ConvVizLogger(trained_model(), torch.rand(4, 3, 16, 16), tmp_path)


def test_model_that_fails_on_the_probe(tmp_path):
    gray = ProbeSet(torch.rand(10, 1, 16, 16))
    with pytest.raises(ValueError, match=r"model failed on probe images of shape \(2, 1, 16, 16\)"):
        ConvVizLogger(trained_model(), gray, tmp_path)
    assert not os.listdir(tmp_path)


def test_layer_called_twice_is_refused(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.act(self.conv(x)))

    with pytest.raises(ValueError, match="'act' ran 2 times"):
        ConvVizLogger(Shared(), make_probe(), tmp_path, layers=["act"], k=2)


def test_auto_layers_for_torchvision_models(tmp_path):
    import torchvision

    probe = ProbeSet(torch.rand(4, 3, 64, 64))
    picks = {
        "alexnet": ["features.1", "features.4", "features.7", "features.9", "features.11"],
        "vgg11": ["features.2", "features.5", "features.10", "features.15", "features.20"],
        "resnet18": ["relu", "layer1", "layer2", "layer3", "layer4"],
    }
    for name, expected in picks.items():
        model = getattr(torchvision.models, name)(weights=None)
        assert ConvVizLogger(model, probe, tmp_path / name, k=2).layers == expected, name


def test_records_are_framed_exactly_like_tensorboards_record_writer():
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    from tb_convviz import summary

    for data in (b"", b"x", bytes(range(256)) * 300):
        buf = io.BytesIO()
        RecordWriter(buf).write(data)
        assert summary.frame_record(data) == buf.getvalue()


def test_auto_layers_look_inside_a_single_wrapped_torchvision_model(tmp_path):
    import torchvision

    class Wrapper(nn.Module):  # e.g. a LightningModule with `self.model = resnet18()`
        def __init__(self):
            super().__init__()
            self.model = torchvision.models.resnet18(weights=None, num_classes=3)

        def forward(self, x):
            return self.model(x)

    logger = ConvVizLogger(Wrapper(), torch.rand(4, 3, 32, 32), tmp_path, k=2)
    assert logger.layers == ["model.relu", "model.layer1", "model.layer2", "model.layer3", "model.layer4"]


def test_probe_images_follow_the_model_dtype(tmp_path):
    model = trained_model().to(torch.bfloat16)
    probe = make_probe()  # float32 images, as a dataset gives them
    with ConvVizLogger(model, probe, tmp_path, layers=LAYERS, k=3) as logger:
        assert logger.log(0)
    assert read_run(tmp_path).topk("block2", 0).values.dtype == np.float32
