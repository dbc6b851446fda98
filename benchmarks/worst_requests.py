"""The most expensive requests the plugin accepts: time and TensorBoard's peak memory before and after.

    python benchmarks/worst_requests.py [--loaders rust python] [--json]

Three worst cases of the red-team pass (issue 13), each on a fresh ``tensorboard``
over a synthetic run of 64x64 probe images: the mosaic of a k=1024 unit at
``size=512``, of a k=256 unit at ``size=512``, and the default mosaic (what the
frontend asks for) of a layer whose receptive field is 4096 px; then six k=1024
mosaics at once. For each: the wall time of the cold request, TensorBoard's peak
RSS (with its data server) just before and just after, and the output's size.
Target: under 2 s and under 200 MB extra each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tb_server import get, tensorboard_process, wait_for  # noqa: E402

from tb_convviz.synthetic_run import write_synthetic_run  # noqa: E402

MB = 1e6
CASES = {
    "k=1024 mosaic, size=512": ("k1024", "size=512"),
    "k=256 mosaic, size=512": ("k256", "size=512"),
    "4096 px field, default mosaic": ("field4096", ""),
}


def write_runs(root: str) -> None:
    common = dict(checkpoints=1, layers=1, units=8, image_size=64)
    write_synthetic_run(os.path.join(root, "k1024"), k=1024, probe_size=1024, **common)
    write_synthetic_run(os.path.join(root, "k256"), k=256, probe_size=1024, **common)
    write_synthetic_run(os.path.join(root, "field4096"), k=9, probe_size=64, field_size=4096, **common)


def mosaic_url(api: str, run: str, extra: str, unit: int = 0) -> str:
    return f"{api}mosaic?run={run}&layer=conv1&unit={unit}" + (f"&{extra}" if extra else "")


def measure(root: str, load_fast: bool, run: str, extra: str, at_once: int = 1) -> dict:
    with tensorboard_process(root, load_fast=load_fast) as tb:
        api = tb.url + "data/plugin/convviz/"
        wait_for(lambda: (lambda r: r[0] == 200 and len(json.loads(r[2])["runs"]) == 3)(get(api + "runs")))
        get(api + f"topk?run={run}&layer=conv1")  # the series is read; the request then costs the render
        before = tb.peak_rss_bytes()
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
            answers = list(pool.map(lambda u: get(mosaic_url(api, run, extra, u), timeout=600), range(at_once)))
        seconds = time.perf_counter() - start
        after = tb.peak_rss_bytes()
    status, _, body = answers[0]
    size = struct.unpack(">II", body[16:24]) if status == 200 else None  # the PNG header's width, height
    return {"seconds": seconds, "peak_before": before, "peak_after": after, "status": [a[0] for a in answers],
            "output": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loaders", nargs="+", default=["rust", "python"], choices=["rust", "python"])
    parser.add_argument("--at_once", type=int, default=6, help="concurrent k=1024 mosaics (0: skip that case)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as root:
        write_runs(root)
        cases = {name: (run, extra, 1) for name, (run, extra) in CASES.items()}
        if args.at_once:
            cases[f"{args.at_once} k=1024 mosaics at once, size=512"] = ("k1024", "size=512", args.at_once)
        for loader in args.loaders:
            for name, (run, extra, at_once) in cases.items():
                r = measure(root, loader == "rust", run, extra, at_once)
                results[f"{loader}: {name}"] = r
                print(f"{loader:6} {name:38} {r['seconds']:6.2f} s  peak RSS {r['peak_before'] / MB:6.0f} -> "
                      f"{r['peak_after'] / MB:6.0f} MB (+{(r['peak_after'] - r['peak_before']) / MB:.0f})  "
                      f"HTTP {r['status'][0]}, {r['output'][0]}x{r['output'][1]} px" if r["output"] else "",
                      flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
