"""Time the ConvViz layer page in headless Chromium against a real ``tensorboard``.

Writes a synthetic run of 100 checkpoints (5 layers of 64 units, k=9, 64x64 probe
images), then prints:

* page load: from navigation to a 64-unit layer page with every mosaic decoded
  (target < 1.5 s), first with TensorBoard's caches cold, then the median of repeats
  in fresh browser contexts;
* checkpoint switch: from an arrow-key press to the grid showing the previous
  checkpoint with every mosaic decoded (target < 0.5 s), median and worst of several
  steps that the server has not rendered before.

Usage: python benchmarks/page.py [--repeats 5] [--switches 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from tb_convviz.synthetic_run import write_synthetic_run  # noqa: E402
from tb_server import get, tensorboard_server, wait_for  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN, LAYER, UNITS, CHECKPOINTS = "bench", "conv3", 64, 100
LOAD_TARGET_S, SWITCH_TARGET_S = 1.5, 0.5

# True once the grid shows `step` with every mosaic decoded.
READY = """(step) => {
  const grid = document.querySelector(".cv-grid");
  const imgs = [...document.querySelectorAll(".cv-grid .cv-mosaic")];
  return grid?.getAttribute("aria-busy") === "false" && imgs.length === %d
    && imgs.every((i) => i.complete && i.naturalWidth > 0 && i.currentSrc.includes(`step=${step}&`));
}""" % UNITS

# Press ArrowLeft and resolve with the milliseconds until READY holds for `step`.
SWITCH = """async (step) => {
  const ready = %s;
  const start = performance.now();
  document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowLeft", bubbles: true }));
  while (!ready(step)) await new Promise(requestAnimationFrame);
  return performance.now() - start;
}""" % READY


def load_once(browser, url: str, step: int) -> float:
    """Seconds from navigation start to the layer page with all mosaics decoded, in a fresh context."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"{url}data/plugin_entry.html?name=convviz#run={RUN}&layer={LAYER}&step={step}")
        page.wait_for_function(READY, arg=step, polling="raf", timeout=60_000)
        return page.evaluate("performance.now()") / 1000
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="page loads after the first one")
    parser.add_argument("--switches", type=int, default=10, help="checkpoint switches to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as logdir:
        run = write_synthetic_run(os.path.join(logdir, RUN), checkpoints=CHECKPOINTS, layers=5, units=UNITS, k=9,
                                  probe_size=1024, image_size=64, num_classes=10, seed=0)
        latest = run.steps[-1]
        with tensorboard_server(logdir, load_fast=True) as url, sync_playwright() as playwright:
            def loaded():
                status, _, body = get(url + "data/plugin/convviz/runs")
                runs = json.loads(body)["runs"] if status == 200 else []
                return runs and all(len(layer["steps"]) == CHECKPOINTS for layer in runs[0]["layers"])

            wait_for(loaded, timeout=300)
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                cold = load_once(browser, url, latest)
                warm = [load_once(browser, url, latest) for _ in range(args.repeats)]

                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.goto(f"{url}data/plugin_entry.html?name=convviz#run={RUN}&layer={LAYER}&step={latest}")
                page.wait_for_function(READY, arg=latest, polling="raf", timeout=60_000)
                switches = [page.evaluate(SWITCH, run.steps[-2 - i]) / 1000 for i in range(args.switches)]
                context.close()
            finally:
                browser.close()

    median_load, median_switch = statistics.median(warm), statistics.median(switches)
    print(f"run: {CHECKPOINTS} checkpoints x 5 layers x {UNITS} units, k=9, 1024 probe images 64x64; "
          f"page: layer {LAYER}, {UNITS} mosaics")
    print(f"page load, TensorBoard cold      : {cold:.3f} s")
    print(f"page load, median of {len(warm)} repeats  : {median_load:.3f} s  "
          f"(target < {LOAD_TARGET_S} s: {median_load / LOAD_TARGET_S:.2f} of it)")
    print(f"checkpoint switch, median of {len(switches)} : {median_switch:.3f} s  "
          f"(target < {SWITCH_TARGET_S} s: {median_switch / SWITCH_TARGET_S:.2f} of it); worst {max(switches):.3f} s")


if __name__ == "__main__":
    main()
