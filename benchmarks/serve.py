"""Mosaic serving latency vs TensorBoard's own images plugin, side by side in one real TensorBoard.

    python benchmarks/serve.py [--load_fast false] [--requests 200] [--json]

Writes a synthetic convviz run plus, in the same log dir, an ordinary images-plugin
series whose PNGs are mosaics of the same size; starts ``tensorboard`` on it; then
alternates requests: ``mosaic`` warm (repeated, served from the PNG cache), ``mosaic``
cold (a (step, unit) never asked before), and ``individualImage`` for the images
plugin's blob. Prints p50/p95 of each, their ratios to the images plugin, and
TensorBoard's peak resident memory. Targets: warm <= 1.5x, cold <= 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.util import tensor_util

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tb_server import get, tensorboard_process, wait_for  # noqa: E402

from tb_convviz import summary  # noqa: E402
from tb_convviz.geometry import crop  # noqa: E402
from tb_convviz.plugin import render  # noqa: E402
from tb_convviz.synthetic_run import write_synthetic_run  # noqa: E402

LAYER, SIZE = "conv3", 64


def write_logs(logdir: str, args) -> tuple:
    run = write_synthetic_run(
        os.path.join(logdir, "convviz"), checkpoints=args.checkpoints, layers=5, units=args.units, k=9,
        probe_size=args.probe_size, image_size=64, chunk_bytes=args.chunk_bytes, seed=0,
    )
    # The images-plugin baseline: the same mosaic PNGs, logged as ordinary image summaries.
    rf = run.fields[LAYER]
    os.makedirs(os.path.join(logdir, "images"))
    writer = summary.EventWriter(os.path.join(logdir, "images"))
    md = image_metadata.create_summary_metadata(display_name="mosaic", description="")
    md.data_class = summary_pb2.DATA_CLASS_BLOB_SEQUENCE
    for c in range(10):
        rows = run.records[LAYER][c, c % args.units]
        tiles = [render.resize(crop(run.images[r["image"]], rf.box(int(r["y"]), int(r["x"]))), SIZE) for r in rows]
        pixels = render.mosaic(tiles, tiles[0].shape[:2])
        png = render.encode_png(pixels)
        h, w = pixels.shape[:2]
        tensor = tensor_util.make_tensor_proto([str(w).encode(), str(h).encode(), png], dtype="string")
        value = summary_pb2.Summary.Value(tag="mosaic", metadata=md, tensor=tensor)
        writer.write(summary_pb2.Summary(value=[value]), c)
    writer.close()
    return run, len(png)


def timed(url: str) -> float:
    start = time.perf_counter()
    status, _, body = get(url)
    elapsed = time.perf_counter() - start
    assert status == 200, body[:300]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load_fast", default="true", choices=["true", "false"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=40)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--probe_size", type=int, default=2048)
    parser.add_argument("--chunk_bytes", type=int, default=summary.CHUNK_BYTES,
                        help="cap on one probe-image chunk (the logger's default unless given)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logdir:
        run, png_bytes = write_logs(logdir, args)
        # TensorBoard's default reload interval, rather than the tests' short one.
        reload = ("--reload_interval", "5")
        with tensorboard_process(logdir, load_fast=args.load_fast == "true", extra_args=reload) as tb:
            api = tb.url + "data/plugin/"

            def blob_keys():
                query = urllib.parse.urlencode({"run": "images", "tag": "mosaic"})
                status, _, body = get(api + "images/images?" + query)
                return status == 200 and len(json.loads(body)) == 10 and [d["query"] for d in json.loads(body)]

            def convviz_loaded():
                status, _, body = get(api + "convviz/runs")
                runs = {r["run"]: r for r in json.loads(body)["runs"]} if status == 200 else {}
                return "convviz" in runs and len(runs["convviz"]["steps"]) == args.checkpoints

            blobs = wait_for(blob_keys)
            wait_for(convviz_loaded)
            mosaic = api + f"convviz/mosaic?run=convviz&layer={LAYER}&size={SIZE}"
            warm_url = mosaic + f"&step={run.steps[0]}&unit=0"
            cold_urls = [mosaic + f"&step={run.steps[1 + i % (args.checkpoints - 1)]}&unit={i % args.units}"
                         for i in range(args.requests)]
            times = {"images plugin blob": [], "mosaic warm": [], "mosaic cold": []}
            for i in range(args.requests):  # interleaved, so that drift hits all three alike
                times["images plugin blob"].append(timed(api + "images/individualImage?" + blobs[i % 10]))
                times["mosaic warm"].append(timed(warm_url))
                times["mosaic cold"].append(timed(cold_urls[i]))
            _, _, body = get(warm_url)
            peak = tb.peak_rss_bytes()

    base = np.percentile(times["images plugin blob"], [50, 95])
    if args.json:
        print(json.dumps({
            "benchmark": "serve", "load_fast": args.load_fast == "true", "checkpoints": args.checkpoints,
            "units": args.units, "probe_size": args.probe_size, "requests": args.requests,
            "mosaic_png_bytes": len(body), "images_plugin_png_bytes": png_bytes, "peak_rss_bytes": peak,
            "ms": {name: dict(zip(("p50", "p95"), np.percentile(values, [50, 95]) * 1e3))
                   for name, values in times.items()},
        }))
        return
    print(f"load_fast={args.load_fast}; {args.checkpoints} checkpoints x 5 layers x {args.units} units, k=9, "
          f"{args.probe_size} probe images 64x64 in chunks of <= {args.chunk_bytes} B; "
          f"{args.requests} requests each, interleaved")
    print(f"PNG size: mosaic {len(body)} B, images-plugin blob {png_bytes} B")
    print(f"{'':22s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50 ratio':>10s} {'p95 ratio':>10s}")
    for name, values in times.items():
        p50, p95 = np.percentile(values, [50, 95])
        print(f"{name:22s} {p50 * 1e3:8.2f} {p95 * 1e3:8.2f} {p50 / base[0]:10.2f} {p95 / base[1]:10.2f}")
    print(f"TensorBoard peak RSS (with data server): {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
