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
        self.read_concurrently = data.read_concurrently

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

    def layer_projections(self, ctx, eid: str, listing: RunListing, layer: Layer,
                          *, required: bool = True) -> "ProjectionReader | None":
        """``layer``'s projections, listed once for the request; NotFoundError saying why they cannot be drawn,
        or "not logged in this run" if it has none (None instead, unless ``required``)."""
        found = self.projections(ctx, eid, listing.name, listing.source).get(layer.name)
        if found is None or not found.blobs:
            if not required:
                return None
            raise errors.NotFoundError(f"projections of layer {layer.name!r} were {NOT_LOGGED} ({listing.name!r})")
        problem = fmt.unusable(found.info, layer.field.size)
        if problem:
            raise errors.NotFoundError(f"projections of layer {layer.name!r} cannot be drawn: {problem}")
        return ProjectionReader(self, ctx, eid, listing.name, layer, found)

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
                    and 0 < min(w.shape[2:]) and max(w.shape[2:]) <= MAX_KERNEL_SIDE and 0 < w.shape[1] <= 4096):
                weights[datum.step] = w.astype(np.float32)
        return Filters(info, weights), sum(w.nbytes for w in weights.values()) + 1024


class ProjectionReader:
    """One request's access to a layer's projections: listed once, each blob read once and cached."""

    def __init__(self, figures: FigureData, ctx, eid: str, run: str, layer: Layer, stored: LayerProjections) -> None:
        self._figures, self._ctx, self._eid, self._run = figures, ctx, eid, run
        self.layer, self.stored = layer, stored

    @property
    def steps(self) -> list[int]:
        return self.stored.steps

    def index(self, step: int) -> np.ndarray:
        """The projection index rows at ``step``."""
        blobs = self._blobs(step)
        key = ("index", self._eid, self._run, blobs[0].blob_key)
        rows = self._figures.pixels.get(key)
        if rows is None:
            rows = self._decode_index(step, self._read(blobs[0].blob_key))
            self._figures.pixels.put(key, rows, rows.nbytes + 64)
        return rows

    def find(self, step: int, unit: int, rank: int) -> int | None:
        """Position of record (unit, rank) in the step's index, or None if it was not projected."""
        rows = self.index(step)
        hits = np.flatnonzero((rows["unit"] == unit) & (rows["rank"] == rank))
        return int(hits[-1]) if hits.size else None

    def ranks_of(self, step: int, unit: int) -> dict[int, int]:
        """Per projected rank of ``unit`` at ``step`` (only ranks 0..k-1: the index may be crafted), its position."""
        rows = self.index(step)
        mine = np.flatnonzero((rows["unit"] == unit) & (rows["rank"] >= 0) & (rows["rank"] < self.layer.info.k))
        return {int(rows["rank"][i]): int(i) for i in mine}

    def projection(self, step: int, position: int, data: bytes | None = None,
                   field: CropField | None = None) -> np.ndarray:
        """The uint8 ``[C, h, w]`` projection at ``position`` of the step's index (``data``: its bytes, if read),
        on ``field``'s crop (default: the record's theoretical box)."""
        ref = self._blobs(step)[position + 1]
        key = ("pixels", self._eid, self._run, ref.blob_key)
        q = self._figures.pixels.get(key)
        row = self.index(step)[position]
        y, x = int(row["y"]), int(row["x"])
        box = record_box(self.layer.field, self.layer.positional, y, x)
        if q is None:
            try:
                q = fmt.decode_projection(self._read(ref.blob_key) if data is None else data, self.stored.info, box)
            except Exception as e:  # Pillow raises many types on corrupt data; all mean "unusable"
                raise errors.NotFoundError(
                    f"a projection of {self.layer.name!r} at step {step} cannot be decoded ({e})") from None
            self._figures.pixels.put(key, q, q.nbytes + 64)
        return q if field is None else fmt.on_box(q, box, field.box(self.layer.positional, y, x))

    def prefetch(self, steps: list[int], unit: int) -> dict[tuple[int, int], bytes]:
        """Read, concurrently, the indices of ``steps`` and the bytes of ``unit``'s top-1 projection at each.

        Returns ``{(step, position): bytes}`` for the projections not decoded yet, to pass to
        :meth:`projection`. Meant to run before a render slot is taken: under the Rust loader
        each read is a round trip to the data server, and a render slot should not wait on them.
        """
        steps = [s for s in steps if s in self.stored.blobs]
        read = self._figures.read_concurrently
        read(lambda s: _quietly(lambda: self.index(s)), steps)
        wanted = {}
        for step in steps:
            position = _quietly(lambda: self.find(step, unit, 0))
            if position is not None:
                key = self._blobs(step)[position + 1].blob_key
                if self._figures.pixels.get(("pixels", self._eid, self._run, key)) is None:
                    wanted[(step, position)] = key
        data = read(lambda key: _quietly(lambda: self._read(key)), list(wanted.values()))
        return {where: blob for where, blob in zip(wanted, data) if blob is not None}

    def _blobs(self, step: int) -> tuple:
        if step not in self.stored.blobs:
            raise errors.NotFoundError(
                f"layer {self.layer.name!r} has no projections at step {step}; steps with projections: "
                f"{_steps_text(self.stored.steps)}")
        return self.stored.blobs[step]

    def _read(self, blob_key: str) -> bytes:
        return self._figures._provider.read_blob(self._ctx, blob_key=blob_key)

    def _decode_index(self, step: int, data: bytes) -> np.ndarray:
        try:
            rows = fmt.decode_index(data)
        except ValueError as e:
            raise errors.NotFoundError(f"projection index of {self.layer.name!r} at step {step} is unusable: {e}")
        if len(rows) != len(self._blobs(step)) - 1:
            raise errors.NotFoundError(
                f"projection index of {self.layer.name!r} at step {step} has {len(rows)} rows for "
                f"{len(self._blobs(step)) - 1} images")
        return rows


def _quietly(read):
    """``read()``, or None where it raises NotFoundError (the caller's own read says why, later)."""
    try:
        return read()
    except errors.NotFoundError:
        return None


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
