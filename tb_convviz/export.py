"""Paper figures from a logged run: a layer's unit mosaics (Zeiler & Fergus Fig. 2) and units over training (Fig. 4).

Where projections were logged, Fig. 2 can show them beside the patches, and Fig. 4 shows them
(as the paper does) instead of the patches.

Reads the event files through :func:`read_run`; no TensorBoard server and no torch.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tb_convviz import projection_format as fmt
from tb_convviz.geometry import CropField, crop
from tb_convviz.plugin.render import grid_shape, mosaic, resize
from tb_convviz.reader import Layer, Run, event_files, read_run

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
GAP = 10
FONT_SIZE = 14
# Runs named in the error for an unknown --run; a log dir may hold hundreds.
MAX_LISTED_RUNS = 20


def grid_figure(run: Run, layer: str, step: int | None = None, units: list[int] | None = None,
                *, patch_size: int = 48, projections: bool = False, theoretical: bool = False) -> Image.Image:
    """The top-k mosaics of ``units`` of ``layer`` at ``step`` (latest if None), in a labelled grid.

    Patches are the effective field's crops where it was measured (see :meth:`Run.crop`), the
    theoretical field's if ``theoretical``. With ``projections``, each unit's projections stand
    left of its patches, as in Fig. 2: a mosaic where all k were projected, else the top-1
    projection as large as the patches' mosaic.
    """
    info = find_layer(run, layer)
    step = _check_step(run, info, step)
    units = list(range(min(info.units, 16))) if units is None else units
    records = run.topk(info.name, step)
    field = run.crop(info.name, step, theoretical)
    if projections:
        _check_projected(run, info, [step])
    cells = [(f"unit {u}" + (" (not finite)" if records.not_finite[u] else ""),
              _side_by_side(_projection_mosaic(run, info, field, step, u, info.k, patch_size),
                            _mosaic(run, info, field, records, u, info.k, patch_size)) if projections
              else _mosaic(run, info, field, records, u, info.k, patch_size)) for u in units]
    cols = math.ceil(math.sqrt(len(cells)))
    rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    title = f"{_run_name(run)} · layer {info.index} ({info.name}) · step {step}"
    return _compose(title, [None] * len(rows), [None] * cols, rows, label_below=True)


def evolution_figure(run: Run, layer: str, units: list[int], steps: list[int] | None = None,
                     *, top: int = 1, patch_size: int = 64, projections: bool | None = None,
                     theoretical: bool = False) -> Image.Image:
    """Each unit of ``units`` (rows) at each checkpoint (columns): its ``top`` strongest projections or patches.

    ``projections`` None shows projections when any of ``steps`` has them (a checkpoint without
    them shows its patches), True requires them, False shows patches. Each checkpoint's crops are
    its effective field's (the theoretical field's if ``theoretical``), as the tab shows them.
    """
    info = find_layer(run, layer)
    steps = run.steps if steps is None else [_check_step(run, info, s) for s in steps]
    if not 1 <= top <= info.k:
        raise ValueError(f"--top must be between 1 and k={info.k}, got {top}")
    projected = set(run.projection_steps(info.name))
    if projections:
        _check_projected(run, info, steps)
    use = projected if projections is not False else set()
    per_step = {s: run.topk(info.name, s) for s in steps}
    fields = {s: run.crop(info.name, s, theoretical) for s in steps}
    rows = [[(None, _projection_mosaic(run, info, fields[s], s, u, top, patch_size) if s in use
              else _mosaic(run, info, fields[s], per_step[s], u, top, patch_size)) for s in steps] for u in units]
    shown = "projections" if use & set(steps) == set(steps) else "projections and patches" if use & set(steps) else None
    rule = run.projection_info(info.name).rule if shown else ""
    title = f"{_run_name(run)} · layer {info.index} ({info.name}) over training" + (
        f" · {rule} {shown}" if shown else "")
    return _compose(title, [f"unit {u}" for u in units], [f"step {s}" for s in steps], rows, label_below=False)


def find_layer(run: Run, layer: str) -> Layer:
    """A layer by module name or, failing that, by 1-based index (``"3"``)."""
    for info in run.layers:
        if info.name == layer:
            return info
    for info in run.layers:
        if layer.isdigit() and info.index == int(layer):
            return info
    choices = ", ".join(f"{l.index} ({l.name})" for l in run.layers)
    raise ValueError(f"no layer {layer!r} in {run.path}; logged layers: {choices}")


def parse_units(text: str, count: int) -> list[int]:
    """Units from ``"0-15"``, ``"3,7,9"`` or a mix; each must be below ``count``."""
    units = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            span = range(int(first), int(last) + 1) if sep else [int(first)]
        except ValueError:
            raise ValueError(f"units {text!r} are not like 0-15 or 3,7,9") from None
        units.extend(span)
    if not units or min(units) < 0 or max(units) >= count:
        raise ValueError(f"units {text!r} are out of range: this layer has {count} units, 0-{count - 1}")
    return units


def open_run(logdir: str, run: str) -> Run:
    """Read run ``run`` of ``logdir`` (``"."`` for the log dir itself), listing the runs there if it is not one."""
    path = os.path.normpath(os.path.join(logdir, run))
    try:
        result = read_run(path)
    except FileNotFoundError as e:
        raise ValueError(f"{e}; {_runs_hint(logdir)}") from None
    if not result.layers:
        raise ValueError(f"run {path!r} has no convviz data: was it logged with ConvVizLogger?")
    return result


def _runs_hint(logdir: str) -> str:
    """Which runs ``logdir`` holds, named as ``run`` takes them, or why there are none."""
    if not os.path.isdir(logdir):
        return f"the log dir {logdir!r} does not exist"
    found = sorted(os.path.relpath(d, logdir) for d, _, _ in os.walk(logdir) if event_files(d))
    if found == ["."]:
        return f"{logdir!r} is itself a run (its event files are directly in it): leave out --run, or pass --run ."
    if found:
        names = ["'.' (the log dir itself)" if name == "." else name for name in found[:MAX_LISTED_RUNS]]
        more = f" and {len(found) - MAX_LISTED_RUNS} more" if len(found) > MAX_LISTED_RUNS else ""
        return f"runs in {logdir!r}: {', '.join(names)}{more}"
    return (f"{logdir!r} holds no runs: no TensorBoard event files in it or its subfolders; log one with "
            "ConvVizLogger, `tb-convviz checkpoints` or `tb-convviz demo`")


def _mosaic(run: Run, info: Layer, field: CropField, records, unit: int, count: int, patch_size: int) -> Image.Image:
    tiles = []
    for image, y, x in zip(records.image[unit, :count], records.y[unit, :count], records.x[unit, :count]):
        if image < 0 or int(image) not in run.stored_images:
            tiles.append(None)
            continue
        box = field.box(info.fmap is not None, int(y), int(x))
        tiles.append(resize(crop(run.probe_image(int(image)), box), patch_size))
    return _on_background(mosaic(tiles, _tile_shape(field, patch_size)))


def _projection_mosaic(run: Run, info: Layer, field: CropField, step: int, unit: int, count: int,
                       patch_size: int) -> Image.Image:
    """A unit's projections at ``step``, each contrast-normalised: the mosaic of the ranks below ``count``
    where more than the top-1 was projected, else the top-1 alone, as large as that mosaic."""
    tiles = []
    for rank in range(count):
        try:
            tiles.append(fmt.display(run.projection_pixels(info.name, step, unit, rank, field=field)))
        except KeyError:
            tiles.append(None)  # only the top-1 record was projected at that step
    tile_shape = _tile_shape(field, patch_size)
    if count > 1 and all(t is None for t in tiles[1:]):
        rows, cols = grid_shape(count)
        shape = (rows * tile_shape[0] + rows - 1, cols * tile_shape[1] + cols - 1)
        return _on_background(mosaic([resize(tiles[0], max(shape)) if tiles[0] is not None else None],
                                     resize(np.zeros(field.size, np.uint8), max(shape)).shape[:2]))
    return _on_background(mosaic([None if t is None else resize(t, patch_size) for t in tiles], tile_shape))


def _tile_shape(field: CropField, patch_size: int) -> tuple[int, int]:
    return resize(np.zeros(field.size, np.uint8), patch_size).shape[:2]


def _on_background(rgba: np.ndarray) -> Image.Image:
    image = Image.fromarray(rgba, "RGBA")
    out = Image.new("RGB", image.size, BACKGROUND)
    out.paste(image, mask=image)
    return out


def _side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    out = Image.new("RGB", (left.width + GAP // 2 + right.width, max(left.height, right.height)), BACKGROUND)
    out.paste(left, (0, 0))
    out.paste(right, (left.width + GAP // 2, 0))
    return out


def _check_projected(run: Run, info: Layer, steps: list[int]) -> None:
    projected = run.projection_steps(info.name)
    missing = [s for s in steps if s not in projected]
    if missing:
        where = f"logged at steps {projected}" if projected else "not logged in this run"
        raise ValueError(f"layer {info.name!r} has no projections at step(s) {missing}: projections were {where}")


def _compose(title: str, row_labels: list, col_labels: list, rows: list[list[tuple]], *,
             label_below: bool) -> Image.Image:
    """Lay out ``rows`` of (label, image) cells with a title, row and column labels."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [l for l in col_labels if l] + [l for row in rows for l, _ in row if l]
    cell_w = max([image.width for row in rows for _, image in row]
                 + [math.ceil(measure.textlength(l, font=font)) + 4 for l in labels])
    cell_h = max(image.height for row in rows for _, image in row) + (line if label_below else 0)
    left = max((measure.textlength(l, font=font) for l in row_labels if l), default=0)
    left = GAP + (math.ceil(left) + GAP if left else 0)
    top = GAP + line + (line if any(col_labels) else 0)
    cols = max(len(row) for row in rows)
    width = max(left + cols * (cell_w + GAP), math.ceil(measure.textlength(title, font=font)) + 2 * GAP)
    figure = Image.new("RGB", (width, top + len(rows) * (cell_h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    draw.text((GAP, GAP), title, fill=TEXT, font=font)
    for c, label in enumerate(col_labels):
        if label:
            draw.text((left + c * (cell_w + GAP) + cell_w / 2, top - 4), label, fill=TEXT, font=font, anchor="md")
    for r, row in enumerate(rows):
        y = top + r * (cell_h + GAP)
        if row_labels[r]:
            draw.text((GAP, y + cell_h / 2), row_labels[r], fill=TEXT, font=font, anchor="lm")
        for c, (label, image) in enumerate(row):
            x = left + c * (cell_w + GAP)
            figure.paste(image, (x + (cell_w - image.width) // 2, y))
            if label_below and label:
                draw.text((x + cell_w / 2, y + cell_h - 2), label, fill=TEXT, font=font, anchor="md")
    return figure


def _check_step(run: Run, info: Layer, step: int | None) -> int:
    if step is None:
        return run.steps[-1]
    if step not in run.steps:
        raise ValueError(f"run {_run_name(run)!r} has no checkpoint at step {step}; logged steps: {run.steps}")
    return step


def _run_name(run: Run) -> str:
    return os.path.basename(os.path.normpath(run.path))
