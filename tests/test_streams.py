"""Training and validation streams: exact against a brute-force top-k over the images fed, and harmless."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.streams import StreamSource, _coefficients, _forms, content_id, content_ids

K = 3
LAYERS = ["conv1", "relu2"]


class Net(nn.Module):
    def __init__(self, bn: bool = False, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv2.bias[:2] = -50.0  # two units that are 0 on every image: all their images tie

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.conv1(x))))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def probe_set():
    return ProbeSet(torch.rand(12, 3, 10, 10, generator=torch.Generator().manual_seed(7)))


def batches(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    out = [torch.rand(size, 3, 10, 10, generator=g) for _ in range(n)]
    out[-1][0] = out[0][1]  # an image fed twice is one image
    out[-1][1] = out[0][1]
    return out


def brute_force(net, images, layer):
    """Per unit of ``layer``, the top-K (value, content id) over ``images``, ties to the lower id, each image once."""
    unique = {content_id(image): image for image in images}
    keys = sorted(unique)
    found = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: found.update(out=o))
    net.eval()
    with torch.no_grad():
        net(torch.stack([unique[key] for key in keys]))
    handle.remove()
    out = found["out"]
    values = out.amax(dim=(2, 3)) if out.dim() == 4 else out
    rows = []
    for unit in range(values.shape[1]):
        order = sorted(range(len(keys)), key=lambda i: (-float(values[i, unit]), keys[i]))[:K]
        rows.append([(float(values[i, unit]), keys[i]) for i in order])
    return rows, unique


def assert_stream_equals(run, source, step, net, fed, probe):
    for layer in LAYERS:
        expected, unique = brute_force(net, fed, layer)
        got = run.topk(layer, step, source=source)
        for unit, row in enumerate(expected):
            np.testing.assert_allclose(got.values[unit], [v for v, _ in row], rtol=1e-5, atol=1e-6)
            for slot, (_, key) in enumerate(row):
                # The stored pixels are the brute-force winner's (lossless at this size).
                np.testing.assert_array_equal(run.stream_image(source, int(got.image[unit, slot])),
                                              probe.show(unique[key]))


def test_train_stream_equals_brute_force_with_ties_and_repeats(tmp_path):
    torch.manual_seed(0)
    net, probe = Net(), probe_set()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    logger = ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, steps=[0, 3], stream="train", projections=None)
    fed = []
    for step, x in enumerate(batches(4, 5, seed=1)):
        net.train()
        net(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        fed.extend(x)
        logger.maybe_log(step)
        if step == 0:
            assert_stream_equals(read_run(tmp_path), "train", 0, net, fed, probe)
    logger.close(final_checkpoint=False)
    run = read_run(tmp_path)
    # The window: images since step 0, and step 0's winners: the top-k over everything fed.
    assert_stream_equals(run, "train", 3, net, fed, probe)
    assert run.streams == ["train"]
    with pytest.raises(KeyError):
        run.topk("conv1", 3, source="eval")


def test_eval_stream_equals_brute_force_with_batchnorm(tmp_path):
    torch.manual_seed(0)
    net, probe = Net(bn=True), probe_set()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    logger = ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, steps=[2], stream="eval", projections=None)
    validation = batches(3, 4, seed=2)
    for step, x in enumerate(batches(3, 6, seed=3)):
        net.train()
        net(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        net.eval()
        with torch.no_grad():
            for v in validation:
                net(v)
        logger.maybe_log(step)
    logger.close(final_checkpoint=False)
    run = read_run(tmp_path)
    assert_stream_equals(run, "eval", 2, net, [image for v in validation for image in v], probe)
    # The probe records are there as before, and the default source.
    assert np.array_equal(run.topk("conv1", 2).image, run.topk("conv1", 2, source="probe").image)


def test_logger_never_ranks_its_own_passes_nor_paused_forwards(tmp_path):
    net, probe = Net(bn=True), probe_set()
    logger = ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, steps=[0, 1], stream=("train", "eval"),
                           projections="topk")
    with torch.no_grad(), logger.paused():
        net.eval()
        net(torch.rand(4, 3, 10, 10))
        net.train()
        net(torch.rand(4, 3, 10, 10))
    logger.maybe_log(0)
    logger.maybe_log(1)
    logger.close(final_checkpoint=False)
    run = read_run(tmp_path)
    for source in ("train", "eval"):
        for layer in LAYERS:
            assert (run.topk(layer, 1, source=source).image == -1).all()


def test_labels_and_projections_of_stream_winners(tmp_path):
    net, probe = Net(), probe_set()
    logger = ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, steps=[0], stream="train")
    x = torch.rand(6, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    net.train()
    net(x)
    logger.maybe_log(0, labels=torch.arange(6) + 10)
    logger.close(final_checkpoint=False)
    run = read_run(tmp_path)
    records = run.topk("relu2", 0, source="train")
    for unit in range(records.image.shape[0]):
        for slot in range(K):
            shown = run.stream_image("train", int(records.image[unit, slot]))
            row = next(i for i, image in enumerate(x) if np.array_equal(probe.show(image), shown))
            assert records.label[unit, slot] == row + 10
    # Top-1 projections of stream records, as for the probe's: the record's own image and position.
    record = run.projection_record("relu2", 0, unit=4, source="train")
    assert (record["image"], record["y"], record["x"]) == (records.image[4, 0], records.y[4, 0], records.x[4, 0])
    assert np.abs(run.projection("relu2", 0, unit=4, source="train")).max() > 0


def test_images_that_cannot_be_found_fail_at_construction(tmp_path):
    class DictNet(Net):
        def forward(self, batch):
            return super().forward(batch["image"])

    net, probe = DictNet(), probe_set()
    call = lambda m, x: m({"image": x})  # noqa: E731
    with pytest.raises(ValueError, match="stream_images="):
        ConvVizLogger(net, probe, tmp_path, layers=LAYERS, forward=call, stream="train")
    logger = ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, forward=call, stream="train", steps=[0],
                           stream_images=lambda args, kwargs: args[0]["image"], projections=None)
    net.train()
    net({"image": torch.rand(4, 3, 10, 10)})
    logger.maybe_log(0)
    logger.close(final_checkpoint=False)
    assert (read_run(tmp_path).topk("conv1", 0, source="train").image >= 0).all()
    with pytest.raises(ValueError, match="stream must be"):
        ConvVizLogger(Net(), probe, tmp_path / "b", stream="validation")


def test_pool_stays_within_its_bound(tmp_path):
    net, probe = Net(), probe_set()
    image_bytes = 3 * 10 * 10 * 4
    logger = ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, steps=[0, 50], stream="train",
                           stream_pool_bytes=8 * image_bytes, projections=None)
    net.train()
    for step, x in enumerate(batches(6, 8, seed=5)):
        net(x)
        assert logger.stream_pool_bytes_held <= 8 * image_bytes
        logger.maybe_log(step)
    logger.close(final_checkpoint=False)
    records = read_run(tmp_path).topk("conv1", 0, source="train")
    assert (records.image >= 0).any()


def _train(net, logger, data, seed):
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    grads, states = [], []
    for step, x in enumerate(data):
        net.train()
        net(x).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        optimizer.step()
        optimizer.zero_grad()
        net.eval()
        with torch.no_grad():
            net(x + 1)
        if logger is not None:
            logger.maybe_log(step)
        states.append((copy.deepcopy(net.state_dict()), torch.get_rng_state(),
                       [m.training for m in net.modules()]))
    return grads, states


def test_streams_do_not_change_training(tmp_path):
    data = batches(4, 6, seed=6)
    torch.manual_seed(1)
    plain = Net(bn=True, dropout=0.3)
    hooked = copy.deepcopy(plain)
    logger = ConvVizLogger(hooked, probe_set(), tmp_path, layers=LAYERS, k=K, steps=[0, 2], stream=("train", "eval"))
    expected = _train(plain, None, data, seed=2)
    got = _train(hooked, logger, data, seed=2)
    logger.close(final_checkpoint=False)
    for a, b in zip(expected[0], got[0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for (sa, ra, fa), (sb, rb, fb) in zip(expected[1], got[1]):
        assert all(torch.equal(sa[name], sb[name]) for name in sa)
        assert torch.equal(ra, rb) and fa == fb


def test_autocast_and_channels_last_streams_record_float32_values_of_the_images_fed(tmp_path):
    torch.manual_seed(0)
    net, probe = Net().to(memory_format=torch.channels_last), probe_set()
    logger = ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, steps=[1], stream="train", projections=None)
    fed = []
    for step, x in enumerate(batches(2, 6, seed=8)):
        net.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x.to(memory_format=torch.channels_last)).float().sum().backward()
        fed.extend(x)
        logger.maybe_log(step)
    logger.close(final_checkpoint=False)
    run = read_run(tmp_path)
    # Candidates were picked on bfloat16 values; the records hold the float32 eval values of fed images.
    for layer in LAYERS:
        _, unique = brute_force(net, fed, layer)
        got = run.topk(layer, 1, source="train")
        shown = {key: probe.show(image) for key, image in unique.items()}
        assert (got.image >= 0).all()
        for unit in range(got.values.shape[0]):
            for slot in range(K):
                pixels = run.stream_image("train", int(got.image[unit, slot]))
                key = next(key for key, s in shown.items() if np.array_equal(s, pixels))
                full = brute_force_value(net, unique[key], layer, unit)
                assert got.values[unit, slot] == pytest.approx(full, rel=1e-5, abs=1e-6)


def brute_force_value(net, image, layer, unit):
    found = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: found.update(out=o))
    net.eval()
    with torch.no_grad():
        net(image[None])
    handle.remove()
    return float(found["out"][0, unit].amax())


def test_a_resumed_run_numbers_new_stream_images_after_the_stored_ones(tmp_path):
    net, probe = Net(), probe_set()
    fed = []
    for phase, seed in ((0, 9), (1, 10)):
        with ConvVizLogger(net, probe, tmp_path, layers=LAYERS, k=K, steps=[phase], stream="train",
                           projections=None) as logger:
            x = torch.rand(5, 3, 10, 10, generator=torch.Generator().manual_seed(seed))
            fed.append(x)
            net.train()
            net(x)
            logger.maybe_log(phase)
    run = read_run(tmp_path)
    first, second = (run.topk("conv1", s, source="train").image for s in (0, 1))
    assert second.max() > first.max()
    # Every record's stored pixels are those of an image fed in its own phase or before.
    for step, images in ((0, fed[0]), (1, torch.cat(fed))):
        shown = [probe.show(image) for image in images]
        for number in np.unique(run.topk("conv1", step, source="train").image):
            assert any(np.array_equal(s, run.stream_image("train", int(number))) for s in shown)


def _validation_images_run(net, logger, step, validation):
    """``logger.log(step)``, and how many validation images it ran through ``net``."""
    inputs = []
    handle = net.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().flatten(1).clone()))
    try:
        assert logger.log(step)
    finally:
        handle.remove()
    images = torch.cat(validation).flatten(1)
    return sum(int((batch[:, None] == images[None]).all(dim=2).sum()) for batch in inputs)


def test_eval_checkpoint_rescores_only_what_the_validation_pass_did_not_score(tmp_path):
    torch.manual_seed(0)
    net, probe = Net(bn=True), probe_set()
    full_net = copy.deepcopy(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    full_optimizer = torch.optim.SGD(full_net.parameters(), lr=0.1)
    options = dict(layers=LAYERS, k=K, steps=[10 ** 6], stream="eval", projections=None)
    logger = ConvVizLogger(net, probe, tmp_path / "skip", **options)
    # forward= may change what the model sees: its checkpoints re-score every candidate.
    full = ConvVizLogger(full_net, probe, tmp_path / "full", forward=lambda m, x: m(x), **options)
    validation = batches(3, 4, seed=11)
    ran = {}
    for step in range(3):
        for model in (net, full_net):
            model.eval()
            with torch.no_grad():
                for v in validation:
                    model(v)
        if step == 2:  # the weights change after the validation pass: the checkpoint must re-score
            for model, sgd in ((net, optimizer), (full_net, full_optimizer)):
                model.train()
                model(batches(1, 6, seed=12)[0]).sum().backward()
                sgd.step()
                sgd.zero_grad()
        ran[step] = (_validation_images_run(net, logger, step, validation),
                     _validation_images_run(full_net, full, step, validation))
    logger.close(final_checkpoint=False)
    full.close(final_checkpoint=False)
    # Step 0: scored by the pass; step 1: the same images again, step 0's winners among them.
    assert ran[0][0] == ran[1][0] == 0 and ran[0][1] > 0 and ran[1][1] > 0
    assert ran[2][0] == ran[2][1] > 0
    skip, rescored = read_run(tmp_path / "skip"), read_run(tmp_path / "full")
    for step in range(3):
        for layer in LAYERS:
            a, b = skip.topk(layer, step, source="eval"), rescored.topk(layer, step, source="eval")
            np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6)
            for field in ("image", "y", "x"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{step} {layer} {field}")
    assert_stream_equals(skip, "eval", 2, net, [image for v in validation for image in v], probe)


def test_streams_under_torch_compile_and_data_parallel_record_what_the_plain_model_does(tmp_path):
    torch.manual_seed(0)
    plain, probe = Net(), probe_set()
    compiled_net, parallel_net = copy.deepcopy(plain), copy.deepcopy(plain)
    # Dynamo with the eager backend: the same tracing of the hooks, without inductor's code generation.
    compiled = torch.compile(compiled_net, backend="eager")
    # Compiled (for the shapes and modes below) before the logger adds its hooks, as in a resumed job.
    compiled.train()
    compiled(torch.rand(5, 3, 10, 10)).sum().backward()
    compiled.eval()
    with torch.no_grad():
        compiled(torch.rand(4, 3, 10, 10))
    compiled_net.zero_grad()
    models = {"plain": (plain, ""), "compiled": (compiled, "_orig_mod."), "parallel": (nn.DataParallel(parallel_net),
                                                                                    "module.")}
    loggers = {name: ConvVizLogger(model, probe, tmp_path / name, layers=[prefix + n for n in LAYERS], k=K,
                                   steps=[1], stream=("train", "eval"), projections=None)
               for name, (model, prefix) in models.items()}
    for step, (x, v) in enumerate(zip(batches(2, 5, seed=13), batches(2, 4, seed=14))):
        for name, (model, _) in models.items():
            model.train()
            model(x).sum().backward()
            model.eval()
            with torch.no_grad():
                model(v)
            loggers[name].maybe_log(step)
    for logger in loggers.values():
        logger.close(final_checkpoint=False)
    want = read_run(tmp_path / "plain")
    for name in ("compiled", "parallel"):
        got = read_run(tmp_path / name)
        for source in ("train", "eval"):
            for layer in LAYERS:
                a, b = got.topk(layer, 1, source=source), want.topk(layer, 1, source=source)
                assert (b.image >= 0).all()
                np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6)
                for field in ("image", "y", "x"):
                    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{name} {source}")


def test_content_ids_are_exact_hashes_of_the_pixels_whatever_the_layout_and_batch():
    x = torch.rand(20, 3, 10, 10, generator=torch.Generator().manual_seed(15))
    ids = content_ids(x)
    assert len(set(ids)) == 20 and all(0 <= key < 2 ** 63 for key in ids)
    assert ids == [content_id(image) for image in x] == content_ids(x.to(memory_format=torch.channels_last))
    y = x.clone()
    y[3, 1, 2, 3] = torch.nextafter(y[3, 1, 2, 3], torch.tensor(2.0))  # one bit of one pixel
    assert content_ids(y) == ids[:3] + [content_ids(y)[3]] + ids[4:] and content_ids(y)[3] != ids[3]
    assert content_ids(x.double())[0] != ids[0]
    odd = torch.randint(0, 256, (17, 1, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(16))
    assert content_ids(odd)[5] == content_id(odd[5])
    # The forms are exact integer sums, so every device computes the same ones.
    data = x.flatten(1).view(torch.int8)
    coefficients = _coefficients(data.shape[1], data.device)
    assert torch.equal(_forms(data, coefficients), data.long() @ coefficients.long())


def test_an_image_fed_twice_that_scores_differently_does_not_keep_others_out():
    """Its two maps may be a batch's two best: they are one image, so the third image still holds a slot."""
    probe = SimpleNamespace(spans={"layer": (0, 1)}, layers=["layer"], k=2, device=torch.device("cpu"))
    stream = StreamSource("train", probe, 0, pool_bytes=1 << 20)
    twice, *others = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(17))
    images = torch.stack([twice, twice, *others])
    values = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0], [0.5]])  # training mode: the same image's maps differ
    stream.observe(images, values, stream.bar("layer", values))
    assert stream._topk.values.tolist() == [[5.0, 3.0]]
    assert stream._topk.image.tolist() == [[content_id(twice), content_id(others[0])]]
    assert set(stream.pool.images) == {content_id(twice), content_id(others[0])}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), k=st.integers(1, 4), units=st.integers(1, 5), levels=st.integers(1, 4),
       sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_forwards_ranked_one_by_one_equal_a_brute_force_top_k(seed, k, units, levels, sizes):
    """Few value levels (ties everywhere, as dead units give), images fed again with other values: each image's best."""
    g = torch.Generator().manual_seed(seed)
    probe = SimpleNamespace(spans={"a": (0, units // 2), "b": (units // 2, units)}, layers=["a", "b"], k=k,
                            device=torch.device("cpu"))
    stream = StreamSource("train", probe, 0, pool_bytes=1 << 20)
    images = torch.rand(8, 1, 2, 2, generator=g)
    ids = content_ids(images)
    best: dict[tuple[int, int], float] = {}
    for size in sizes:
        rows = torch.randint(0, len(images), (size,), generator=g)  # an image may come twice in one batch
        values = torch.randint(0, levels, (size, units), generator=g).float()
        bars = [stream.bar(name, values[:, lo:hi]) for name, (lo, hi) in probe.spans.items()]
        stream.observe(images[rows], values, torch.cat(bars))
        for row, image in enumerate(rows.tolist()):
            for unit in range(units):
                key = (unit, ids[image])
                best[key] = max(best.get(key, float("-inf")), float(values[row, unit]))
    for unit in range(units):
        ranked = sorted((-value, key) for (u, key), value in best.items() if u == unit)[:k]
        ranked += [(float("inf"), -1)] * (k - len(ranked))
        assert stream._topk.values[unit].tolist() == [-value for value, _ in ranked]
        assert stream._topk.image[unit].tolist() == [key for _, key in ranked]
    assert set(stream.pool.images) == {key for key in stream._topk.image.flatten().tolist() if key >= 0}
