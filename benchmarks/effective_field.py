"""Effective receptive fields: their cost against the probe pass, and their size on the model zoo.

Default: per model, the effective-field measurement of a checkpoint (one forward and one
backward per logged conv layer, on ``effective_field.IMAGES`` probe images) against the
probe pass over 256 probe images at batch size 128, measured side by side in one run,
interleaved, the median of the per-repeat ratios; and the peak memory each adds.

``--zoo``: the README's table, the effective against the theoretical field of every layer
that ``layers="auto"`` logs for each model of ``tests/test_zoo.py`` at its test resolution
(random init, one checkpoint), in one run.

    python benchmarks/effective_field.py [--repeats 5] [--zoo] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Iterator

import torch
import torchvision

from tb_convviz import ConvVizLogger, ProbeSet, effective_field
from tb_convviz.demo.model import DemoAlexNet

sys.path.insert(0, os.path.dirname(__file__))
from overhead import peak_extra  # noqa: E402

PROBE, BATCH = 256, 128
MODELS = {
    "demo AlexNet (width 8)": (lambda: DemoAlexNet(width=8), 64),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), 64),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), 96),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(weights=None), 96),
}


def logger_for(model: torch.nn.Module, side: int, log_dir: str) -> ConvVizLogger:
    probe = ProbeSet(torch.rand(PROBE, 3, side, side, generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConvVizLogger(model.eval(), probe, log_dir, batch_size=BATCH, projections=None)


def cost(repeats: int, only: list[str] | None = None) -> list[dict]:
    rows = []
    for name, (build, side) in MODELS.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            logger = logger_for(build(), side, tmp)
            probe_pass = lambda: logger._probe_source.local()  # noqa: E731
            measure = lambda: effective_field.measure(logger._net, logger.probe, logger._layer_infos,  # noqa: E731
                                                      call=logger._call, device=logger.device)
            measure()  # warm-up
            ratios, seconds = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                probe_pass()
                middle = time.perf_counter()
                measure()
                end = time.perf_counter()
                ratios.append((end - middle) / (middle - start))
                seconds.append(end - middle)
            rows.append({
                "model": name, "input": side, "layers": len(logger._layer_infos),
                "measure_s": statistics.median(seconds), "ratio_to_probe_pass": statistics.median(ratios),
                "peak_extra_mb_measure": peak_extra(measure) / 2 ** 20,
                "peak_extra_mb_probe_pass": peak_extra(probe_pass) / 2 ** 20,
            })
            logger.close(final_checkpoint=False)
    return rows


def zoo(only: list[str] | None = None) -> Iterator[dict]:
    """One row per zoo model (of ``only``, if given), as each is measured."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
    from test_zoo import ZOO, build

    for name, (side, _) in ZOO.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = ProbeSet(torch.rand(8, 3, side, side, generator=torch.Generator().manual_seed(0)))
            logger = ConvVizLogger(build(name), probe, tmp, k=1, projections=None)
            fields = effective_field.measure(logger._net, probe, logger._layer_infos, call=logger._call)
            logger.close(final_checkpoint=False)
        yield {"model": name, "input": side, "layers": [
            {"name": layer, "theoretical": [info.receptive_field.size_h, info.receptive_field.size_w],
             "effective": list(fields[layer]) if layer in fields else None}
            for layer, info in logger._layer_infos.items()]}


def _side(size: list[int] | None) -> str:
    if size is None:
        return "–"
    return str(size[0]) if size[0] == size[1] else f"{size[0]}×{size[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--zoo", action="store_true", help="the README's table of effective vs theoretical fields")
    parser.add_argument("--models", nargs="*", default=None, help="only these models (--zoo: e.g. torchvision.resnet18; else e.g. resnet18)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.zoo:
        if not args.json:
            print(f"| model | input | effective / theoretical field (px), layers 1 to 5, at "
                  f"{effective_field.MASS_SHARE:.0%} of the gradient mass |")
            print("|---|---|---|")
        for row in zoo(args.models):
            cells = ", ".join(f"{_side(l['effective'])} / {_side(l['theoretical'])}" for l in row["layers"])
            print(json.dumps(row) if args.json else f"| {row['model']} | {row['input']} | {cells} |", flush=True)
        return
    rows = cost(args.repeats, args.models)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"effective fields per checkpoint vs the probe pass ({PROBE} probe images, batch {BATCH}), "
          f"median of {args.repeats}:")
    for r in rows:
        print(f"  {r['model']:<24} {r['input']:>3} px, {r['layers']} layers: {r['measure_s'] * 1000:7.1f} ms, "
              f"x{r['ratio_to_probe_pass']:.3f} of the probe pass; peak extra memory {r['peak_extra_mb_measure']:.1f} MB "
              f"(probe pass {r['peak_extra_mb_probe_pass']:.1f} MB)")


if __name__ == "__main__":
    main()
