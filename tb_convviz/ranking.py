"""Ranking a checkpoint's candidates into its records, and the exact merge of every rank's share under DDP.

Every collective that a checkpoint's records need is made here, in :func:`merge_ranks`, which
every rank calls once per checkpoint and source. Before any of them the ranks agree, on a
small gloo group of their own (:class:`Agreement`): at the start of ``log()`` on the step, so
that a rank that is not logging (``log()`` on one rank only) is a clear error instead of a
logger collective paired with a DDP all-reduce (gloo aborts the process then); and in
``merge_ranks``, and before the projections' gather, on whether every rank's pass succeeded,
so that a checkpoint that failed on one rank is skipped on all of them. What rank 0 alone does
(taking and reading the log dir, when the logger is built) is :func:`on_rank_0`: every rank raises
its error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tb_convviz.topk import TopK, distinct, emptied, merge


@dataclasses.dataclass
class Ranked:
    """A source's per-layer records: ``topk[layer]`` (``[units, k]``) and ``not_finite[layer]`` (``[units]`` bool)."""

    topk: dict[str, TopK]
    not_finite: dict[str, torch.Tensor]


class Skipped(RuntimeError):
    """Another rank's part of the checkpoint failed, so every rank skips it (that rank says why)."""


class RankMismatch(RuntimeError):
    """The ranks did not call the logger together: a rule of the logger under torch.distributed was broken."""


RULE = ("under torch.distributed, every rank must build the logger, call maybe_log() (or log()) with the same "
        "global steps, and call close(), together")


class Agreement:
    """The ranks' agreements before a checkpoint's collectives, on a gloo group of all ranks, made by every rank
    together (when the logger is built).

    Waits as long as the default group would (its timeout), then raises :class:`RankMismatch`.
    """

    def __init__(self) -> None:
        self.timeout = _default_timeout()
        self.group = dist.new_group(backend="gloo", timeout=self.timeout) if world() > 1 else None

    def same_step(self, step: int, call: str) -> None:
        """Every rank is in ``call`` at ``step``; RankMismatch (naming the rule) if not."""
        if self.group is None:
            return
        steps = self._reduce([step, -step], dist.ReduceOp.MAX, f"{call} at step {step}")
        if steps[0] != -steps[1]:
            raise RankMismatch(f"convviz: {call} was called at different steps on different ranks (from "
                               f"{-steps[1]} to {steps[0]}): {RULE}. Pass the same global step on every rank")

    def all_ok(self, ok: bool, what: str) -> bool:
        """Whether ``what`` succeeded on every rank (all-reduce MIN of each rank's ``ok``)."""
        if self.group is None:
            return ok
        return bool(self._reduce([int(ok)], dist.ReduceOp.MIN, what)[0])

    def rank_0s(self, value: int, call: str) -> int:
        """Rank 0's ``value``, on every rank."""
        if self.group is None:
            return value
        return self._reduce([value if rank() == 0 else -(1 << 62)], dist.ReduceOp.MAX, call)[0]

    def rank_0s_error(self, error: Exception | None, what: str) -> Exception | None:
        """Rank 0's ``error`` (None if it had none), on every rank: the same class where it is a builtin one,
        with the same message."""
        if self.group is None:
            return error
        sent = [None if error is None else (type(error).__name__, str(error))]
        with _waiting(what):
            dist.broadcast_object_list(sent, src=0, group=self.group)
        if rank() == 0 or sent[0] is None:
            return error
        kind, message = sent[0]
        if kind in _REBUILT:
            return _REBUILT[kind](message)
        return RuntimeError(f"{what} failed on rank 0 ({kind}: {message})")

    def _reduce(self, values: list[int], op, what: str) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        with _waiting(what):
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()


@contextlib.contextmanager
def _waiting(what: str) -> Iterator[None]:
    """A collective of the agreement: RankMismatch where it ends without the other ranks."""
    try:
        yield
    except RuntimeError as e:  # a timeout, or a rank that left
        raise RankMismatch(
            f"convviz: rank {rank()} waited in {what} for the other ranks, which did not come ({e}): "
            f"{RULE}") from None


# The errors of rank 0 that other ranks raise as they are (any other becomes a RuntimeError that names it).
_REBUILT = {kind.__name__: kind for kind in (ValueError, TypeError, RuntimeError, OSError)}


def _default_timeout() -> datetime.timedelta:
    """The timeout of the default process group (what the user allows a collective), else torch's default."""
    try:
        group = dist.distributed_c10d._get_default_group()
        for device in ("cpu", "cuda"):
            with contextlib.suppress(Exception):
                return group._get_backend(torch.device(device)).options._timeout
    except Exception:  # private API: fall back rather than fail
        pass
    return dist.default_pg_timeout


def merge_ranks(local: Callable[[], Ranked], k: int, *, agreement: Agreement | None = None,
                by_content: bool = False) -> Ranked:
    """This rank's share (``local()``) merged with every other rank's into the checkpoint's records, on the CPU.

    Every rank calls it once per checkpoint and source, with the same layers in the same
    order: the gathers pair up only then. Units that were not finite on any rank lose their ranks.
    ``by_content``: records name images by content, and two ranks may hold the same image.
    Under DDP (with the logger's ``agreement``) the ranks first agree that every share succeeded:
    if one failed, its error is raised there and :class:`Skipped` on every other rank.
    """
    local = agreed(local, agreement, "the probe pass")
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


def agreed(part: Callable[[], Any], agreement: Agreement | None, what: str) -> Any:
    """``part()``, once every rank's ``part()`` has succeeded; else its error here, :class:`Skipped` elsewhere."""
    if agreement is None or agreement.group is None:
        return part()
    try:
        result, error = part(), None
    except Exception as e:
        result, error = None, e
    if agreement.all_ok(error is None, what):
        return result
    if error is not None:
        raise error
    raise Skipped(f"{what} failed on another rank, so every rank skips it (that rank's warning says why)")


def on_rank_0(part: Callable[[], None], agreement: Agreement | None, what: str) -> None:
    """``part()`` on rank 0 alone; if it fails, every rank raises its error (the same message), none waits on."""
    error = None
    if rank() == 0:
        try:
            part()
        except Exception as e:
            error = e
    shared = agreement.rank_0s_error(error, what) if agreement is not None else error
    if shared is not None:  # rank 0's own error there
        raise shared


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
