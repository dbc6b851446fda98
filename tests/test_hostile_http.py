"""Hostile and malformed input: every HTTP route under hypothesis, hostile names, foreign plugin data.

Requests go through TensorBoard's own WSGI app and Python loader (``Served`` from
``test_plugin_http``); the foreign-data check also runs against a real ``tensorboard``
with the Rust loader.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import urllib.parse

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from tb_convviz import metadata, plugin_data_pb2, read_run, summary
from tb_convviz.geometry import ReceptiveField
from tb_convviz.plugin import render
from tb_convviz.plugin.convviz_plugin import MAX_LIMIT, frontend_dir
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import PLUGIN_API, get, served_runs, tensorboard_server, wait_for
from test_plugin_http import API, Served

HOSTILE = '<img src=x onerror="alert(1)"> \'quoted\' &amp; </script><script>alert(2)</script>'
HOSTILE_RUN = '<b onmouseover="alert(3)">run</b> \'ü\' &lt;'  # a directory name: no "/"
HOSTILE_LAYER = "features.<script>alert('layer')</script>" + "é\"" * 1500
HOSTILE_CLASSES = [HOSTILE, "x" * 5000, "ascii", "中文 \"quotes\" 'single'"]
SETTINGS = settings(max_examples=60, deadline=None)

ROUTES = {
    "runs": (),
    "stats": ("run",),
    "topk": ("run", "layer", "step", "offset", "limit"),
    "patch": ("run", "layer", "step", "unit", "rank", "size"),
    "mosaic": ("run", "layer", "step", "unit", "size"),
    "evolution": ("run", "layer", "unit"),
    "compare": ("run", "layer", "step", "other_step", "other_run"),
    "probe_image": ("run", "index", "layer", "unit", "rank", "step"),
}
PNG_ROUTES = {"patch", "mosaic", "probe_image"}


def write_hostile_run(logdir: str, layer: str = HOSTILE_LAYER, class_names=HOSTILE_CLASSES) -> None:
    """A one-layer run named by its directory, with layer and class names ``layer`` and ``class_names``."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    probe = plugin_data_pb2.ProbeInfo(n=4, height=8, width=8, channels=3, class_names=class_names,
                                      fingerprint="hostile")
    info = plugin_data_pb2.LayerInfo(
        name=layer, index=1, units=2, k=2, fmap_h=8, fmap_w=8, input_h=8, input_w=8, probe_fingerprint="hostile",
        receptive_field=ReceptiveField(size=(3, 3), stride=(1, 1), offset=(0.0, 0.0)).to_proto(),
    )
    records = np.zeros((2, 2), metadata.RECORD_DTYPE)
    records["image"], records["value"], records["y"], records["x"] = [[0, 1], [2, 3]], [[2, 1], [4, 3]], 1, 2
    os.makedirs(logdir, exist_ok=True)
    writer = summary.EventWriter(logdir)
    labels = [i if i < len(class_names) else 0 for i in range(4)]  # images 0..3 show class names 0..3
    writer.write(summary.probe_chunk_pb(probe, [0, 1, 2, 3], labels, [summary.encode_image(i) for i in images]), 0)
    writer.write(summary.topk_pb(info, records.tobytes()), 5)
    writer.close()


def write_foreign_run(logdir: str, content: bytes) -> None:
    """A run whose every convviz series carries plugin data ``content`` (but valid payloads)."""
    with tempfile.TemporaryDirectory() as tmp:
        written = write_synthetic_run(tmp, checkpoints=1, layers=1, units=2, k=2, probe_size=4, image_size=8)
    os.makedirs(logdir)
    writer = summary.EventWriter(logdir)
    chunk = summary.probe_chunk_pb(written.probe, [0], [0], [summary.encode_image(written.images[0])])
    topk = summary.topk_pb(written.layers[0], written.records["conv1"][0].tobytes())
    for pb, step in ((chunk, 0), (topk, 0)):
        for value in pb.value:
            value.metadata.plugin_data.content = content
        writer.write(pb, step)
    writer.close()


def future_content() -> bytes:
    newer = plugin_data_pb2.PluginData(version=99)
    newer.layer.name = "conv1"
    return newer.SerializeToString()


CORRUPT = b"\x0a\xff\xff\xff\xff\x0f garbage \x00\x01"


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    write_synthetic_run(str(root / "a"), checkpoints=3, layers=2, units=5, k=4, probe_size=16,
                        image_size=12, fc_layer=True)
    write_hostile_run(str(root / HOSTILE_RUN))
    write_foreign_run(str(root / "future"), future_content())
    write_foreign_run(str(root / "corrupt"), CORRUPT)
    return str(root)


@pytest.fixture(scope="module")
def served(logs):
    return Served(logs)


def _check_response(resp, route: str) -> None:
    """The properties every plugin response has, whatever was asked."""
    assert resp.status_code in (200, 400, 404), resp.get_data(as_text=True)[:500]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    if resp.status_code != 200 or route not in PNG_ROUTES:
        assert resp.mimetype == "application/json"
        body = json.loads(resp.get_data())
        if resp.status_code != 200:
            assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
            assert "internal error" not in body["error"]
        elif route == "topk":
            assert len(body["units"]) <= MAX_LIMIT
        return
    assert resp.mimetype == "image/png"
    image = Image.open(io.BytesIO(resp.get_data()))
    # Bounded by `size` (<= 512; every logged field and image here is smaller), whatever was asked.
    side = render.MAX_SIZE
    assert max(image.size) <= (3 * side + 2 if route == "mosaic" else side)


# Consistent (run, layer, steps, units, k) targets that answer 200; mutations then break them.
_TARGETS = [("a", layer, (0, 10, 20), 5, 4) for layer in ("conv1", "conv2", "fc")] + [
    (HOSTILE_RUN, HOSTILE_LAYER, (5,), 2, 2)]


def _valid(draw, name: str, target) -> str:
    run, layer, steps, units, k = target
    choices = {
        "run": st.just(run), "other_run": st.just(run), "layer": st.just(layer),
        "step": st.sampled_from(steps), "other_step": st.sampled_from(steps),
        "unit": st.integers(0, units - 1), "rank": st.integers(0, k - 1), "size": st.integers(8, 512),
        "index": st.integers(0, 3), "offset": st.integers(0, units), "limit": st.integers(1, units + 1),
    }
    return str(draw(choices[name]))


_ODD = ["", "-1", "-0", "+1", "007", "513", "4097", "2147483648", "9" * 18, "9" * 19, "1e3", "0x10", " 1",
        "1 ", "1.0", "\u0661", "NaN", "inf", "nope", "A", "a ", "conv1 ", "../a", "a/../a", "%00", "\0",
        "future", "corrupt", "conv1", "fc", HOSTILE_LAYER]
_HOSTILE_VALUES = st.one_of(
    st.sampled_from(_ODD),
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=40),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)


@st.composite
def queries(draw, route: str) -> str:
    """A plausible query for ``route``, then a few mutations: odd values, dropped or repeated parameters."""
    target = draw(st.sampled_from(_TARGETS))
    names = ROUTES[route]
    if route == "probe_image":  # a probe index, or a record that names one
        names = draw(st.sampled_from([("run", "index"), ("run", "layer", "unit", "rank", "step")]))
    pairs = [(name, _valid(draw, name, target)) for name in names] or [("unknown", draw(_HOSTILE_VALUES))]
    for kind, i in draw(st.lists(st.tuples(st.sampled_from(["odd", "drop", "repeat"]), st.integers(0, 99)),
                                 max_size=3)):
        if not pairs:
            break
        i %= len(pairs)
        if kind == "odd":
            pairs[i] = (pairs[i][0], draw(_HOSTILE_VALUES))
        elif kind == "drop":
            del pairs[i]
        else:
            pairs.append((pairs[i][0], draw(_HOSTILE_VALUES) if draw(st.booleans()) else pairs[i][1]))
    # Bytes, not str: latin-1 sends percent-encoded bytes that are not valid UTF-8.
    encode = draw(st.sampled_from(["utf-8", "latin-1"]))
    return urllib.parse.urlencode([(n, v.encode(encode, "replace")) for n, v in pairs])


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_route_answers_json_errors_or_bounded_data_never_500(served, route):
    @SETTINGS
    @given(query=queries(route))
    def check(query):
        _check_response(served.get(f"{route}?{query}"), route)

    check()


_SEGMENTS = st.one_of(
    st.sampled_from(["..", ".", "", "%2e%2e", "%2E%2E", "..%2f", "%2f", "%5c", "..\\", "%00", "index.js",
                     "style.css", "..%00.js", "~", "etc", "passwd", "convviz_plugin.py", "%252e%252e", "\u2025",
                     "plugin", "tb_convviz", "setup.py", "index.js.py", "INDEX.JS", "index.js/.", "frontend"]),
    st.text(max_size=12),
)


@pytest.fixture(scope="module")
def frontend_files() -> list[bytes]:
    contents = []
    for top, _, names in os.walk(os.path.realpath(frontend_dir())):
        for name in names:
            with open(os.path.join(top, name), "rb") as f:
                contents.append(f.read())
    return contents


@SETTINGS
@given(segments=st.lists(_SEGMENTS, min_size=1, max_size=6))
def test_static_serves_only_frontend_files(served, frontend_files, segments):
    path = urllib.parse.quote("/".join(segments), safe="/%\\.~")
    # Only what TensorBoard routes to the plugin: it re-parses the decoded path (so "#", "?" and ";"
    # end it) and drops one trailing "/"; anything else gets TensorBoard's own plain-text 404.
    routed = urllib.parse.urlparse(urllib.parse.unquote(API + "static/" + path)).path
    assume(routed.startswith(API + "static/") and routed != API + "static/")
    resp = served.client.get(API + "static/" + path)
    assert resp.status_code in (200, 404), resp.status_code
    if resp.status_code == 404:
        assert resp.mimetype == "application/json" and "error" in json.loads(resp.get_data())
        return
    assert resp.get_data() in frontend_files  # byte for byte a file of the frontend folder


def test_huge_responses_are_refused_or_bounded(served):
    assert "must be in 8..512" in served.json("mosaic?run=a&layer=conv1&unit=0&size=513", 400)["error"]
    assert "must be in 1..4096" in served.json("topk?run=a&layer=conv1&limit=4097", 400)["error"]
    assert "must be in 0.." in served.json(f"topk?run=a&layer=conv1&offset={2**40}", 400)["error"]
    assert served.json("topk?run=a&layer=conv1&offset=4&limit=4096")["units"][0]["unit"] == 4
    assert served.json("topk?run=a&layer=conv1&offset=2147483648")["units"] == []
    mosaic = Image.open(io.BytesIO(served.get("mosaic?run=a&layer=fc&unit=0&size=512").get_data()))
    assert mosaic.size == (2 * 512 + 1, 2 * 512 + 1)  # k=4: a 2x2 grid


def test_hostile_names_round_trip_exactly_as_json_text(served):
    runs = {r["run"]: r for r in served.json("runs")["runs"]}
    run = runs[HOSTILE_RUN]
    assert run["error"] is None
    assert [layer["name"] for layer in run["layers"]] == [HOSTILE_LAYER]
    assert run["probe"]["class_names"] == HOSTILE_CLASSES
    query = urllib.parse.urlencode({"run": HOSTILE_RUN, "layer": HOSTILE_LAYER})
    body = served.json("topk?" + query)
    assert (body["run"], body["layer"]) == (HOSTILE_RUN, HOSTILE_LAYER)
    assert [r["label_name"] for u in body["units"] for r in u["records"]] == HOSTILE_CLASSES
    assert served.png("mosaic?" + query + "&unit=1").shape == (3, 7, 4)
    # JSON, not HTML: a browser will not parse the markup, and errors echo names as JSON strings.
    raw = served.get("topk?" + urllib.parse.urlencode({"run": HOSTILE_RUN, "layer": HOSTILE}))
    assert raw.status_code == 404 and raw.mimetype == "application/json"
    assert repr(HOSTILE) in json.loads(raw.get_data())["error"]


@settings(max_examples=25, deadline=None)
@given(layer=st.text(min_size=1, max_size=300), class_name=st.text(max_size=300))
def test_any_layer_and_class_name_round_trips(layer, class_name):
    with tempfile.TemporaryDirectory() as root:
        write_hostile_run(os.path.join(root, "run"), layer=layer, class_names=[class_name])
        served = Served(root)
        (run,) = served.json("runs")["runs"]
        assert [entry["name"] for entry in run["layers"]] == [layer]
        assert run["probe"]["class_names"] == [class_name]
        body = served.json("topk?" + urllib.parse.urlencode({"run": "run", "layer": layer}))
        assert body["layer"] == layer
        assert body["units"][0]["records"][0]["label_name"] == class_name


def _check_foreign_listing(runs: dict) -> None:
    assert runs["a"]["error"] is None and len(runs["a"]["steps"]) == 3
    assert runs["future"]["layers"] == [] and runs["corrupt"]["layers"] == []
    assert "convviz data format v99 was written by a newer tb-convviz" in runs["future"]["error"]
    assert "upgrade with `pip install -U tb-convviz`" in runs["future"]["error"]
    assert "corrupted convviz plugin data" in runs["corrupt"]["error"]


def test_foreign_plugin_data_is_reported_per_run_and_other_runs_still_work(served):
    _check_foreign_listing({r["run"]: r for r in served.json("runs")["runs"]})
    error = served.json("topk?run=future&layer=conv1", 404)["error"]
    assert "no readable layer 'conv1'" in error and "upgrade" in error
    assert "corrupted" in served.json("mosaic?run=corrupt&layer=conv1&unit=0", 404)["error"]
    assert served.json("topk?run=a&layer=conv2")["total_units"] == 5
    assert served.png("mosaic?run=a&layer=conv2&unit=1").ndim == 3


def test_foreign_plugin_data_under_the_rust_loader(logs):
    with tensorboard_server(logs, load_fast=True) as url:
        base = url + PLUGIN_API
        _check_foreign_listing(wait_for(lambda: {"a", "future", "corrupt"} <= set(runs := served_runs(base))
                                        and len(runs["a"]["steps"]) == 3 and runs))
        status, _, body = get(base + "topk?run=future&layer=conv1")
        assert status == 404 and "upgrade" in json.loads(body)["error"]
        status, content_type, _ = get(base + "mosaic?run=a&layer=conv2&unit=1")
        assert (status, content_type) == (200, "image/png")


def test_read_run_says_what_is_wrong_with_foreign_plugin_data(logs):
    with pytest.raises(metadata.UnsupportedVersionError, match=r"v99 .*upgrade with `pip install -U tb-convviz`"):
        read_run(os.path.join(logs, "future"))
    with pytest.raises(ValueError, match="corrupted convviz plugin data") as caught:
        read_run(os.path.join(logs, "corrupt"))
    assert os.path.join(logs, "corrupt") in str(caught.value)
