"""Routes for the paper's own pictures: projections (Fig. 2), the Fig. 4 grid and layer-1 filters (Fig. 6).

See ``http_api.md``. Every response is bounded like the patch routes': images are sized
to fit ``render.MAX_OUTPUT_PIXELS`` and rendered in the renderer's slots and cache; a row
holds at most ``MAX_ROW_CELLS`` cells and ``MAX_ROW_PIXELS`` pixels of width, a grid at
most ``MAX_GRID_UNITS`` units.
"""

from __future__ import annotations

import math

import numpy as np
from tensorboard import errors

from tb_convviz import projection_format as fmt
from tb_convviz.geometry import crop
from tb_convviz.plugin import convviz_plugin as base
from tb_convviz.plugin import render
from tb_convviz.plugin.figures import FigureData, projections_json

MAX_ROW_CELLS = 128
MAX_ROW_PIXELS = 16384
MAX_GRID_UNITS = 256
MAX_LIST_TEXT = 4096
SCALES = ("own", "common")
KINDS = ("projection", "patch")
ROW_ORDERS = ("changed", "random", "units")
FILTER_TILE_DEFAULT = 32


class FigureRoutes:
    """The figure routes of a :class:`~tb_convviz.plugin.convviz_plugin.ConvVizPlugin`."""

    def __init__(self, plugin) -> None:
        self._plugin = plugin
        self._data = plugin._data
        self.figures = FigureData(plugin._data)

    def apps(self) -> dict:
        return {
            "/projection": self._serve_projection,
            "/projection_mosaic": self._serve_projection_mosaic,
            "/row": self._serve_row,
            "/fig4": self._serve_fig4,
            "/filters": self._serve_filters,
            "/filter_mosaic": self._serve_filter_mosaic,
        }

    def describe(self, ctx, eid: str, listing, layers) -> tuple[dict, dict | None, list[str]]:
        """For the ``runs`` listing: per layer name its projections (or None), the run's filters (or None), and
        why some layer's projections cannot be drawn."""
        projections = self.figures.projections(ctx, eid, listing.name, listing.source)
        per_layer, problems = {}, []
        for layer in layers:
            found = projections.get(layer.name)
            problem = fmt.unusable(found.info, layer.field.size) if found is not None else None
            if problem:
                problems.append(f"projections of layer {layer.name!r}: {problem}")
            per_layer[layer.name] = None if problem else projections_json(found, layer.info.units)
        try:
            filters = self.figures.filters(ctx, eid, listing.name)
        except errors.NotFoundError:
            return per_layer, None, problems
        shape = next(iter(filters.weights.values())).shape if filters.weights else None
        if shape is None:
            return per_layer, None, problems
        return per_layer, {"module": filters.info.module, "steps": filters.steps, "shape": list(shape)}, problems

    # --- projections ------------------------------------------------------------------------

    def _scaled(self, projections, step, position, scale: str, field) -> np.ndarray:
        """``[h, w, C]`` uint8 display image of a stored projection on ``field``'s crop, on its own or the layer's
        common scale."""
        q = projections.projection(step, position, field=field)
        if scale == "common":
            rows = projections.index(step)
            finite = rows["scale"][np.isfinite(rows["scale"])]
            q = fmt.rescale(q, float(rows["scale"][position]), float(finite.max()) if finite.size else 0.0)
        return fmt.display(q)

    def _projection_params(self, request, params):
        """What both projection routes take: ``(eid, listing, projections, step, unit, size, scale, field)``."""
        ctx, eid = base._context(request)
        listing, layer = self._plugin._layer(ctx, eid, params)
        step = base._step(listing, layer, params)
        unit = base._unit(layer, params)
        size = params.bounded("size", render.MIN_SIZE, render.MAX_SIZE, default=None)
        scale = base._choice(params, "scale", SCALES)
        return (eid, listing, self.figures.layer_projections(ctx, eid, listing, layer), step, unit, size, scale,
                base._crop(layer, step, params))

    @base._route
    def _serve_projection(self, request, params):
        eid, listing, projections, step, unit, size, scale, field = self._projection_params(request, params)
        layer = projections.layer
        rank = base._rank(layer, params) if params.text("rank", required=False) is not None else 0
        size = render.fit_size(field.size, size)
        position = projections.find(step, unit, rank)
        if position is None:
            raise errors.NotFoundError(
                f"unit {unit} rank {rank} of layer {layer.name!r} was not projected at step {step}"
                + (" (only the top-1 record is projected there)" if rank else ""))
        key = ("projection", eid, listing.key, layer.name, step, position, size, scale, field)
        return base._png(request, self._cached(key, lambda: render.encode_png(render.resize(
            self._scaled(projections, step, position, scale, field), size))))

    @base._route
    def _serve_projection_mosaic(self, request, params):
        eid, listing, projections, step, unit, size, scale, field = self._projection_params(request, params)
        layer = projections.layer
        by_rank = projections.ranks_of(step, unit)
        if not by_rank:
            raise errors.NotFoundError(f"unit {unit} of layer {layer.name!r} was not projected at step {step}")
        count = max(by_rank) + 1  # at most k
        size = render.fit_size(field.size, size, count)

        def draw() -> bytes:
            tiles = [render.resize(self._scaled(projections, step, by_rank[r], scale, field), size)
                     if r in by_rank else None for r in range(count)]
            tile = render.resize(np.zeros(field.size, np.uint8), size).shape[:2]
            return render.encode_png(render.mosaic(tiles, tile))

        key = ("projection_mosaic", eid, listing.key, layer.name, step, unit, size, scale, field)
        return base._png(request, self._cached(key, draw))

    @base._route
    def _serve_row(self, request, params):
        """One unit's top-1 projection (or patch) at each of ``steps``: one row of the Fig. 4 grid."""
        ctx, eid = base._context(request)
        listing, layer = self._plugin._layer(ctx, eid, params)
        unit = base._unit(layer, params)
        steps = _steps(params, layer, required=True)
        size = params.bounded("size", render.MIN_SIZE, render.MAX_SIZE, default=None)
        kind = base._choice(params, "kind", KINDS)
        scale = base._choice(params, "scale", SCALES)
        # One scale along the row (Fig. 4 compares checkpoints): the largest of its steps' crops.
        field = max((base._crop(layer, step, params) for step in steps), key=lambda f: f.size[0] * f.size[1])
        tile = render.resize(np.zeros(field.size, np.uint8), size).shape[:2]
        width = len(steps) * (tile[1] + 1) - 1
        if width > MAX_ROW_PIXELS or width * tile[0] > render.MAX_OUTPUT_PIXELS:
            raise errors.InvalidArgumentError(
                f"a row of {len(steps)} cells of {tile[1]}x{tile[0]} px is wider than {MAX_ROW_PIXELS} px or more "
                f"than {render.MAX_OUTPUT_PIXELS} pixels: ask for fewer steps or a smaller size")
        key = ("row", eid, listing.key, layer.name, unit, tuple(steps), size, kind, scale, field,
               layer.steps[-1] if layer.steps else None)
        if kind == "patch":
            probe = self._data.probe(ctx, eid, listing)
            render.check_decoded(probe, len(steps))
            return base._png(request, self._cached(key, lambda: render.encode_png(_strip(
                self._patch_row(ctx, eid, listing, probe, layer, steps, unit, size, field), tile))))
        projections = self.figures.layer_projections(ctx, eid, listing, layer, required=False)
        if projections is None:  # not logged: a row of empty cells
            return base._png(request, self._cached(key, lambda: render.encode_png(_strip([None] * len(steps), tile))))
        check_projected_pixels(projections, len(steps))
        # Read before taking a render slot: the data provider's round trips should not hold one.
        read = projections.prefetch(steps, unit) if not self._is_cached(key) else {}
        return base._png(request, self._cached(key, lambda: render.encode_png(_strip(
            self._projection_row(projections, steps, unit, size, scale, field, read), tile))))

    def _patch_row(self, ctx, eid, listing, probe, layer, steps, unit, size, field) -> list:
        records = [layer.records(step)[unit, 0] for step in steps]
        self._data.prefetch(ctx, eid, listing, probe, {int(r["image"]) for r in records})
        return [render.resize(crop(
            self._data.image(ctx, eid, listing, probe, int(r["image"])),
            field.box(layer.positional, int(r["y"]), int(r["x"]))), size)
            if int(r["image"]) in probe.blob_keys else None for r in records]

    def _projection_row(self, projections, steps, unit, size, scale, field, read) -> list:
        """Each step's top-1 projection of ``unit`` (None where it has none), on its own or the row's common scale."""
        found = [(step, _found_or_none(projections, step, unit)) for step in steps]
        cells = [None if p is None else projections.projection(s, p, read.get((s, p)), field) for s, p in found]
        if scale == "common":
            scales = [float(projections.index(s)["scale"][p]) if p is not None else 0.0 for s, p in found]
            common = max([v for v in scales if math.isfinite(v)], default=0.0)
            cells = [None if q is None else fmt.rescale(q, v, common) for q, v in zip(cells, scales)]
        return [None if q is None else render.resize(fmt.display(q), size) for q in cells]

    @base._route
    def _serve_fig4(self, request, params):
        """The rows and columns of the Fig. 4 grid: which units, which steps, and what changed."""
        ctx, eid = base._context(request)
        listing, layer = self._plugin._layer(ctx, eid, params)
        steps = _steps(params, layer, required=False) or list(layer.steps)
        order = base._choice(params, "rows", ROW_ORDERS)
        count = params.bounded("count", 1, MAX_GRID_UNITS, default=16)
        seed = params.bounded("seed", 0, 2 ** 31 - 1, default=0)
        if not steps:
            raise errors.NotFoundError(f"layer {layer.name!r} has no readable checkpoint yet")
        top1 = np.stack([layer.records(s)["image"][:, 0] for s in steps], axis=1)  # [units, steps]
        changes = (top1[:, 1:] != top1[:, :-1]).sum(axis=1)
        if order == "units":
            units = _int_list(params, "units", required=True)
            if len(units) > MAX_GRID_UNITS or any(not 0 <= u < layer.info.units for u in units):
                raise errors.InvalidArgumentError(
                    f"units must be at most {MAX_GRID_UNITS} unit indices in 0..{layer.info.units - 1}")
        elif order == "random":
            rng = np.random.default_rng(seed)
            units = sorted(rng.choice(layer.info.units, min(count, layer.info.units), replace=False).tolist())
        else:
            units = np.argsort(-changes, kind="stable")[:count].tolist()
        try:
            projected = self.figures.layer_projections(ctx, eid, listing, layer).steps
        except errors.NotFoundError:  # not logged, or unusable
            projected = []
        return base._json(request, {
            "run": listing.name, "layer": layer.name, "rows": order, "steps": steps,
            "projection_steps": [s for s in steps if s in set(projected)],
            "units": [{"unit": int(u), "changes": int(changes[u]), "top1": [int(i) for i in top1[u]]} for u in units],
        })

    # --- filters ----------------------------------------------------------------------------

    def _filter_step(self, filters, params) -> int:
        step = params.integer("step", required=False)
        if step is None:
            return filters.steps[-1]
        if step not in filters.weights:
            raise errors.NotFoundError(f"no filters at step {step}; steps with filters: "
                                       + ", ".join(map(str, filters.steps[:20])))
        return step

    def _logged_filters(self, request, params):
        """The experiment id, run listing and filters of the requested run; 404 if it logged none."""
        ctx, eid = base._context(request)
        listing = self._data.listing(ctx, eid, params.text("run"))
        filters = self.figures.filters(ctx, eid, listing.name)
        if not filters.weights:
            raise errors.NotFoundError(f"first-layer filters were not logged in this run ({listing.name!r})")
        return eid, listing, filters

    @base._route
    def _serve_filters(self, request, params):
        _, listing, filters = self._logged_filters(request, params)
        step = self._filter_step(filters, params)
        info = filters.info
        ratios = (info.dominant_ratio or fmt.DOMINANT_RATIO, info.near_zero_ratio or fmt.NEAR_ZERO_RATIO)
        flags = {s: fmt.filter_flags(w, *ratios) for s, w in filters.weights.items()}
        weights = filters.weights[step]
        dominant, near_zero = flags[step]
        return base._json(request, {
            "run": listing.name, "module": info.module, "step": step, "steps": filters.steps,
            "shape": list(weights.shape), "dominant_ratio": ratios[0], "near_zero_ratio": ratios[1],
            "rms": [base._number(v) for v in fmt.filter_rms(weights)],
            "dominant": np.flatnonzero(dominant).tolist(), "near_zero": np.flatnonzero(near_zero).tolist(),
            "counts": {"dominant": [int(flags[s][0].sum()) for s in filters.steps],
                       "near_zero": [int(flags[s][1].sum()) for s in filters.steps]},
        })

    @base._route
    def _serve_filter_mosaic(self, request, params):
        eid, listing, filters = self._logged_filters(request, params)
        step = self._filter_step(filters, params)
        size = params.bounded("size", render.MIN_SIZE, 128, default=FILTER_TILE_DEFAULT)
        weights = filters.weights[step]
        size = render.fit_size(weights.shape[2:], size, weights.shape[0])
        key = ("filters", eid, listing.name, step, size, filters.steps[-1])
        return base._png(request, self._cached(key, lambda: render.encode_png(
            filter_mosaic(filters.weights[step], size))))

    def _cached(self, key, draw) -> bytes:
        # The renderer's cache and render slots: figure renders share the patch routes' budget.
        return self._plugin._render._cached(("figure", *key), draw)

    def _is_cached(self, key) -> bool:
        return self._plugin._render.pngs.get(("figure", *key)) is not None


def _found_or_none(projections, step: int, unit: int) -> int | None:
    try:
        return projections.find(step, unit, 0)
    except errors.NotFoundError:
        return None  # no projections at that step: an empty cell


def check_projected_pixels(projections, cells: int) -> None:
    """InvalidArgumentError (400) when ``cells`` stored projections are more pixels than one request may decode."""
    info, (height, width) = projections.stored.info, projections.layer.field.size
    if info.clipped:  # only the part inside the probe image is stored
        height, width = min(height, info.image_height), min(width, info.image_width)
    pixels = cells * max(height, 1) * max(width, 1)
    if pixels > render.MAX_DECODED_PIXELS:
        raise errors.InvalidArgumentError(
            f"{cells} projections of {height}x{width} pixels are {pixels} pixels to decode, more than the "
            f"{render.MAX_DECODED_PIXELS} one request may decode: ask for fewer steps")


def filter_mosaic(weights: np.ndarray, size: int) -> np.ndarray:
    """All filters as RGB tiles (each contrast-normalised on its own), ``size`` px each, in a near-square RGBA grid."""
    tiles = [render.resize(t, size) for t in fmt.filter_tiles(weights)]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    th, tw = tiles[0].shape[:2]
    out = np.zeros((rows * (th + 1) - 1, cols * (tw + 1) - 1, 4), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (th + 1):r * (th + 1) + th, c * (tw + 1):c * (tw + 1) + tw, :3] = t
        out[r * (th + 1):r * (th + 1) + th, c * (tw + 1):c * (tw + 1) + tw, 3] = 255
    return out


def _strip(cells: list, tile: tuple[int, int]) -> np.ndarray:
    """Cells side by side with 1-px transparent separators; missing cells stay transparent."""
    th, tw = tile
    out = np.zeros((th, len(cells) * (tw + 1) - 1, 4), np.uint8)
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        rgb = cell if cell.ndim == 3 else np.repeat(cell[:, :, None], 3, axis=2)
        out[:, i * (tw + 1):i * (tw + 1) + tw, :3] = rgb[:, :, :3]
        out[:, i * (tw + 1):i * (tw + 1) + tw, 3] = 255
    return out



def _int_list(params, name: str, *, required: bool) -> list[int] | None:
    text = params.text(name, required=required)
    if text is None:
        return None
    if len(text) > MAX_LIST_TEXT:
        raise errors.InvalidArgumentError(f"parameter {name!r} is longer than {MAX_LIST_TEXT} characters")
    parts = text.split(",")
    if not all(base._INTEGER.fullmatch(p) for p in parts):
        raise errors.InvalidArgumentError(f"parameter {name!r} must be comma-separated integers, got {base._short(text)}")
    return [int(p) for p in parts]


def _steps(params, layer, *, required: bool) -> list[int] | None:
    steps = _int_list(params, "steps", required=required)
    if steps is None:
        return None
    if len(steps) > MAX_ROW_CELLS:
        raise errors.InvalidArgumentError(f"at most {MAX_ROW_CELLS} steps per request, got {len(steps)}")
    missing = [s for s in steps if s not in layer.records_by_step]
    if missing:
        raise errors.NotFoundError(f"steps {missing[:5]} are not checkpoints of layer {layer.name!r}; it has "
                                   f"{len(layer.steps)} checkpoints from {layer.steps[0] if layer.steps else '-'} "
                                   f"to {layer.steps[-1] if layer.steps else '-'}")
    return steps
