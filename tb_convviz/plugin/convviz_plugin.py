"""The ConvViz TensorBoard plugin: top-k receptive-field patches per unit, served from the logged indices.

See ``http_api.md`` next to this file for the routes. Reads only through
``context.data_provider``; imports no torch.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
import re
from typing import Callable

import numpy as np
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from tensorboard.util import tb_logging
from werkzeug import wrappers

import tb_convviz
from tb_convviz import metadata
from tb_convviz.plugin import matching, render
from tb_convviz.geometry import CropField, ReceptiveField
from tb_convviz.plugin.data import ConvVizData, Layer, Probe, RunListing

logger = tb_logging.get_logger()

MAX_LIMIT = 4096
# Units of a `topk` answer whose probe images are read ahead: about the tiles of a window.
WARM_UNITS = 64
# The assignment is O(units³); 1024 units take up to a few seconds on one core.
MAX_MATCH_UNITS = 1024
# The orders `compare` pages through: by unit index, or least shared first (ties by unit).
COMPARE_ORDERS = ("unit", "change")
# Published in `runs`, so that the frontend never asks for more than a request may do.
LIMITS = {
    "max_size": render.MAX_SIZE, "min_size": render.MIN_SIZE, "max_output_pixels": render.MAX_OUTPUT_PIXELS,
    "max_decoded_pixels": render.MAX_DECODED_PIXELS, "max_units_per_page": MAX_LIMIT,
}
_STATIC_ROUTE = f"/data/plugin/{metadata.PLUGIN_NAME}/static/"
_STATIC_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
    ".svg": "image/svg+xml", ".png": "image/png", ".json": "application/json",
}
_INTEGER = re.compile(r"-?[0-9]{1,18}")
# What the `field` parameter of the image routes crops: the effective receptive field (kept inside the
# image; runs without one fall back to the theoretical field) or the theoretical field (padded).
FIELDS = ("effective", "theoretical")
# The `overlay` parameter of the patch and probe_image routes: none, or the record's projection as a heatmap.
OVERLAYS = ("none", "projection")


def frontend_dir() -> str:
    """The frontend's folder: the copy installed as package data, else ``frontend/`` of a source checkout."""
    package = os.path.dirname(os.path.abspath(tb_convviz.__file__))
    installed = os.path.join(package, "_frontend")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "frontend")


def _route(handler: Callable) -> Callable:
    """Make ``handler(self, request, params)`` a WSGI app whose errors are JSON ``{"error": ...}``."""

    @functools.wraps(handler)
    @wrappers.Request.application
    def app(self, request):
        if request.method not in ("GET", "HEAD"):
            return _method_not_allowed(request)
        try:
            return handler(self, request, _Params(request.args))
        except errors.PublicError as e:
            return http_util.Respond(request, {"error": str(e)}, "application/json", code=e.http_code)
        except Exception:  # a bug: log it, but send no traceback to the browser
            logger.exception("convviz: %s failed", request.full_path)
            return http_util.Respond(
                request, {"error": "internal error in the convviz plugin; see TensorBoard's log"},
                "application/json", code=500,
            )

    return app


class _Params:
    """Query parameters, each given at most once; bad values raise InvalidArgumentError (400)."""

    def __init__(self, args) -> None:
        self._args = args

    def text(self, name: str, *, required: bool = True) -> str | None:
        values = self._args.getlist(name)
        if len(values) > 1:
            raise errors.InvalidArgumentError(f"parameter {name!r} is given {len(values)} times; give it once")
        if not values and required:
            raise errors.InvalidArgumentError(f"parameter {name!r} is required")
        return values[0] if values else None

    def integer(self, name: str, *, required: bool = True, default: int | None = None) -> int | None:
        value = self.text(name, required=required)
        if value is None:
            return default
        if not _INTEGER.fullmatch(value):
            raise errors.InvalidArgumentError(f"parameter {name!r} must be an integer, got {_short(value)}")
        return int(value)

    def bounded(self, name: str, low: int, high: int, default: int | None) -> int | None:
        value = self.integer(name, required=False, default=default)
        if value is not None and not low <= value <= high:
            raise errors.InvalidArgumentError(f"parameter {name!r} must be in {low}..{high}, got {value}")
        return value


class ConvVizPlugin(base_plugin.TBPlugin):
    """Serves top-k patches, mosaics, per-unit evolution and checkpoint comparisons."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data = ConvVizData(context.data_provider, logdir=context.logdir)
        self._render = render.Renderer(self._data)
        self._matcher = matching.CachedMatcher()
        self._static_dir = os.path.realpath(frontend_dir())
        from tb_convviz.plugin.figure_routes import FigureRoutes  # it builds on this module's helpers

        self._figures = FigureRoutes(self)

    def get_plugin_apps(self):
        return {
            "/runs": self._serve_runs,
            "/stats": self._serve_stats,
            "/topk": self._serve_topk,
            "/patch": self._serve_patch,
            "/mosaic": self._serve_mosaic,
            "/evolution": self._serve_evolution,
            "/compare": self._serve_compare,
            "/probe_image": self._serve_probe_image,
            "/static/*": self._serve_static,
            **self._figures.apps(),
        }

    def is_active(self) -> bool:
        return False  # TensorBoard's `list_plugins` already says whether convviz data exists

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name="ConvViz")

    # --- routes -----------------------------------------------------------------------------

    @_route
    def _serve_runs(self, request, params):
        ctx, eid = _context(request)
        runs = []
        for listing in self._data.listings(ctx, eid).values():
            layers = self._layers(ctx, eid, listing)
            probe = self._data.probe(ctx, eid, listing)
            problems = (list(listing.errors) + [p for layer in layers for p in layer.errors] + list(probe.errors)
                        + list(self._data.problems(eid, listing)))
            projections, filters, figure_problems = self._figures.describe(ctx, eid, listing, layers)
            problems += figure_problems
            runs.append({
                "run": listing.name,
                "steps": sorted({s for layer in layers for s in layer.steps}),
                "restarts": self._data.restarts(ctx, eid, listing),
                "layers": [{**_layer_json(layer), "projections": projections[layer.name]} for layer in layers],
                "filters": filters,
                "probe": _probe_json(probe),
                "streams": sorted(listing.streams, key=metadata.SOURCES.index),
                "error": _summarise(problems),
            })
        return _json(request, {"runs": runs, "limits": LIMITS})

    @_route
    def _serve_stats(self, request, params):
        ctx, eid = _context(request)
        listing = self._data.listing(ctx, eid, params.text("run"), _source(params))
        layers = self._layers(ctx, eid, listing)
        tags = [metadata.scalar_tag(layer.name, s) for layer in layers for s in metadata.SCALAR_NAMES]
        # A stream's records have no scalars of their own: the same figures, from its records.
        scalars = self._data.scalars(ctx, eid, listing.name, tags) if listing.source == "probe" else \
            {tag: values for layer in layers for tag, values in _record_scalars(layer).items()}
        out = []
        for layer in layers:
            entry = {"name": layer.name, "index": layer.info.index, "steps": list(layer.steps)}
            for name in metadata.SCALAR_NAMES:
                values = scalars.get(metadata.scalar_tag(layer.name, name), {})
                entry[name] = [_number(values.get(step)) for step in layer.steps]
            entry["final_overlap"] = _final_overlap(layer)
            # The effective field's larger side per checkpoint (None where not measured), and the theoretical one's.
            entry["effective_field"] = [max(layer.effective[s]) if s in layer.effective else None for s in layer.steps]
            entry["theoretical_field"] = max(layer.field.size)
            out.append(entry)
        return _json(request, {"run": listing.name, "layers": out})

    @_route
    def _serve_topk(self, request, params):
        ctx, eid = _context(request)
        listing, layer = self._layer(ctx, eid, params)
        step = _step(listing, layer, params)
        offset = params.bounded("offset", 0, 1 << 31, default=0)
        limit = params.bounded("limit", 1, MAX_LIMIT, default=MAX_LIMIT)
        probe = self._data.probe(ctx, eid, listing)
        units = slice(offset, min(offset + limit, layer.info.units))
        records = layer.records(step)[units]
        # The first tiles' mosaics are asked for next: their images are read while this answer travels.
        self._data.prefetch(ctx, eid, listing, probe, set(records[:WARM_UNITS]["image"].ravel().tolist()), wait=False)
        previous = layer.previous_step(step)
        overlaps = (
            metadata.topk_overlap(records["image"], layer.records(previous)[units]["image"])
            if previous is not None else [None] * len(records)
        )
        return _json(request, {
            "run": listing.name, "layer": layer.name, "step": step, "previous_step": previous,
            "total_units": layer.info.units, "offset": offset,
            "units": [
                {"unit": offset + i, **_unit_summary(row), "overlap": _number(overlap),
                 "records": _records_json(row, layer, probe)}
                for i, (row, overlap) in enumerate(zip(records, overlaps))
            ],
        })

    @_route
    def _serve_patch(self, request, params):
        ctx, eid = _context(request)
        listing, layer = self._layer(ctx, eid, params)
        step = _step(listing, layer, params)
        unit = _unit(layer, params)
        rank = _rank(layer, params)
        size = params.bounded("size", render.MIN_SIZE, render.MAX_SIZE, default=None)
        record = _record(layer, step, unit, rank)
        probe = self._data.probe(ctx, eid, listing)
        field = _crop(layer, step, params)
        heat = self._heat(ctx, eid, listing, layer, step, unit, rank, field, params)
        return _png(request, self._render.patch(ctx, eid, listing, probe, layer, record, size, field, heat))

    @_route
    def _serve_mosaic(self, request, params):
        ctx, eid = _context(request)
        listing, layer = self._layer(ctx, eid, params)
        step = _step(listing, layer, params)
        unit = _unit(layer, params)
        size = params.bounded("size", render.MIN_SIZE, render.MAX_SIZE, default=None)
        probe = self._data.probe(ctx, eid, listing)
        records = layer.records(step)[unit]
        return _png(request, self._render.mosaic(ctx, eid, listing, probe, layer, records, size,
                                                 _crop(layer, step, params)))

    @_route
    def _serve_evolution(self, request, params):
        ctx, eid = _context(request)
        listing, layer = self._layer(ctx, eid, params)
        unit = _unit(layer, params)
        probe = self._data.probe(ctx, eid, listing)
        rows = [layer.records(step)[unit] for step in layer.steps]
        checkpoints = []
        for i, (step, row) in enumerate(zip(layer.steps, rows)):
            before = rows[i - 1] if i else None
            checkpoints.append({
                "step": step, **_unit_summary(row), "records": _records_json(row, layer, probe),
                "overlap": None if before is None else _number(
                    metadata.topk_overlap(row["image"][None], before["image"][None])[0]
                ),
                "top1_changed": before is not None and int(row["image"][0]) != int(before["image"][0]),
            })
        return _json(request, {"run": listing.name, "layer": layer.name, "unit": unit, "checkpoints": checkpoints})

    @_route
    def _serve_compare(self, request, params):
        ctx, eid = _context(request)
        listing, layer = self._layer(ctx, eid, params)
        step = _step(listing, layer, params)
        other_name = params.text("other_run", required=False)
        other_listing = listing if other_name is None else self._data.listing(ctx, eid, other_name, listing.source)
        if other_listing.name != listing.name:
            _check_comparable(listing, other_listing, layer)
        other_layer = self._data.layer(ctx, eid, other_listing, layer.name)
        if (other_layer.info.units, other_layer.info.k) != (layer.info.units, layer.info.k):
            raise errors.InvalidArgumentError(
                f"layer {layer.name!r} has {layer.info.units} units, k={layer.info.k} in run {listing.name!r} "
                f"but {other_layer.info.units} units, k={other_layer.info.k} in run {other_listing.name!r}"
            )
        other_step = _step(other_listing, other_layer, params, name="other_step", required=True)
        match = params.bounded("match", 0, 1, default=0) == 1
        offset = params.bounded("offset", 0, 1 << 31, default=0)
        limit = params.bounded("limit", 1, MAX_LIMIT, default=MAX_LIMIT)
        a, b = layer.records(step)["image"], other_layer.records(other_step)["image"]
        same_unit = metadata.topk_overlap(a, b)
        if match:
            if layer.info.units > MAX_MATCH_UNITS:
                raise errors.InvalidArgumentError(
                    f"layer {layer.name!r} has {layer.info.units} units; matching is limited to "
                    f"{MAX_MATCH_UNITS} units (it takes O(units³)); compare unit for unit (match=0)"
                )
            partner, shared_counts = self._matcher.match(
                (eid, listing.name, other_listing.name, layer.name, step, other_step), a, b)
            overlaps = shared_counts / layer.info.k
        else:
            partner, overlaps = np.arange(layer.info.units), same_unit
        rows, other_rows = layer.records(step), other_layer.records(other_step)
        probe, other_probe = self._data.probe(ctx, eid, listing), self._data.probe(ctx, eid, other_listing)
        # Pages follow the order the tab shows, so that its first page is the units at the top.
        order = _compare_order(params)
        ranked = np.arange(layer.info.units) if order == "unit" else np.lexsort((np.arange(layer.info.units), overlaps))
        units = [
            {**_pair_json(u, int(partner[u]), a[u], b[partner[u]], overlaps[u]),
             "records": _records_json(rows[u], layer, probe),
             "other_records": _records_json(other_rows[partner[u]], other_layer, other_probe)}
            for u in ranked[offset:offset + limit].tolist()
        ]
        return _json(request, {
            "run": listing.name, "step": step, "other_run": other_listing.name, "other_step": other_step,
            "layer": layer.name, "matched": match, "mean_overlap": _number(overlaps.mean()),
            "unit_for_unit_mean_overlap": _number(same_unit.mean()),
            "unique": int(np.sum(overlaps == 0)), "total_units": layer.info.units, "offset": offset, "order": order,
            "shared_counts": np.rint(overlaps * layer.info.k).astype(int).tolist(), "other_units": partner.tolist(),
            "units": units,
        })

    @_route
    def _serve_probe_image(self, request, params):
        ctx, eid = _context(request)
        listing = self._data.listing(ctx, eid, params.text("run"), _source(params))
        index = params.integer("index", required=False)
        boxes, heat = (), None
        if any(params.text(name, required=False) is not None for name in ("layer", "unit", "rank", "step")):
            layer = self._data.layer(ctx, eid, listing, params.text("layer"))
            step = _step(listing, layer, params)
            unit = _unit(layer, params)
            rank = _rank(layer, params)
            record = _record(layer, step, unit, rank)
            if index is not None and index != int(record["image"]):
                raise errors.InvalidArgumentError(
                    f"index {index} does not match the record's probe image {int(record['image'])}; omit index"
                )
            index = int(record["image"])
            y, x = int(record["y"]), int(record["x"])
            crop = _crop(layer, step, params)
            boxes = tuple(dict.fromkeys((layer.crop(step, theoretical=True).box(layer.positional, y, x),
                                         crop.box(layer.positional, y, x))))
            info = layer.info
            heat = self._heat(ctx, eid, listing, layer, step, unit, rank,
                              CropField(ReceptiveField.whole_input(info.input_h, info.input_w)), params)
        elif index is None:
            raise errors.InvalidArgumentError("parameter 'index' is required unless layer, unit and rank name a record")
        probe = self._data.probe(ctx, eid, listing)
        return _png(request, self._render.probe_image(ctx, eid, listing, probe, index, boxes, heat))

    @wrappers.Request.application
    def _serve_static(self, request):
        if request.method not in ("GET", "HEAD"):
            return _method_not_allowed(request)
        relative = request.path[len(_STATIC_ROUTE):] if request.path.startswith(_STATIC_ROUTE) else ""
        path = self._static_file(relative)
        if path is None:
            return _json(request, {"error": f"no frontend file {_short(relative)}"}, code=404)
        with open(path, "rb") as f:
            return http_util.Respond(request, f.read(), _STATIC_TYPES[os.path.splitext(path)[1].lower()])

    # --- helpers ----------------------------------------------------------------------------

    def _static_file(self, relative: str) -> str | None:
        """The file ``relative`` names inside the frontend folder, or None (also for any path trick)."""
        parts = relative.split("/")
        if os.path.splitext(relative)[1].lower() not in _STATIC_TYPES or any(
            p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts
        ):
            return None
        path = os.path.realpath(os.path.join(self._static_dir, *parts))
        inside = os.path.commonpath([path, self._static_dir]) == self._static_dir
        return path if inside and os.path.isfile(path) else None

    def _heat(self, ctx, eid, listing, layer, step, unit, rank, field, params):
        """For ``overlay=projection``: (cache key, loader) of the record's projection on ``field``'s crop, else None.

        404 when that record was not projected (by default only each unit's top-1 is).
        """
        if _choice(params, "overlay", OVERLAYS) == "none":
            return None
        projections = self._figures.figures.layer_projections(ctx, eid, listing, layer)
        position = projections.find(step, unit, rank)
        if position is None:
            raise errors.NotFoundError(f"unit {unit} rank {rank} of layer {layer.name!r} was not projected at step "
                                       f"{step}, so there is no overlay" + (" (only the top-1 record is projected there)"
                                                                            if rank else ""))
        return (("projection", layer.name, step, position, field),
                lambda: projections.projection(step, position, field=field))

    def _layers(self, ctx, eid: str, listing: RunListing) -> list[Layer]:
        layers = [self._data.layer(ctx, eid, listing, name) for name in listing.layers]
        return sorted(layers, key=lambda layer: (layer.info.index, layer.name))

    def _layer(self, ctx, eid: str, params: _Params) -> tuple[RunListing, Layer]:
        listing = self._data.listing(ctx, eid, params.text("run"), _source(params))
        return listing, self._data.layer(ctx, eid, listing, params.text("layer"))


def _record_scalars(layer: Layer) -> dict[str, dict[int, float]]:
    """The logger's per-layer scalars, computed from ``layer``'s records: ``{tag: {step: value}}``."""
    out: dict[str, dict[int, float]] = {metadata.scalar_tag(layer.name, name): {} for name in metadata.SCALAR_NAMES}
    for step in layer.steps:
        records = layer.records(step)
        # Units that saw no image (a stream with nothing since the run began) count nowhere.
        peak, finite = records["value"][:, 0], records["image"][:, 0] >= 0
        out[metadata.scalar_tag(layer.name, "dead_fraction")][step] = float(np.mean(finite & ~(peak > 0)))
        out[metadata.scalar_tag(layer.name, "mean_peak")][step] = float(np.mean(peak[finite])) if finite.any() \
            else float("nan")
        previous = layer.previous_step(step)
        if previous is not None:
            overlap = metadata.topk_overlap(records["image"], layer.records(previous)["image"])
            out[metadata.scalar_tag(layer.name, "topk_overlap")][step] = float(overlap[finite].mean()) \
                if finite.any() else float("nan")
    return out


def _source(params: _Params) -> str:
    """The ``source`` parameter: whose records to serve, "probe" (the default), "train" or "eval"."""
    source = params.text("source", required=False) or "probe"
    if source not in metadata.SOURCES:
        raise errors.InvalidArgumentError(f"source must be one of {', '.join(metadata.SOURCES)}, got {_short(source)!r}")
    return source


def _method_not_allowed(request):
    response = http_util.Respond(
        request, {"error": f"method {request.method} is not allowed: the convviz routes answer GET only"},
        "application/json", code=405,
    )
    response.headers["Allow"] = "GET, HEAD"
    return response


def _context(request):
    return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)


def _json(request, payload, code: int = 200):
    try:  # as a string: TensorBoard's Cleanse walks every value, most of a 512-unit answer's time
        content = json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError):  # what only Cleanse turns into JSON: NaN and infinities, sets, bytes
        content = payload
    return http_util.Respond(request, content, "application/json", code=code)


# A checkpoint's images never change once logged (the logger never rewrites a step), so
# the browser may reuse them when the step is explicit; "latest" must be revalidated.
# Short, because a user may delete a run and log a new one under the same name.
PINNED_IMAGE_MAX_AGE_S = 600


def _png(request, data: bytes):
    args = request.args
    pinned = "step" in args or (request.path.endswith("/probe_image") and "layer" not in args)
    return http_util.Respond(request, data, "image/png", expires=PINNED_IMAGE_MAX_AGE_S if pinned else 0)


def _step(listing: RunListing, layer: Layer, params: _Params, *, name: str = "step", required: bool = False) -> int:
    step = params.integer(name, required=required)
    if not layer.steps:
        raise errors.NotFoundError(f"layer {layer.name!r} of run {listing.name!r} has no readable checkpoint yet")
    if step is None:
        return layer.steps[-1]
    if step not in layer.records_by_step:
        i = bisect.bisect_left(layer.steps, step)
        near = sorted({layer.steps[j] for j in (i - 1, i) if 0 <= j < len(layer.steps)})
        raise errors.NotFoundError(
            f"step {step} is not a checkpoint of layer {layer.name!r} in run {listing.name!r}: it has "
            f"{len(layer.steps)} checkpoints from {layer.steps[0]} to {layer.steps[-1]}; "
            f"nearest: {', '.join(map(str, near))}"
        )
    return step


def _choice(params: _Params, name: str, choices: tuple[str, ...]) -> str:
    """Parameter ``name``, one of ``choices`` (the first if absent)."""
    value = params.text(name, required=False)
    if value is None:
        return choices[0]
    if value not in choices:
        raise errors.InvalidArgumentError(f"parameter {name!r} must be one of {', '.join(choices)}, got {_short(value)}")
    return value


def _crop(layer: Layer, step: int, params: _Params) -> CropField:
    """The crop that ``field=`` asks for at ``step``: the effective field's (the default, where measured) or the theoretical one's."""
    return layer.crop(step, theoretical=_choice(params, "field", FIELDS) == "theoretical")


def _index_param(params: _Params, name: str, count: int, what: str) -> int:
    value = params.integer(name)
    if not 0 <= value < count:
        raise errors.NotFoundError(f"{name} {value} does not exist: there are {count} {what}, 0..{count - 1}")
    return value


def _unit(layer: Layer, params: _Params) -> int:
    return _index_param(params, "unit", layer.info.units, f"units in layer {layer.name!r}")


def _rank(layer: Layer, params: _Params) -> int:
    return _index_param(params, "rank", layer.info.k, f"records per unit (k) in layer {layer.name!r}")


def _record(layer: Layer, step: int, unit: int, rank: int) -> np.void:
    record = layer.records(step)[unit, rank]
    if int(record["image"]) < 0:
        raise errors.NotFoundError(
            f"unit {unit} of layer {layer.name!r} has no record at rank {rank} at step {step}: "
            "fewer probe images than k gave it a value"
        )
    return record


def _compare_order(params: _Params) -> str:
    order = params.text("order", required=False) or "unit"
    if order not in COMPARE_ORDERS:
        raise errors.InvalidArgumentError(f"parameter 'order' must be one of {', '.join(COMPARE_ORDERS)}, got {_short(order)}")
    return order


def _check_comparable(listing: RunListing, other: RunListing, layer: Layer) -> None:
    if layer.name not in other.layers:
        raise errors.InvalidArgumentError(
            f"layer {layer.name!r} is not logged in run {other.name!r}, so it cannot be compared across runs"
        )
    mine = layer.info.probe_fingerprint or (listing.probe.fingerprint if listing.probe else "")
    theirs = other.layers[layer.name][0].probe_fingerprint or (other.probe.fingerprint if other.probe else "")
    if not mine or mine != theirs:
        raise errors.InvalidArgumentError(
            f"runs {listing.name!r} and {other.name!r} were logged with different probe sets "
            f"(fingerprints {mine or 'unknown'!s} and {theirs or 'unknown'!s}): their top-k images "
            "index different images and cannot be compared"
        )


def _pair_json(unit: int, other_unit: int, a: np.ndarray, b: np.ndarray, overlap: float) -> dict:
    """A compared pair: the shared probe images and their ranks in each top-k (-1 ids excluded)."""
    a_ids, b_ids = a.tolist(), b.tolist()
    shared = sorted(set(i for i in a_ids if i >= 0) & set(b_ids))
    return {
        "unit": unit, "other_unit": other_unit, "overlap": _number(overlap), "shared": shared,
        "ranks": [a_ids.index(i) for i in shared], "other_ranks": [b_ids.index(i) for i in shared],
    }


def _final_overlap(layer: Layer) -> list[float | None]:
    """Per checkpoint, the mean fraction of each unit's top-k images also in its top-k at the latest checkpoint."""
    if not layer.steps:
        return []
    final = layer.records(layer.steps[-1])["image"]
    return [_number(metadata.topk_overlap(layer.records(step)["image"], final).mean()) for step in layer.steps]


def _layer_json(layer: Layer) -> dict:
    info, rf = layer.info, layer.field
    return {
        "name": layer.name, "index": info.index, "units": info.units, "k": info.k,
        "receptive_field": {"size": list(rf.size), "stride": list(rf.stride), "center": list(rf.offset),
                            "method": rf.method},
        "effective_field": {"mass_share": layer.mass_share,
                            "sizes": [list(layer.effective[s]) if s in layer.effective else None for s in layer.steps]}
        if layer.effective else None,
        "fmap": [info.fmap_h, info.fmap_w] if layer.positional else None,
        "input": [info.input_h, info.input_w],
        "steps": list(layer.steps),
    }


def _probe_json(probe: Probe) -> dict | None:
    info = probe.info
    if info is None:
        return None
    return {
        "n": info.n, "height": info.height, "width": info.width, "channels": info.channels,
        "class_names": list(info.class_names), "fingerprint": info.fingerprint,
        "stored_images": len(probe.blob_keys),
    }


def _records_json(row: np.ndarray, layer: Layer, probe: Probe) -> list[dict]:
    out = []
    for rank, record in enumerate(row.tolist()):
        value, image, y, x = record
        if image < 0:
            continue  # no record: fewer probe images than k had a value
        label = probe.labels.get(image)
        label = label if label is not None and label >= 0 else None
        positional = layer.positional and y >= 0 and x >= 0
        out.append({
            "rank": rank, "image": image, "y": y if positional else None, "x": x if positional else None,
            "value": _number(value), "label": label, "label_name": probe.label_name(label),
        })
    return out


def _unit_summary(row: np.ndarray) -> dict:
    not_finite = bool(metadata.not_finite(row["value"], row["image"]))
    values = row["value"][(row["image"] >= 0) & np.isfinite(row["value"])]
    peak = float(values.max()) if values.size else None
    return {"peak": peak, "dead": not not_finite and not (peak is not None and peak > 0), "not_finite": not_finite}


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _summarise(problems: list[str], shown: int = 5) -> str | None:
    if not problems:
        return None
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
