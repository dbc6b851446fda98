"""TensorBoard's load time and memory, and the plugin's response times, on long runs of wide layers.

    python benchmarks/scale.py [--checkpoints 50 200] [--cache_dir DIR] [--json]

For each checkpoint count N, writes once (into ``--cache_dir``, reused later) a
synthetic run of N checkpoints x 5 layers x 512 units, k=9, over 4096 probe images
64x64, and a copy of the same log dir holding only its scalars. Then, for each
loader, starts ``tensorboard`` on each and measures the time from start until
every step is listed (``runs``, or the Scalars plugin for the copy), the peak
resident memory of TensorBoard and its data server, and the plugin's response times:
``runs``, ``topk`` of a whole 512-unit layer, ``mosaic`` cold and warm, and
``evolution`` of one unit across all N checkpoints. The last rows divide each figure
at the largest N by the one at the smallest: linear growth is N_max / N_min.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import summary_pb2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tb_server import get, tensorboard_process, wait_for  # noqa: E402

from tb_convviz import summary  # noqa: E402
from tb_convviz.reader import event_files  # noqa: E402
from tb_convviz.synthetic_run import write_synthetic_run  # noqa: E402

RUN, LAYER, SCALAR_TAG = "run", "conv5", "convviz/conv1/mean_peak"


def cached_logdirs(cache_dir: str, checkpoints: int, args) -> tuple[str, str]:
    """(log dir with the convviz run, log dir with its scalars only), written on first use."""
    name = f"c{checkpoints}_u{args.units}_k9_p{args.probe_size}_i{args.image_size}"
    full, scalars = (os.path.join(cache_dir, name, kind) for kind in ("convviz", "scalars_only"))
    if not os.path.isdir(scalars):
        # Written aside and renamed, so that an interrupted run leaves no half-written cache entry.
        tmp = tempfile.mkdtemp(dir=cache_dir)
        try:
            write_synthetic_run(os.path.join(tmp, "convviz", RUN), checkpoints=checkpoints, layers=5,
                                units=args.units, k=9, probe_size=args.probe_size, image_size=args.image_size)
            copy_scalars(os.path.join(tmp, "convviz", RUN), os.path.join(tmp, "scalars_only", RUN))
            os.rename(tmp, os.path.join(cache_dir, name))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return full, scalars


def copy_scalars(src: str, dst: str) -> None:
    """The same run minus its convviz series: only the Scalars-plugin values, at the same steps."""
    os.makedirs(dst)
    writer = summary.EventWriter(dst)
    for path in event_files(src):
        for event in event_file_loader.EventFileLoader(path).Load():
            values = [v for v in event.summary.value if v.metadata.plugin_data.plugin_name == "scalars"]
            if values:
                writer.write(summary_pb2.Summary(value=values), event.step)
    writer.close()


def median_ms(urls: list[str]) -> float:
    times = []
    for url in urls:
        start = time.perf_counter()
        status, _, body = get(url)
        times.append(time.perf_counter() - start)
        assert status == 200, body[:300]
    return statistics.median(times) * 1e3


def serve(logdir: str, load_fast: bool, checkpoints: int, convviz: bool, units: int) -> dict:
    """Load time, peak memory and (for convviz) response times of one tensorboard on ``logdir``."""
    start = time.perf_counter()
    # TensorBoard's default reload interval, rather than the tests' short one.
    with tensorboard_process(logdir, load_fast, extra_args=("--reload_interval", "5")) as tb:
        api = tb.url + "data/plugin/"

        def loaded():
            if convviz:
                status, _, body = get(api + "convviz/runs")
                runs = json.loads(body)["runs"] if status == 200 else []
                layers = runs[0]["layers"] if runs else []
                return len(layers) == 5 and all(len(layer["steps"]) == checkpoints for layer in layers)
            status, _, body = get(api + f"scalars/scalars?run={RUN}&tag={SCALAR_TAG}")
            return status == 200 and len(json.loads(body)) == checkpoints

        wait_for(loaded, timeout=1800, interval=0.25)
        out = {"load_s": time.perf_counter() - start, "load_peak_rss_mib": tb.peak_rss_bytes() / 2**20}
        if convviz:
            base = api + "convviz/"
            steps = json.loads(get(base + "runs")[2])["runs"][0]["steps"]
            mosaic = base + f"mosaic?run={RUN}&layer={LAYER}&size=64"
            out.update({
                "runs_ms": median_ms([base + "runs"] * 5),
                "topk_ms": median_ms([base + f"topk?run={RUN}&layer={LAYER}&step={s}" for s in steps[-5:]]),
                "mosaic_cold_ms": median_ms([mosaic + f"&step={steps[i * 7 % len(steps)]}&unit={i * 37 % units}"
                                             for i in range(1, 16)]),
                "mosaic_warm_ms": median_ms([mosaic + f"&step={steps[0]}&unit=0"] * 16),
                "evolution_ms": median_ms([base + f"evolution?run={RUN}&layer={LAYER}&unit={u}"
                                           for u in range(5)]),
            })
        out["peak_rss_mib"] = tb.peak_rss_bytes() / 2**20
    return out


COLUMNS = [
    ("loader", "{}"), ("checkpoints", "{}"), ("load s", "{:.1f}"), ("peak RSS MiB", "{:.0f}"),
    ("load s, scalars only", "{:.1f}"), ("peak RSS MiB, scalars only", "{:.0f}"), ("runs ms", "{:.1f}"),
    ("topk ms", "{:.1f}"), ("mosaic cold ms", "{:.1f}"), ("mosaic warm ms", "{:.1f}"), ("evolution ms", "{:.1f}"),
]
KEYS = [None, None, "load_s", "peak_rss_mib", "bare_load_s", "bare_peak_rss_mib", "runs_ms", "topk_ms",
        "mosaic_cold_ms", "mosaic_warm_ms", "evolution_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--probe_size", type=int, default=4096)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--loaders", nargs="+", default=["true", "false"], choices=["true", "false"])
    parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "tb_convviz_scale"))
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()
    os.makedirs(args.cache_dir, exist_ok=True)
    results = []
    for checkpoints in sorted(args.checkpoints):
        full, bare = cached_logdirs(args.cache_dir, checkpoints, args)
        for load_fast in args.loaders:
            row = {"loader": "rust" if load_fast == "true" else "python", "checkpoints": checkpoints}
            row.update(serve(full, load_fast == "true", checkpoints, True, args.units))
            bare_row = serve(bare, load_fast == "true", checkpoints, False, args.units)
            row.update({"bare_load_s": bare_row["load_s"], "bare_peak_rss_mib": bare_row["peak_rss_mib"]})
            results.append(row)
    setup = {"layers": 5, "units": args.units, "k": 9, "probe_images": args.probe_size,
             "image_size": args.image_size}
    if args.json:
        print(json.dumps({"benchmark": "scale", "setup": setup, "results": results}))
        return
    print(f"synthetic run: N checkpoints x 5 layers x {args.units} units, k=9, {args.probe_size} probe images "
          f"{args.image_size}x{args.image_size}; per-request figures are medians")
    print("| " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in results:
        cells = [row["loader"], row["checkpoints"]] + [row[key] for key in KEYS[2:]]
        print("| " + " | ".join(fmt.format(cell) for (_, fmt), cell in zip(COLUMNS, cells)) + " |")
    low, high = min(args.checkpoints), max(args.checkpoints)
    if low != high:
        for loader in dict.fromkeys(row["loader"] for row in results):
            a, b = (next(r for r in results if r["loader"] == loader and r["checkpoints"] == n) for n in (low, high))
            growth = [f"{b[key] / a[key]:.2f}x" for key in KEYS[2:]]
            print(f"| {loader} | growth {low}->{high} (linear: {high / low:.1f}x) | " + " | ".join(growth) + " |")


if __name__ == "__main__":
    main()
