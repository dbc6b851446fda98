"""Ranking a checkpoint's candidates into its records, and the exact merge of every rank's share under DDP.

Every collective that a checkpoint's records need is made here, in :func:`merge_ranks`, which
every rank calls once per checkpoint and source: ranks that must first agree (for example
that each one's pass succeeded) agree there, before the gathers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tb_convviz.topk import TopK, distinct, emptied, merge


@dataclasses.dataclass
class Ranked:
    """A source's per-layer records: ``topk[layer]`` (``[units, k]``) and ``not_finite[layer]`` (``[units]`` bool)."""

    topk: dict[str, TopK]
    not_finite: dict[str, torch.Tensor]


def merge_ranks(local: Callable[[], Ranked], k: int, *, by_content: bool = False) -> Ranked:
    """This rank's share (``local()``) merged with every other rank's into the checkpoint's records, on the CPU.

    Every rank calls it once per checkpoint and source, with the same layers in the same
    order: the gathers pair up only then. Units that were not finite on any rank lose their ranks.
    ``by_content``: records name images by content, and two ranks may hold the same image.
    """
    local = local()
    topk, not_finite = {}, {}
    for name, records in local.topk.items():
        bad = local.not_finite[name]
        if world() > 1:
            records = _gather(records, k, by_content)
            bad = bad.to(torch.uint8)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            bad = bad.bool()
        not_finite[name] = bad.to("cpu")
        topk[name] = emptied(records, bad).to("cpu")
    return Ranked(topk, not_finite)


def _gather(topk: TopK, k: int, by_content: bool) -> TopK:
    parts = []
    for tensor in (topk.values, topk.image, topk.position):
        gathered = [torch.empty_like(tensor) for _ in range(world())]
        dist.all_gather(gathered, tensor.contiguous())
        parts.append(gathered)
    merged = TopK(parts[0][0], parts[1][0], parts[2][0])
    for values, image, position in zip(*(p[1:] for p in parts)):
        other = TopK(values, image, position)
        merged = distinct(TopK.joined(merged, other), k) if by_content else merge(merged, other, k)
    return merged


def share(items: int, batch_size: int) -> tuple[int, int]:
    """This rank's ``[begin, end)`` of ``items`` taken in batches: ranks split whole batches of the single-process pass.

    A kernel's rounding can depend on the batch an image is in, and each image must get the
    value one process would give it.
    """
    batches = -(-items // batch_size)
    begin = min(batches * rank() // world() * batch_size, items)
    end = min(batches * (rank() + 1) // world() * batch_size, items)
    return begin, end


@contextlib.contextmanager
def buffers_of_rank_0(model: nn.Module) -> Iterator[None]:
    """Rank 0's buffers in ``model`` while inside, each rank's own restored after.

    DDP keeps parameters in sync but not buffers: each rank updates its own BatchNorm
    statistics, and DDP copies rank 0's only at the next forward. A checkpoint's passes must
    rank every share with the model rank 0 writes about.
    """
    buffers = list(model.buffers()) if world() > 1 else []
    own = [b.clone() for b in buffers] if rank() != 0 else []
    for buffer in buffers:
        dist.broadcast(buffer, src=0)
    try:
        yield
    finally:
        for buffer, saved in zip(buffers, own):
            buffer.copy_(saved)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
