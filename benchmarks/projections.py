"""Projections: checkpoint cost with and without them, bytes per unit, encodings, and the Fig. 4 grid page.

Measured side by side in one run on the CPU, in the overhead benchmark's setup (the
demo's AlexNet-style net at 64x64, 1024 probe images, batch 128):

* a checkpoint with ``projections="top1"`` and one with ``projections=None``, each
  divided by a plain ``torch.no_grad()`` eval forward over the same images (the three
  interleaved, weights perturbed before each triple; medians);
* projection bytes per unit per checkpoint as stored (lossless WebP plus the index),
  next to the same 8-bit projections as PNG; ``--run DIR`` measures a real run's
  stored projections instead (e.g. ``runs/demo/seed0`` of ``tb-convviz demo``);
* ``--page``: a Fig. 4 grid of 16 units x 16 checkpoints, from navigation to every row
  decoded, in headless Chromium against a real ``tensorboard`` (cold, then median).

    python benchmarks/projections.py [--repeats 5] [--run DIR] [--page] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from tb_convviz import ConvVizLogger, ProbeSet, read_run  # noqa: E402
from tb_convviz import projection_format as fmt  # noqa: E402
from tb_convviz.demo.model import DemoAlexNet  # noqa: E402
from overhead import BATCH, perturb, plain_forward  # noqa: E402  (the same setup as the overhead benchmark)

TOP1_TARGET, NONE_TARGET, BYTES_TARGET, PAGE_TARGET_S = 2.0, 1.05, 2048, 1.0


def timing(repeats: int) -> dict:
    torch.manual_seed(0)
    model = DemoAlexNet()
    probe = ProbeSet(torch.randn(1024, 3, 64, 64))
    with tempfile.TemporaryDirectory() as root:
        loggers = {mode: ConvVizLogger(model, probe, os.path.join(root, str(mode)), k=9, batch_size=BATCH,
                                       layers=DemoAlexNet.LOGGED_LAYERS, projections=mode) for mode in (None, "top1")}
        for logger in loggers.values():
            logger.log(0)  # the first checkpoint stores every winning image once
        plain_forward(model, probe)
        times = {"forward": [], None: [], "top1": []}
        for step in range(1, repeats + 1):
            perturb(model)
            t0 = time.perf_counter()
            plain_forward(model, probe)
            times["forward"].append(time.perf_counter() - t0)
            for mode, logger in loggers.items():
                t0 = time.perf_counter()
                assert logger.log(step)
                times[mode].append(time.perf_counter() - t0)
        for logger in loggers.values():
            logger.close()
        stored = stored_bytes(read_run(os.path.join(root, "top1")))
    fwd = statistics.median(times["forward"])
    return {"forward_s": fwd, "none_s": statistics.median(times[None]), "top1_s": statistics.median(times["top1"]),
            "none_ratio": statistics.median(times[None]) / fwd, "top1_ratio": statistics.median(times["top1"]) / fwd,
            "random_init": stored}


def stored_bytes(run) -> dict:
    """Bytes per unit per checkpoint of the run's projections as stored, and as PNG of the same pixels."""
    webp = png = records = units = 0
    checkpoints = set()
    for layer in run.layers:
        for step, (info, index, blobs) in run._projections.get(layer.name, {}).items():
            checkpoints.add(step)
            units += layer.units
            records += len(blobs)
            webp += sum(len(b) for b in blobs) + index.nbytes
            for blob in blobs:
                q = fmt.decode_pixels(blob, info.channels, info.height, info.width)
                png += len(fmt.encode_pixels(q, "png")) + fmt.INDEX_DTYPE.itemsize
    return {"checkpoints": len(checkpoints), "records": records, "bytes_per_unit": webp / max(units, 1),
            "png_bytes_per_unit": png / max(units, 1), "total_bytes": webp}


def page(repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    from tb_server import get, tensorboard_server, wait_for

    steps = [round(400 * (i / 15) ** 2) for i in range(16)]
    with tempfile.TemporaryDirectory() as logdir:
        torch.manual_seed(0)
        model = DemoAlexNet(width=8)
        with ConvVizLogger(model, ProbeSet(torch.rand(64, 3, 64, 64)), os.path.join(logdir, "bench"), k=9,
                           steps=steps) as logger:
            for step in steps:
                perturb(model)
                logger.log(step)
        layer = read_run(os.path.join(logdir, "bench")).layers[2]
        hash_ = f"run=bench&layer={layer.name}&view=evolution&count=16&show=projection"
        ready = "() => { const g = document.querySelector('.cv-fig4'); const imgs = [...document.querySelectorAll('.cv-fig4-img')];" \
                " return g?.getAttribute('aria-busy') === 'false' && imgs.length === 16 && imgs.every((i) => i.complete && i.naturalWidth > 0); }"
        with tensorboard_server(logdir, load_fast=True) as url, sync_playwright() as playwright:
            wait_for(lambda: (lambda s: s[0] == 200 and json.loads(s[2])["runs"] and all(
                (l["projections"] or {}).get("steps") == steps for l in json.loads(s[2])["runs"][0]["layers"]))(
                get(url + "data/plugin/convviz/runs")), timeout=300)
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            loads = []
            try:
                for _ in range(repeats + 1):
                    context = browser.new_context(viewport={"width": 1280, "height": 900})
                    p = context.new_page()
                    p.goto(f"{url}data/plugin_entry.html?name=convviz#{hash_}")
                    p.wait_for_function(ready, polling="raf", timeout=60_000)
                    loads.append(p.evaluate("performance.now()") / 1000)
                    context.close()
            finally:
                browser.close()
    return {"cold_s": loads[0], "median_s": statistics.median(loads[1:]), "units": 16, "checkpoints": len(steps)}


def encodings(run) -> dict:
    """Encode-time and size of each candidate encoding on the run's projections (8-bit pixels, lossless)."""
    qs = [fmt.decode_pixels(b, info.channels, info.height, info.width)
          for layer in run.layers for info, _, blobs in run._projections.get(layer.name, {}).values() for b in blobs]
    out = {}
    for name, kwargs in [("png", dict(format="PNG", compress_level=9)),
                         ("webp_lossless_m2", dict(format="WEBP", lossless=True, quality=50, method=2)),
                         ("webp_lossless_m0", dict(format="WEBP", lossless=True, quality=0, method=0)),
                         ("webp_lossless_m4", dict(format="WEBP", lossless=True, quality=100, method=4))]:
        t0, size = time.perf_counter(), 0
        for q in qs:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(q.transpose(1, 2, 0))).save(buf, **kwargs)
            size += len(buf.getvalue())
        out[name] = {"bytes": size / max(len(qs), 1), "ms": 1e3 * (time.perf_counter() - t0) / max(len(qs), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", default=None, help="a real run's log dir to measure stored bytes on")
    parser.add_argument("--page", action="store_true", help="also time the Fig. 4 grid in Chromium")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the text")
    args = parser.parse_args()
    result = {"benchmark": "projections", "threads": torch.get_num_threads(), "repeats": args.repeats,
              **timing(args.repeats)}
    if args.run:
        run = read_run(args.run)
        result["run"] = {"path": args.run, **stored_bytes(run), "encodings": encodings(run)}
    if args.page:
        result["page"] = page(args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    print(f"torch {torch.__version__}, {result['threads']} threads, DemoAlexNet 64x64, 1024 probe images, batch {BATCH}")
    print(f"plain no_grad forward             : {result['forward_s'] * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"checkpoint, projections=None      : {result['none_s'] * 1e3:8.1f} ms  ratio {result['none_ratio']:.3f} "
          f"(target <= {NONE_TARGET})")
    print(f"checkpoint, projections='top1'    : {result['top1_s'] * 1e3:8.1f} ms  ratio {result['top1_ratio']:.3f} "
          f"(target <= {TOP1_TARGET})")
    for name, stored in [("random-init weights", result["random_init"])] + (
            [(f"run {args.run}", result["run"])] if args.run else []):
        print(f"bytes per unit per checkpoint, {name}: {stored['bytes_per_unit']:.0f} B as stored (WebP lossless), "
              f"{stored['png_bytes_per_unit']:.0f} B as PNG (target <= {BYTES_TARGET} B)")
    if args.run:
        for name, e in result["run"]["encodings"].items():
            print(f"  {name:18s}: {e['bytes']:7.0f} B per projection, {e['ms']:.2f} ms to encode")
    if args.page:
        p = result["page"]
        print(f"Fig. 4 grid, {p['units']} units x {p['checkpoints']} checkpoints: cold {p['cold_s']:.3f} s, "
              f"median {p['median_s']:.3f} s (target < {PAGE_TARGET_S} s)")


if __name__ == "__main__":
    main()
