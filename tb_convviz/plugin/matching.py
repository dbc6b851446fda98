"""Matching units across runs or checkpoints by what they respond to, in numpy.

Two networks trained from different seeds learn similar features in a different unit
order (Li, Yosinski et al., "Convergent Learning", 2016), so unit *i* against unit *i*
says nothing across seeds. Here units are paired one-to-one so that the total overlap
of their top-k image sets over the shared probe set is as large as possible.

The assignment is a small Hungarian algorithm (shortest augmenting paths with
potentials, O(n³)) rather than ``scipy.optimize.linear_sum_assignment``: scipy is a
large dependency for one function, and the plugin side otherwise needs only numpy,
Pillow and tensorboard. ``tests/test_matching.py`` checks it against brute force.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Hashable

import numpy as np

from tb_convviz.plugin.data import ByteLRU, _SingleFlight
from tb_convviz.plugin.render import Busy

# Rows of A compared against all of B at once: bounds the [rows, units, k, k] temporary.
_CHUNK_ELEMENTS = 1 << 23
# A solve of 1024 units takes seconds of CPU: one runs at a time, and a request waits this long
# for its turn before it is answered 503 (try again).
CONCURRENT_SOLVES = 1
SOLVE_WAIT_S = 60.0


def overlap_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[units_a, units_b]`` counts of probe images in both ``a[i]`` and ``b[j]`` (``[units, k]`` ids, -1 = none).

    Ids within a row are distinct (a unit's top-k lists each image once).
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.where(np.asarray(b, dtype=np.int64) < 0, -2, b)  # -1 in a never equals a missing id in b
    rows = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0] * a.shape[1] * b.shape[1]))
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int64)
    for start in range(0, a.shape[0], rows):
        chunk = a[start:start + rows]
        out[start:start + rows] = (chunk[:, None, :, None] == b[None, :, None, :]).sum(axis=(2, 3))
    return out


def max_weight_assignment(weights: np.ndarray) -> np.ndarray:
    """For each row of ``[n, m]`` ``weights`` (n <= m), its column in a one-to-one assignment of maximal total weight."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[0] > weights.shape[1]:
        raise ValueError(f"weights must be [n, m] with n <= m, got shape {weights.shape}")
    if not np.isfinite(weights).all():
        raise ValueError("weights must be finite")
    n, m = weights.shape
    cost = -weights
    u = np.zeros(n + 1)  # row potentials (1-based; 0 is the virtual start)
    v = np.zeros(m + 1)  # column potentials
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: row assigned to column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for row in range(1, n + 1):
        owner[0] = row
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while owner[j0] != 0:
            used[j0] = True
            i0 = owner[j0]
            free = ~used
            free[0] = False
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv, np.inf)
            j1 = int(np.argmin(candidates))
            delta = candidates[j1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    columns = np.empty(n, dtype=np.int64)
    assigned = np.nonzero(owner[1:])[0]
    columns[owner[1:][assigned] - 1] = assigned
    return columns


def match_units(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair each unit of ``a`` with one of ``b`` (``[units, k]`` top-k image ids) maximising total overlap.

    Returns ``(partner, shared)``: ``partner[i]`` is the unit of ``b`` paired with unit ``i``
    of ``a`` and ``shared[i]`` how many top-k images they have in common.
    """
    counts = overlap_counts(a, b)
    partner = max_weight_assignment(counts)
    return partner, counts[np.arange(len(partner)), partner]


class CachedMatcher:
    """:func:`match_units` for the plugin: each result cached, concurrent requests for it solved once,
    and at most ``CONCURRENT_SOLVES`` solves at a time."""

    def __init__(self, cache_bytes: int = 16 << 20) -> None:
        self._cache = ByteLRU(cache_bytes)
        self._flight = _SingleFlight()
        self._slots = threading.BoundedSemaphore(CONCURRENT_SOLVES)
        self.solves = 0  # how many assignments were computed (the rest came from the cache)

    def match(self, key: Hashable, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:func:`match_units` of ``a`` and ``b``, named by ``key`` (runs, layer, steps) and their content.

        The content is part of the cache key, so a run logged again under the same name is solved again.
        """
        digest = hashlib.blake2b(np.ascontiguousarray(a).tobytes() + b"|" + np.ascontiguousarray(b).tobytes(),
                                 digest_size=16).digest()
        key = (key, a.shape, b.shape, digest)
        found = self._cache.get(key)
        if found is None:
            with self._flight.lock(key):
                found = self._cache.get(key)
                if found is None:
                    found = self._solve(a, b)
                    self._cache.put(key, found, sum(x.nbytes for x in found))
        return found

    def _solve(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._slots.acquire(timeout=SOLVE_WAIT_S):
            raise Busy(f"the convviz plugin is busy matching units for other requests (waited {SOLVE_WAIT_S:.0f} s); "
                       "try again")
        try:
            self.solves += 1
            return match_units(a, b)
        finally:
            self._slots.release()
