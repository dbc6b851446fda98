"""Reading convviz runs through TensorBoard's data provider, with bounded caches.

The provider API has no step filter: reading a tensor series returns every step.
So each layer series is read once, decoded into views, and cached until its
listing (max step, max wall time) changes, which is when TensorBoard's reload saw
new or replaced checkpoints. Probe images are decoded on first use into a
byte-bounded LRU. Nothing here imports torch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import math
import threading
from typing import Any, Callable, Hashable

import numpy as np
from PIL import Image
from tensorboard import errors
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.data import provider

from tb_convviz import metadata, plugin_data_pb2
from tb_convviz.geometry import ReceptiveField

# `downsample=` that keeps every point: the loaders keep all convviz points (see
# loader.fix_flags), and anything smaller would make the provider drop steps.
ALL_POINTS = 1 << 30
# Bounds on what logged metadata may ask of the renderer; larger values are refused
# as corrupted rather than allocated.
MAX_FIELD_SIDE = 4096
MAX_IMAGE_PIXELS = 1 << 24


class ByteLRU:
    """Thread-safe least-recently-used map bounded by the total ``nbytes`` of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes


class _SingleFlight:
    """Runs one loader per key at a time, so a page of concurrent requests reads a series once."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def lock(self, key: Hashable) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's top-k records at every logged checkpoint of a run."""

    name: str
    info: plugin_data_pb2.LayerInfo
    field: ReceptiveField
    steps: tuple[int, ...]
    records_by_step: dict[int, np.ndarray]
    errors: tuple[str, ...] = ()

    @property
    def positional(self) -> bool:
        """Whether records carry a (y, x) position (conv layers) or not (fully connected)."""
        return self.info.fmap_h > 0 and self.info.fmap_w > 0

    def records(self, step: int) -> np.ndarray:
        """``[units, k]`` RECORD_DTYPE records at ``step`` (which must be logged)."""
        return self.records_by_step[step]

    def previous_step(self, step: int) -> int | None:
        i = self.steps.index(step)
        return self.steps[i - 1] if i else None


@dataclasses.dataclass(frozen=True)
class Probe:
    """The stored probe images of a run: blob key and label per probe index."""

    info: plugin_data_pb2.ProbeInfo | None
    blob_keys: dict[int, str]
    labels: dict[int, int]
    errors: tuple[str, ...] = ()

    def label_name(self, label: int | None) -> str | None:
        names = self.info.class_names if self.info is not None else ()
        return names[label] if label is not None and 0 <= label < len(names) else None


@dataclasses.dataclass(frozen=True)
class RunListing:
    """What a run's listing says, before any series is read."""

    name: str
    layers: dict[str, tuple[plugin_data_pb2.LayerInfo, tuple]]  # name -> (info, version)
    probe: plugin_data_pb2.ProbeInfo | None
    probe_version: tuple | None
    errors: tuple[str, ...]


class ConvVizData:
    """Reads convviz runs from a TensorBoard ``DataProvider``; every method takes ``ctx`` and ``eid``."""

    def __init__(
        self,
        data_provider: provider.DataProvider,
        *,
        series_cache_bytes: int = 512 << 20,
        image_cache_bytes: int = 256 << 20,
    ) -> None:
        self._provider = data_provider
        self._series = ByteLRU(series_cache_bytes)
        self.images = ByteLRU(image_cache_bytes)
        self._flight = _SingleFlight()
        # Each blob is one provider call, a gRPC round trip under the Rust loader; a mosaic
        # needs k of them, so they are issued together. The Python loader reads in-process,
        # where threads only add GIL contention (measured 1.3-1.5x slower cold mosaics).
        self._readers = (
            None if isinstance(data_provider, MultiplexerDataProvider)
            else concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="convviz-read")
        )

    def listings(self, ctx, eid: str, run: str | None = None) -> dict[str, RunListing]:
        """Listings of every run with convviz data, or of ``run`` alone."""
        rtf = provider.RunTagFilter(runs=[run]) if run is not None else None
        tensors = self._provider.list_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, run_tag_filter=rtf
        )
        return {name: _listing(name, tags) for name, tags in sorted(tensors.items()) if tags}

    def listing(self, ctx, eid: str, run: str) -> RunListing:
        """The listing of ``run``; NotFoundError naming the valid runs if it has no convviz data."""
        found = self.listings(ctx, eid, run).get(run)
        if found is None:
            raise errors.NotFoundError(
                f"run {run!r} has no convviz data; runs with convviz data: "
                + _names(self.listings(ctx, eid))
            )
        return found

    def layer(self, ctx, eid: str, listing: RunListing, name: str) -> Layer:
        """Layer ``name`` of the listed run, read once per version of its series."""
        if name not in listing.layers:
            # A layer whose plugin data is unusable is listed in `errors`: say why here too.
            why = "".join(f" ({p})" for p in listing.errors if p.startswith(metadata.topk_tag(name) + ":"))
            raise errors.NotFoundError(
                f"run {listing.name!r} has no readable layer {name!r}{why}; layers: {_names(listing.layers)}"
            )
        info, version = listing.layers[name]
        return self._cached(
            ("layer", eid, listing.name, name), version, lambda: self._read_layer(ctx, eid, listing.name, name, info)
        )

    def probe(self, ctx, eid: str, listing: RunListing) -> Probe:
        """Stored probe images of the listed run (blob keys only; no bytes are read)."""
        if listing.probe_version is None:
            return Probe(info=listing.probe, blob_keys={}, labels={})
        return self._cached(
            ("probe", eid, listing.name), listing.probe_version, lambda: self._read_probe(ctx, eid, listing)
        )

    def image(self, ctx, eid: str, listing: RunListing, probe: Probe, index: int) -> np.ndarray:
        """Probe image ``index`` as uint8 ``[H, W]`` or ``[H, W, C]``; NotFoundError if not stored."""
        key = probe.blob_keys.get(index)
        if key is None:
            raise errors.NotFoundError(
                f"probe image {index} is not stored in run {listing.name!r}: only images named by "
                f"some top-k record are kept ({len(probe.blob_keys)} of "
                f"{probe.info.n if probe.info else '?'} are stored)"
            )
        cache_key = (eid, listing.name, index, key)
        image = self.images.get(cache_key)
        if image is None:
            image = decode_image(self._provider.read_blob(ctx, blob_key=key), f"probe image {index}")
            self.images.put(cache_key, image, image.nbytes)
        return image

    def prefetch(self, ctx, eid: str, listing: RunListing, probe: Probe, indices) -> None:
        """Read and decode the stored, uncached images among ``indices`` concurrently.

        Errors are left for the caller's own ``image`` call to raise.
        """
        missing = {
            i for i in indices
            if i in probe.blob_keys and self.images.get((eid, listing.name, i, probe.blob_keys[i])) is None
        }
        if len(missing) > 1 and self._readers is not None:
            concurrent.futures.wait(
                [self._readers.submit(self.image, ctx, eid, listing, probe, i) for i in missing]
            )

    def scalars(self, ctx, eid: str, run: str, tags: list[str]) -> dict[str, dict[int, float]]:
        """Scalars ``tags`` of ``run`` as ``{tag: {step: value}}`` (missing tags are absent)."""
        data = self._provider.read_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", downsample=ALL_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        )
        return {tag: {d.step: d.value for d in series} for tag, series in data.get(run, {}).items()}

    def _cached(self, key: Hashable, version: Hashable, load: Callable[[], Any]) -> Any:
        """The value of series ``key`` at ``version``; one version per key is kept."""
        entry = self._series.get(key)
        if entry is None or entry[0] != version:
            with self._flight.lock(key):
                entry = self._series.get(key)
                if entry is None or entry[0] != version:
                    value, nbytes = load()
                    entry = (version, value)
                    self._series.put(key, entry, nbytes)
        return entry[1]

    def _read_layer(self, ctx, eid: str, run: str, name: str, info: plugin_data_pb2.LayerInfo):
        tag = metadata.topk_tag(name)
        series = self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
        ).get(run, {}).get(tag, [])
        records, problems, nbytes = {}, [], 0
        for datum in series:  # a repeated step keeps its last value, as TensorBoard shows it
            try:
                payload = datum.numpy.item() if datum.numpy.shape == () else None
                if not isinstance(payload, bytes):
                    raise ValueError("the top-k tensor is not a string scalar")
                records[datum.step] = metadata.decode_records(payload, info.units, info.k)
                nbytes += len(payload)
            except ValueError as e:
                problems.append(f"layer {name!r} step {datum.step}: {e}; step skipped")
        layer = Layer(
            name=name, info=info, field=ReceptiveField.from_proto(info.receptive_field),
            steps=tuple(sorted(records)), records_by_step=records, errors=tuple(problems),
        )
        return layer, nbytes + 64 * len(records)

    def _read_probe(self, ctx, eid: str, listing: RunListing):
        rtf = provider.RunTagFilter(runs=[listing.name], tags=[metadata.PROBE_INDEX_TAG, metadata.PROBE_IMAGES_TAG])
        kwargs = dict(experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS, run_tag_filter=rtf)
        rows = self._provider.read_tensors(ctx, **kwargs).get(listing.name, {}).get(metadata.PROBE_INDEX_TAG, [])
        blobs = self._provider.read_blob_sequences(ctx, **kwargs).get(listing.name, {})
        refs = {d.step: d.values for d in blobs.get(metadata.PROBE_IMAGES_TAG, [])}
        blob_keys, labels, problems = {}, {}, []
        for datum in rows:
            chunk = np.asarray(datum.numpy)
            if chunk.ndim != 2 or chunk.shape[1] != 2 or chunk.dtype.kind not in "iu":
                problems.append(f"probe chunk {datum.step}: index is not an int [m, 2] tensor; chunk skipped")
                continue
            values = refs.get(datum.step, ())
            if len(values) != len(chunk):
                problems.append(
                    f"probe chunk {datum.step}: {len(chunk)} index rows but {len(values)} images; "
                    "only the matching ones are used"
                )
            for (index, label), ref in zip(chunk.tolist(), values):
                if index not in blob_keys:  # stored once; a duplicate is ignored
                    blob_keys[index], labels[index] = ref.blob_key, label
        probe = Probe(info=listing.probe, blob_keys=blob_keys, labels=labels, errors=tuple(problems))
        return probe, 128 * len(blob_keys)


def _listing(run: str, tags: dict[str, provider.TensorTimeSeries]) -> RunListing:
    layers, problems, probe, probe_version = {}, [], None, None
    for tag, series in sorted(tags.items()):
        version = (series.max_step, series.max_wall_time)
        name = metadata.layer_of_tag(tag)
        if name is None and tag != metadata.PROBE_INDEX_TAG:
            continue  # a series a newer tb-convviz may add; not an error
        try:
            data = metadata.parse_plugin_metadata(series.plugin_content)
        except ValueError as e:
            problems.append(f"{tag}: {e}")
            continue
        if name is None:
            if data.WhichOneof("content") != "probe":
                problems.append(f"{tag}: plugin data holds no probe description")
                continue
            probe, probe_version = data.probe, version
            continue
        reason = _invalid_layer(data)
        if reason:
            problems.append(f"{tag}: {reason}")
            continue
        layers[name] = (data.layer, version)
    return RunListing(name=run, layers=layers, probe=probe, probe_version=probe_version, errors=tuple(problems))


def _invalid_layer(data: plugin_data_pb2.PluginData) -> str | None:
    if data.WhichOneof("content") != "layer":
        return "plugin data holds no layer description"
    info, rf = data.layer, data.layer.receptive_field
    if info.units < 1 or info.k < 1:
        return f"layer has {info.units} units and k={info.k}; both must be positive"
    if not (1 <= rf.size_h <= MAX_FIELD_SIDE and 1 <= rf.size_w <= MAX_FIELD_SIDE):
        return f"receptive field {rf.size_h}x{rf.size_w} is outside 1..{MAX_FIELD_SIDE} pixels"
    if not all(math.isfinite(v) and abs(v) < 1e6 for v in (rf.center_h, rf.center_w, rf.stride_h, rf.stride_w)):
        return "receptive field centre or stride is not a finite pixel position"
    return None


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Decode PNG/JPEG bytes into uint8 ``[H, W]`` (grey) or ``[H, W, 3]``; NotFoundError if unusable."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.width * pil.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{pil.width}x{pil.height} pixels is more than {MAX_IMAGE_PIXELS}")
            pil = pil if pil.mode in ("L", "RGB") else pil.convert("RGB")
            return np.asarray(pil, dtype=np.uint8)
    except Exception as e:  # Pillow raises many types on corrupt data; all mean "unusable"
        raise errors.NotFoundError(f"{what} is stored but cannot be decoded ({e})") from None


def _names(items) -> str:
    names = sorted(items)
    shown = ", ".join(repr(n) for n in names[:20])
    return (shown + f", ... ({len(names)} in all)" if len(names) > 20 else shown) or "none"
