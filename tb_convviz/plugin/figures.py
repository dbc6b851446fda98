"""Projections and first-layer filters through TensorBoard's data provider, cached and bounded. No torch.

A layer's projections at a checkpoint are one blob-sequence value (blob 0 the index,
then one image per record), read lazily: the listing gives blob keys, the index is read
once per (layer, step), and each image on first use.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tensorboard import errors
from tensorboard.data import provider

from tb_convviz import metadata, plugin_data_pb2
from tb_convviz import projection_format as fmt
from tb_convviz.geometry import CropField, record_box
from tb_convviz.plugin.data import ALL_POINTS, ByteLRU, ConvVizData, Layer, RunListing, _SingleFlight, cached_version

# Bounds on what logged metadata may ask of the renderer.
MAX_FILTERS = 4096
MAX_KERNEL_SIDE = 64
MAX_CROP_SIDE = 4096
NOT_LOGGED = "not logged in this run"


@dataclasses.dataclass(frozen=True)
class LayerProjections:
    """Blob references of one layer's projections at every step that has them."""

    info: plugin_data_pb2.ProjectionInfo
    blobs: dict[int, tuple]  # step -> BlobReferences (index first)

    @property
    def steps(self) -> list[int]:
        return sorted(self.blobs)

    def ranks(self, step: int, units: int) -> int:
        """1 where only the top-1 records were projected, else more: the images per unit, rounded up."""
        images = len(self.blobs[step]) - 1
        return max(1, -(-images // max(units, 1)))


@dataclasses.dataclass(frozen=True)
class Filters:
    """The first convolution's weights at every logged step."""

    info: plugin_data_pb2.FilterInfo
    weights: dict[int, np.ndarray]

    @property
    def steps(self) -> list[int]:
        return sorted(self.weights)


class FigureData:
    """Reads projections and filters of the runs ``data`` lists; every method takes ``ctx`` and ``eid``."""

    def __init__(self, data: ConvVizData, *, cache_bytes: int = 128 << 20) -> None:
        self._data = data
        self._provider = data._provider
        self._series = ByteLRU(cache_bytes // 2)
        self.pixels = ByteLRU(cache_bytes // 2)
        self._flight = _SingleFlight()

    def projections(self, ctx, eid: str, run: str, source: str = "probe") -> dict[str, LayerProjections]:
        """Per layer name, its projections' blob references (empty for a run logged without projections).

        ``source``: those of the probe's records, or of a stream's ("train", "eval").
        """
        prefix = metadata.PROJECTION_TAG_PREFIX if source == "probe" else metadata.stream_tag(source, "projection", "")
        listed = self._provider.list_blob_sequences(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, run_tag_filter=provider.RunTagFilter(runs=[run]),
        ).get(run, {})
        tags = {tag: series for tag, series in listed.items() if tag.startswith(prefix)}
        if not tags:
            return {}
        version = tuple(sorted((tag, s.max_step, s.max_wall_time, s.max_length) for tag, s in tags.items()))
        return cached_version(self._series, self._flight, ("projections", eid, run, source), version,
                              lambda: self._read_projections(ctx, eid, run, tags, prefix))

    def _read_projections(self, ctx, eid, run, tags, prefix) -> tuple[dict[str, LayerProjections], int]:
        read = self._provider.read_blob_sequences(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=list(tags)),
        ).get(run, {})
        out = {}
        for tag, series in tags.items():
            try:
                info = metadata.parse_plugin_metadata(series.plugin_content).projection
            except ValueError:
                continue  # unreadable metadata: that layer shows "not logged"
            if not (0 < info.height <= MAX_CROP_SIDE and 0 < info.width <= MAX_CROP_SIDE and 0 < info.channels <= 4):
                continue
            blobs = {d.step: tuple(d.values) for d in read.get(tag, []) if len(d.values) > 1}
            out[tag[len(prefix):]] = LayerProjections(info, blobs)
        return out, 256 * sum(len(p.blobs) for p in out.values()) + 1024

    def layer_projections(self, ctx, eid: str, listing: RunListing, layer: Layer) -> LayerProjections:
        """``layer``'s projections; NotFoundError saying "not logged in this run" if it has none."""
        found = self.projections(ctx, eid, listing.name, listing.source).get(layer.name)
        if found is None or not found.blobs:
            raise errors.NotFoundError(f"projections of layer {layer.name!r} were {NOT_LOGGED} ({listing.name!r})")
        return found

    def index(self, ctx, eid: str, listing: RunListing, layer: Layer, step: int) -> np.ndarray:
        """The projection index rows of ``layer`` at ``step``."""
        projections = self.layer_projections(ctx, eid, listing, layer)
        if step not in projections.blobs:
            raise errors.NotFoundError(
                f"layer {layer.name!r} has no projections at step {step}; steps with projections: "
                f"{_steps_text(projections.steps)}")
        ref = projections.blobs[step][0]
        key = ("index", eid, listing.name, ref.blob_key)
        rows = self.pixels.get(key)
        if rows is None:
            try:
                rows = fmt.decode_index(self._provider.read_blob(ctx, blob_key=ref.blob_key))
            except ValueError as e:
                raise errors.NotFoundError(f"projection index of {layer.name!r} at step {step} is unusable: {e}")
            if len(rows) != len(projections.blobs[step]) - 1:
                raise errors.NotFoundError(
                    f"projection index of {layer.name!r} at step {step} has {len(rows)} rows for "
                    f"{len(projections.blobs[step]) - 1} images")
            self.pixels.put(key, rows, rows.nbytes + 64)
        return rows

    def find(self, ctx, eid: str, listing: RunListing, layer: Layer, step: int, unit: int, rank: int) -> int | None:
        """Position of record (unit, rank) in the step's index, or None if it was not projected."""
        rows = self.index(ctx, eid, listing, layer, step)
        hits = np.flatnonzero((rows["unit"] == unit) & (rows["rank"] == rank))
        return int(hits[-1]) if hits.size else None

    def projection(self, ctx, eid: str, listing: RunListing, layer: Layer, step: int, position: int,
                   field: CropField | None = None) -> np.ndarray:
        """The uint8 ``[C, h, w]`` projection at ``position`` of the step's index, on ``field``'s crop (default: the theoretical)."""
        projections = self.layer_projections(ctx, eid, listing, layer)
        ref = projections.blobs[step][position + 1]
        key = ("pixels", eid, listing.name, ref.blob_key)
        q = self.pixels.get(key)
        row = self.index(ctx, eid, listing, layer, step)[position]
        y, x = int(row["y"]), int(row["x"])
        box = record_box(layer.field, layer.positional, y, x)
        if q is None:
            try:
                q = fmt.decode_projection(self._provider.read_blob(ctx, blob_key=ref.blob_key), projections.info, box)
            except Exception as e:  # Pillow raises many types on corrupt data; all mean "unusable"
                raise errors.NotFoundError(f"a projection of {layer.name!r} at step {step} cannot be decoded ({e})")
            self.pixels.put(key, q, q.nbytes + 64)
        return q if field is None else fmt.on_box(q, box, field.box(layer.positional, y, x))

    def filters(self, ctx, eid: str, run: str) -> Filters:
        """The first convolution's weights; NotFoundError saying "not logged in this run" without them."""
        listed = self._provider.list_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, run_tag_filter=provider.RunTagFilter(runs=[run]),
        ).get(run, {})
        tags = sorted(t for t in listed if t.startswith(metadata.FILTERS_TAG_PREFIX))
        if not tags:
            raise errors.NotFoundError(f"first-layer filters were {NOT_LOGGED} ({run!r})")
        tag = tags[0]
        series = listed[tag]
        version = (series.max_step, series.max_wall_time)
        return cached_version(self._series, self._flight, ("filters", eid, run), version,
                              lambda: self._read_filters(ctx, eid, run, tag, series))

    def _read_filters(self, ctx, eid, run, tag, series) -> tuple[Filters, int]:
        try:
            info = metadata.parse_plugin_metadata(series.plugin_content).filters
        except ValueError as e:
            raise errors.NotFoundError(f"first-layer filters of {run!r} are unreadable: {e}")
        data = self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
        ).get(run, {}).get(tag, [])
        weights = {}
        for datum in data:
            w = np.asarray(datum.numpy)
            if (w.ndim == 4 and w.dtype.kind == "f" and 0 < w.shape[0] <= MAX_FILTERS
                    and 0 < max(w.shape[2:]) <= MAX_KERNEL_SIDE and 0 < w.shape[1] <= 4096):
                weights[datum.step] = w.astype(np.float32)
        return Filters(info, weights), sum(w.nbytes for w in weights.values()) + 1024


def projections_json(projections: LayerProjections | None, units: int) -> dict | None:
    """What the ``runs`` listing says about a layer's projections (None: not logged)."""
    if projections is None or not projections.blobs:
        return None
    info = projections.info
    steps = projections.steps
    return {
        "rule": info.rule, "size": [info.height, info.width], "uncovered": list(info.uncovered),
        "levels": fmt.levels_of(info), "steps": steps,
        "topk_steps": [s for s in steps if projections.ranks(s, units) > 1],
    }


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return f"none ({NOT_LOGGED})"
    return ", ".join(map(str, steps[:20])) + (f", ... ({len(steps)} in all)" if len(steps) > 20 else "")
