"""Training and validation streams: the images the user's own forwards feed the model, ranked per unit.

Hooks on the logged layers keep, per unit, the top-k images of every forward the user runs in
the stream's mode (training mode for ``"train"``, eval mode for ``"eval"``), on the model's
device. Images that enter some unit's top-k are copied once into a CPU pool, named by a hash of
their pixels. A checkpoint re-scores the window's candidates (images seen since the previous
checkpoint, and that checkpoint's winners) as the probe pass scores probe images.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from typing import Any, Callable, Iterator, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from tb_convviz.caller import user_stacklevel
from tb_convviz.isolation import preserved
from tb_convviz.ranking import Agreement, Ranked, merge_ranks, rank, world
from tb_convviz.records import StreamRecords
from tb_convviz.sources import ProbeSource
from tb_convviz.topk import TopK, distinct
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


def content_id(image: torch.Tensor) -> int:
    """An image's id: a 63-bit hash of its pixels as fed (dtype, shape and values), the same on every rank."""
    data = image.detach().cpu().contiguous().view(-1)
    digest = hashlib.blake2b(repr((data.dtype, tuple(image.shape))).encode(), digest_size=8)
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


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


class ImagePool:
    """Candidate images on the CPU, each held once (named by :func:`content_id`), at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.images: dict[int, torch.Tensor] = {}
        self.labels: dict[int, int] = {}
        self.bytes = 0

    def add(self, images: torch.Tensor) -> list[int]:
        """Hold ``images`` ``[m, C, H, W]``; returns their ids."""
        ids = []
        for image in images.detach().cpu():
            image = image.contiguous().clone()
            key = content_id(image)
            if key not in self.images:
                self.images[key] = image
                self.bytes += image.numel() * image.element_size()
            ids.append(key)
        return ids

    def image(self, key: int) -> torch.Tensor:
        return self.images[key]

    def keep(self, keys: set[int]) -> None:
        """Let go of every image but ``keys``."""
        for key in [k for k in self.images if k not in keys]:
            self.bytes -= self.images[key].numel() * self.images[key].element_size()
            del self.images[key]
            self.labels.pop(key, None)


class StreamSource:
    """One stream (``mode`` "train" or "eval"): per unit of ``probe``'s layers, the top-k of the user's forwards."""

    def __init__(self, mode: str, probe: ProbeSource, images_at: ImagesAt, *, pool_bytes: int) -> None:
        self.mode, self.probe, self.images_at = mode, probe, images_at
        self.pool = ImagePool(pool_bytes)
        self.units = probe.spans[probe.layers[-1]][1]
        self.winners: set[int] = set()
        self._topk = TopK.empty(self.units, probe.k, probe.device)
        self.numbers: dict[int, int] = {}  # content id -> the number the run's records name the image by
        self.next_number = 0  # after those a resumed run already holds
        self.last_ids: list[tuple[int, int]] = []  # (row, id) of the last ranked forward, for its labels
        self._warned = False

    def observe(self, images: torch.Tensor, values: torch.Tensor) -> None:
        """Rank a forward's ``[B, units]`` spatial maxima; images that enter some unit's top-k join the pool."""
        values = values.float().masked_fill(values.isnan(), float("-inf"))
        enter = values >= self._topk.values[:, -1]
        rows = enter.any(dim=1).nonzero().flatten()
        if not len(rows):
            self.last_ids = []
            return
        ids = self.pool.add(images[rows.to(images.device)])
        self.last_ids = list(zip(rows.tolist(), ids))
        image = torch.tensor(ids, dtype=torch.int64, device=values.device)
        candidates = TopK(values[rows].t().masked_fill(~enter[rows].t(), float("-inf")),
                          image.unsqueeze(0).expand(self.units, -1),
                          torch.full((self.units, len(ids)), -1, dtype=torch.int64, device=values.device))
        candidates = TopK(candidates.values, candidates.image.masked_fill(candidates.values == float("-inf"), -1),
                          candidates.position)
        self._topk = distinct(TopK.joined(self._topk, candidates), self.probe.k)
        # Only images some unit holds stay: the pool never holds more than units x k + the winners.
        held = self._topk.image
        self.pool.keep(set(held[held >= 0].unique().tolist()) | self.winners)
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
        # The weakest leave first: the images whose best slot in any unit's top-k is the lowest,
        # which then leave the units that held them.
        held = self._topk.image
        slot = torch.arange(held.shape[1], device=held.device).expand_as(held)
        best: dict[int, int] = {}
        for key, s in zip(held.flatten().tolist(), slot.flatten().tolist()):
            if key >= 0:
                best[key] = min(best.get(key, s), s)
        order = sorted(self.pool.images, key=lambda key: (-best.get(key, held.shape[1]), key))
        dropped = set()
        for key in order:
            if self.pool.bytes <= self.pool.max_bytes:
                break
            dropped.add(key)
            self.pool.keep(set(self.pool.images) - {key})
        self.winners -= dropped
        gone = torch.isin(held, torch.tensor(sorted(dropped), dtype=torch.int64, device=held.device))
        self._topk = distinct(TopK(self._topk.values.masked_fill(gone, float("-inf")), held.masked_fill(gone, -1),
                                   self._topk.position), self.probe.k)

    def local(self) -> Ranked:
        """This rank's window re-scored in eval mode as the probe pass scores probe images (ids: content ids)."""
        held = self._topk.image
        keys = sorted((set(held[held >= 0].unique().tolist()) | self.winners) & set(self.pool.images))
        size = self.probe.batch_size
        batches = ((torch.tensor(keys[i:i + size], dtype=torch.int64),
                    torch.stack([self.pool.image(key) for key in keys[i:i + size]]))
                   for i in range(0, len(keys), size))
        return self.probe.rank_images(batches)

    def commit(self, results: dict[str, TopK]) -> None:
        """After a checkpoint with ``results``: its winners open the next window, the rest of the pool goes."""
        self.winners = {key for topk in results.values() for key in topk.image[topk.image >= 0].unique().tolist()}
        self.pool.keep(self.winners)
        self._topk = TopK.empty(self.units, self.probe.k, self.probe.device)

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
            # Rank 0 gets the new winners' pixels from whichever rank holds them: at most units x k images.
            shares = [None] * world() if rank() == 0 else None
            dist.gather_object(held, shares, dst=0)
            if rank() != 0:
                return None
            for share in shares:
                for key, (image, label) in share.items():
                    self.pool.images.setdefault(key, image)
                    self.pool.labels.setdefault(key, label)
                    held.setdefault(key, (image, label))
        images = {self.numbers[key]: image for key, (image, _) in held.items()}
        labels = {self.numbers[key]: label for key, (_, label) in held.items() if label >= 0}
        return StreamRecords(results, project(_Numbered(self), results), images, labels)

    def warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"convviz: {message}", ConvVizWarning, stacklevel=user_stacklevel())


class _Numbered:
    """A stream's images by the number the run's records name them by, for projections."""

    def __init__(self, stream: StreamSource) -> None:
        self.pool, self.keys = stream.pool, {number: key for key, number in stream.numbers.items()}

    def image(self, number: int) -> torch.Tensor:
        return self.pool.image(self.keys[number])


class StreamHooks:
    """The forward hooks that feed ``streams`` from the user's forwards of ``net``; ``paused()`` stops them."""

    def __init__(self, net: nn.Module, streams: Sequence[StreamSource]) -> None:
        self.net, self.streams = net, {s.mode: s for s in streams}
        first = streams[0]
        self.layers, self.images_at = first.probe.layers, first.images_at
        self._paused = 0
        self._current: tuple[StreamSource, torch.Tensor] | None = None
        self._found: dict[str, torch.Tensor] = {}
        self.last: StreamSource | None = None
        modules = dict(net.named_modules())
        self._handles = [net.register_forward_pre_hook(self._start, with_kwargs=True),
                         net.register_forward_hook(self._end)]
        self._handles += [modules[name].register_forward_hook(self._layer(name)) for name in self.layers]

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
        self._current = (stream, images)

    def _layer(self, name: str):
        def hook(_module, _inputs, output):
            if self._current is not None and isinstance(output, torch.Tensor):
                with torch.no_grad():
                    out = output.detach()
                    self._found[name] = out.amax(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else out
        return hook

    def _end(self, _module, _args, _output) -> None:
        current, self._current = self._current, None
        if current is None or len(self._found) != len(self.layers):
            return
        stream, images = current
        with torch.no_grad():
            stream.observe(images, torch.cat([self._found[n].float() for n in self.layers], dim=1))
        self._found, self.last = {}, stream

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
