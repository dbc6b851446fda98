"""When to log: dense early in training, sparse late, as in Zeiler & Fergus' Fig. 4."""

from __future__ import annotations

import math
from typing import Iterable

DEFAULT_CHECKPOINTS = 16


class Schedule:
    """Decides which training steps get a checkpoint.

    Give at most one of ``every_n_steps`` (0, N, 2N, ...), ``steps`` (an explicit
    list) or ``total_steps`` (``checkpoints`` distinct steps spaced quadratically over
    ``[0, total_steps]``, so early training is sampled densely; see ``spaced_steps``,
    which gives every step when ``total_steps < checkpoints - 1``). With none, it
    logs at 0, 1, 2, 5, 10, 20, 50, 100, ... A step that is skipped over (the
    caller did not ask at it) is made up at the next step asked about. Step
    ``total_steps`` is the model after the last update: a loop that asks before
    each update never reaches it, and ``ConvVizLogger.close()`` logs it instead.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        steps: Iterable[int] | None = None,
        total_steps: int | None = None,
        checkpoints: int = DEFAULT_CHECKPOINTS,
    ) -> None:
        given = [n for n, v in (("every_n_steps", every_n_steps), ("steps", steps), ("total_steps", total_steps))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of every_n_steps, steps, total_steps (got {', '.join(given)})")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if checkpoints < 2:
            raise ValueError(f"checkpoints must be at least 2, got {checkpoints}")
        self.every_n_steps, self.total_steps = every_n_steps, total_steps
        if steps is not None:
            self._list = sorted({int(s) for s in steps})
            if not self._list or self._list[0] < 0:
                raise ValueError("steps must be a non-empty list of non-negative ints")
        elif total_steps is not None:
            self._list = spaced_steps(total_steps, checkpoints)
        else:
            self._list = None

    def thin(self, after: int, keep: int) -> list[int]:
        """Keep at most ``keep`` (at least 1) of the ``total_steps`` schedule's steps after ``after``; the dropped ones.

        The kept steps are those of the same spacing with fewer checkpoints, so the
        schedule stays dense early and still ends at ``total_steps``.
        """
        if self.total_steps is None or self._list is None:
            raise ValueError("only a total_steps schedule is thinned")
        future = [s for s in self._list if s > after]
        if len(future) <= keep:
            return []
        plan = [self.total_steps]
        for checkpoints in range(len(self._list) - 1, 2, -1):
            candidate = [s for s in spaced_steps(self.total_steps, checkpoints) if s > after]
            if len(candidate) <= keep:
                plan = candidate
                break
        self._list = [s for s in self._list if s <= after] + plan
        return sorted(set(future) - set(plan))

    def next_due(self, after: int) -> int | None:
        """The first scheduled step greater than ``after`` (None when the list is exhausted)."""
        if self.every_n_steps is not None:
            return (after // self.every_n_steps + 1) * self.every_n_steps if after >= 0 else 0
        if self._list is not None:
            return next((s for s in self._list if s > after), None)
        if after < 0:
            return 0
        decade = 10 ** int(math.log10(after)) if after > 0 else 1
        for base in (decade, 10 * decade):
            for m in (1, 2, 5):
                if m * base > after:
                    return m * base
        raise AssertionError("unreachable")


def spaced_steps(total_steps: int, checkpoints: int = DEFAULT_CHECKPOINTS) -> list[int]:
    """``checkpoints`` distinct steps from 0 to ``total_steps``, dense early.

    Checkpoint *i* goes at ``total_steps * (i / (checkpoints - 1)) ** 2``, rounded, or one step
    after checkpoint *i - 1* where the rounding would put both on one step, so early training
    gets one checkpoint per step until the quadratic spacing is wider. A run shorter than that
    (``total_steps < checkpoints - 1``) gets every step, 0 to ``total_steps``.
    """
    if total_steps + 1 <= checkpoints:
        return list(range(total_steps + 1))
    steps: list[int] = []
    for i in range(checkpoints):
        steps.append(max(round(total_steps * (i / (checkpoints - 1)) ** 2), steps[-1] + 1 if steps else 0))
    return steps
