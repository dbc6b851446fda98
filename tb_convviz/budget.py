"""The overhead budget: checkpoints take at most a fraction of training's wall time.

A checkpoint's cost is measured against the training time between checkpoints (the wall
time between ``maybe_log`` calls, less the checkpoints). With ``total_steps`` known, the
run's training time is projected from the time per step, and after each checkpoint the
rest of the schedule is thinned to what the budget affords, keeping its dense-early
spacing; otherwise a due checkpoint waits until the checkpoints so far, plus this one, fit
in the budget of the training time so far. The first ``GRACE_SECONDS`` of checkpoints are
free, so a loop whose checkpoints cost milliseconds is never thinned. Step 0 (the first
checkpoint), the final one and explicit ``log()`` calls are always logged. Rank 0 measures
and decides; the other ranks follow its decisions, as all join every checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Iterator

import torch
import torch.distributed as dist

from tb_convviz.ranking import rank, world
from tb_convviz.schedule import Schedule

DEFAULT_BUDGET = 0.1
GRACE_SECONDS = 10.0
# After the first checkpoint, one log line gives its cost in training steps above this ratio.
STEPS_PER_CHECKPOINT_NOTE = 10

clock = time.perf_counter  # the time source, read at each call (tests give theirs)
log = logging.getLogger("tb_convviz")


class OverheadBudget:
    """Defers or thins scheduled checkpoints so that they take at most ``fraction`` of training time."""

    def __init__(self, fraction: float | None, schedule: Schedule, device: torch.device) -> None:
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction):
            raise ValueError(f"overhead_budget must be a positive fraction of training time such as 0.1, or None "
                             f"to log every scheduled checkpoint, got {fraction!r}")
        self.fraction, self.schedule, self.device = fraction, schedule, device
        self._start: float | None = None  # clock and step at the first maybe_log
        self._first_step = 0
        self._spent, self._cost, self._checkpoints = 0.0, 0.0, 0
        self._measured_at: int | None = None  # the step of the last checkpoint not yet followed by a step
        self._noted = False
        self._dropped: list[int] = []
        self._logged: list[int] = []

    def seen(self, step: int) -> bool:
        """Note a ``maybe_log(step)`` call; whether the schedule was thinned (the due step must be renewed)."""
        if self._start is None:
            self._start, self._first_step = clock(), step
        if self._measured_at is None or step <= self._measured_at:
            return False
        checkpoint_step, self._measured_at = self._measured_at, None
        per_step = self._per_step(step)
        if not self._noted and per_step > 0 and rank() == 0:
            self._noted = True
            ratio = self._cost / per_step
            if ratio > STEPS_PER_CHECKPOINT_NOTE:
                budget = ("overhead_budget=None logs every scheduled checkpoint; a fraction such as 0.1 keeps "
                          "them within that share of training time" if self.fraction is None else
                          f"overhead_budget={self.fraction} keeps all checkpoints within that share of training time")
                log.warning(
                    "convviz: one checkpoint took %.2f s, as long as %.0f training steps (%.3f s each). For a "
                    "quick trial, pass projections=None, a smaller probe set (ProbeSet.from_dataset(..., n=256)) "
                    "or a smaller probe image size; %s.", self._cost, ratio, per_step, budget)
        if self.fraction is None or self.schedule.total_steps is None:
            return False
        # The training time of the whole run, at this pace, less what is spent; the final checkpoint is kept.
        allowance = self.fraction * per_step * self.schedule.total_steps + GRACE_SECONDS - self._spent
        affordable = allowance / self._cost if self._cost > 0 else math.inf
        keep = self._agree(1 << 30 if affordable >= 1 << 30 else max(1, math.floor(affordable)))
        dropped = self.schedule.thin(checkpoint_step, keep)
        self._dropped += dropped
        return bool(dropped)

    def allows(self, step: int, due: int) -> bool:
        """Whether the checkpoint due at ``due`` may be logged now, at ``step`` (else it waits)."""
        if self.fraction is None or self._checkpoints == 0 or self.schedule.total_steps is not None:
            return True
        training = clock() - self._start - self._spent
        allowed = self._agree(int(self._spent + self._cost <= self.fraction * training + GRACE_SECONDS))
        if not allowed and (not self._dropped or self._dropped[-1] != due):
            self._dropped.append(due)
        return bool(allowed)

    @contextlib.contextmanager
    def measure(self, step: int) -> Iterator[None]:
        """Time the checkpoint at ``step``."""
        began = clock()
        try:
            yield
        finally:
            self._cost = clock() - began
            self._spent += self._cost
            self._checkpoints += 1
            self._measured_at = step
            self._logged.append(step)

    def report(self) -> None:
        """One log line, if any scheduled checkpoint was deferred or left out."""
        late = sorted(set(self._dropped) - set(self._logged))
        if not late or rank() != 0:
            return
        shown = ", ".join(map(str, late[:12])) + (", ..." if len(late) > 12 else "")
        log.warning(
            "convviz: the overhead budget (overhead_budget=%s: checkpoints take at most %.0f%% of training time, "
            "after the first %.0f s) deferred or left out the checkpoints scheduled at steps %s; the last one took "
            "%.2f s. Pass a larger overhead_budget= to keep more, or overhead_budget=None to log every scheduled "
            "checkpoint.", self.fraction, 100 * self.fraction, GRACE_SECONDS, shown, self._cost)

    def _per_step(self, step: int) -> float:
        return max(0.0, clock() - self._start - self._spent) / max(1, step - self._first_step)

    def _agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if world() == 1:
            return value
        decided = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(decided, src=0)
        return int(decided.item())
