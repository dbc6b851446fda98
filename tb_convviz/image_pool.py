"""The streams' candidate images on the CPU: each held once, in blocks, within a byte bound."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


class _Block:
    """Images copied together: their memory goes when the last of them does."""

    __slots__ = ("nbytes", "rows", "keys")

    def __init__(self, views: dict[int, torch.Tensor]) -> None:
        self.nbytes = sum(view.numel() * view.element_size() for view in views.values())
        self.rows, self.keys = len(views), set(views)


class ImagePool:
    """Candidate images (``[C, H, W]`` each, named by content id), ``bytes`` of CPU memory in all.

    A forward's new candidates are copied in one block, not one copy per image: in a young
    window nearly every image enters some unit's top-k, and most leave it again before the
    window closes. ``bytes`` counts the blocks' memory; a block whose images have mostly left
    is compacted, so it stays below twice the images'. :meth:`evict` first gives every image
    a block of its own, so that each image that leaves frees its bytes.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.images: dict[int, torch.Tensor] = {}  # views into their blocks
        self.labels: dict[int, int] = {}
        self.bytes = 0
        self._blocks: dict[int, _Block] = {}
        self._single = False  # since an eviction: one block per image, until keep()

    def add(self, keys: Sequence[int], images: torch.Tensor, rows: Sequence[int]) -> None:
        """Hold ``images[rows]`` as ``keys`` (those not held yet); from another device in one transfer."""
        new: dict[int, int] = {}
        for key, row in zip(keys, rows):
            if key not in self.images:
                new.setdefault(key, row)
        if not new:
            return
        images = images.detach()
        if len(new) == len(images) and list(new.values()) == list(range(len(images))):
            block = images.to("cpu", memory_format=torch.contiguous_format, copy=True)
        else:
            block = images[torch.tensor(list(new.values()), device=images.device)]
            block = block.to("cpu", memory_format=torch.contiguous_format)
        if self._single:
            for key, row in zip(new, block):
                self._hold({key: row.clone()})
        else:
            self._hold(dict(zip(new, block.unbind(0))))

    def _hold(self, views: dict[int, torch.Tensor]) -> None:
        block = _Block(views)
        for key, view in views.items():
            self.images[key] = view
            self._blocks[key] = block
        self.bytes += block.nbytes

    def image(self, key: int) -> torch.Tensor:
        return self.images[key]

    def drop(self, keys: Iterable[int]) -> None:
        """Let go of ``keys`` (those held)."""
        emptied: dict[int, _Block] = {}
        for key in keys:
            if self.images.pop(key, None) is None:
                continue
            self.labels.pop(key, None)
            block = self._blocks.pop(key)
            block.keys.discard(key)
            emptied[id(block)] = block
        for block in emptied.values():
            if not block.keys:
                self.bytes -= block.nbytes
            elif 2 * len(block.keys) < block.rows:
                self._compact(block)

    def _compact(self, block: _Block) -> None:
        keys = sorted(block.keys)
        self.bytes -= block.nbytes
        self._hold(dict(zip(keys, torch.stack([self.images[key] for key in keys]).unbind(0))))

    def keep(self, keys: set[int]) -> None:
        """Let go of every image but ``keys``."""
        self.drop([key for key in self.images if key not in keys])
        self._single = False

    def evict(self, weakest_first: Iterable[int]) -> list[int]:
        """Let go of images in the order given until ``bytes <= max_bytes``; the keys let go of."""
        for block in {id(b): b for b in self._blocks.values() if b.rows > 1}.values():
            self.bytes -= block.nbytes
            for key in sorted(block.keys):
                self._hold({key: self.images[key].clone()})
        self._single = True
        dropped = []
        for key in weakest_first:
            if self.bytes <= self.max_bytes:
                break
            if key in self.images:
                dropped.append(key)
                self.drop([key])
        return dropped
