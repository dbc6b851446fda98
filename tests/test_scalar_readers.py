"""The convviz scalars are listed by every reader of event files, as SummaryWriter's are."""

import json
import urllib.parse
import urllib.request

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet, metadata, read_run
from tb_server import tensorboard_server

LAYERS = ["1", "3"]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scalars")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3, 2), nn.ReLU())
    probe = ProbeSet(torch.rand(20, 3, 12, 12, generator=torch.Generator().manual_seed(0)))
    with ConvVizLogger(net, probe, root / "run", layers=LAYERS, k=3, steps=[0, 4, 9]) as logger:
        for step in range(10):
            logger.maybe_log(step)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
    return root


@pytest.fixture(scope="module")
def expected(logdir):
    run = read_run(logdir / "run")
    scalars = run.scalars
    tags = {metadata.scalar_tag(layer, name) for layer in LAYERS for name in metadata.SCALAR_NAMES}
    # The first conv ("0") also gets its layer-1 filter counts.
    tags |= {metadata.scalar_tag("0", name) for name in metadata.FILTER_SCALAR_NAMES}
    # Each logged conv layer's effective receptive field (its larger side), at every checkpoint.
    tags |= {metadata.scalar_tag(layer, "effective_field") for layer in LAYERS}
    assert tags == set(scalars) and len(run.steps) >= 3
    for layer in LAYERS:
        assert scalars[metadata.scalar_tag(layer, "effective_field")] == {
            step: max(run.effective_field(layer, step)) for step in run.steps}
    # The first checkpoint has no overlap with a previous one.
    assert all(len(scalars[t]) == len(run.steps) - t.endswith("topk_overlap") for t in tags)
    return scalars


def test_event_accumulator_lists_the_scalars(logdir, expected):
    acc = event_accumulator.EventAccumulator(str(logdir / "run"), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    assert set(expected) <= set(acc.Tags()["scalars"])
    for tag, values in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(values)


def test_tbparse_lists_the_scalars(logdir, expected):
    tbparse = pytest.importorskip("tbparse")
    frame = tbparse.SummaryReader(str(logdir / "run")).scalars
    got = {}
    for row in frame.itertuples():
        got.setdefault(row.tag, {})[int(row.step)] = row.value
    assert set(expected) <= set(got)
    for tag, values in expected.items():
        assert got[tag] == pytest.approx(values)


@pytest.mark.parametrize("load_fast", [True, False], ids=["rust", "python"])
def test_tensorboard_scalars_dashboard_and_the_tab_show_them(logdir, expected, load_fast):
    def get(url):
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    with tensorboard_server(str(logdir), load_fast=load_fast) as base:
        tags = get(base + "data/plugin/scalars/tags")["run"]
        assert set(expected) <= set(tags)
        for tag, values in expected.items():
            query = urllib.parse.urlencode({"run": "run", "tag": tag})
            points = get(f"{base}data/plugin/scalars/scalars?{query}")
            assert {step: value for _, step, value in points} == pytest.approx(values)
        stats = get(base + "data/plugin/convviz/stats?run=run")
        for layer in stats["layers"]:
            for name in metadata.SCALAR_NAMES:
                series = expected[metadata.scalar_tag(layer["name"], name)]
                assert layer[name] == pytest.approx([series.get(s) for s in layer["steps"]])
