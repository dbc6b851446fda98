"""The convviz HTTP API through TensorBoard's WSGI app and its Python data loader (``--load_fast=false``)."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard import program
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_ingester
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.core import core_plugin
from tensorboard.util import tensor_util
from werkzeug import test as werkzeug_test

from tb_convviz import metadata, plugin_data_pb2, summary
from tb_convviz.plugin import loader, render
from tb_convviz.plugin.convviz_plugin import WARM_UNITS
from tb_convviz.plugin.data import ByteLRU
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import wait_for

API = "/data/plugin/convviz/"
CHECKPOINTS = 12  # more than the 10 points the Python loader keeps per series by default


class CountingProvider:
    """TensorBoard's data provider, recording which series each ``read_tensors`` call returned."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.tensor_reads: list[tuple[str, str]] = []
        self.blob_reads: list[str] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def read_tensors(self, ctx=None, **kwargs):
        result = self._inner.read_tensors(ctx, **kwargs)
        self.tensor_reads += [(run, tag) for run, tags in result.items() for tag in tags]
        return result

    def read_blob(self, ctx=None, *, blob_key):
        self.blob_reads.append(blob_key)
        return self._inner.read_blob(ctx, blob_key=blob_key)


class Served:
    """TensorBoard's own app and Python loader over a log dir, configured from command-line flags."""

    def __init__(self, logdir, *flags: str) -> None:
        tb = program.TensorBoard(plugins=[core_plugin.CorePluginLoader(), loader.ConvVizLoader])
        tb.configure(argv=["tensorboard", "--logdir", str(logdir), "--load_fast=false",
                           "--reload_interval=0", "--reload_task=blocking", *flags])
        self.flags = tb.flags
        self.ingester = data_ingester.LocalDataIngester(self.flags)
        self.reload()
        self.provider = CountingProvider(self.ingester.data_provider)
        app = application.TensorBoardWSGIApp(self.flags, [loader.ConvVizLoader()], self.provider)
        self.client = werkzeug_test.Client(app)

    def reload(self) -> None:
        self.ingester.start()  # blocking: one full reload, as TensorBoard's reload thread does

    def get(self, route: str):
        return self.client.get(API + route)

    def json(self, route: str, status: int = 200):
        resp = self.get(route)
        assert resp.status_code == status, resp.get_data(as_text=True)
        assert resp.mimetype == "application/json"
        return json.loads(resp.get_data())

    def png(self, route: str) -> np.ndarray:
        resp = self.get(route)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.mimetype == "image/png"
        return np.asarray(Image.open(io.BytesIO(resp.get_data())))


def expected_crop(image: np.ndarray, size, stride, center, y, x) -> np.ndarray:
    """The receptive-field crop, pixel by pixel, padded with grey 128 off the image."""
    out = np.full((size[0], size[1], image.shape[2]), 128, np.uint8)
    top = math.floor(center[0] + y * stride[0] - (size[0] - 1) / 2 + 0.5)
    left = math.floor(center[1] + x * stride[1] - (size[1] - 1) / 2 + 0.5)
    for i in range(size[0]):
        for j in range(size[1]):
            if 0 <= top + i < image.shape[0] and 0 <= left + j < image.shape[1]:
                out[i, j] = image[top + i, left + j]
    return out


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    common = dict(checkpoints=CHECKPOINTS, layers=3, units=6, k=5, probe_size=24, image_size=16, fc_layer=True)
    runs = {
        "a": write_synthetic_run(str(root / "a"), seed=1, **common),
        "same_probe": write_synthetic_run(str(root / "same_probe"), seed=1, **common),
        "other_probe": write_synthetic_run(str(root / "other_probe"), seed=2, **common),
    }
    return root, runs


@pytest.fixture(scope="module")
def served(logs):
    return Served(logs[0])


def test_loader_keeps_every_checkpoint_unless_the_user_says_otherwise(tmp_path):
    assert loader.PLUGIN_NAME == metadata.PLUGIN_NAME
    assert Served(tmp_path).flags.samples_per_plugin == {"convviz": 0}
    explicit = Served(tmp_path, "--samples_per_plugin", "convviz=3,images=2").flags.samples_per_plugin
    assert explicit == {"convviz": 3, "images": 2}


def test_plugin_is_listed_active_as_an_iframe_tab(served):
    resp = served.client.get("/data/plugins_listing")
    entry = json.loads(resp.get_data())["convviz"]
    assert entry["enabled"] is True
    assert entry["tab_name"] == "ConvViz"
    assert entry["loading_mechanism"] == {"type": "IFRAME", "module_path": API + "static/index.js"}


def test_runs_lists_layers_steps_and_probe_set(served, logs):
    runs = {r["run"]: r for r in served.json("runs")["runs"]}
    assert sorted(runs) == ["a", "other_probe", "same_probe"]
    run, written = runs["a"], logs[1]["a"]
    assert run["error"] is None
    assert run["steps"] == written.steps and len(run["steps"]) == CHECKPOINTS
    assert [layer["name"] for layer in run["layers"]] == ["conv1", "conv2", "conv3", "fc"]
    conv2 = run["layers"][1]
    rf = written.fields["conv2"]
    assert conv2 == {
        "name": "conv2", "index": 2, "units": 6, "k": 5,
        "receptive_field": {"size": list(rf.size), "stride": list(rf.stride), "center": list(rf.offset),
                            "method": "analytic"},
        "fmap": [4, 4], "input": [16, 16], "steps": written.steps,
        "projections": None,  # a synthetic run has none
        "effective_field": None,  # nor effective fields: its crops are the theoretical field's
    }
    assert run["filters"] is None
    assert run["layers"][3]["fmap"] is None
    assert run["probe"] == {
        "n": 24, "height": 16, "width": 16, "channels": 3, "class_names": written.class_names,
        "fingerprint": written.probe.fingerprint, "stored_images": len(written.stored),
    }


def test_topk_returns_the_logged_records_with_labels_and_overlap(served, logs):
    written = logs[1]["a"]
    step = written.steps[4]
    body = served.json(f"topk?run=a&layer=conv2&step={step}")
    assert (body["step"], body["previous_step"], body["total_units"]) == (step, written.steps[3], 6)
    logged, before = written.records["conv2"][4], written.records["conv2"][3]
    for unit in body["units"]:
        u = unit["unit"]
        rows = logged[u]
        assert [r["image"] for r in unit["records"]] == rows["image"].tolist()
        assert [(r["y"], r["x"]) for r in unit["records"]] == list(zip(rows["y"].tolist(), rows["x"].tolist()))
        assert [r["value"] for r in unit["records"]] == pytest.approx(rows["value"].tolist())
        assert [r["label"] for r in unit["records"]] == written.labels[rows["image"]].tolist()
        assert unit["records"][0]["label_name"] == written.class_names[written.labels[rows["image"][0]]]
        assert unit["overlap"] == pytest.approx(len(set(rows["image"].tolist()) & set(before[u]["image"].tolist())) / 5)
        assert unit["dead"] == (float(rows["value"].max()) <= 0)
    first = served.json("topk?run=a&layer=fc&step=0")
    assert first["previous_step"] is None
    assert all(u["overlap"] is None for u in first["units"])
    assert all(r["y"] is None and r["x"] is None for u in first["units"] for r in u["records"])


def test_topk_defaults_to_latest_step_and_pages(served, logs):
    body = served.json("topk?run=a&layer=conv1&offset=2&limit=3")
    assert body["step"] == logs[1]["a"].steps[-1]
    assert [u["unit"] for u in body["units"]] == [2, 3, 4]
    assert body["offset"] == 2 and body["total_units"] == 6


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3", "fc"])
def test_patch_pixels_equal_the_receptive_field_crop(served, logs, layer):
    written = logs[1]["a"]
    rf = written.fields[layer]
    for c in (0, CHECKPOINTS - 1):
        for unit, rank in ((0, 0), (3, 4), (5, 2)):
            rec = written.records[layer][c][unit, rank]
            y, x = (0, 0) if layer == "fc" else (int(rec["y"]), int(rec["x"]))
            expected = expected_crop(written.images[rec["image"]], rf.size, rf.stride, rf.offset, y, x)
            got = served.png(f"patch?run=a&layer={layer}&step={written.steps[c]}&unit={unit}&rank={rank}")
            np.testing.assert_array_equal(got, expected)


def test_patch_size_resamples_the_longer_side(served):
    assert served.png("patch?run=a&layer=conv2&unit=1&rank=0&size=64").shape == (64, 64, 3)
    assert served.png("patch?run=a&layer=conv3&unit=1&rank=0&size=8").shape == (8, 8, 3)


def test_mosaic_is_a_near_square_grid_of_the_patches(served, logs):
    written = logs[1]["a"]
    rf = written.fields["conv1"]
    h, w = rf.size
    got = served.png(f"mosaic?run=a&layer=conv1&step={written.steps[2]}&unit=4")
    assert got.shape == (2 * h + 1, 3 * w + 2, 4)  # k=5: 2 rows x 3 columns, 1-px separators
    for rank, rec in enumerate(written.records["conv1"][2][4]):
        r, c = divmod(rank, 3)
        tile = got[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w]
        expected = expected_crop(written.images[rec["image"]], rf.size, rf.stride, rf.offset, rec["y"], rec["x"])
        np.testing.assert_array_equal(tile[..., :3], expected)
        assert (tile[..., 3] == 255).all()
    assert (got[h, :, 3] == 0).all() and (got[:, w, 3] == 0).all()
    assert (got[h + 1:, 2 * (w + 1):, 3] == 0).all()  # the sixth cell is empty
    assert served.png("mosaic?run=a&layer=conv1&unit=4&size=32").shape == (2 * 32 + 1, 3 * 32 + 2, 4)


def test_evolution_follows_one_unit_over_every_checkpoint(served, logs):
    written = logs[1]["a"]
    body = served.json("evolution?run=a&layer=conv3&unit=2")
    checkpoints = body["checkpoints"]
    assert [c["step"] for c in checkpoints] == written.steps
    assert checkpoints[0]["overlap"] is None and checkpoints[0]["top1_changed"] is False
    images = written.records["conv3"]["image"][:, 2]
    for c in range(1, CHECKPOINTS):
        assert [r["image"] for r in checkpoints[c]["records"]] == images[c].tolist()
        assert checkpoints[c]["overlap"] == pytest.approx(len(set(images[c]) & set(images[c - 1])) / 5)
        assert checkpoints[c]["top1_changed"] == (images[c][0] != images[c - 1][0])


def test_stats_gives_the_logged_scalars_per_checkpoint(served, logs):
    written = logs[1]["a"]
    layer = served.json("stats?run=a")["layers"][0]
    assert layer["name"] == "conv1" and layer["steps"] == written.steps
    assert layer["topk_overlap"][0] is None
    images = written.records["conv1"]["image"]
    expected = [metadata.topk_overlap(images[c], images[c - 1]).mean() for c in range(1, CHECKPOINTS)]
    assert layer["topk_overlap"][1:] == pytest.approx(expected)
    peaks = written.records["conv1"]["value"][:, :, 0]
    assert layer["mean_peak"] == pytest.approx(peaks.mean(axis=1).tolist())
    assert layer["dead_fraction"] == pytest.approx((peaks <= 0).mean(axis=1).tolist())


def test_compare_checkpoints_and_runs_with_the_same_probe_set(served, logs):
    written = logs[1]["a"]
    first, last = written.steps[0], written.steps[-1]
    body = served.json(f"compare?run=a&layer=conv2&step={first}&other_step={last}")
    a, b = written.records["conv2"]["image"][0], written.records["conv2"]["image"][-1]
    for unit in body["units"]:
        shared = sorted(set(a[unit["unit"]].tolist()) & set(b[unit["unit"]].tolist()))
        assert unit["shared"] == shared and unit["overlap"] == pytest.approx(len(shared) / 5)
    assert body["mean_overlap"] == pytest.approx(np.mean([u["overlap"] for u in body["units"]]))
    across = served.json(f"compare?run=a&layer=conv2&step={last}&other_run=same_probe&other_step={last}")
    assert across["other_run"] == "same_probe" and across["mean_overlap"] == 1.0  # same seed, same records
    refused = served.json(f"compare?run=a&layer=conv2&other_run=other_probe&other_step={last}", status=400)
    assert "different probe sets" in refused["error"]


def test_probe_image_whole_and_with_the_receptive_field_box(served, logs):
    written = logs[1]["a"]
    index = written.stored[0]
    np.testing.assert_array_equal(served.png(f"probe_image?run=a&index={index}"), written.images[index])
    rec = written.records["conv2"][-1][1, 0]
    boxed = served.png("probe_image?run=a&layer=conv2&unit=1&rank=0")
    image = written.images[rec["image"]]
    rf = written.fields["conv2"]
    top = math.floor(rf.offset[0] + rec["y"] * rf.stride[0] - (rf.size[0] - 1) / 2 + 0.5)
    left = math.floor(rf.offset[1] + rec["x"] * rf.stride[1] - (rf.size[1] - 1) / 2 + 0.5)
    changed = np.argwhere((boxed != image).any(axis=2))
    assert len(changed) and (boxed[tuple(changed.T)] == render.BOX_COLOR).all()
    rows, cols = changed[:, 0], changed[:, 1]
    on_outline = (rows == top) | (rows == top + rf.size[0] - 1) | (cols == left) | (cols == left + rf.size[1] - 1)
    assert on_outline.all()
    unstored = sorted(set(range(24)) - set(written.stored))
    if unstored:
        body = served.json(f"probe_image?run=a&index={unstored[0]}", status=404)
        assert "only images named by some top-k record are kept" in body["error"]
    body = served.json(f"probe_image?run=a&index={int(rec['image']) + 1}&layer=conv2&unit=1&rank=0", status=400)
    assert "omit index" in body["error"]


@pytest.mark.parametrize("route, status, fragment", [
    ("topk?layer=conv1", 400, "parameter 'run' is required"),
    ("topk?run=a", 400, "parameter 'layer' is required"),
    ("topk?run=a&run=a&layer=conv1", 400, "given 2 times"),
    ("topk?run=a&layer=conv1&step=ten", 400, "must be an integer"),
    ("topk?run=a&layer=conv1&step=1e3", 400, "must be an integer"),
    ("topk?run=a&layer=conv1&limit=0", 400, "must be in 1..4096"),
    ("topk?run=a&layer=conv1&offset=-1", 400, "must be in 0.."),
    ("patch?run=a&layer=conv1&unit=0&rank=0&size=4", 400, "must be in 8..512"),
    ("patch?run=a&layer=conv1&unit=0", 400, "parameter 'rank' is required"),
    ("probe_image?run=a", 400, "parameter 'index' is required"),
    ("topk?run=nope&layer=conv1", 404, "runs with convviz data: 'a', 'other_probe', 'same_probe'"),
    ("topk?run=a&layer=conv9", 404, "layers: 'conv1', 'conv2', 'conv3', 'fc'"),
    ("topk?run=a&layer=conv1&step=5", 404, "12 checkpoints from 0 to 110; nearest: 0, 10"),
    ("topk?run=a&layer=conv1&step=99999999999999", 404, "nearest: 110"),
    ("patch?run=a&layer=conv1&unit=6&rank=0", 404, "6 units in layer 'conv1', 0..5"),
    ("mosaic?run=a&layer=conv1&unit=-1", 404, "unit -1 does not exist"),
    ("patch?run=a&layer=conv1&unit=0&rank=5", 404, "5 records per unit (k)"),
    ("evolution?run=a&layer=fc&unit=99", 404, "unit 99 does not exist"),
    ("compare?run=a&layer=conv1&step=0", 400, "parameter 'other_step' is required"),
    ("compare?run=a&layer=conv1&other_run=nope&other_step=0", 404, "run 'nope' has no convviz data"),
    ("probe_image?run=a&index=1000", 404, "is not stored"),
])
def test_errors_are_json_and_say_what_is_valid(served, route, status, fragment):
    assert fragment in served.json(route, status=status)["error"]


@pytest.mark.parametrize("path", [
    "static/../convviz_plugin.py", "static/%2e%2e/%2e%2e/setup.py", "static//etc/passwd",
    "static/..%2f..%2fsetup.py", "static/index.js%00.js", "static/nope.js", "static/api.py",
])
def test_static_refuses_path_tricks(served, path):
    resp = served.get(path)
    assert resp.status_code == 404 and "error" in json.loads(resp.get_data())


def test_static_serves_the_frontend_module(served):
    from tb_convviz.plugin.convviz_plugin import frontend_dir

    if not os.path.isfile(os.path.join(frontend_dir(), "index.js")):
        pytest.skip("frontend/index.js is not there yet")
    resp = served.get("static/index.js")
    assert resp.status_code == 200 and resp.mimetype == "text/javascript"
    assert b"export" in resp.get_data()
    assert resp.headers["X-Content-Type-Options"] == "nosniff"  # went through http_util.Respond


def _topk_summary(info: plugin_data_pb2.LayerInfo, payload: bytes, content: bytes | None = None):
    pb = summary.topk_pb(info, payload)
    if content is not None:
        pb.value[0].metadata.plugin_data.content = content
    return pb


def test_live_run_new_checkpoints_and_half_written_records(tmp_path):
    written = write_synthetic_run(str(tmp_path / "live"), checkpoints=3, layers=1, units=4, k=3,
                                  probe_size=12, image_size=8)
    served = Served(tmp_path)
    assert served.json("topk?run=live&layer=conv1")["step"] == 20
    before = served.png("mosaic?run=live&layer=conv1&unit=0")
    info = written.layers[0]
    newer = written.records["conv1"][-1].copy()
    newer["value"] += 1
    writer = summary.EventWriter(str(tmp_path / "live"), filename_suffix=".more")
    writer.write(_topk_summary(info, newer.tobytes()), 30)
    writer.close()
    event_file = next(p for p in (tmp_path / "live").iterdir() if p.name.endswith(".more"))
    with open(event_file, "ab") as f:  # the start of a record whose writer was killed
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x12\x34")
    served.reload()
    run = served.json("runs")["runs"][0]
    assert run["steps"] == [0, 10, 20, 30] and run["error"] is None
    latest = served.json("topk?run=live&layer=conv1")
    assert latest["step"] == 30
    assert latest["units"][0]["records"][0]["value"] == pytest.approx(float(newer[0, 0]["value"]))
    np.testing.assert_array_equal(served.png("mosaic?run=live&layer=conv1&unit=0"), before)


def test_a_layer_is_read_once_until_a_reload_changes_it(tmp_path):
    written = write_synthetic_run(str(tmp_path / "run"), checkpoints=4, layers=2, units=3, k=2,
                                  probe_size=8, image_size=8)
    served = Served(tmp_path)
    for step in written.steps:
        served.json(f"topk?run=run&layer=conv1&step={step}")
        served.png(f"mosaic?run=run&layer=conv1&step={step}&unit=2")
    assert served.provider.tensor_reads == [("run", "convviz/topk/conv1")]
    served.reload()  # nothing new: nothing is read again
    served.json("topk?run=run&layer=conv1")
    assert len(served.provider.tensor_reads) == 1
    writer = summary.EventWriter(str(tmp_path / "run"), filename_suffix=".more")
    writer.write(summary.topk_pb(written.layers[0], written.records["conv1"][0].tobytes()), 40)
    writer.close()
    served.reload()
    assert served.json("topk?run=run&layer=conv1")["step"] == 40
    assert served.provider.tensor_reads[1:] == [("run", "convviz/topk/conv1")]


def test_byte_lru_keeps_the_most_recently_used_within_its_budget():
    cache = ByteLRU(max_bytes=10, entry_overhead=0)  # each entry also pays its key: 1 byte here
    cache.put("a", 1, 4)
    cache.put("b", 2, 4)
    assert cache.get("a") == 1  # now "b" is the least recently used
    cache.put("c", 3, 4)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), cache.nbytes) == (1, None, 3, 10)
    cache.put("huge", 4, 7)
    assert cache.get("huge") is None and cache.nbytes == 10


def test_foreign_and_corrupted_plugin_data_are_reported_not_fatal(tmp_path):
    written = write_synthetic_run(str(tmp_path / "mixed"), checkpoints=2, layers=1, units=2, k=2,
                                  probe_size=4, image_size=8)
    good = written.layers[0]
    newer = plugin_data_pb2.PluginData(version=metadata.PROTO_VERSION + 1)
    newer.layer.CopyFrom(good)
    newer.layer.name = "future"
    writer = summary.EventWriter(str(tmp_path / "mixed"), filename_suffix=".foreign")
    future = plugin_data_pb2.LayerInfo(name="future")
    writer.write(_topk_summary(future, b"", content=newer.SerializeToString()), 0)
    writer.write(_topk_summary(plugin_data_pb2.LayerInfo(name="garbage"), b"", content=b"\xff\xfe\x00junk"), 0)
    writer.write(_topk_summary(good, b"short payload"), 20)  # wrong size: this step is skipped
    writer.close()
    run = Served(tmp_path).json("runs")["runs"][0]
    assert [layer["name"] for layer in run["layers"]] == ["conv1"]
    assert run["layers"][0]["steps"] == [0, 10]
    assert "upgrade with `pip install -U tb-convviz`" in run["error"]
    assert "corrupted convviz plugin data" in run["error"]
    assert "step 20" in run["error"] and "expected 48" in run["error"]


def test_missing_records_and_undecodable_images_answer_404_not_500(tmp_path):
    written = write_synthetic_run(str(tmp_path / "gaps"), checkpoints=1, layers=1, units=2, k=4,
                                  probe_size=64, image_size=8)
    free = next(i for i in range(64) if i not in written.stored)
    rec = written.records["conv1"][0].copy()
    rec[0, 3]["image"] = -1  # fewer probe images than k had a value
    rec[1, 0]["image"] = free
    writer = summary.EventWriter(str(tmp_path / "gaps"), filename_suffix=".gaps")
    writer.write(summary.probe_chunk_pb(written.probe, [free], [0], [b"not an image"]), 100)
    writer.write(summary.topk_pb(written.layers[0], rec.tobytes()), 10)
    writer.close()
    served = Served(tmp_path)
    units = served.json("topk?run=gaps&layer=conv1")["units"]
    assert [r["rank"] for r in units[0]["records"]] == [0, 1, 2]
    assert "no record at rank 3" in served.json("patch?run=gaps&layer=conv1&unit=0&rank=3", status=404)["error"]
    mosaic = served.png("mosaic?run=gaps&layer=conv1&unit=0")
    assert (mosaic[-4:, -4:, 3] == 0).all()  # the missing fourth patch is left transparent
    body = served.json("patch?run=gaps&layer=conv1&unit=1&rank=0", status=404)
    assert f"probe image {free} is stored but cannot be decoded" in body["error"]


def test_a_blob_tensor_of_the_wrong_shape_is_skipped(tmp_path):
    written = write_synthetic_run(str(tmp_path / "odd"), checkpoints=2, layers=1, units=2, k=2,
                                  probe_size=4, image_size=8)
    info = written.layers[0]
    md = metadata.create_summary_metadata(info, summary_pb2.DATA_CLASS_TENSOR)
    bad = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=metadata.topk_tag(info.name), metadata=md, tensor=tensor_util.make_tensor_proto(np.zeros(3, np.float32)))])
    writer = summary.EventWriter(str(tmp_path / "odd"), filename_suffix=".odd")
    writer.write(bad, 20)
    writer.close()
    run = Served(tmp_path).json("runs")["runs"][0]
    assert run["steps"] == [0, 10]
    assert "not a string scalar" in run["error"]


def test_images_of_an_explicit_step_may_be_cached_latest_may_not(served, logs):
    step = logs[1]["a"].steps[1]
    pinned = served.get(f"mosaic?run=a&layer=conv1&step={step}&unit=0")
    latest = served.get("mosaic?run=a&layer=conv1&unit=0")
    assert "max-age=600" in pinned.headers["Cache-Control"]
    assert "max-age" not in latest.headers.get("Cache-Control", "") or "max-age=0" in latest.headers["Cache-Control"]
    boxed_latest = served.get("probe_image?run=a&layer=conv1&unit=0&rank=0")
    assert "max-age=600" not in boxed_latest.headers.get("Cache-Control", "")


def test_topk_reads_the_images_of_its_first_tiles_ahead_of_their_mosaics(tmp_path):
    run = write_synthetic_run(str(tmp_path / "r"), checkpoints=1, layers=1, units=2 * WARM_UNITS, k=3,
                              probe_size=400, image_size=8, seed=5)
    served = Served(tmp_path)
    served.json("runs")  # reads the probe chunks' index
    reads = served.provider.blob_reads
    listed = len(reads)
    served.json(f"topk?run=r&layer=conv1&step={run.steps[0]}")
    first = set(run.records["conv1"][0, :WARM_UNITS]["image"].ravel().tolist()) & set(run.stored)
    assert len(first) < len(set(run.records["conv1"][0]["image"].ravel().tolist()) & set(run.stored))
    wait_for(lambda: len(reads) - listed >= len(first), timeout=30)
    for unit in range(WARM_UNITS):  # the first tiles' mosaics read no image again
        served.png(f"mosaic?run=r&layer=conv1&step={run.steps[0]}&unit={unit}")
    assert len(reads) - listed == len(set(reads[listed:])) == len(first)
