"""`tb-convviz export`: paper figures from the event files alone, checked pixel by pixel."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from tb_convviz.geometry import crop
from tb_convviz.reader import read_run
from tb_convviz.synthetic_run import write_synthetic_run

CLI = Path(sys.executable).with_name("tb-convviz")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    # conv1's field is 4x4 and images are stored losslessly, so at --patch-size 4 a tile is the crop itself.
    write_synthetic_run(str(root / "run1"), checkpoints=4, layers=2, units=6, k=5, probe_size=30,
                        image_size=12, fc_layer=True, seed=3)
    return root


def run_cli(*args):
    return subprocess.run([str(CLI), "export", *args], capture_output=True, text=True, timeout=120)


def patch(run, layer, step, unit, rank):
    records, info = run.topk(layer, step), run.layer(layer)
    box = info.receptive_field.box(int(records.y[unit, rank]), int(records.x[unit, rank]))
    return crop(run.probe_image(int(records.image[unit, rank])), box)


def find(figure, tile):
    """(y, x) of every place where ``tile`` appears in ``figure``."""
    windows = sliding_window_view(figure, tile.shape)[..., 0, :, :, :]
    return [tuple(p) for p in np.argwhere((windows == tile).all(axis=(-3, -2, -1)))]


def test_grid_shows_each_units_top_k_in_rank_order(logdir, tmp_path):
    out = tmp_path / "fig.png"
    done = run_cli("--logdir", str(logdir), "--run", "run1", "--layer", "1", "--step", "20", "--units", "0-2,5",
                   "--patch-size", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout

    figure = np.asarray(Image.open(out).convert("RGB"))
    run = read_run(logdir / "run1")
    origins = []
    for unit in (0, 1, 2, 5):
        first = find(figure, patch(run, "conv1", 20, unit, 0))
        assert first, f"unit {unit}'s best patch is not in the figure"
        y, x = first[0]
        # Ranks 1..4 follow in a 3-wide grid of 4-pixel tiles with 1-pixel gaps.
        for rank in range(1, 5):
            row, col = divmod(rank, 3)
            assert (y + 5 * row, x + 5 * col) in find(figure, patch(run, "conv1", 20, unit, rank))
        origins.append((y, x))
    # Units run left to right, then down: 4 units make a 2x2 grid.
    assert origins[0][0] == origins[1][0] < origins[2][0] == origins[3][0]
    assert origins[0][1] == origins[2][1] < origins[1][1] == origins[3][1]


def test_evolution_strip_has_a_labelled_column_per_checkpoint(logdir, tmp_path):
    out = tmp_path / "evolution.png"
    done = run_cli("--logdir", str(logdir), "--run", "run1", "--layer", "conv1", "--evolution", "--unit", "4",
                   "--patch-size", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr

    figure = np.asarray(Image.open(out).convert("RGB"))
    run = read_run(logdir / "run1")
    places = [find(figure, patch(run, "conv1", step, 4, 0)) for step in run.steps]
    # One row of equally spaced columns, steps left to right; a patch that stayed the best
    # over several checkpoints is found in each of their columns.
    (y,) = {y for found in places for y, _ in found}
    columns = sorted({x for found in places for _, x in found})
    assert len(columns) == len(run.steps) and len(set(np.diff(columns))) == 1
    assert all((y, x) in found for x, found in zip(columns, places))
    for x in columns:  # a step label above each column
        assert (figure[y - 18:y - 2, x - 10:x + 14].min(axis=-1) < 100).any()

    fewer = run_cli("--logdir", str(logdir), "--run", "run1", "--layer", "conv1", "--evolution", "--unit", "4",
                    "--steps", "0,30", "--patch-size", "4", "--out", str(tmp_path / "two.png"))
    assert fewer.returncode == 0, fewer.stderr
    assert Image.open(tmp_path / "two.png").width < figure.shape[1]


def test_fully_connected_layer_shows_whole_images(logdir, tmp_path):
    out = tmp_path / "fc.png"
    assert run_cli("--logdir", str(logdir), "--run", "run1", "--layer", "fc", "--units", "3", "--patch-size", "12",
                   "--out", str(out)).returncode == 0
    run = read_run(logdir / "run1")
    image = run.probe_image(int(run.topk("fc").image[3, 0]))
    assert find(np.asarray(Image.open(out).convert("RGB")), image)


@pytest.mark.parametrize("args, message", [
    (["--run", "nope", "--layer", "1"], "no log dir at .*nope'; runs in .*: run1"),
    (["--run", "run1", "--layer", "conv9"], "no layer 'conv9' in .*; logged layers: 1 \\(conv1\\), 2 \\(conv2\\), 3 \\(fc\\)"),
    (["--run", "run1", "--layer", "2", "--step", "15"], "no checkpoint at step 15; logged steps: \\[0, 10, 20, 30\\]"),
    (["--run", "run1", "--layer", "2", "--units", "4-6"], "units '4-6' are out of range: this layer has 6 units, 0-5"),
    (["--run", "run1", "--layer", "2", "--units", "a-b"], "units 'a-b' are not like 0-15 or 3,7,9"),
    (["--run", "run1", "--layer", "2", "--evolution"], "--evolution needs the unit to follow: --unit U"),
])
def test_errors_say_what_to_do(logdir, tmp_path, args, message):
    done = run_cli("--logdir", str(logdir), *args, "--out", str(tmp_path / "x.png"))
    assert done.returncode == 1
    assert done.stderr.startswith("tb-convviz export: error: ")
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "x.png").exists()


def test_export_needs_no_torch(logdir, tmp_path):
    code = ("import sys; from tb_convviz.cli import main; "
            f"assert main(['export', '--logdir', {str(logdir)!r}, '--run', 'run1', '--layer', '2', "
            f"'--out', {str(tmp_path / 'f.png')!r}]) == 0; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-1] == "False", done.stderr


def test_unknown_run_lists_the_runs_or_says_why_there_are_none(logdir, tmp_path):
    def error(*args):
        done = run_cli(*args, "--layer", "1", "--out", str(tmp_path / "x.png"))
        assert done.returncode == 1 and "Traceback" not in done.stderr
        return done.stderr

    (tmp_path / "empty").mkdir()
    assert f"'{logdir / 'run1'}' is itself a run (its event files are directly in it): leave out --run, or pass " \
           "--run ." in error("--logdir", str(logdir / "run1"), "--run", "seed9")
    assert f"'{tmp_path / 'empty'}' holds no runs: no TensorBoard event files in it or its subfolders" in \
           error("--logdir", str(tmp_path / "empty"), "--run", "seed9")
    assert f"the log dir '{tmp_path / 'nowhere'}' does not exist" in \
           error("--logdir", str(tmp_path / "nowhere"), "--run", "seed9")
    assert not (tmp_path / "x.png").exists()
