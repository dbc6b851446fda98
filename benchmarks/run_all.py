"""Run every benchmark and print one markdown table of the README's figures, with the machine it ran on.

    python benchmarks/run_all.py [--skip page scale] [--scale_checkpoints 50 200]

Each figure is measured side by side within its own script (see their docstrings);
this runner starts them one after another, reads the JSON line each prints with
``--json`` (``page.py``'s text lines when it has no ``--json``), and prints the table.
Progress goes to stderr. Expect tens of minutes on two cores, mostly ``scale.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20


def run(script: str, *args: str) -> dict | str:
    """Run ``benchmarks/<script>``; its JSON line as a dict (or, without ``--json``, its stdout)."""
    path = os.path.join(HERE, script)
    with open(path, encoding="utf-8") as f:
        has_json = '"--json"' in f.read()
    command = [sys.executable, path, *args, *(["--json"] if has_json else [])]
    print(f"$ {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.strip().splitlines()[-1]) if has_json else out


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores (load average {load}), {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def streams_rows(s: dict) -> list[tuple[str, str, str]]:
    c = s["checkpoint"]
    return [
        ("training step with stream='train' ÷ without (demo net b128; resnet18 64 px b64)", "≤ 1.05",
         f"{s['train_step_demo']:.3f}; {s['train_step_resnet18']:.3f} (median of {s['repeats']})"),
        ("validation pass with stream='eval' ÷ without", "≤ 1.05", f"{s['validation_demo']:.3f}"),
        ("checkpoint with both streams ÷ without (1024 probe images)", "report", f"{c['ratio']:.2f}"),
        ("streams' pool; peak extra memory of a checkpoint with streams vs without", "the bound (256 MiB)",
         f"{c['pool_bytes'] / MIB:.1f} MiB; {c['peak_extra_bytes']['streams'] / MIB:.1f} vs "
         f"{c['peak_extra_bytes']['probe'] / MIB:.1f} MiB"),
    ]


def overhead_rows(o: dict) -> list[tuple[str, str, str]]:
    mem = o["peak_extra_bytes"]
    return [
        ("checkpoint cost ÷ plain forward pass", "≤ 1.15",
         f"{o['ratio']:.3f} ({o['checkpoint_s'] * 1e3:.0f} ms vs {o['forward_s'] * 1e3:.0f} ms over 1024 images, "
         f"median of {o['repeats']}, {o['threads']} threads)"),
        ("peak extra memory at 512 vs 4096 probe images", "flat",
         f"{mem['512']['checkpoint'] / MIB:.1f} MiB vs {mem['4096']['checkpoint'] / MIB:.1f} MiB "
         f"(×{o['memory_ratio_4096_512']:.2f}; a plain forward adds {mem['512']['forward'] / MIB:.1f} vs "
         f"{mem['4096']['forward'] / MIB:.1f} MiB)"),
    ]


def storage_rows(s: dict) -> list[tuple[str, str, str]]:
    return [("bytes per checkpoint vs the same top-9 crops as `add_image` grids", "≥ 50× smaller",
             f"{s['later_ratio']:.0f}× after the first checkpoint ({s['convviz_bytes_per_later_checkpoint'] / 1024:.0f} "
             f"vs {s['add_image_bytes_per_later_checkpoint'] / 1024:.0f} KiB); {s['ratio']:.1f}× over all "
             f"{s['checkpoints']} including the first, which stores the probe images; {s['records_ratio']:.0f}× "
             f"once every probe image is stored ({s['convviz_record_bytes_per_checkpoint'] / 1024:.0f} KiB of records)")]


def serve_rows(v: dict) -> list[tuple[str, str, str]]:
    ms = v["ms"]
    base, warm, cold = ms["images plugin blob"], ms["mosaic warm"], ms["mosaic cold"]
    return [(f"mosaic serving vs TensorBoard's image plugin (`--load_fast={str(v['load_fast']).lower()}`)", "—",
             f"p50 warm {warm['p50']:.1f} ms (×{warm['p50'] / base['p50']:.2f}), cold {cold['p50']:.1f} ms "
             f"(×{cold['p50'] / base['p50']:.2f}), image plugin {base['p50']:.1f} ms; p95 warm {warm['p95']:.1f}, "
             f"cold {cold['p95']:.1f}, image plugin {base['p95']:.1f} ms")]


def matching_rows(m: dict) -> list[tuple[str, str, str]]:
    parts = [f"{r['units']} units {r['matched_ms']:.0f} ms (×{r['ratio']:.0f}, peak {r['peak_bytes'] / MIB:.1f} MiB)"
             for r in m["results"]]
    r = m["results"][-1]
    return [("matching units across runs (`compare?match=1`) vs unit for unit", "—",
             "; ".join(parts) + f"; mean overlap {r['mean_overlap_matched']:.0%} matched vs "
             f"{r['mean_overlap_unit_for_unit']:.0%} unit for unit on shuffled, partly changed units")]


def page_rows(out: dict | str) -> list[tuple[str, str, str]]:
    if isinstance(out, dict):
        figures = ", ".join(f"{k} {v}" for k, v in out.items() if k != "benchmark")
    else:  # page.py's text lines: "page load, TensorBoard cold : 0.812 s  ..."
        found = re.findall(r"^(page load[^:]*|checkpoint switch[^:]*?)\s*:\s*([0-9.]+) s", out, re.M)
        figures = "; ".join(f"{name.strip()}: {value} s" for name, value in found) or out.strip()
    return [("page load (headless Chromium, real TensorBoard)", "—", figures)]


def tab_rows(t: dict) -> list[tuple[str, str, str]]:
    r = t["results"]["this tree"]
    return [
        (f"checkpoint switch on a {t['units']}-unit layer, tiles in the window decoded (tab_512.py)", "0.5 s",
         f"{r['switch']:.3f} s median, worst {r['switch_worst']:.3f} s"),
        ("first load of that layer, TensorBoard cold / warm median", "—", f"{r['load_cold']:.2f} s / {r['load']:.2f} s"),
        ("matched compare of that layer, first / median; JSON per request", "—",
         f"{r['compare_cold']:.2f} s / {r['compare']:.2f} s; {r['compare_bytes'] / 1000:.0f} KB"),
    ]


def scale_rows(sc: dict) -> list[tuple[str, str, str]]:
    setup, rows = sc["setup"], []
    counts = sorted({r["checkpoints"] for r in sc["results"]})
    low, high = counts[0], counts[-1]
    for loader in ("rust", "python"):
        r = {row["checkpoints"]: row for row in sc["results"] if row["loader"] == loader}
        if high not in r:
            continue
        b, a = r[high], r[low]
        growth = "" if low == high else (
            f"; {low}→{high} checkpoints (×{high / low:.0f}): load ×{b['load_s'] / a['load_s']:.2f}, "
            f"RSS ×{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, evolution ×{b['evolution_ms'] / a['evolution_ms']:.2f}")
        rows.append((
            f"scale, {high} checkpoints × {setup['layers']} layers × {setup['units']} units, k={setup['k']}, "
            f"{setup['probe_images']} probe images ({loader} loader)", "—",
            f"load {b['load_s']:.1f} s (scalars only {b['bare_load_s']:.1f} s), peak RSS {b['peak_rss_mib']:.0f} MiB "
            f"(scalars only {b['bare_peak_rss_mib']:.0f} MiB); runs {b['runs_ms']:.0f} ms, topk of "
            f"{setup['units']} units {b['topk_ms']:.0f} ms, mosaic cold {b['mosaic_cold_ms']:.0f} / warm "
            f"{b['mosaic_warm_ms']:.0f} ms, evolution {b['evolution_ms']:.0f} ms" + growth))
    return rows


def projection_rows(p: dict) -> list[tuple[str, str, str]]:
    stored = p["random_init"]
    rows = [
        ("checkpoint with projections=\"top1\" ÷ plain forward pass", "≤ 2.0",
         f"{p['top1_ratio']:.3f} ({p['top1_s'] * 1e3:.0f} ms vs {p['forward_s'] * 1e3:.0f} ms; medians of "
         f"{p['repeats']} per-step ratios)"),
        ("checkpoint with projections=None ÷ plain forward pass", "≤ 1.05",
         f"{p['none_ratio']:.3f} ({p['none_s'] * 1e3:.0f} ms)"),
        ("projection bytes per unit per checkpoint, random-init weights", "≤ 2 KB",
         f"{stored['bytes_per_unit']:.0f} B as stored"),
    ]
    stored_name = next(name for name in p["encodings"] if "stored" in name)
    rows += [(f"encoding: {name}", "≥ 40 dB, smallest" if name == stored_name else "—",
              f"{e['bytes']:.0f} B, PSNR min {e['psnr_min']:.1f} dB (median {e['psnr_median']:.1f}), "
              f"{e['ms']:.2f} ms") for name, e in p["encodings"].items()]
    if "page" in p:
        rows.append(("Fig. 4 grid, 16 units × 16 checkpoints, headless Chromium", "< 1 s",
                     f"{p['page']['median_s']:.3f} s median ({p['page']['cold_s']:.3f} s with TensorBoard cold)"))
    return rows


def construction_rows(c: dict) -> list[tuple[str, str, str]]:
    worst = max(c["results"], key=lambda r: r["ratio"])
    peak = max(c["results"], key=lambda r: r["peak_extra_bytes"])
    each = ", ".join(f"{r['model'].split('.', 1)[1]} {r['ratio']:.1f}" for r in c["results"])
    return [(f"logger construction ÷ one forward of a {c['batch']}-image probe batch ({c['size']} px), "
             f"{len(c['results'])} zoo models", "a few forwards",
             f"median {c['median_ratio']:.2f}, max {worst['ratio']:.2f} ({worst['model']}); peak extra memory "
             f"≤ {peak['peak_extra_bytes'] / MIB:.0f} MiB ({peak['model']}); per model: {each}")]


def worst_rows(w: dict) -> list[tuple[str, str, str]]:
    return [
        (f"worst request ({name}), cold", "< 2 s, < 200 MB extra",
         f"{r['seconds']:.2f} s; peak RSS {r['peak_before'] / 1e6:.0f} → {r['peak_after'] / 1e6:.0f} MB "
         f"(+{(r['peak_after'] - r['peak_before']) / 1e6:.0f}); {r['output'][0]}×{r['output'][1]} px")
        for name, r in w.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["overhead", "construction", "storage", "serve", "matching", "page", "tab", "scale",
                                 "worst", "projections", "streams"])
    parser.add_argument("--serve_requests", type=int, default=200)
    parser.add_argument("--scale_checkpoints", type=int, nargs="+", default=[50, 200])
    args = parser.parse_args()
    requests = ["--requests", str(args.serve_requests)]
    benchmarks = [
        ("overhead", ["overhead.py"], overhead_rows),
        ("construction", ["construction.py"], construction_rows),
        ("storage", ["storage.py"], storage_rows),
        ("serve", ["serve.py", "--load_fast", "true", *requests], serve_rows),
        ("serve", ["serve.py", "--load_fast", "false", *requests], serve_rows),
        ("matching", ["matching.py"], matching_rows),
        ("page", ["page.py"], page_rows),
        ("tab", ["tab_512.py"], tab_rows),
        ("worst", ["worst_requests.py"], worst_rows),
        ("projections", ["projections.py", "--page"], projection_rows),
        ("streams", ["streams.py"], streams_rows),
        ("scale", ["scale.py", "--checkpoints", *map(str, args.scale_checkpoints)], scale_rows),
    ]
    before = machine()
    rows = []
    for name, command, to_rows in benchmarks:
        if name in args.skip or not os.path.exists(os.path.join(HERE, command[0])):
            continue
        try:
            rows += to_rows(run(*command))
        except subprocess.CalledProcessError as e:  # one broken benchmark should not cost the others
            reason = (e.stderr or "").strip().splitlines()[-1:] or [f"exit status {e.returncode}"]
            rows.append((" ".join(command), "—", f"failed: {reason[0]}"))

    print(f"Machine: {before}; load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| figure | target | measured |")
    print("|---|---|---|")
    for figure, target, measured in rows:
        print(f"| {figure} | {target} | {measured} |")


if __name__ == "__main__":
    main()
