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
import math
import os
import threading
from typing import Any, Callable, Hashable

import numpy as np
from tensorboard import errors
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.data import provider

from tb_convviz import metadata, plugin_data_pb2, stored_image
from tb_convviz.geometry import CropField, ReceptiveField, effective_crop

# `downsample=` that keeps every point: the loaders keep all convviz points (see
# loader.fix_flags), and anything smaller would make the provider drop steps.
ALL_POINTS = 1 << 30
# Bounds on what logged metadata may ask of the renderer; larger values are refused
# as corrupted rather than allocated.
MAX_FIELD_SIDE = 4096
MAX_IMAGE_PIXELS = 1 << 24


class ByteLRU:
    """Thread-safe least-recently-used map bounded in entries and in bytes, keys included.

    Keys may come from requests (experiment ids, run names), so each entry is charged
    its key's size and a fixed overhead besides the ``nbytes`` of its value.
    """

    def __init__(self, max_bytes: int, max_entries: int = 4096, entry_overhead: int = 256) -> None:
        self.max_bytes, self.max_entries, self.entry_overhead = max_bytes, max_entries, entry_overhead
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
        nbytes += self.entry_overhead + _key_bytes(key)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes or len(self._items) > self.max_entries:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def _key_bytes(key: Hashable) -> int:
    if isinstance(key, (str, bytes)):
        return len(key)
    if isinstance(key, tuple):
        return sum(_key_bytes(part) for part in key)
    return 16


class _SingleFlight:
    """Runs one loader per key at a time, so a page of concurrent requests reads a series once.

    A fixed set of locks, picked by the key's hash: the table never grows, whatever the
    keys; two keys that share a lock only wait for each other.
    """

    STRIPES = 64

    def __init__(self) -> None:
        self._locks = tuple(threading.Lock() for _ in range(self.STRIPES))

    def lock(self, key: Hashable) -> threading.Lock:
        return self._locks[hash(key) % self.STRIPES]

    def __len__(self) -> int:
        return len(self._locks)


def cached_version(cache: ByteLRU, flight: _SingleFlight, key: Hashable, version: Hashable,
                   load: Callable[[], Any]) -> Any:
    """The value of series ``key`` at ``version`` in ``cache``; one version per key is kept.

    ``load`` returns (value, nbytes); nbytes None means "incomplete, do not keep". Under
    ``flight``, concurrent requests for a key load it once.
    """
    entry = cache.get(key)
    if entry is None or entry[0] != version:
        with flight.lock(key):
            entry = cache.get(key)
            if entry is None or entry[0] != version:
                value, nbytes = load()
                entry = (version, value)
                if nbytes is not None:
                    cache.put(key, entry, nbytes)
    return entry[1]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's top-k records at every logged checkpoint of a run."""

    name: str
    info: plugin_data_pb2.LayerInfo
    field: ReceptiveField
    steps: tuple[int, ...]
    records_by_step: dict[int, np.ndarray]
    errors: tuple[str, ...] = ()
    # (h, w) of the effective receptive field per step where it was measured, and the mass share it holds.
    effective: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    mass_share: float | None = None

    @property
    def positional(self) -> bool:
        """Whether records carry a (y, x) position (conv layers) or not (fully connected)."""
        return self.info.fmap_h > 0 and self.info.fmap_w > 0

    def records(self, step: int) -> np.ndarray:
        """``[units, k]`` RECORD_DTYPE records at ``step`` (which must be logged)."""
        return self.records_by_step[step]

    def crop(self, step: int, theoretical: bool = False) -> CropField:
        """How records at ``step`` are cropped: the effective field kept inside the image where measured, else
        (or if ``theoretical``) the theoretical field."""
        size = None if theoretical else self.effective.get(step)
        return effective_crop(self.field, size, (self.info.input_h, self.info.input_w))

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
    # Format version of the chunks: v2 image blobs name their probe index, v1 blobs are bare.
    version: int = metadata.PROTO_VERSION

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
    # Format of the probe chunks: 2 (one self-describing blob sequence) or 1 (legacy index + images).
    probe_format: int = metadata.PROTO_VERSION
    # Whose records and images `layers` and `probe_version` are: the probe set's, or a stream's.
    source: str = "probe"
    # Per stream the run logged: its layers (as `layers`) and its image chunks' version (or None).
    streams: dict[str, tuple[dict, tuple | None]] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """The run and source: what cached renderings of this listing's records are keyed by."""
        return self.name, self.source

    def of_source(self, source: str) -> "RunListing":
        """This listing as seen through ``source`` ("probe", "train" or "eval"); NotFoundError if not logged."""
        if source == self.source:
            return self
        if source not in self.streams:
            raise errors.NotFoundError(
                f"run {self.name!r} has no {source!r} stream records; its sources: "
                + ", ".join(["probe", *sorted(self.streams)]))
        layers, version = self.streams[source]
        return dataclasses.replace(self, layers=layers, probe_version=version, source=source,
                                   probe_format=metadata.PROTO_VERSION)
    # Layers with an effective-field series: name -> the mass share its box holds.
    effective: dict[str, float] = dataclasses.field(default_factory=dict)
    restarts_version: tuple | None = None  # of the restart markers' series, None without one


class ConvVizData:
    """Reads convviz runs from a TensorBoard ``DataProvider``; every method takes ``ctx`` and ``eid``."""

    def __init__(
        self,
        data_provider: provider.DataProvider,
        *,
        series_cache_bytes: int = 512 << 20,
        image_cache_bytes: int = 256 << 20,
        logdir: str | None = None,
    ) -> None:
        self._provider = data_provider
        self._logdir = logdir if logdir and os.path.isdir(logdir) else None
        self._series = ByteLRU(series_cache_bytes)
        self.images = ByteLRU(image_cache_bytes)
        self._flight = _SingleFlight()
        self._image_flight = _SingleFlight()
        # Per run, probe images found inconsistent when read (shown in the run's error).
        self.damaged = ByteLRU(1 << 20, max_entries=256)
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
        kwargs = dict(experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, run_tag_filter=rtf)
        tensors = _unless_vanished(lambda: self._provider.list_tensors(ctx, **kwargs), {})
        blobs = _unless_vanished(lambda: self._provider.list_blob_sequences(ctx, **kwargs), {})
        return {
            name: _listing(name, tags, blobs.get(name, {}))
            for name, tags in sorted(tensors.items()) if tags and not self._through_loop(name)
        }

    def _through_loop(self, run: str) -> bool:
        """Whether run ``run`` is reached through a symlink to one of its own parent folders (``logdir/loop -> .``).

        TensorBoard's Python loader follows such links until the path is too long, listing each
        run dozens of times (loop/a, loop/loop/a, ...); its Rust loader skips them, as this does.
        """
        if self._logdir is None:
            return False
        path = self._logdir
        seen = {os.path.realpath(path)}
        for part in [p for p in os.path.normpath(run).split(os.sep) if p not in ("", ".")]:
            path = os.path.join(path, part)
            real = os.path.realpath(path)
            if real in seen:
                return True
            seen.add(real)
        return False

    def listing(self, ctx, eid: str, run: str, source: str = "probe") -> RunListing:
        """The listing of ``run`` through ``source``; NotFoundError naming the valid runs if it has no convviz data."""
        found = self.listings(ctx, eid, run).get(run)
        if found is not None:
            return found.of_source(source)
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
            ("layer", eid, listing.key, name), version,
            lambda: self._read_layer(ctx, eid, listing.name, name, info, listing.source,
                                     listing.effective.get(name)),
        )

    def probe(self, ctx, eid: str, listing: RunListing) -> Probe:
        """Stored probe images of the listed run (blob keys only; no bytes are read)."""
        if listing.probe_version is None:
            return Probe(info=listing.probe, blob_keys={}, labels={})
        return self._cached(
            ("probe", eid, listing.key), listing.probe_version, lambda: self._read_probe(ctx, eid, listing)
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
            with self._image_flight.lock(cache_key):  # read once, by a request or by `prefetch` ahead of it
                image = self.images.get(cache_key)
                if image is None:
                    image = self._read_image(ctx, eid, listing, probe, index, key)
                    self.images.put(cache_key, image, image.nbytes)
        return image

    def _read_image(self, ctx, eid: str, listing: RunListing, probe: Probe, index: int, key: str) -> np.ndarray:
        blob = self._provider.read_blob(ctx, blob_key=key)
        if probe.version >= 2:
            try:
                blob = metadata.decode_image_blob(blob, index)
            except ValueError as e:
                self._note_damage(eid, listing, f"run {listing.name!r}: {e}")
                raise errors.NotFoundError(str(e)) from None
        return decode_image(blob, f"probe image {index}", probe.info)

    def _note_damage(self, eid: str, listing: RunListing, problem: str) -> None:
        key = (eid, listing.name, listing.probe_version)
        notes = self.damaged.get(key) or ()
        if problem not in notes and len(notes) < 5:
            self.damaged.put(key, notes + (problem,), len(problem))

    def problems(self, eid: str, listing: RunListing) -> tuple[str, ...]:
        """Inconsistent probe images met while serving the listed run (they are never drawn)."""
        return self.damaged.get((eid, listing.name, listing.probe_version)) or ()

    def prefetch(self, ctx, eid: str, listing: RunListing, probe: Probe, indices, *, wait: bool = True) -> None:
        """Read and decode the stored, uncached images among ``indices`` concurrently; ``wait=False``: in the
        background, for requests to come.

        Errors are left for the caller's own ``image`` call to raise.
        """
        missing = {
            i for i in indices
            if i in probe.blob_keys and self.images.get((eid, listing.name, i, probe.blob_keys[i])) is None
        }
        if len(missing) > 1 and self._readers is not None:
            reads = [self._readers.submit(self.image, ctx, eid, listing, probe, i) for i in missing]
            if wait:
                concurrent.futures.wait(reads)

    def scalars(self, ctx, eid: str, run: str, tags: list[str]) -> dict[str, dict[int, float]]:
        """Scalars ``tags`` of ``run`` as ``{tag: {step: value}}`` (missing tags are absent)."""
        data = self._provider.read_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", downsample=ALL_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        )
        return {tag: {d.step: d.value for d in series} for tag, series in data.get(run, {}).items()}

    def restarts(self, ctx, eid: str, listing: RunListing) -> list[int]:
        """Steps at which a restarted training's session began logging into the run (see metadata)."""
        if listing.restarts_version is None:
            return []
        return self._cached(("restarts", eid, listing.name), listing.restarts_version,
                            lambda: self._read_restarts(ctx, eid, listing.name))

    def _read_restarts(self, ctx, eid: str, run: str):
        read = _unless_vanished(lambda: self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[metadata.RESTART_TAG]),
        ), None)
        if read is None:  # the loader is swapping the series in
            return [], None
        steps = sorted({datum.step for datum in read.get(run, {}).get(metadata.RESTART_TAG, [])})
        return steps, 16 * len(steps)

    def _cached(self, key: Hashable, version: Hashable, load: Callable[[], Any]) -> Any:
        return cached_version(self._series, self._flight, key, version, load)

    def _read_layer(self, ctx, eid: str, run: str, name: str, info: plugin_data_pb2.LayerInfo, source: str,
                    mass_share: float | None):
        tag = metadata.topk_tag(name) if source == "probe" else metadata.stream_tag(source, "topk", name)
        # The effective field is the layer's, whichever images its records rank.
        effective_tag = metadata.effective_field_tag(name)
        tags = [tag] if mass_share is None else [tag, effective_tag]
        read = _unless_vanished(lambda: self._provider.read_tensors(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        ), None)
        if read is None:  # the loader is swapping the series in: nothing yet, and nothing kept
            return Layer(name=name, info=info, field=ReceptiveField.from_proto(info.receptive_field),
                         steps=(), records_by_step={}), None
        series = read.get(run, {}).get(tag, [])
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
        effective = {}
        for datum in read.get(run, {}).get(effective_tag, []) if mass_share is not None else ():
            size = np.asarray(datum.numpy)
            if size.shape == (2,) and size.dtype.kind in "iu" and (size > 0).all() and (size <= MAX_FIELD_SIDE).all():
                effective[datum.step] = (int(size[0]), int(size[1]))
            else:
                problems.append(f"layer {name!r} step {datum.step}: the effective field is not two positive "
                                "int sides; its theoretical field is shown")
        layer = Layer(
            name=name, info=info, field=ReceptiveField.from_proto(info.receptive_field),
            steps=tuple(sorted(records)), records_by_step=records, errors=tuple(problems),
            effective=effective, mass_share=mass_share,
        )
        return layer, nbytes + 64 * len(records) + 64 * len(effective)

    def _read_probe(self, ctx, eid: str, listing: RunListing):
        if listing.probe_format < 2:
            return self._read_legacy_probe(ctx, eid, listing)
        tag = metadata.PROBE_CHUNK_TAG if listing.source == "probe" else metadata.stream_tag(listing.source, "chunk")
        rtf = provider.RunTagFilter(runs=[listing.name], tags=[tag])
        read = _unless_vanished(lambda: self._provider.read_blob_sequences(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS, run_tag_filter=rtf,
        ), None)
        if read is None:
            return Probe(info=listing.probe, blob_keys={}, labels={}), None
        chunks, problems, seen = [], [], set()
        for datum in read.get(listing.name, {}).get(tag, []):
            if datum.step in seen:  # a reader resolves a step to one record; the others are unreachable
                problems.append(f"probe chunk {datum.step} is stored twice; only the first is used")
            elif not datum.values:
                problems.append(f"probe chunk {datum.step} is empty; chunk skipped")
            else:
                chunks.append(datum)
            seen.add(datum.step)
        indexes = self.read_concurrently(lambda d: self._chunk_index(ctx, d), chunks)
        blob_keys, labels = {}, {}
        for datum, rows in zip(chunks, indexes):
            if isinstance(rows, str):
                problems.append(f"probe chunk {datum.step}: {rows}; chunk skipped")
                continue
            if len(rows) != len(datum.values) - 1:
                problems.append(f"probe chunk {datum.step}: {len(rows)} index rows but {len(datum.values) - 1} "
                                "images; chunk skipped")
                continue
            for (index, label), ref in zip(rows.tolist(), datum.values[1:]):
                if index not in blob_keys:  # stored once; a duplicate is ignored
                    blob_keys[index], labels[index] = ref.blob_key, label
        probe = Probe(info=listing.probe, blob_keys=blob_keys, labels=labels, errors=tuple(problems))
        return probe, 128 * len(blob_keys)

    def _chunk_index(self, ctx, datum) -> np.ndarray | str:
        """The index rows of a chunk, or why they cannot be read."""
        try:
            return metadata.decode_chunk_index(self._provider.read_blob(ctx, blob_key=datum.values[0].blob_key))
        except (ValueError, errors.PublicError) as e:
            return str(e)

    def read_concurrently(self, function, items) -> list:
        """``[function(item) for item in items]``, on the reader threads where the provider is remote."""
        if self._readers is None or len(items) < 2:
            return [function(item) for item in items]
        return list(self._readers.map(function, items))

    def _read_legacy_probe(self, ctx, eid: str, listing: RunListing):
        """v1 chunks: an index tensor and an image blob sequence, paired by step only where that is unambiguous."""
        rtf = provider.RunTagFilter(runs=[listing.name], tags=[metadata.PROBE_INDEX_TAG, metadata.PROBE_IMAGES_TAG])
        kwargs = dict(experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=ALL_POINTS, run_tag_filter=rtf)
        tensors = _unless_vanished(lambda: self._provider.read_tensors(ctx, **kwargs), None)
        blobs = _unless_vanished(lambda: self._provider.read_blob_sequences(ctx, **kwargs), None)
        if tensors is None or blobs is None:
            return Probe(info=listing.probe, blob_keys={}, labels={}, version=1), None
        rows = tensors.get(listing.name, {}).get(metadata.PROBE_INDEX_TAG, [])
        images = blobs.get(listing.name, {}).get(metadata.PROBE_IMAGES_TAG, [])
        refs = {d.step: d.values for d in images}
        counts = collections.Counter([d.step for d in rows] + [d.step for d in images])
        twice = {step for step, count in counts.items() if count > 2}
        blob_keys, labels, problems = {}, {}, []
        for datum in rows:
            chunk = np.asarray(datum.numpy)
            if datum.step in twice:
                problems.append(f"probe chunk {datum.step} is stored twice (format v1 pairs by step); chunk skipped")
                continue
            if chunk.ndim != 2 or chunk.shape[1] != 2 or chunk.dtype.kind not in "iu":
                problems.append(f"probe chunk {datum.step}: index is not an int [m, 2] tensor; chunk skipped")
                continue
            values = refs.get(datum.step, ())
            if len(values) != len(chunk):
                problems.append(f"probe chunk {datum.step}: {len(chunk)} index rows but {len(values)} images; "
                                "chunk skipped")
                continue
            for (index, label), ref in zip(chunk.tolist(), values):
                if index not in blob_keys:
                    blob_keys[index], labels[index] = ref.blob_key, label
        probe = Probe(info=listing.probe, blob_keys=blob_keys, labels=labels, errors=tuple(problems), version=1)
        return probe, 128 * len(blob_keys)


def _unless_vanished(read: Callable[[], Any], vanished: Any) -> Any:
    """``read()``, or ``vanished`` when TensorBoard's Python loader drops a series mid-read.

    During a reload, ``plugin_event_accumulator`` can list a tag whose tensors are gone a
    moment later (KeyError): that series is simply not there yet.
    """
    try:
        return read()
    except KeyError:
        return vanished


def _listing(run: str, tags: dict[str, provider.TensorTimeSeries],
             blobs: dict[str, provider.BlobSequenceTimeSeries]) -> RunListing:
    chunks = blobs.get(metadata.PROBE_CHUNK_TAG)
    layers, problems, probe, probe_version, probe_format = {}, [], None, None, metadata.PROTO_VERSION
    streams: dict[str, tuple[dict, tuple | None]] = {}
    probe_series = [(metadata.PROBE_CHUNK_TAG, chunks)] if chunks is not None else []
    if chunks is None and metadata.PROBE_INDEX_TAG in tags:
        probe_series, probe_format = [(metadata.PROBE_INDEX_TAG, tags[metadata.PROBE_INDEX_TAG])], 1
    effective = {}
    restarts = tags.get(metadata.RESTART_TAG)
    for tag, series in sorted(tags.items()) + probe_series:
        version = (series.max_step, series.max_wall_time)
        if tag.startswith(metadata.EFFECTIVE_FIELD_TAG_PREFIX):
            share = _mass_share(series.plugin_content)
            if share is not None:
                effective[tag[len(metadata.EFFECTIVE_FIELD_TAG_PREFIX):]] = share
            continue
        name = metadata.layer_of_tag(tag)
        stream = metadata.parse_stream_tag(tag)
        if stream is not None and stream[1] == "topk" and stream[2]:
            source, _, name = stream
            if source not in streams:
                chunk = blobs.get(metadata.stream_tag(source, "chunk"))
                streams[source] = ({}, (chunk.max_step, chunk.max_wall_time) if chunk is not None else None)
            layers_of = streams[source][0]
        else:
            layers_of = layers
        if name is None and (tag, series) not in probe_series:
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
        layers_of[name] = (data.layer, version)
    return RunListing(name=run, layers=layers, probe=probe, probe_version=probe_version, errors=tuple(problems),
                      probe_format=probe_format, streams=streams, effective=effective,
                      restarts_version=(restarts.max_step, restarts.max_wall_time) if restarts else None)


def _mass_share(content: bytes) -> float | None:
    """The mass share of an effective-field series, or None if its plugin data is unusable (then it is not read)."""
    try:
        data = metadata.parse_plugin_metadata(content)
    except ValueError:
        return None
    share = data.effective_field.mass_share
    return share if data.WhichOneof("content") == "effective_field" and 0 < share <= 1 else None


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


def decode_image(data: bytes, what: str, info: plugin_data_pb2.ProbeInfo | None) -> np.ndarray:
    """Decode a probe image into uint8 ``[H, W]`` (grey) or ``[H, W, 3]``; NotFoundError if unusable.

    It must be as large as the probe set (``info``) says, which is checked from its header
    before any pixel is decoded, so that what a request decodes is what its budget counted.
    """
    height, width = (info.height, info.width) if info is not None else (0, 0)
    try:
        if height * width > MAX_IMAGE_PIXELS:
            raise ValueError(f"the probe set declares {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}")
        return stored_image.decode(data, height, width, what=what)
    except Exception as e:  # Pillow raises many types on corrupt data; all mean "unusable"
        raise errors.NotFoundError(f"{what} is stored but cannot be decoded ({e})") from None


def _names(items) -> str:
    names = sorted(items)
    shown = ", ".join(repr(n) for n in names[:20])
    return (shown + f", ... ({len(names)} in all)" if len(names) > 20 else shown) or "none"
