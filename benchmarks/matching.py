"""Cost of matching units across runs (``compare?match=1``) against comparing unit for unit (``match=0``).

    python benchmarks/matching.py [--units 64 256 512 1024] [--json]

For each layer width, two top-9 sets over a 1024-image probe set are made where B is A
with its units shuffled and a third of every unit's images replaced (two seeds that learned
similar features in another order). Both ways of comparing run side by side on the same
arrays, best of a few repeats; peak memory is numpy's, measured with tracemalloc.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from tb_convviz.metadata import topk_overlap
from tb_convviz.plugin.matching import match_units

PROBE, K = 1024, 9


def layer_pair(units: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = np.stack([rng.choice(PROBE, K, replace=False) for _ in range(units)])
    b = a[rng.permutation(units)].copy()
    for row in b:
        fresh = np.setdiff1d(rng.choice(PROBE, 3 * K, replace=False), row)[: K // 3]
        row[rng.choice(K, len(fresh), replace=False)] = fresh
    return a, b


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_bytes(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, nargs="+", default=[64, 256, 512, 1024])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for units in args.units:
        a, b = layer_pair(units, rng)
        repeats = 3 if units <= 512 else 1
        plain_s, plain = timed(lambda: topk_overlap(a, b), 20)
        matched_s, (partner, shared) = timed(lambda: match_units(a, b), repeats)
        rows.append({
            "units": units, "unit_for_unit_ms": plain_s * 1e3, "matched_ms": matched_s * 1e3,
            "ratio": matched_s / plain_s, "mean_overlap_unit_for_unit": float(plain.mean()),
            "mean_overlap_matched": float(shared.mean() / K), "peak_bytes": peak_bytes(lambda: match_units(a, b)),
        })
    if args.json:
        print(json.dumps({"benchmark": "matching", "results": rows}))
        return
    for r in rows:
        print(f"{r['units']:5d} units: matched {r['matched_ms']:8.1f} ms vs unit for unit {r['unit_for_unit_ms']:.2f} ms "
              f"(×{r['ratio']:.0f}); mean overlap {r['mean_overlap_matched']:.0%} vs {r['mean_overlap_unit_for_unit']:.0%}; "
              f"peak {r['peak_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
