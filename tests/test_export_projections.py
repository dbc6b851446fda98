"""`tb-convviz export --projections` (Fig. 2 layout) and `--evolution` with projections (Fig. 4)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz import projection_format as fmt
from tb_convviz.cli import main
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.export import GAP, evolution_figure, grid_figure
from tb_convviz.geometry import crop
from tb_convviz.plugin.render import resize
from tb_convviz.synthetic_run import write_synthetic_run

STEPS = [0, 4, 8]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_projections")
    torch.manual_seed(0)
    model = DemoAlexNet(width=4)
    with ConvVizLogger(model, ProbeSet(torch.rand(12, 3, 64, 64)), root / "run", k=4, steps=STEPS,
                       projections_topk_every="last") as logger:
        for step in STEPS:
            assert logger.log(step)
    write_synthetic_run(str(root / "old"), checkpoints=2, units=4, k=4, probe_size=16)
    return root


def test_fig2_layout_puts_projections_beside_patches(logdir, tmp_path):
    run = read_run(logdir / "run")
    plain = grid_figure(run, "1", units=list(range(4)), patch_size=48)
    both = grid_figure(run, "1", units=list(range(4)), patch_size=48, projections=True)
    assert both.width > plain.width
    out = tmp_path / "fig2.png"
    assert main(["export", "--logdir", str(logdir), "--run", "run", "--layer", "1", "--units", "0",
                 "--projections", "--patch-size", "7", "--field", "theoretical", "--out", str(out)]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    # The projection tile of unit 0, rank 0, at its own 7x7 pixels, is somewhere in the figure.
    want = fmt.quantize(run.projection("features.relu1", STEPS[-1], 0))[0].transpose(1, 2, 0)
    windows = np.lib.stride_tricks.sliding_window_view(image, want.shape)[:, :, 0]
    assert (windows == want).all(axis=(2, 3, 4)).any()


def test_evolution_shows_projections_where_logged(logdir, tmp_path):
    run = read_run(logdir / "run")
    projected = evolution_figure(run, "2", [1], patch_size=27, theoretical=True)
    patches = evolution_figure(run, "2", [1], patch_size=27, projections=False, theoretical=True)
    for step in STEPS:
        want = fmt.quantize(run.projection("features.relu2", step, 1))[0].transpose(1, 2, 0)
        for figure, shown in ((projected, True), (patches, False)):
            windows = np.lib.stride_tricks.sliding_window_view(np.asarray(figure.convert("RGB")), want.shape)[:, :, 0]
            assert (windows == want).all(axis=(2, 3, 4)).any() == shown, step
    out = tmp_path / "fig4.png"
    assert main(["export", "--logdir", str(logdir), "--run", "run", "--layer", "2", "--evolution", "--unit", "1",
                 "--out", str(out)]) == 0


def test_runs_without_projections_say_so(logdir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["export", "--logdir", str(logdir), "--run", "old", "--layer", "1", "--projections",
                 "--out", str(out)]) == 1
    assert "not logged in this run" in capsys.readouterr().err
    # Without --projections an older run still exports its patches.
    assert main(["export", "--logdir", str(logdir), "--run", "old", "--layer", "1", "--evolution", "--unit", "0",
                 "--out", str(out)]) == 0
    assert main(["export", "--logdir", str(logdir), "--run", "run", "--layer", "1", "--evolution", "--unit", "0",
                 "--top", "2", "--projections", "--out", str(out)]) == 0


def find(figure: np.ndarray, tile: np.ndarray) -> list[tuple[int, int]]:
    """Every (y, x) where ``tile`` ([h, w, 3]) sits in ``figure`` exactly."""
    windows = np.lib.stride_tricks.sliding_window_view(figure, tile.shape)[:, :, 0]
    return [tuple(map(int, p)) for p in np.argwhere((windows == tile).all(axis=(2, 3, 4)))]


@pytest.mark.parametrize("theoretical", [False, True])
def test_fig2_each_top1_projection_stands_beside_its_own_units_patches(logdir, theoretical):
    """At a top-1 checkpoint the projection is as large as the patch mosaic, directly left of that unit's patches."""
    run = read_run(logdir / "run")
    step, size = STEPS[0], 12
    field = run.crop("features.relu2", step, theoretical)
    figure = np.asarray(grid_figure(run, "2", step, units=[0, 1, 2, 3], patch_size=size, projections=True,
                                    theoretical=theoretical).convert("RGB"))
    records = run.topk("features.relu2", step)
    tile = resize(np.zeros(field.size, np.uint8), size).shape
    mosaic_side = max(2 * tile[0] + 1, 2 * tile[1] + 1)  # k=4: a 2x2 mosaic
    for unit in range(4):
        projection = resize(fmt.display(run.projection_pixels("features.relu2", step, unit, field=field)), mosaic_side)
        box = field.box(True, int(records.y[unit, 0]), int(records.x[unit, 0]))
        top1 = resize(crop(run.probe_image(int(records.image[unit, 0])), box), size)
        at = find(figure, projection)
        patches = find(figure, top1)
        assert at and patches, unit
        # The unit's top-1 patch (its mosaic's first tile) starts right after its projection, on the same line.
        assert any((y, x + projection.shape[1] + GAP // 2) in patches for y, x in at), unit


def test_default_crops_are_the_effective_fields(logdir, tmp_path):
    run = read_run(logdir / "run")
    layer = run.layer("features.relu2")
    for step in STEPS:
        effective = run.effective_field(layer.name, step)
        assert effective is not None and effective[0] <= layer.receptive_field.size[0]
        field = run.crop(layer.name, step)
        assert field.size == effective
        records = run.topk(layer.name, step)
        figure = np.asarray(evolution_figure(run, "2", [1], [step], patch_size=max(field.size), projections=False)
                            .convert("RGB"))
        box = field.box(True, int(records.y[1, 0]), int(records.x[1, 0]))
        assert 0 <= box[0] and 0 <= box[1] and box[2] <= 64 and box[3] <= 64  # inside the image: no padding
        assert find(figure, crop(run.probe_image(int(records.image[1, 0])), box))
    out = tmp_path / "fig.png"
    assert main(["export", "--logdir", str(logdir), "--run", "run", "--layer", "2", "--field", "effective",
                 "--out", str(out)]) == 0
