"""`tb-convviz export --projections` (Fig. 2 layout) and `--evolution` with projections (Fig. 4)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz import projection_format as fmt
from tb_convviz.cli import main
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.export import evolution_figure, grid_figure
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
                 "--projections", "--patch-size", "7", "--out", str(out)]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    # The projection tile of unit 0, rank 0, at its own 7x7 pixels, is somewhere in the figure.
    want = fmt.quantize(run.projection("features.relu1", STEPS[-1], 0))[0].transpose(1, 2, 0)
    windows = np.lib.stride_tricks.sliding_window_view(image, want.shape)[:, :, 0]
    assert (windows == want).all(axis=(2, 3, 4)).any()


def test_evolution_shows_projections_where_logged(logdir, tmp_path):
    run = read_run(logdir / "run")
    projected = evolution_figure(run, "2", [1], patch_size=27)
    patches = evolution_figure(run, "2", [1], patch_size=27, projections=False)
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
