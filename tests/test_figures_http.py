"""Projections, the Fig. 4 grid and layer-1 filters: logger -> event files -> read_run and the HTTP routes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz import projection_format as fmt
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.geometry import crop, record_box
from tb_convviz.plugin.figure_routes import MAX_ROW_CELLS
from tb_convviz.projection import Target, project_checkpoint
from tb_convviz.synthetic_run import write_synthetic_run
from test_plugin_http import API, Served

STEPS = [0, 5, 10]


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.get_data())))


def body(response, status=200):
    assert response.status_code == status, response.get_data(as_text=True)
    return json.loads(response.get_data())


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A DemoAlexNet run with top-1 projections, all k at the last step, and filters; plus an old-style run."""
    root = tmp_path_factory.mktemp("figures")
    torch.manual_seed(0)
    model = DemoAlexNet(width=8)
    probe = ProbeSet(torch.rand(24, 3, 64, 64), labels=torch.arange(24) % 3, class_names=["a", "b", "c"])
    weights = []
    logger = ConvVizLogger(model, probe, root / "new", k=4, batch_size=16, steps=STEPS,
                           projections_topk_every="last")
    for step in STEPS:
        with torch.no_grad():
            model.features.conv1.weight[0] *= 3  # one filter grows to dominate
        weights.append(model.features.conv1.weight.detach().clone())
        assert logger.log(step)
    logger.close()
    write_synthetic_run(str(root / "old"), checkpoints=2, units=4, k=4, probe_size=16)
    return root, model, probe, logger, weights


def test_read_run_round_trip(logged):
    root, model, probe, logger, weights = logged
    run = read_run(root / "new")
    for step, w in zip(STEPS, weights):
        np.testing.assert_array_equal(run.filters(step), w.numpy())
    assert run.filter_module == "features.conv1"
    assert run.scalars["convviz/features.conv1/dominant_filters"][STEPS[-1]] >= 1
    # The last step was projected again here, independently, from the same records and model.
    targets = [Target(l.name, l.receptive_field, l.fmap[1] if l.fmap else 0) for l in run.layers]
    records = {l.name: run.topk(l.name, STEPS[-1]) for l in run.layers}
    position = {n: np.where(r.y >= 0, r.y * t.fmap_w + r.x, -1) for (n, r), t in zip(records.items(), targets)}
    from tb_convviz.isolation import preserved
    with preserved(model, no_grad=False):
        again = project_checkpoint(model, probe, targets, {n: r.image for n, r in records.items()}, position,
                                   ranks=4, rule="deconvnet", batch_size=16, device=torch.device("cpu"), dtype=None)
    for layer in run.layers:
        assert run.projection_steps(layer.name) == STEPS
        info = run.projection_info(layer.name)
        assert (info.rule, info.height, info.width) == ("deconvnet", *layer.receptive_field.size)
        index = again[layer.name].index
        assert len(index) == layer.units * 4  # all k at the schedule's last step
        for row, blob in list(zip(index, again[layer.name].images))[:: max(1, len(index) // 12)]:
            stored = run.projection(layer.name, STEPS[-1], int(row["unit"]), int(row["rank"]))
            assert stored.shape == (3, *layer.receptive_field.size)
            box = record_box(layer.receptive_field, layer.fmap is not None, int(row["y"]), int(row["x"]))
            want = fmt.dequantize(fmt.decode_projection(blob, info, box), float(row["scale"]))
            np.testing.assert_allclose(stored, want, rtol=0, atol=float(row["scale"]) / 127 + 1e-7)
            assert np.abs(stored).max() == pytest.approx(float(row["scale"]), rel=1e-6)
        # Top-1 only before the last step.
        with pytest.raises(KeyError, match="not projected"):
            run.projection(layer.name, STEPS[0], 0, rank=1)


def test_projection_lines_up_with_the_patch(logged):
    """The projection's box is the patch's: zero exactly where the patch is padding."""
    root, *_ = logged
    run = read_run(root / "new")
    layer = run.layers[-1]
    records = run.topk(layer.name, STEPS[-1])
    for unit in range(layer.units):
        y, x, image = int(records.y[unit, 0]), int(records.x[unit, 0]), int(records.image[unit, 0])
        inside = crop(np.ones((64, 64), np.uint8), layer.receptive_field.box(y, x), fill=0).astype(bool)
        p = run.projection(layer.name, STEPS[-1], unit)
        assert not p[:, ~inside].any()
        assert run.projection_record(layer.name, STEPS[-1], unit)["image"] == image


@pytest.fixture(scope="module")
def served(logged):
    return Served(logged[0])


def test_runs_lists_projections_and_filters(served):
    runs = {r["run"]: r for r in body(served.client.get(API + "runs"))["runs"]}
    new, old = runs["new"], runs["old"]
    assert new["filters"]["module"] == "features.conv1" and new["filters"]["steps"] == STEPS
    assert new["filters"]["shape"] == [8, 3, 7, 7]
    for layer in new["layers"]:
        p = layer["projections"]
        assert p["rule"] == "deconvnet" and p["steps"] == STEPS and p["topk_steps"] == [STEPS[-1]]
        assert p["size"] == layer["receptive_field"]["size"] and p["uncovered"] == []
        assert p["levels"] == fmt.LEVELS
    assert old["filters"] is None and all(layer["projections"] is None for layer in old["layers"])


def test_projection_png_is_the_stored_projection(served, logged):
    run = read_run(logged[0] / "new")
    layer = run.layers[1]
    stored = run.projection(layer.name, 5, 3)
    scale = float(run.projection_record(layer.name, 5, 3)["scale"])
    image = png(served.client.get(API + f"projection?run=new&layer={layer.name}&step=5&unit=3&field=theoretical"))
    np.testing.assert_array_equal(image.transpose(2, 0, 1), fmt.quantize(stored)[0] if scale else image)
    # By default, the same projection on the record's effective-field crop, as its patch is cut.
    field = run.crop(layer.name, 5)
    assert field.size == run.effective_field(layer.name, 5) and field.size < layer.receptive_field.size
    cut = png(served.client.get(API + f"projection?run=new&layer={layer.name}&step=5&unit=3"))
    np.testing.assert_array_equal(cut.transpose(2, 0, 1), run.projection_pixels(layer.name, 5, 3, field=field))
    row = run.projection_record(layer.name, 5, 3)
    box = field.box(True, int(row["y"]), int(row["x"]))
    theoretical = layer.receptive_field.box(int(row["y"]), int(row["x"]))
    # The effective crop is part of the theoretical one (kept inside the image, it may leave it, where the projection is 0).
    inner = crop(image, (box[0] - theoretical[0], box[1] - theoretical[1], box[2] - theoretical[0], box[3] - theoretical[1]),
                 fill=128)
    np.testing.assert_array_equal(cut, inner)
    common = png(served.client.get(API + f"projection?run=new&layer={layer.name}&step=5&unit=3&scale=common"))
    assert np.abs(common.astype(int) - 128).max() <= np.abs(image.astype(int) - 128).max()
    big = png(served.client.get(API + f"projection?run=new&layer={layer.name}&step=5&unit=3&size=128"))
    assert max(big.shape[:2]) == 128


def test_projection_mosaic_has_k_tiles_where_all_k_were_projected(served, logged):
    run = read_run(logged[0] / "new")
    layer = run.layers[0]
    h, w = layer.receptive_field.size
    last = png(served.client.get(API + f"projection_mosaic?run=new&layer={layer.name}&step=10&unit=1"))
    assert last.shape == (2 * h + 1, 2 * w + 1, 4) and (last[:, :, 3] == 255).sum() == 4 * h * w
    first = png(served.client.get(API + f"projection_mosaic?run=new&layer={layer.name}&step=0&unit=1"))
    assert first.shape == (h, w, 4)


def test_row_is_one_cell_per_step(served, logged):
    run = read_run(logged[0] / "new")
    layer = run.layers[2]
    h, w = layer.receptive_field.size
    row = png(served.client.get(API + f"row?run=new&layer={layer.name}&unit=2&steps=0,5,10&field=theoretical"))
    assert row.shape == (h, 3 * w + 2, 4)
    for i, step in enumerate(STEPS):
        cell = row[:, i * (w + 1):i * (w + 1) + w, :3].transpose(2, 0, 1)
        np.testing.assert_array_equal(cell, fmt.quantize(run.projection(layer.name, step, 2))[0])
    # By default one crop along the row, the largest of its steps' effective fields: one scale, as in Fig. 4.
    field = max((run.crop(layer.name, s) for s in STEPS), key=lambda f: f.size[0] * f.size[1])
    assert field.size < (h, w)
    (eh, ew) = field.size
    row = png(served.client.get(API + f"row?run=new&layer={layer.name}&unit=2&steps=0,5,10"))
    assert row.shape == (eh, 3 * ew + 2, 4)
    for i, step in enumerate(STEPS):
        np.testing.assert_array_equal(row[:, i * (ew + 1):i * (ew + 1) + ew, :3].transpose(2, 0, 1),
                                      run.projection_pixels(layer.name, step, 2, field=field))
    patches = png(served.client.get(API + f"row?run=new&layer={layer.name}&unit=2&steps=10,0&kind=patch&size=32"))
    assert patches.shape == (32, 65, 4)
    old = png(served.client.get(API + "row?run=old&layer=" + read_run(logged[0] / "old").layers[0].name
                                + "&unit=0&steps=0"))
    assert (old[:, :, 3] == 0).all()  # not logged: an empty cell, not an error


def test_fig4_rows(served, logged):
    run = read_run(logged[0] / "new")
    layer = run.layers[3].name
    data = body(served.client.get(API + f"fig4?run=new&layer={layer}&count=5"))
    assert data["steps"] == STEPS and data["projection_steps"] == STEPS
    top1 = np.stack([run.topk(layer, s).image[:, 0] for s in STEPS], axis=1)
    changes = (top1[:, 1:] != top1[:, :-1]).sum(axis=1)
    assert [u["changes"] for u in data["units"]] == sorted(changes, reverse=True)[:5]
    a = body(served.client.get(API + f"fig4?run=new&layer={layer}&rows=random&seed=3&count=4&steps=0,10"))
    b = body(served.client.get(API + f"fig4?run=new&layer={layer}&rows=random&seed=3&count=4&steps=0,10"))
    assert a == b and len(a["units"]) == 4 and a["steps"] == [0, 10]
    picked = body(served.client.get(API + f"fig4?run=new&layer={layer}&rows=units&units=7,2"))
    assert [u["unit"] for u in picked["units"]] == [7, 2]


def test_filters_routes(served, logged):
    weights = logged[4]
    data = body(served.client.get(API + "filters?run=new"))
    assert data["steps"] == STEPS and data["step"] == 10 and data["shape"] == [8, 3, 7, 7]
    rms = np.sqrt((weights[-1].double().numpy().reshape(8, -1) ** 2).mean(axis=1))
    np.testing.assert_allclose(data["rms"], rms, rtol=1e-6)
    assert data["dominant"] == [0] and data["counts"]["dominant"][-1] == 1
    first = body(served.client.get(API + "filters?run=new&step=0"))
    assert first["step"] == 0
    mosaic = png(served.client.get(API + "filter_mosaic?run=new&step=10&size=16"))
    assert mosaic.shape == (3 * 17 - 1, 3 * 17 - 1, 4)
    tile = mosaic[:16, :16, :3]
    assert tile.min() == 0 and tile.max() == 255  # each filter uses the full range on its own


@pytest.mark.parametrize("query, status, says", [
    ("projection?run=old&layer={old}&unit=0", 404, "not logged in this run"),
    ("filters?run=old", 404, "not logged in this run"),
    ("filter_mosaic?run=old", 404, "not logged in this run"),
    ("projection?run=new&layer={new}&unit=0&step=0&rank=2", 404, "only the top-1"),
    ("projection?run=new&layer={new}&unit=0&scale=huge", 400, "own, common"),
    ("row?run=new&layer={new}&unit=0", 400, "'steps' is required"),
    ("row?run=new&layer={new}&unit=0&steps=0,x", 400, "comma-separated"),
    ("row?run=new&layer={new}&unit=0&steps=0,3", 404, "not checkpoints"),
    ("row?run=new&layer={new}&unit=0&steps=" + ",".join(["0"] * (MAX_ROW_CELLS + 1)), 400, "at most"),
    ("row?run=new&layer={new}&unit=0&steps=" + ",".join(["0"] * 100) + "&size=512", 400, "wider than"),
    ("row?run=new&layer={new}&unit=0&steps=0&kind=both", 400, "projection, patch"),
    ("fig4?run=new&layer={new}&rows=units", 400, "'units' is required"),
    ("fig4?run=new&layer={new}&rows=units&units=99", 400, "unit indices"),
    ("fig4?run=new&layer={new}&count=0", 400, "'count' must be in"),
    ("filters?run=new&step=3", 404, "no filters at step 3"),
    ("filter_mosaic?run=new&size=4096", 400, "'size' must be in"),
])
def test_bad_requests_get_json_errors(served, logged, query, status, says):
    old = read_run(logged[0] / "old").layers[0].name
    new = read_run(logged[0] / "new").layers[0].name
    error = body(served.client.get(API + query.format(old=old, new=new)), status)["error"]
    assert says in error


JUNK = ["", "-1", "999999999999999999", "1.5", "x" * 5000, "\u00e9\u0000", "0,", ",", "0" * 19]


@pytest.mark.parametrize("route, params", [
    ("projection", ["layer", "step", "unit", "rank", "size", "scale"]),
    ("projection_mosaic", ["layer", "step", "unit", "size", "scale"]),
    ("row", ["layer", "unit", "steps", "kind", "size", "scale"]),
    ("fig4", ["layer", "steps", "rows", "count", "seed", "units"]),
    ("filters", ["step"]),
    ("filter_mosaic", ["step", "size"]),
])
def test_junk_never_breaks_a_route(served, logged, route, params):
    import urllib.parse

    layer = read_run(logged[0] / "new").layers[0].name
    good = {"run": "new", "layer": layer, "step": "5", "unit": "1", "rank": "0", "steps": "0,5", "units": "1"}
    for name in params:
        for junk in JUNK:
            query = {**{p: good[p] for p in params if p in good}, "run": "new", name: junk}
            response = served.client.get(API + route + "?" + urllib.parse.urlencode(query))
            assert response.status_code in (200, 400, 404), (name, junk, response.get_data(as_text=True)[:200])
            if response.status_code != 200:
                assert "error" in json.loads(response.get_data())


def test_last_projects_all_k_at_the_final_checkpoint_of_any_schedule(tmp_path):
    torch.manual_seed(0)
    model = DemoAlexNet(width=4)
    logger = ConvVizLogger(model, ProbeSet(torch.rand(8, 3, 64, 64)), tmp_path, k=3, projections_topk_every="last")
    for step in range(4):  # the default schedule logs 0, 1, 2; close() logs the trained model at 4
        logger.maybe_log(step)
        with torch.no_grad():
            model.features.conv1.weight.mul_(1.1)
    logger.close()
    run = read_run(tmp_path)
    layer = run.layers[0].name
    assert run.projection_steps(layer) == [0, 1, 2, 4]
    for step in (0, 1, 2):
        with pytest.raises(KeyError):
            run.projection(layer, step, 0, rank=2)
    assert run.projection(layer, 4, 0, rank=2).shape[0] == 3


def test_overlay_draws_the_top1_projection_where_the_unit_fires(served, logged):
    """overlay=projection on the patch and the whole image: in colour where the projection is strong, grey elsewhere."""
    run = read_run(logged[0] / "new")
    layer = run.layers[2]
    records = run.topk(layer.name, 5)
    unit = 3
    field = run.crop(layer.name, 5)
    box = field.box(True, int(records.y[unit, 0]), int(records.x[unit, 0]))
    image = crop(run.probe_image(int(records.image[unit, 0])), box).astype(np.float64)
    q = run.projection_pixels(layer.name, 5, unit, field=field).astype(np.float64)
    strength = np.abs(q - 128).sum(axis=0)
    level = Image.fromarray(np.rint(strength * 255 / strength.max()).astype(np.uint8))
    blurred = np.asarray(level.filter(ImageFilter.GaussianBlur(max(strength.shape) / 32)), np.float64)
    share = (blurred / blurred.max())[:, :, None]
    grey = (image[:, :, :3] @ np.array([0.299, 0.587, 0.114]))[:, :, None] * 0.3  # luminance, faded
    want = np.rint(image * share + grey * (1 - share)).astype(np.uint8)
    got = png(served.client.get(API + f"patch?run=new&layer={layer.name}&step=5&unit={unit}&rank=0&overlay=projection"))
    np.testing.assert_array_equal(got[:, :, :3], want)
    peak = share[:, :, 0] == 1
    assert peak.any() and (got[peak][:, :3] == image[peak]).all()  # the image itself where the unit fires most
    faded = share[:, :, 0] == 0
    if faded.any():  # dark grey where it does not fire at all
        assert (got[faded][:, 0] == got[faded][:, 1]).all() and (got[faded][:, :3] <= 77).all()
    plain = png(served.client.get(API + f"probe_image?run=new&layer={layer.name}&step=5&unit={unit}&rank=0"))
    heated = png(served.client.get(API + f"probe_image?run=new&layer={layer.name}&step=5&unit={unit}&rank=0"
                                         "&overlay=projection"))
    assert plain.shape == heated.shape and (plain != heated).any()
    # Both boxes on the whole image: the theoretical field's in red, the effective one's in blue.
    for color in ([255, 40, 40], [40, 200, 255]):
        assert (plain[:, :, :3] == color).all(axis=2).any(), color
    missing = served.client.get(API + f"patch?run=new&layer={layer.name}&step=5&unit={unit}&rank=1&overlay=projection")
    assert missing.status_code == 404 and "only the top-1" in body(missing, 404)["error"]
    bad = served.client.get(API + f"patch?run=new&layer={layer.name}&step=5&unit={unit}&rank=0&overlay=heat")
    assert "none, projection" in body(bad, 400)["error"]
    bad = served.client.get(API + f"mosaic?run=new&layer={layer.name}&step=5&unit={unit}&field=huge")
    assert "effective, theoretical" in body(bad, 400)["error"]


def test_stats_give_the_effective_field_over_training(served, logged):
    run = read_run(logged[0] / "new")
    layers = {l["name"]: l for l in body(served.client.get(API + "stats?run=new"))["layers"]}
    for layer in run.layers:
        sizes = [run.effective_field(layer.name, s) for s in STEPS]
        assert layers[layer.name]["effective_field"] == [max(s) if s else None for s in sizes]
        assert layers[layer.name]["theoretical_field"] == max(layer.receptive_field.size)
    old = body(served.client.get(API + "stats?run=old"))["layers"][0]
    assert old["effective_field"] == [None] * len(old["steps"])
