"""Crafted event files (issue 19): each costs a bounded, small amount of work and answers 4xx, never 500.

The runs come from ``crafted_runs`` (tb-convviz's own writer). Requests go through
TensorBoard's WSGI app and Python loader; the key ones also through a real ``tensorboard``
under both loaders, whose peak memory must not grow by what decoding a bomb would take.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from crafted_runs import BASE, BIG_PROBE_SIDE, BOMB_SIDE, FIELD, probe_bomb_index, records_of, write_crafted_runs
from tb_convviz import projection_format as fmt
from tb_convviz import read_run, stored_image
from tb_convviz.cli import main
from tb_convviz.plugin import render
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import get, tensorboard_process, wait_for
from test_plugin_http import API, Served


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    return str(root), write_crafted_runs(str(root))


@pytest.fixture(scope="module")
def served(crafted):
    return Served(crafted[0])


def _png(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return np.asarray(Image.open(io.BytesIO(resp.get_data())))


def _error(resp, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    return json.loads(resp.get_data())["error"]


def test_the_listing_of_crafted_runs_answers(served):
    runs = {r["run"]: r for r in served.json("runs")["runs"]}
    assert set(runs) == {"ranks", "projection_bomb", "wrong_size", "unclipped4096", "filters0", "probe_bomb",
                         "big_probe"}
    assert runs["filters0"]["filters"] is None  # a [4, 3, 0, 5] filter tensor is no filters
    (layer,) = runs["wrong_size"]["layers"]
    assert layer["projections"] is None and "7x5" in runs["wrong_size"]["error"]


def test_absurd_ranks_in_a_projection_index_are_skipped(served):
    # Unit 0 has ranks 0 and 2^31-1: one tile, not 2^31 of them.
    mosaic = _png(served.get("projection_mosaic?run=ranks&layer=conv1&unit=0"))
    assert mosaic.shape == (FIELD, FIELD, 4) and (mosaic[..., 3] == 255).all()
    # Unit 1 has only ranks -1 and -5: nothing was projected for it.
    assert "was not projected" in _error(served.get("projection_mosaic?run=ranks&layer=conv1&unit=1"), 404)
    assert "was not projected" in _error(served.get("projection?run=ranks&layer=conv1&unit=1"), 404)
    assert _png(served.get("projection?run=ranks&layer=conv1&unit=0")).shape[:2] == (FIELD, FIELD)


def test_a_projection_bomb_is_refused_from_its_header(served):
    error = _error(served.get("projection?run=projection_bomb&layer=conv1&unit=0"), 404)
    assert f"{BOMB_SIDE}x{BOMB_SIDE}" in error and f"declares {FIELD}x{FIELD}" in error
    assert _png(served.get("projection?run=projection_bomb&layer=conv1&unit=1")).shape[:2] == (FIELD, FIELD)
    # In a row, the bomb is an empty cell beside the good one... of its own unit only.
    assert _png(served.get("row?run=projection_bomb&layer=conv1&unit=1&steps=0")).shape[:2] == (FIELD, FIELD)


def test_decoding_checks_the_header_before_the_pixels():
    from crafted_runs import png, webp

    with pytest.raises(ValueError, match=f"stored as {BOMB_SIDE}x{BOMB_SIDE} pixels, but its record declares 4x4"):
        fmt.decode_pixels(webp(BOMB_SIDE, BOMB_SIDE), 3, FIELD, FIELD)
    with pytest.raises(ValueError, match="declares 16x16"):
        stored_image.decode(png(BOMB_SIDE, BOMB_SIDE), 16, 16, what="probe image 3")
    grey = stored_image.decode(png(20, 10), 10, 20)
    assert grey.shape == (10, 20) and (grey == 100).all()


def test_a_probe_image_bomb_is_a_missing_tile(served, crafted):
    written = crafted[1]["probe_bomb"]
    bomb = probe_bomb_index(written)
    error = _error(served.get(f"probe_image?run=probe_bomb&index={bomb}"), 404)
    assert f"{BOMB_SIDE}x{BOMB_SIDE}" in error and "declares 16x16" in error
    mosaic = _png(served.get("mosaic?run=probe_bomb&layer=conv1&unit=0"))
    side = written.fields["conv1"].size[0]
    assert tuple(mosaic[0, 0, :3]) == render.MISSING_COLOR  # rank 0's tile is the "missing" cross
    assert tuple(mosaic[0, side + 1 + side // 2, :3]) != render.MISSING_COLOR


def test_probe_images_larger_than_declared_are_never_decoded(served, crafted):
    # Nine 4096^2 images where the probe set declares 16x16: the mosaic is nine "missing" crosses.
    mosaic = _png(served.get("mosaic?run=big_probe&layer=conv1&unit=0"))
    side = crafted[1]["big_probe"].fields["conv1"].size[0]
    corners = mosaic[::side + 1, ::side + 1, :3].reshape(-1, 3)
    assert len(corners) == 9 and all(tuple(c) == render.MISSING_COLOR for c in corners)
    assert "declares 16x16" in _error(served.get("patch?run=big_probe&layer=conv1&unit=0&rank=0"), 404)


def test_a_projection_of_another_size_than_its_layer_is_a_clear_404(served):
    for route in ("projection_mosaic?run=wrong_size&layer=conv1&unit=0",
                  "projection?run=wrong_size&layer=conv1&unit=0",
                  "row?run=wrong_size&layer=conv1&unit=0&steps=0&size=16"):
        error = _error(served.get(route), 404)
        assert "7x5 pixels (height x width)" in error and f"field is {FIELD}x{FIELD}" in error, error


def test_an_unclipped_4096_projection_is_bounded(served):
    image = _png(served.get("projection?run=unclipped4096&layer=conv1&unit=0"))
    assert image.shape[0] * image.shape[1] <= render.MAX_OUTPUT_PIXELS
    row = _png(served.get("row?run=unclipped4096&layer=conv1&unit=0&steps=0&size=64"))
    assert row.shape[:2] == (64, 64) and (row[..., 3] == 255).all()
    # Five cells of 4096^2 decoded pixels are more than a request may decode.
    error = _error(served.get("row?run=unclipped4096&layer=conv1&unit=0&steps=0,0,0,0,0&size=8"), 400)
    assert f"more than the {render.MAX_DECODED_PIXELS}" in error


def test_a_zero_size_filter_tensor_is_not_logged_filters(served):
    assert "not logged" in _error(served.get("filter_mosaic?run=filters0"), 404)
    assert "not logged" in _error(served.get("filters?run=filters0"), 404)


@pytest.mark.parametrize("run, message", [
    ("wrong_size", "stored at 7x5 pixels (height x width)"),
    ("projection_bomb", f"stored as {BOMB_SIDE}x{BOMB_SIDE} pixels"),
])
def test_export_says_what_is_wrong_with_crafted_projections(crafted, tmp_path, capsys, run, message):
    code = main(["export", "--logdir", crafted[0], "--run", run, "--layer", "conv1", "--units", "0",
                 "--projections", "--out", str(tmp_path / "fig.png")])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "broadcast" not in err, err


def test_export_of_a_probe_bomb_says_which_image(crafted, tmp_path, capsys):
    bomb = probe_bomb_index(crafted[1]["probe_bomb"])
    code = main(["export", "--logdir", crafted[0], "--run", "probe_bomb", "--layer", "conv1", "--units", "0",
                 "--out", str(tmp_path / "fig.png")])
    err = capsys.readouterr().err
    assert code == 1 and f"probe image {bomb} is stored as {BOMB_SIDE}x{BOMB_SIDE}" in err, err
    run = read_run(os.path.join(crafted[0], "probe_bomb"))
    good = int(records_of(crafted[1]["probe_bomb"], 0)[1]["image"])
    assert run.probe_image(good).shape == (BASE["image_size"], BASE["image_size"], 3)


# Decoding the 13000^2 bomb takes +0.5 GB at least (RGB); nine 4096^2 images +0.45 GB.
BOMB_BYTES = 200 << 20


@pytest.mark.parametrize("load_fast", [True, False])
def test_bombs_cost_a_real_tensorboard_no_memory(crafted, load_fast):
    written = crafted[1]
    routes = ["projection?run=projection_bomb&layer=conv1&unit=0",
              f"probe_image?run=probe_bomb&index={probe_bomb_index(written['probe_bomb'])}",
              "mosaic?run=probe_bomb&layer=conv1&unit=0",
              "mosaic?run=big_probe&layer=conv1&unit=0",
              "projection_mosaic?run=ranks&layer=conv1&unit=0",
              "projection_mosaic?run=wrong_size&layer=conv1&unit=0",
              "filter_mosaic?run=filters0"]
    with tensorboard_process(crafted[0], load_fast=load_fast) as tb:
        api = tb.url + API.lstrip("/")
        wait_for(lambda: (lambda r: r[0] == 200 and len(json.loads(r[2])["runs"]) == 7)(get(api + "runs")))
        get(api + "topk?run=big_probe&layer=conv1")
        before = tb.peak_rss_bytes()
        statuses = [get(api + route)[0] for route in routes]
        grown = tb.peak_rss_bytes() - before
    assert statuses == [404, 404, 200, 200, 200, 404, 404]
    assert grown < BOMB_BYTES, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def _loop_logdirs(root: str) -> tuple[str, str]:
    """A log dir of run ``a``, a link to it in ``b``, and ``loop -> .``; and a log dir that is itself a run, with a loop."""
    runs = os.path.join(root, "runs")
    write_synthetic_run(os.path.join(runs, "a"), **BASE)
    os.makedirs(os.path.join(runs, "b"))
    os.symlink(os.path.join(runs, "a"), os.path.join(runs, "b", "link_to_a"))
    os.symlink(runs, os.path.join(runs, "loop"))
    itself = os.path.join(root, "itself")
    write_synthetic_run(itself, **BASE)
    os.makedirs(os.path.join(itself, "sub"))
    os.symlink("..", os.path.join(itself, "sub", "up"))  # back to the run: a loop too
    return runs, itself


def test_runs_reached_through_a_symlink_loop_are_skipped(tmp_path):
    runs, itself = _loop_logdirs(str(tmp_path))
    assert [r["run"] for r in Served(runs).json("runs")["runs"]] == ["a", "b/link_to_a"]
    assert [r["run"] for r in Served(itself).json("runs")["runs"]] == ["."]
    assert "no convviz data" in Served(runs).json("topk?run=loop/a&layer=conv1", 404)["error"]
    for load_fast in (True, False):  # the Rust loader skips the loop itself; the plugin makes the Python one agree
        with tensorboard_process(runs, load_fast=load_fast) as tb:
            api = tb.url + API.lstrip("/")
            wait_for(lambda: (lambda r: r[0] == 200 and len(json.loads(r[2])["runs"]) >= 2)(get(api + "runs")))
            assert [r["run"] for r in json.loads(get(api + "runs")[2])["runs"]] == ["a", "b/link_to_a"]
