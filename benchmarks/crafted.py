"""The crafted runs of issue 19 and the slow routes it found: time and TensorBoard's peak memory per request.

    python benchmarks/crafted.py [--loaders rust python] [--skip CASE ...]

Each case is one cold request on a ``tensorboard`` over the crafted runs of
``tests/crafted_runs.py``, a 128-checkpoint run with top-1 projections (for ``row``) and a
1024-unit run (for ``compare?match=1``, asked twice: the second is served from the cache).
For each: its HTTP status, wall time, and TensorBoard's peak RSS (with its data server)
just before and after. Before issue 19 (measured then, on 2 cores): the 2^31-1 rank took
182 s and +16.4 GB, the 13000^2 WebP bomb +2.5 GB, a 128-step row 13.5 s under the Rust loader.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from crafted_runs import BASE, add_projections, field_image, probe_bomb_index, write_crafted_runs  # noqa: E402
from tb_server import get, tensorboard_process, wait_for  # noqa: E402

from tb_convviz.synthetic_run import write_synthetic_run  # noqa: E402

MB = 1e6
ROW_STEPS = 128


def write_runs(root: str) -> dict[str, str]:
    """The runs, and per case the route it asks for."""
    written = write_crafted_runs(root)
    rows = write_synthetic_run(os.path.join(root, "rows"), **{**BASE, "checkpoints": ROW_STEPS})
    for c, step in enumerate(rows.steps):
        add_projections(os.path.join(root, "rows"), rows, [(0, 0), (1, 0)], [field_image()] * 2, step=step,
                        checkpoint=c)
    write_synthetic_run(os.path.join(root, "wide"), checkpoints=2, layers=1, units=1024, k=9, probe_size=1024,
                        image_size=8)
    steps = ",".join(map(str, rows.steps))
    match = "compare?run=wide&layer=conv1&step=0&other_step=10&match=1&limit=1"
    return {
        "ranks": "projection_mosaic?run=ranks&layer=conv1&unit=0",
        "projection bomb": "projection?run=projection_bomb&layer=conv1&unit=0",
        "probe bomb": f"probe_image?run=probe_bomb&index={probe_bomb_index(written['probe_bomb'])}",
        "nine 4096^2 probe images": "mosaic?run=big_probe&layer=conv1&unit=0",
        "unclipped 4096^2 projection": "projection?run=unclipped4096&layer=conv1&unit=0",
        "wrong-size projection mosaic": "projection_mosaic?run=wrong_size&layer=conv1&unit=0",
        "[4,3,0,5] filters": "filter_mosaic?run=filters0",
        f"row of {ROW_STEPS} steps": f"row?run=rows&layer=conv1&unit=0&steps={steps}&size=16",
        f"row of {ROW_STEPS} steps, scale=common": f"row?run=rows&layer=conv1&unit=1&steps={steps}&size=16&scale=common",
        "compare match=1, 1024 units": match,
        "the same again": match,
    }


def measure(root: str, load_fast: bool, cases: dict[str, str]) -> dict:
    out = {}
    with tensorboard_process(root, load_fast=load_fast, start_timeout=180) as tb:
        api = tb.url + "data/plugin/convviz/"
        wait_for(lambda: (lambda r: r[0] == 200 and len(json.loads(r[2])["runs"]) >= 9)(get(api + "runs")), 300)
        for run in ("rows", "wide", "big_probe", "probe_bomb"):
            get(api + f"topk?run={run}&layer=conv1&limit=1")  # the records are read; a request then costs itself
        for name, route in cases.items():
            before = tb.peak_rss_bytes()
            start = time.perf_counter()
            status = get(api + route, timeout=900)[0]
            out[name] = {"status": status, "seconds": time.perf_counter() - start,
                         "peak_before": before, "peak_after": tb.peak_rss_bytes()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loaders", nargs="+", default=["rust", "python"], choices=["rust", "python"])
    parser.add_argument("--skip", nargs="*", default=[], help="cases to leave out")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as root:
        cases = {name: route for name, route in write_runs(root).items() if name not in args.skip}
        for loader in args.loaders:
            for name, r in measure(root, loader == "rust", cases).items():
                results[f"{loader}: {name}"] = r
                print(f"{loader:6} {name:38} HTTP {r['status']}  {r['seconds']:7.2f} s  peak RSS "
                      f"{r['peak_before'] / MB:6.0f} -> {r['peak_after'] / MB:6.0f} MB "
                      f"(+{(r['peak_after'] - r['peak_before']) / MB:.0f})", flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
