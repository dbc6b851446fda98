"""Time the ConvViz tab on 512-unit layers in headless Chromium against a real ``tensorboard``.

Writes a synthetic run of 5 layers of 512 units (k=9, 1024 probe images 64x64, 16
checkpoints), serves it with ``tensorboard``, and prints, for a 1280x900 window:

* first deep-layer load: navigation to layer 5's grid with every tile in the window
  decoded (timed in the page), on a TensorBoard that never served that layer (then the
  median of repeats), each load after a pause;
* checkpoint switch: an arrow key to the next checkpoint, until every tile in the window
  shows it decoded (target < 0.5 s), after a pause as a user looks at the grid;
* matched compare: two checkpoints of layer 5 matched one-to-one, until every pair in the
  window is decoded, and the bytes of ``compare`` JSON per request.

``--baseline DIR`` also serves the same log dir from the tb_convviz of another source tree
(say, ``git worktree add /tmp/before <commit>``), in a second TensorBoard, and measures both
alternately, so that before and after are side by side in one run.

Usage: python benchmarks/tab_512.py [--switches 6] [--repeats 2] [--baseline DIR] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from tb_convviz.synthetic_run import write_synthetic_run  # noqa: E402
from tb_server import get, tensorboard_process, wait_for  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN, LAYER, UNITS, CHECKPOINTS = "bench", "conv5", 512, 16
SWITCH_TARGET_S = 0.5
DWELL_S = 2.0

# The page's clock (ms since navigation) once `grid` is idle and every mosaic in the window is decoded
# (at `step`, when given), else false: loads are timed in the page, not when Playwright's polling notices.
READY = """([grid, step]) => {
  const el = document.querySelector(grid);
  if (el?.getAttribute("aria-busy") !== "false") return false;
  // Tiles first: a rectangle inside a tile that is skipped (content-visibility) costs a layout of its
  // own, about 1 ms each, which 512 of them would add to every figure.
  const inWindow = [...el.children].filter((tile) => {
    const r = tile.getBoundingClientRect();
    return r.bottom > 0 && r.top < innerHeight && r.width > 0;
  }).flatMap((tile) => [...tile.querySelectorAll(".cv-mosaic")]).filter((i) => i.getBoundingClientRect().width > 0);
  return inWindow.length > 0 && inWindow.every((i) => i.complete && i.naturalWidth > 0
    && (step == null || i.currentSrc.includes(`step=${step}&`))) && performance.now();
}"""

# Press ArrowRight and resolve with the milliseconds until READY holds for `step`.
SWITCH = """async (step) => {
  const isReady = %s;
  const start = performance.now();
  document.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowRight", bubbles: true }));
  let ready;
  while (!(ready = isReady([".cv-grid", step]))) await new Promise(requestAnimationFrame);
  return ready - start;
}""" % READY

COMPARE_BYTES = """() => performance.getEntriesByType("resource").filter((e) => e.name.includes("/compare?"))
  .map((e) => e.decodedBodySize)"""


def timed_load(browser, url: str, hash_: str, grid: str) -> tuple[float, list[int]]:
    """Seconds from navigation to READY in a fresh context, and the compare responses' JSON bytes."""
    time.sleep(DWELL_S)  # the last page's fetch ahead, on either server, is done: loads alternate between them
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"{url}data/plugin_entry.html?name=convviz#{hash_}")
        ready = page.wait_for_function(READY, arg=[grid, None], polling="raf", timeout=300_000).json_value()
        return ready / 1000, page.evaluate(COMPARE_BYTES)
    finally:
        context.close()


def switches(browser, urls: dict[str, str], steps: list[int], count: int) -> dict[str, list[float]]:
    """Arrow-key switches on one page per server, alternating between them, after a pause each."""
    contexts, pages = [], {}
    try:
        for name, url in urls.items():
            contexts.append(browser.new_context(viewport={"width": 1280, "height": 900}))
            pages[name] = contexts[-1].new_page()
            pages[name].goto(f"{url}data/plugin_entry.html?name=convviz#run={RUN}&layer={LAYER}&step={steps[0]}")
            pages[name].wait_for_function(READY, arg=[".cv-grid", steps[0]], polling="raf", timeout=300_000)
        times = {name: [] for name in urls}
        for step in steps[1:count + 1]:
            for name, page in pages.items():
                time.sleep(DWELL_S)  # a user looks at the grid before moving on
                times[name].append(page.evaluate(SWITCH, step) / 1000)
        return times
    finally:
        for context in contexts:
            context.close()


@contextlib.contextmanager
def serve(logdir: str, source: str | None):
    """A TensorBoard process over ``logdir`` whose tb_convviz comes from ``source`` (a source tree), else this one."""
    saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    if source:
        os.environ["PYTHONPATH"] = os.path.abspath(source) + (os.pathsep + saved if saved else "")
        os.chdir(source)  # `python -c` puts its working directory first on sys.path
    try:
        with tensorboard_process(logdir, load_fast=True, extra_args=("--reload_interval", "5")) as tb:
            os.chdir(cwd)
            def loaded():
                status, _, body = get(tb.url + "data/plugin/convviz/runs")
                runs = json.loads(body)["runs"] if status == 200 else []
                return runs and all(len(layer["steps"]) == CHECKPOINTS for layer in runs[0]["layers"])

            wait_for(loaded, timeout=300)
            yield tb
    finally:
        os.chdir(cwd)
        if source:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)


def measure(browser, urls: dict[str, str], steps: list[int], args) -> dict[str, dict]:
    """Every figure for every server, each measured on the servers in turn so that load drift hits all alike."""
    deep = f"run={RUN}&layer={LAYER}&step={steps[-1]}"
    # The compare link in the form every version reads alike: A at other_step, B at step.
    compare = f"view=compare&run={RUN}&layer={LAYER}&step={steps[-1]}&other_step={steps[-2]}&match=1"
    out = {name: {"load": [], "compare": []} for name in urls}
    for name, url in urls.items():
        out[name]["load_cold"] = timed_load(browser, url, deep, ".cv-grid")[0]
    for _ in range(args.repeats):
        for name, url in urls.items():
            out[name]["load"].append(timed_load(browser, url, deep, ".cv-grid")[0])
    for name, times in switches(browser, urls, steps[2:], args.switches).items():
        out[name]["switches"] = times
    for name, url in urls.items():
        out[name]["compare_cold"], sizes = timed_load(browser, url, compare, ".cv-compare-grid")
        out[name].update(compare_requests=len(sizes), compare_bytes=max(sizes, default=0), compare_total_bytes=sum(sizes))
    for _ in range(args.repeats):
        for name, url in urls.items():
            out[name]["compare"].append(timed_load(browser, url, compare, ".cv-compare-grid")[0])
    for figures in out.values():
        figures.update(load=statistics.median(figures["load"]), compare=statistics.median(figures["compare"]),
                       switch=statistics.median(figures["switches"]), switch_worst=max(figures["switches"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=6, help="checkpoint switches to time")
    parser.add_argument("--repeats", type=int, default=2, help="loads after the first one")
    parser.add_argument("--baseline", help="a source tree whose tb_convviz to measure beside this one")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as logdir:
        run = write_synthetic_run(os.path.join(logdir, RUN), checkpoints=CHECKPOINTS, layers=5, units=UNITS, k=9,
                                  probe_size=1024, image_size=64, num_classes=10, seed=0)
        with contextlib.ExitStack() as stack, sync_playwright() as playwright:
            servers = {"this tree": stack.enter_context(serve(logdir, None))}
            if args.baseline:
                servers["baseline"] = stack.enter_context(serve(logdir, args.baseline))
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                results = measure(browser, {name: tb.url for name, tb in reversed(servers.items())}, run.steps, args)
            finally:
                browser.close()
            for name, tb in servers.items():
                results[name]["peak_rss"] = tb.peak_rss_bytes() // 2**20

    if args.json:
        print(json.dumps({"benchmark": "tab_512", "units": UNITS, "switches": args.switches, "results": results}))
        return
    print(f"run: {CHECKPOINTS} checkpoints x 5 layers x {UNITS} units, k=9, 1024 probe images 64x64; "
          f"layer {LAYER} in a 1280x900 window; {args.switches} switches after {DWELL_S:.0f} s each")
    rows = [("first deep-layer load, TensorBoard cold", "load_cold", "s"), ("deep-layer load, median", "load", "s"),
            (f"checkpoint switch, median (target < {SWITCH_TARGET_S} s)", "switch", "s"),
            ("checkpoint switch, worst", "switch_worst", "s"), ("matched compare, first", "compare_cold", "s"),
            ("matched compare, median", "compare", "s"), ("compare requests per view", "compare_requests", ""),
            ("compare JSON bytes, largest request", "compare_bytes", "B"),
            ("compare JSON bytes, all requests", "compare_total_bytes", "B"),
            ("TensorBoard peak RSS with its data server", "peak_rss", "MiB")]
    names = list(results)
    print(f"{'':48s}" + "".join(f"{n:>16s}" for n in names) + ("   ratio" if len(names) == 2 else ""))
    for label, key, unit in rows:
        values = [results[n][key] for n in names]
        cells = "".join(f"{v:>12.3f} {unit:3s}" if unit == "s" else f"{v:>12d} {unit:3s}" for v in values)
        ratio = f"   {values[0] / values[1]:.2f}" if len(names) == 2 and values[1] else ""
        print(f"{label:48s}{cells}{ratio}")


if __name__ == "__main__":
    main()
