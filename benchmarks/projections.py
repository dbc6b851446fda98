"""Projections: checkpoint cost with and without them, bytes per unit, encodings, and the Fig. 4 grid page.

Measured side by side in one run on the CPU, in the overhead benchmark's setup (the
demo's AlexNet-style net at 64x64, 1024 probe images, batch 128):

* a checkpoint with ``projections="top1"`` and one with ``projections=None``, each
  divided by a plain ``torch.no_grad()`` eval forward over the same images, as the
  overhead benchmark pairs them (weights perturbed before each step; medians of the
  per-step ratios);
* projection bytes per unit per checkpoint as stored (quantised lossless WebP plus the
  index); ``--run DIR`` measures a real run's stored projections too (e.g.
  ``runs/demo/seed0`` of ``tb-convviz demo``);
* the candidate encodings on the last checkpoint's float projections: bytes, encode time
  and fidelity, as PSNR on the display scale (128 ± 127 = ± the projection's peak);
* ``--page``: a Fig. 4 grid of 16 units x 16 checkpoints, from navigation to every row
  decoded, in headless Chromium against a real ``tensorboard`` (cold, then median).

    python benchmarks/projections.py [--repeats 15] [--run DIR] [--page] [--json]
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
from tb_convviz.isolation import preserved  # noqa: E402
from tb_convviz.projection import Target, project_records, stored_crops  # noqa: E402
from tb_convviz.demo.model import DemoAlexNet  # noqa: E402
from overhead import BATCH, paired, perturb  # noqa: E402  (the same setup as the overhead benchmark)

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
        result = paired(model, probe, repeats, {str(mode).lower(): loggers[mode].log for mode in loggers})
        for logger in loggers.values():
            logger.close()
        run = read_run(os.path.join(root, "top1"))
        stored, candidates = stored_bytes(run), encodings(float_projections(model, probe, run))
    return {**result, "random_init": stored, "encodings": candidates}


def stored_bytes(run) -> dict:
    """Bytes per unit per checkpoint of the run's projections as stored (images plus index rows)."""
    stored = records = units = 0
    checkpoints = set()
    for layer in run.layers:
        for step in run.projection_steps(layer.name):
            _, index, blobs = run._projections_at(layer.name, step, "probe")
            checkpoints.add(step)
            units += layer.units
            records += len(blobs)
            stored += sum(len(b) for b in blobs) + index.nbytes
    return {"checkpoints": len(checkpoints), "records": records, "bytes_per_unit": stored / max(units, 1),
            "total_bytes": stored}


def float_projections(model, probe, run) -> list[np.ndarray]:
    """The top-1 projections of the run's last checkpoint, recomputed from ``model``, unquantised."""
    step = run.steps[-1]
    targets = [Target(l.name, l.receptive_field, l.fmap[1] if l.fmap else 0) for l in run.layers]
    records = {t.name: run.topk(t.name, step) for t in targets}
    position = {t.name: np.where(r.y >= 0, r.y * t.fmap_w + r.x, -1) for t, r in zip(targets, records.values())}
    with preserved(model, no_grad=False):
        return [crop for _, _, pixels, boxes in project_records(
            model, probe, targets, {n: r.image for n, r in records.items()}, position, ranks=1, rule="deconvnet",
            batch_size=BATCH, device=torch.device("cpu")) for crop in stored_crops(pixels, boxes)]


def _image(q: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(q.transpose(1, 2, 0)))


CANDIDATES = {  # name: (levels each side of zero, PIL save options)
    f"WebP lossless, {fmt.LEVELS} levels (stored)": (fmt.LEVELS, dict(format="WEBP", lossless=True, quality=25, method=1)),
    "WebP lossless, 15 levels": (15, dict(format="WEBP", lossless=True, quality=25, method=1)),
    "WebP lossless, 31 levels": (31, dict(format="WEBP", lossless=True, quality=25, method=1)),
    "WebP lossless, 127 levels (8 bits)": (127, dict(format="WEBP", lossless=True, quality=25, method=1)),
    f"PNG, {fmt.LEVELS} levels": (fmt.LEVELS, dict(format="PNG", compress_level=9)),
    "WebP lossy q90, 8 bits": (127, dict(format="WEBP", quality=90, method=4)),
    "WebP lossy q100, 8 bits": (127, dict(format="WEBP", quality=100, method=4)),
    "JPEG 4:4:4 q95, 8 bits": (127, dict(format="JPEG", quality=95, subsampling=0)),
    "JPEG 4:4:4 q98, 8 bits": (127, dict(format="JPEG", quality=98, subsampling=0)),
}


def encodings(projections: list[np.ndarray]) -> dict:
    """Each candidate's mean bytes, encode time and PSNR (min, median) against the float projections on the display scale."""
    shown = [p for p in projections if np.abs(p).max() > 0 and p.shape[0] == 3]
    out = {}
    for name, (levels, options) in CANDIDATES.items():
        size, seconds, psnr = 0, 0.0, []
        for p in shown:
            t0 = time.perf_counter()
            q, scale = fmt.quantize(p, levels)
            buf = io.BytesIO()
            _image(q).save(buf, **options)
            seconds += time.perf_counter() - t0
            size += len(buf.getvalue())
            with Image.open(io.BytesIO(buf.getvalue())) as decoded:
                back = np.asarray(decoded.convert("RGB"), np.float64).transpose(2, 0, 1)
            mse = np.mean((back - (128 + 127 * p / scale)) ** 2)
            psnr.append(10 * np.log10(255 ** 2 / mse))
        n = max(len(shown), 1)
        out[name] = {"bytes": size / n, "ms": 1e3 * seconds / n, "psnr_min": float(np.min(psnr)),
                     "psnr_median": float(np.median(psnr))}
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--run", default=None, help="a real run's log dir to measure stored bytes on")
    parser.add_argument("--page", action="store_true", help="also time the Fig. 4 grid in Chromium")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the text")
    args = parser.parse_args()
    result = {"benchmark": "projections", "threads": torch.get_num_threads(), "repeats": args.repeats,
              **timing(args.repeats)}
    if args.run:
        run = read_run(args.run)
        result["run"] = {"path": args.run, **stored_bytes(run)}
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
        print(f"bytes per unit per checkpoint, {name}: {stored['bytes_per_unit']:.0f} B as stored "
              f"(target <= {BYTES_TARGET} B)")
    print("encodings of the last checkpoint's float projections (PSNR on the display scale):")
    for name, e in result["encodings"].items():
        print(f"  {name:36s}: {e['bytes']:6.0f} B, PSNR min {e['psnr_min']:5.1f} dB, median {e['psnr_median']:5.1f} dB, "
              f"{e['ms']:.2f} ms to encode")
    if args.page:
        p = result["page"]
        print(f"Fig. 4 grid, {p['units']} units x {p['checkpoints']} checkpoints: cold {p['cold_s']:.3f} s, "
              f"median {p['median_s']:.3f} s (target < {PAGE_TARGET_S} s)")


if __name__ == "__main__":
    main()
