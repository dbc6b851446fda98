"""Bounded work per request, bounded caches, and the smaller red-team findings, through TensorBoard's WSGI app."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import uuid

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test

from tb_convviz import ConvVizLogger, metadata, read_run, summary
from tb_convviz.plugin import render
from tb_convviz.plugin.convviz_plugin import ConvVizPlugin
from tb_convviz.reader import DamagedEventFile, event_files
from tb_convviz.synthetic_run import write_synthetic_run
from test_faults import LAYERS, make_model, make_probe
from tb_server import get, tensorboard_server, wait_for
from test_plugin_http import API, Served


def _png(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return np.asarray(Image.open(io.BytesIO(resp.get_data())))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    write_synthetic_run(str(root / "k1024"), checkpoints=1, layers=1, units=2, k=1024, probe_size=1024,
                        image_size=16)
    write_synthetic_run(str(root / "field4096"), checkpoints=1, layers=1, units=2, k=9, probe_size=16,
                        image_size=32, field_size=4096)
    return Served(root)


@pytest.mark.parametrize("query", [
    "mosaic?run=k1024&layer=conv1&unit=0&size=512",
    "mosaic?run=k1024&layer=conv1&unit=0",
    "mosaic?run=field4096&layer=conv1&unit=0",
    "patch?run=field4096&layer=conv1&unit=0&rank=0",
])
def test_large_requests_are_downscaled_to_the_pixel_budget(big, query):
    image = _png(big.get(query))
    assert image.shape[0] * image.shape[1] <= render.MAX_OUTPUT_PIXELS
    assert image.shape[0] > 1 and image.shape[1] > 1


def test_a_downscaled_mosaic_still_shows_every_record(big):
    image = _png(big.get("mosaic?run=k1024&layer=conv1&unit=0&size=512"))
    rows, cols = render.grid_shape(1024)
    tile = (image.shape[0] + 1) // rows - 1
    assert tile >= 8 and (tile + 1) * rows - 1 == image.shape[0]
    assert (image[::tile + 1, ::tile + 1, 3] == 255).all()  # every tile's corner is drawn, opaque


def test_runs_publishes_the_request_limits(big):
    limits = big.json("runs")["limits"]
    assert limits["max_size"] == render.MAX_SIZE and limits["max_output_pixels"] == render.MAX_OUTPUT_PIXELS


def test_caches_and_lock_tables_stay_bounded_whatever_the_experiment_id(tmp_path):
    write_synthetic_run(str(tmp_path / "run"), checkpoints=1, layers=1, units=2, k=2, probe_size=4, image_size=8)
    served = Served(tmp_path)
    context = base_plugin.TBContext(data_provider=served.provider, flags=served.flags, logdir=str(tmp_path))
    plugin = ConvVizPlugin(context)
    data = plugin._data
    data._series.max_entries = 50
    data.images.max_entries = plugin._render.pngs.max_entries = 50
    client = werkzeug_test.Client(application.TensorBoardWSGI([plugin]))
    for _ in range(300):
        eid = uuid.uuid4().hex * 4
        for route in ("runs", "mosaic?run=run&layer=conv1&unit=0", "topk?run=run&layer=conv1"):
            resp = client.get(f"/experiment/{eid}{API}{route}")
            assert resp.status_code == 200, resp.get_data(as_text=True)
    for cache in (data._series, data.images, plugin._render.pngs, data.damaged):
        assert len(cache) <= cache.max_entries and cache.nbytes <= cache.max_bytes
    assert len(data._flight) <= 64


@pytest.mark.parametrize("method", ["POST", "OPTIONS", "DELETE", "PUT"])
@pytest.mark.parametrize("route", ["runs", "topk?run=k1024&layer=conv1", "static/index.js"])
def test_other_methods_than_get_answer_405(big, method, route):
    resp = big.client.open(API + route, method=method)
    assert resp.status_code == 405 and resp.headers["Allow"] == "GET, HEAD"
    assert "GET" in json.loads(resp.get_data())["error"]


@pytest.mark.parametrize("value", ["+1", " 1", "1.0", "0x1"])
def test_integers_are_decimal_as_documented(big, value):
    error = big.json(f"topk?run=k1024&layer=conv1&offset={value}", status=400)["error"]
    assert "must be an integer" in error


def test_compare_pages_like_topk(tmp_path):
    write_synthetic_run(str(tmp_path / "run"), checkpoints=2, layers=1, units=10, k=3, probe_size=16, image_size=8)
    served = Served(tmp_path)
    whole = served.json("compare?run=run&layer=conv1&step=0&other_step=10")
    assert whole["total_units"] == 10 and [u["unit"] for u in whole["units"]] == list(range(10))
    page = served.json("compare?run=run&layer=conv1&step=0&other_step=10&offset=4&limit=3")
    assert (page["offset"], page["total_units"]) == (4, 10) and page["units"] == whole["units"][4:7]
    assert page["mean_overlap"] == whole["mean_overlap"]


def test_an_undecodable_image_is_a_missing_tile_and_the_rest_is_served(tmp_path):
    written = write_synthetic_run(str(tmp_path / "run"), checkpoints=1, layers=1, units=1, k=4, probe_size=4,
                                  image_size=8)
    path, = event_files(str(tmp_path / "run"))
    with open(path, "rb") as f:
        data = f.read()
    good = summary.encode_image(written.images[2])
    start = data.index(good)
    broken = bytearray(data)
    broken[start + 20:start + 40] = b"\0" * 20  # damage the PNG inside a valid record
    events = [e for e in _events(bytes(broken))]
    with open(path, "wb") as f:
        for event in events:
            f.write(summary.frame_record(event))
    served = Served(tmp_path)
    mosaic = _png(served.get("mosaic?run=run&layer=conv1&unit=0"))
    rank = list(written.records["conv1"][0, 0]["image"]).index(2)
    side = written.fields["conv1"].size[0]
    rows, cols = render.grid_shape(4)
    for r in range(4):
        top, left = (r // cols) * (side + 1), (r % cols) * (side + 1)
        tile = mosaic[top:top + side, left:left + side]
        assert (tile[..., 3] == 255).all()
        if r == rank:  # the "missing" cross: its corners are drawn in the missing colour
            assert tuple(tile[0, 0, :3]) == render.MISSING_COLOR
    assert served.get(f"patch?run=run&layer=conv1&unit=0&rank={rank}").status_code == 404


def _events(data: bytes):
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        yield data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4


def test_an_image_blob_naming_another_index_is_an_error_not_wrong_pixels(tmp_path):
    written = write_synthetic_run(str(tmp_path / "run"), checkpoints=1, layers=1, units=2, k=2, probe_size=4,
                                  image_size=8)
    writer = summary.EventWriter(str(tmp_path / "run"), filename_suffix=".swapped")
    chunk = summary.probe_chunk_pb(written.probe, [100, 101], [0, 0], [b"a", b"b"])
    blobs = chunk.value[0].tensor.string_val
    blobs[1], blobs[2] = metadata.encode_image_blob(101, b"x"), metadata.encode_image_blob(100, b"y")
    writer.write(chunk, 99)
    writer.close()
    run = read_run(str(tmp_path / "run"))
    assert "holds probe image 101" in run.errors[0] and 100 not in run.stored_images
    served = Served(tmp_path)
    index = written.stored[0]
    assert served.get(f"probe_image?run=run&index={index}").status_code == 200
    error = served.json("probe_image?run=run&index=100", status=404)["error"]
    assert "holds probe image 101" in error
    assert "holds probe image 101" in served.json("runs")["runs"][0]["error"]
    with tensorboard_server(str(tmp_path), load_fast=True) as url:  # the Rust loader checks the same
        api = url + API.lstrip("/")
        wait_for(lambda: get(api + "runs")[0] == 200 and json.loads(get(api + "runs")[2])["runs"])
        assert get(api + f"probe_image?run=run&index={index}")[0] == 200
        status, _, body = get(api + "probe_image?run=run&index=100")
        assert status == 404 and "holds probe image 101" in json.loads(body)["error"]


def test_a_crafted_record_length_is_reported_as_damage(tmp_path):
    log_dir = str(tmp_path / "run")
    write_synthetic_run(log_dir, checkpoints=1, layers=1, units=2, k=2, probe_size=4, image_size=8)
    path, = event_files(log_dir)
    header = struct.pack("<Q", 1 << 50)
    with open(path, "ab") as f:
        f.write(header + struct.pack("<I", summary.masked_crc(header)) + b"\0" * 64)
    with pytest.raises(DamagedEventFile, match="claims 1125899906842624 bytes"):
        read_run(log_dir)
    with pytest.raises(ValueError, match="is damaged"):
        ConvVizLogger(make_model(), make_probe(), log_dir, layers=LAYERS, k=4)
    export = subprocess.run([sys.executable, "-m", "tb_convviz.cli", "export", "--logdir", log_dir, "--layer",
                             "conv1", "--out", str(tmp_path / "grid.png")], capture_output=True, text=True)
    assert export.returncode != 0 and "is damaged" in export.stderr and "Traceback" not in export.stderr


@pytest.mark.parametrize("during", ["list_tensors", "read_tensors"])
def test_a_series_vanishing_mid_read_is_not_there_yet(tmp_path, during):
    write_synthetic_run(str(tmp_path / "run"), checkpoints=2, layers=1, units=2, k=2, probe_size=4, image_size=8)
    served = Served(tmp_path)
    inner = served.provider._inner
    tensors, call = inner._multiplexer.Tensors, getattr(inner, during)
    racing = {"now": False}

    def vanishing(run, tag):  # what plugin_event_accumulator does while a reload swaps a series in
        if racing["now"] and tag == metadata.topk_tag("conv1"):
            raise KeyError(tag)
        return tensors(run, tag)

    def once(*args, **kwargs):
        racing["now"] = True
        try:
            return call(*args, **kwargs)
        finally:
            racing["now"] = False
            setattr(inner, during, call)

    inner._multiplexer.Tensors = vanishing
    setattr(inner, during, once)
    runs = served.json("runs")["runs"]  # 200: the run, or its layer, is simply not there yet
    assert all(run["error"] is None and run["steps"] == [] for run in runs)
    assert served.json("runs")["runs"][0]["steps"] == [0, 10]  # and nothing empty was kept


def _v1_chunk(probe, indices, labels, images) -> "summary_pb2.Summary":
    """A probe chunk as tb-convviz wrote it before format v2: index tensor + image blobs, paired by step."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util

    from tb_convviz import plugin_data_pb2

    def md(data_class):
        data = plugin_data_pb2.PluginData(version=1)
        data.probe.CopyFrom(probe)
        return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()), data_class=data_class)

    rows = np.stack([np.asarray(indices, np.int32), np.asarray(labels, np.int32)], axis=1)
    blobs = tensor_util.make_tensor_proto(np.array(list(images), dtype=object), shape=[len(images)])
    return summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=metadata.PROBE_INDEX_TAG, metadata=md(summary_pb2.DATA_CLASS_TENSOR),
                                  tensor=tensor_util.make_tensor_proto(rows)),
        summary_pb2.Summary.Value(tag=metadata.PROBE_IMAGES_TAG, metadata=md(summary_pb2.DATA_CLASS_BLOB_SEQUENCE),
                                  tensor=blobs),
    ])


def test_runs_of_format_v1_are_read_where_the_pairing_is_unambiguous(tmp_path):
    from tensorboard.compat.proto import summary_pb2

    log_dir = str(tmp_path / "old")
    os.makedirs(log_dir)
    written = write_synthetic_run(str(tmp_path / "source"), checkpoints=1, layers=1, units=2, k=2, probe_size=6,
                                  image_size=8)
    writer = summary.EventWriter(log_dir)
    encoded = {i: summary.encode_image(written.images[i]) for i in range(6)}
    writer.write(_v1_chunk(written.probe, [0, 1, 2], [0, 0, 0], [encoded[i] for i in (0, 1, 2)]), 0)
    writer.write(_v1_chunk(written.probe, [3, 4], [0, 0], [encoded[i] for i in (3, 4)]), 1)
    # A retry that reused chunk step 1 with other images: under v1 this step is ambiguous.
    writer.write(_v1_chunk(written.probe, [5], [0], [encoded[5]]), 1)
    writer.write(summary_pb2.Summary(value=summary.topk_pb(written.layers[0],
                                                           written.records["conv1"][0].tobytes()).value), 0)
    writer.close()
    run = read_run(log_dir)  # read_run pairs within one record: always unambiguous
    assert run.stored_images == set(range(6)) and run.legacy_chunks
    for i in range(6):
        np.testing.assert_array_equal(run.probe_image(i), written.images[i])
    served = Served(tmp_path)
    listed = {r["run"]: r for r in served.json("runs")["runs"]}["old"]
    assert "probe chunk 1 is stored twice" in listed["error"]
    for i in range(3):  # chunk 0 is unambiguous and served
        np.testing.assert_array_equal(_png(served.get(f"probe_image?run=old&index={i}"))[..., :3], written.images[i])
    for i in (3, 4, 5):  # never a wrong image: not found, saying why in the run's error
        assert served.get(f"probe_image?run=old&index={i}").status_code == 404
    with pytest.raises(ValueError, match="before v2"):
        ConvVizLogger(make_model(), make_probe(), log_dir, layers=LAYERS, k=4)


def test_a_render_waits_its_turn_and_answers_503_when_it_waited_too_long(big, monkeypatch):
    monkeypatch.setattr(render, "RENDER_WAIT_S", 0.2)
    for _ in range(render.CONCURRENT_RENDERS):  # every slot taken by other renders
        assert render._renders.acquire(timeout=5)
    try:
        resp = big.get("mosaic?run=k1024&layer=conv1&unit=1&size=100")
        assert resp.status_code == 503 and "busy" in json.loads(resp.get_data())["error"]
    finally:
        for _ in range(render.CONCURRENT_RENDERS):
            render._renders.release()
    assert big.get("mosaic?run=k1024&layer=conv1&unit=1&size=100").status_code == 200
