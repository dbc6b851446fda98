"""Training and validation streams: the images the user's own forwards feed the model, ranked per unit.

Hooks on the logged layers keep, per unit, the top-k images of every forward the user runs in
the stream's mode (training mode for ``"train"``, eval mode for ``"eval"``), on the model's
device. Images that enter some unit's top-k are copied once into a CPU pool, named by a hash of
their pixels. A checkpoint re-scores the window's candidates (images seen since the previous
checkpoint, and that checkpoint's winners) as the probe pass scores probe images.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from tb_convviz.caller import user_stacklevel
from tb_convviz.image_pool import ImagePool
from tb_convviz.isolation import preserved
from tb_convviz.model_call import autocast_enabled, autocast_off
from tb_convviz.ranking import Agreement, Ranked, merge_ranks, rank, world
from tb_convviz.records import StreamRecords
from tb_convviz.sources import ProbeSource
from tb_convviz.state_version import state_tensors, state_version
from tb_convviz.topk import TopK, distinct, entry_bar, merge, peak_positions, peak_values
from tb_convviz.warning import ConvVizWarning

STREAMS = ("train", "eval")
POOL_BYTES = 256 << 20

ImagesAt = Union[int, str, Callable[[tuple, dict], torch.Tensor]]
"""Where a forward's images are: a positional index, a keyword name, or ``images_at(args, kwargs)``."""


def check_streams(stream: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stream`` as a tuple of stream names; ValueError for anything else."""
    names = () if stream is None else (stream,) if isinstance(stream, str) else tuple(stream)
    if any(name not in STREAMS for name in names) or len(set(names)) != len(names):
        raise ValueError(f"stream must be None, 'train', 'eval' or ('train', 'eval'), got {stream!r}")
    return names


# Content ids: _FORMS exact integer linear forms of an image's bytes (as int8) with fixed
# coefficients in [-128, 128), in int8 products of _BYTES bytes at most (each sum is below
# 2^16 * 2^14 = 2^30, exact in int32), then a blake2b digest of the forms, dtype and shape.
_FORMS = 8
_BYTES = 1 << 16


@functools.lru_cache(maxsize=4)
def _coefficients(size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0x5EED5)  # the same on every rank and device
    return torch.randint(-128, 128, (size, _FORMS), generator=generator, dtype=torch.int8).to(device)


def _forms(data: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``data @ coefficients`` (int8, ``[m, n]`` and ``[n, _FORMS]``), exact, as int64."""
    rows = len(data)
    if rows <= 16:  # the int8 kernels want more than 16 rows
        data = nn.functional.pad(data, (0, 0, 0, 17 - rows))
    try:
        out = torch._int_mm(data, coefficients)
    except (AttributeError, NotImplementedError, RuntimeError):  # no int8 kernel here: float64 sums are exact too
        with autocast_off(data.device.type):
            out = data.double() @ coefficients.double()
    return out[:rows].long()


def content_ids(images: torch.Tensor) -> list[int]:
    """Ids of ``images`` ``[m, ...]``: 63-bit hashes of their pixels as fed (dtype, shape and values).

    The pixels are hashed where they are, all at once, with exact integer arithmetic: every
    device and rank gets the same ids. Two different images share an id only if all
    ``_FORMS`` forms agree (probability at most 2^-64 for images that do not depend on the
    fixed coefficients: a form vanishes on a nonzero difference for at most one of the 256
    values of a coefficient) or their 63-bit digests collide (2^-63): about 1e-7 for the
    10^6 winners of a long run.
    """
    if not len(images):
        return []
    data = images.detach().reshape(len(images), -1).contiguous().view(torch.int8)  # the logical pixel order
    if data.shape[1] % 8:  # the int8 kernels want a multiple of 8 bytes
        data = nn.functional.pad(data, (0, 8 - data.shape[1] % 8))
    coefficients = _coefficients(data.shape[1], data.device)
    sums = sum(_forms(data[:, lo:lo + _BYTES].contiguous(), coefficients[lo:lo + _BYTES])
               for lo in range(0, data.shape[1], _BYTES))
    salt = repr((images.dtype, tuple(images.shape[1:]))).encode()
    forms = sums.cpu().numpy().astype("<i8").tobytes()
    size = 8 * _FORMS
    return [int.from_bytes(hashlib.blake2b(salt + forms[at:at + size], digest_size=8).digest(), "little") >> 1
            for at in range(0, len(forms), size)]


def content_id(image: torch.Tensor) -> int:
    """One image's :func:`content_ids`."""
    return content_ids(image.unsqueeze(0))[0]


def _ids_of(images: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """:func:`content_ids` of ``images[rows]``: all of them hashed where most are wanted, instead of a copy."""
    if 2 * len(rows) > len(images):
        ids = content_ids(images)
        return ids if len(rows) == len(images) else [ids[row] for row in rows.tolist()]
    return content_ids(images[rows.to(images.device)])


def locate_images(net: nn.Module, call: Callable[[torch.Tensor], Any], sample: torch.Tensor,
                  images_at: ImagesAt | None) -> ImagesAt:
    """Where ``net``'s forward finds the images ``call(sample)`` gives it; ValueError at construction if nowhere."""
    if images_at is not None:
        if not (isinstance(images_at, (int, str)) or callable(images_at)):
            raise TypeError(f"stream_images must be an int, a str or a callable(args, kwargs), got {images_at!r}")
        return images_at
    seen: list[tuple[tuple, dict]] = []
    handle = net.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        with preserved(net):
            call(sample)
    finally:
        handle.remove()
    if seen:
        args, kwargs = seen[0]
        found = next((i for i, a in enumerate(args) if a is sample), None)
        if found is None:
            found = next((name for name, a in kwargs.items() if a is sample), None)
        if found is not None:
            return found
    raise ValueError(
        "stream=: cannot find the images in the model's inputs (they are not its first positional [N, C, H, W] "
        "argument, nor an argument that forward= passes on unchanged). Pass stream_images=: the position or "
        "keyword of the images among the model's arguments, or a callable(args, kwargs) that returns them"
    )


def _images_of(images_at: ImagesAt, args: tuple, kwargs: dict) -> Any:
    if isinstance(images_at, int):
        return args[images_at] if images_at < len(args) else None
    if isinstance(images_at, str):
        return kwargs.get(images_at)
    return images_at(args, kwargs)


class StreamSource:
    """One stream (``mode`` "train" or "eval"): per unit of ``probe``'s layers, the top-k of the user's forwards.

    ``exact_forwards``: a forward may score its images exactly as the re-scoring would (the
    eval stream, without ``forward=``); a checkpoint then re-scores only the candidates that
    such forwards did not score with the current weights.
    """

    def __init__(self, mode: str, probe: ProbeSource, images_at: ImagesAt, *, pool_bytes: int,
                 exact_forwards: bool = False) -> None:
        self.mode, self.probe, self.images_at = mode, probe, images_at
        self.exact_forwards = exact_forwards
        self.pool = ImagePool(pool_bytes)
        self.units = probe.spans[probe.layers[-1]][1]
        self.winners: set[int] = set()
        self.numbers: dict[int, int] = {}  # content id -> the number the run's records name the image by
        self.next_number = 0  # after those a resumed run already holds
        self.last_ids: list[tuple[int, int]] = []  # (row, id) of the last ranked forward, for its labels
        self._warned = False
        self._open([])

    def _open(self, winners: Iterable[int]) -> None:
        """A new window, holding ``winners``."""
        self.winners = set(winners)
        self.pool.keep(self.winners)
        self._topk = TopK.empty(self.units, self.probe.k, self.probe.device)
        self._full = False  # every unit holds k images
        # Whether every record of the window came from a forward that scored as the re-scoring
        # would, with the weights of state version _version; and the winners no such forward scored.
        self._exact, self._version, self._unscored = self.exact_forwards, None, set(self.winners)
        self._fed_winners: set[int] = set()

    def scored_version(self, images: torch.Tensor) -> int | None:
        """The model's state version if a forward of ``images`` now scores them exactly as the re-scoring would."""
        if (not self.exact_forwards or world() > 1 or images.dtype != torch.float32
                or images.device != self.probe.device or autocast_enabled(images.device.type)
                or any(m.training for m in self.probe.net.modules())):
            return None
        tensors = state_tensors(self.probe.net)
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
            return None
        return state_version(tensors)

    def bar(self, layer: str, values: torch.Tensor) -> torch.Tensor:
        """Per unit of ``layer``, the :func:`~tb_convviz.topk.entry_bar` of a forward's ``[B, units]`` maxima."""
        held = self._topk.values[slice(*self.probe.spans[layer])]
        # Once no slot is free the bar is the held k-th: the batch's own k-th cannot raise it.
        return held[:, -1] if self._full else entry_bar(values, held)

    def observe(self, images: torch.Tensor, values: torch.Tensor, bar: torch.Tensor,
                positions: torch.Tensor | None = None, version: int | None = None,
                spatial: torch.Tensor | None = None) -> None:
        """Rank a forward's ``[B, units]`` spatial maxima; images that enter some unit's top-k join the pool.

        ``bar``: per unit, the :meth:`bar` of the batch. ``version``: the forward scored its
        images as the re-scoring would, with the weights of that state version; ``positions``
        then holds the positions of the maxima that reach ``bar``, on the units whose maps are
        ``spatial`` (``[units]`` bool).
        """
        if self._version is None:
            self._version = version
        # The sum is finite only if every value is: an overflow only costs a re-scoring.
        if version is None or version != self._version or not bool(values.sum().isfinite()):
            self._exact = False
        enter = values >= bar  # NaN enters nowhere
        rows = enter.any(dim=1).nonzero().flatten()
        ids = _ids_of(images, rows)
        if len(set(ids)) < len(ids):
            # An image fed twice may have set the batch's part of the bar (in training mode its
            # maps differ): the bar of the images held alone. Maps between the two bars have no
            # position; if one holds a slot, the checkpoint re-scores (below).
            enter = values >= self._topk.values[:, -1]
            rows = enter.any(dim=1).nonzero().flatten()
            ids = _ids_of(images, rows)
        self.last_ids = []
        if not ids:
            return
        if len(rows) < len(images):
            values, enter = values[rows], enter[rows]
            positions = positions[rows] if positions is not None else None
        rows = rows.tolist()
        positions = positions if positions is not None else torch.full_like(values, -1, dtype=torch.int64)
        keep = _merge_repeats(ids, values, positions, enter)
        if version is not None:
            self._unscored.difference_update(ids)
        if len(keep) < len(ids):
            ids, rows, values, enter, positions = ([ids[i] for i in keep], [rows[i] for i in keep], values[keep],
                                                   enter[keep], positions[keep])
        pool, winners = self.pool.images, self.winners
        # Only images in the top-k can be seen again: pool images but the winners not fed since the window opened.
        again = any(key in pool and (key not in winners or key in self._fed_winners) for key in ids)
        self._fed_winners.update(key for key in ids if key in winners)
        candidates = TopK(values.masked_fill(~enter, float("-inf")).t(),
                          torch.tensor(ids, dtype=torch.int64, device=values.device), positions.t())
        self._topk, stays, left = _joined(self._topk, candidates, again=again)
        if not self._full:
            self._note_full()
        if self._exact and spatial is not None and bool(
                ((self._topk.position < 0) & (self._topk.image >= 0) & spatial.unsqueeze(1)).any()):
            # A map without a position holds a slot (an image fed twice that scored differently): re-score.
            self._exact = False
        new = [i for i in stays.nonzero().flatten().tolist() if ids[i] not in pool]
        self.pool.add([ids[i] for i in new], images, [rows[i] for i in new])
        self.pool.drop(key for key in left.tolist() if key not in winners)
        self.last_ids = [(row, key) for row, key in zip(rows, ids) if key in pool]
        if self.pool.bytes > self.pool.max_bytes:
            self._bound()

    def label(self, labels: torch.Tensor) -> None:
        """Labels of the last ranked forward's images, ``[B]``."""
        if not self.last_ids:
            return
        labels = labels.detach().cpu().flatten().tolist()
        for row, key in self.last_ids:
            if row < len(labels) and key in self.pool.images:
                self.pool.labels[key] = int(labels[row])

    def _bound(self) -> None:
        # The weakest leave first: the images whose best slot in any unit's top-k is the lowest
        # (winners no unit holds: lowest of all), then the higher ids; the units that held them lose them.
        held, k = self._topk.image, self.probe.k
        keys = torch.tensor(sorted(self.pool.images), dtype=torch.int64, device=held.device)
        slot = torch.arange(k, device=held.device).expand_as(held)
        mask = held >= 0
        best = torch.full_like(keys, k).scatter_reduce(0, torch.searchsorted(keys, held[mask]), slot[mask], "amin")
        dropped = self.pool.evict(keys[best.argsort(descending=True, stable=True)].tolist())
        self._exact = False
        self.winners.difference_update(dropped)
        self._unscored.difference_update(dropped)
        gone = torch.isin(held, torch.tensor(dropped, dtype=torch.int64, device=held.device))
        self._topk = merge(TopK(self._topk.values.masked_fill(gone, float("-inf")), held.masked_fill(gone, -1),
                                self._topk.position.masked_fill(gone, -1)), TopK.empty(self.units, 0, held.device))
        self._note_full()

    def _note_full(self) -> None:
        self._full = bool((self._topk.image[:, -1] >= 0).all())

    def local(self) -> Ranked:
        """This rank's window re-scored in eval mode as the probe pass scores probe images (ids: content ids).

        Candidates that forwards scored as the re-scoring would, with the current weights, keep
        their values and positions; only the others are re-scored.
        """
        skip = (self._exact and self._version is not None and world() == 1
                and state_version(state_tensors(self.probe.net)) == self._version)
        keys = sorted(self._unscored & self.pool.images.keys() if skip else self.pool.images)
        size = self.probe.batch_size
        batches = ((torch.tensor(keys[i:i + size], dtype=torch.int64),
                    torch.stack([self.pool.image(key) for key in keys[i:i + size]]))
                   for i in range(0, len(keys), size))
        rescored = self.probe.rank_images(batches)
        if not skip:
            return rescored
        topk = {name: distinct(TopK.joined(TopK(*(t[lo:hi] for t in (self._topk.values, self._topk.image,
                                                                          self._topk.position))),
                                           rescored.topk[name]), self.probe.k)
                for name, (lo, hi) in self.probe.spans.items()}
        return Ranked(topk, rescored.not_finite)

    def commit(self, results: dict[str, TopK]) -> None:
        """After a checkpoint with ``results``: its winners open the next window, the rest of the pool goes."""
        self._open(key for topk in results.values() for key in topk.image[topk.image >= 0].unique().tolist())

    def numbered(self, results: dict[str, TopK]) -> tuple[dict[str, TopK], list[int]]:
        """``results`` with images named by their number in the run, and the ids newly numbered (ascending)."""
        new = sorted({key for topk in results.values() for key in topk.image[topk.image >= 0].tolist()}
                     - set(self.numbers))
        for key in new:
            self.numbers[key], self.next_number = self.next_number, self.next_number + 1
        out = {}
        for name, topk in results.items():
            image = torch.tensor([self.numbers.get(key, -1) for key in topk.image.flatten().tolist()],
                                 dtype=torch.int64).view_as(topk.image)
            out[name] = TopK(topk.values, image, topk.position)
        return out, new

    def checkpoint(self, project: Callable[[Any, dict[str, TopK]], dict],
                   agreement: Agreement | None = None) -> StreamRecords | None:
        """Every rank: re-score, merge the ranks exactly, open the next window; rank 0 gets the records.

        ``project(images, results)`` projects the records on rank 0 alone (``images.image(number)``).
        """
        merged = merge_ranks(self.local, self.probe.k, agreement=agreement, by_content=True)
        results, new = self.numbered(merged.topk)
        self.commit(merged.topk)
        held = {key: (self.pool.images[key], self.pool.labels.get(key, -1)) for key in new if key in self.pool.images}
        if world() > 1:
            # Each image on its own: a view would send its whole block.
            held = {key: (image.clone(), label) for key, (image, label) in held.items()}
            # Rank 0 gets the new winners' pixels from whichever rank holds them: at most units x k images.
            shares = [None] * world() if rank() == 0 else None
            dist.gather_object(held, shares, dst=0)
            if rank() != 0:
                return None
            for share in shares:
                for key, (image, label) in share.items():
                    self.pool.add([key], image.unsqueeze(0), [0])
                    self.pool.labels.setdefault(key, label)
                    held.setdefault(key, (image, label))
        images = {self.numbers[key]: image for key, (image, _) in held.items()}
        labels = {self.numbers[key]: label for key, (_, label) in held.items() if label >= 0}
        return StreamRecords(results, project(_Numbered(self), results), images, labels)

    def warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"convviz: {message}", ConvVizWarning, stacklevel=user_stacklevel())


def _merge_repeats(ids: list[int], values: torch.Tensor, positions: torch.Tensor, enter: torch.Tensor) -> list[int]:
    """Rows of a forward that hold the same image twice, merged into its first: the indices to keep.

    The first row gets each unit's best value (and its position); ``values``, ``positions``
    and ``enter`` (``[m, units]``) are updated in place.
    """
    first: dict[int, int] = {}
    for i, key in enumerate(ids):
        if key not in first:
            first[key] = i
            continue
        a = first[key]
        better = values[i] > values[a]
        values[a] = torch.where(better, values[i], values[a])
        positions[a] = torch.where(better, positions[i], positions[a])
        enter[a] |= enter[i]
    return sorted(first.values())


def _joined(held: TopK, candidates: TopK, *, again: bool) -> tuple[TopK, torch.Tensor, torch.Tensor]:
    """The top-k of ``held`` and ``candidates`` (values ``[units, m]``, -inf where not entering; images ``[m]``).

    Candidates are distinct images. ``again``: some may be held already; such an image keeps its best record.
    Also: which candidates hold a slot now (``[m]`` bool), and the images ``held`` held that no slot holds now.
    """
    k, m = held.k, candidates.values.shape[1]
    held, values = _seen_again(held, candidates) if again else (held, candidates.values)
    # One topk over int64 keys, the value's bits in float order and then the image's rank among
    # those at hand (lower ids first), instead of two stable sorts of the records.
    known, index = torch.cat([held.image.flatten(), candidates.image]).unique(return_inverse=True)
    index = torch.cat([index[:held.image.numel()].view_as(held.image), index[held.image.numel():].expand_as(values)],
                      dim=1)
    both = torch.cat([held.values, values], dim=1)
    bits = (both + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, which it equals
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats' bits count down as the float goes down
    slots = (bits.long() * (1 << 32) + (len(known) - 1 - index)).topk(k, dim=1).indices
    values, kept = both.gather(1, slots), index.gather(1, slots)
    unused = values == float("-inf")
    out = TopK(values, known[kept].masked_fill(unused, -1),
               torch.cat([held.position, candidates.position], dim=1).gather(1, slots).masked_fill(unused, -1))
    stays = torch.zeros(m, dtype=torch.bool, device=values.device)
    stays[slots[(slots >= k) & ~unused] - k] = True
    left = torch.zeros(len(known), dtype=torch.bool, device=values.device)
    left[index[:, :k][held.image >= 0]] = True
    left[kept[~unused]] = False
    return out, stays, known[left]


def _seen_again(held: TopK, candidates: TopK) -> tuple[TopK, torch.Tensor]:
    """``held`` with the better records of images it holds that are candidates too, and the other candidates' values."""
    values, image = candidates.values, candidates.image.expand_as(candidates.values)
    ids, order = candidates.image.sort()
    column = order[torch.searchsorted(ids, held.image).clamp(max=len(ids) - 1)]  # each held image's candidate
    again = image.gather(1, column) == held.image
    seen = values.gather(1, column).masked_fill(~again, float("-inf"))
    better = seen > held.values
    held = TopK(torch.where(better, seen, held.values), held.image,
                torch.where(better, candidates.position.gather(1, column), held.position))
    absorbed = torch.zeros_like(values, dtype=torch.int32).scatter_add_(1, column, again.int()) > 0
    return held, values.masked_fill(absorbed, float("-inf"))


class _Numbered:
    """A stream's images by the number the run's records name them by, for projections."""

    def __init__(self, stream: StreamSource) -> None:
        self.pool, self.keys = stream.pool, {number: key for key, number in stream.numbers.items()}

    def image(self, number: int) -> torch.Tensor:
        return self.pool.image(self.keys[number])


class StreamHooks:
    """The forward hooks that feed ``streams`` from the user's forwards of ``net``; ``paused()`` stops them."""

    def __init__(self, net: nn.Module, streams: Sequence[StreamSource], *, compiled: bool = False) -> None:
        """``compiled``: ``net`` runs inside ``torch.compile`` code (see :func:`compiled`)."""
        self.net, self.streams, self.compiled = net, {s.mode: s for s in streams}, compiled
        first = streams[0]
        self.layers, self.images_at = first.probe.layers, first.images_at
        self._paused = 0
        self._current: tuple[StreamSource, torch.Tensor] | None = None
        self._found: dict[str, torch.Tensor] = {}
        self.last: StreamSource | None = None
        modules = dict(net.named_modules())
        # Under torch.compile the hooks run eagerly, outside the graph: dynamo cannot trace the ranking.
        eager = torch.compiler.disable
        self._handles = [net.register_forward_pre_hook(eager(self._start), with_kwargs=True),
                         net.register_forward_hook(eager(self._end))]
        self._handles += [modules[name].register_forward_hook(eager(self._layer(name))) for name in self.layers]
        self._recompile(compiled)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No forward inside is ranked."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._current, self._found, self.last = None, {}, None
        stream = self.streams.get("train" if module.training else "eval")
        if self._paused or stream is None:
            return
        images = _images_of(self.images_at, args, kwargs)
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            stream.warn_once(f"a {stream.mode}-stream forward got no [N, C, H, W] images where stream_images= "
                             f"says ({type(images).__name__}); such forwards are not ranked")
            return
        self._current = (stream, images, stream.scored_version(images))

    def _layer(self, name: str):
        def hook(_module, _inputs, output):
            if self._current is None or not isinstance(output, torch.Tensor):
                return
            stream, _, version = self._current
            with torch.no_grad():
                out = output.detach()
                values = peak_values(out)
                bar = stream.bar(name, values)
                # Positions of the maxima that can hold a slot, as the probe pass finds them.
                positions = peak_positions(out, values, bar) if version is not None else None
                self._found[name] = (values, bar, positions, out.dim() > 2)
        return hook

    def _end(self, _module, _args, _output) -> None:
        current, self._current = self._current, None
        if current is None or len(self._found) != len(self.layers):
            return
        stream, images, version = current
        found = [self._found[n] for n in self.layers]
        if any(len(values) != len(images) for values, *_ in found):
            stream.warn_once(f"a {stream.mode}-stream forward's layers saw another batch size than its images "
                             f"{tuple(images.shape)}; such forwards are not ranked (check stream_images=)")
            return
        with torch.no_grad():
            values = torch.cat([values for values, *_ in found], dim=1)
            bar = torch.cat([bar for _, bar, _, _ in found])
            if version is None:
                stream.observe(images, values, bar)
            else:
                spatial = torch.cat([torch.full((len(bar),), flag, device=values.device)
                                     for _, bar, _, flag in found])
                stream.observe(images, values, bar, torch.cat([positions for _, _, positions, _ in found], dim=1),
                               version, spatial)
        self._found, self.last = {}, stream

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._recompile(self.compiled)

    @staticmethod
    def _recompile(compiled: bool) -> None:
        # Dynamo does not guard on module hooks: code compiled before they were added (or
        # removed) would run without them (or go on calling them). Compiled code is dropped so
        # that the next call compiles anew (every model's: dynamo keys its caches by code object).
        if compiled:
            reset = getattr(torch._dynamo, "reset_code_caches", torch._dynamo.reset)
            reset()


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its modules is compiled (``torch.compile(model)`` or ``module.compile()``)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
