"""Logger construction cost on the model zoo: time ÷ one forward of a probe batch, peak memory.

Measured side by side per model, random-init, on the CPU: a ``torch.no_grad()`` eval forward
of one probe batch (``--batch`` images of ``--size`` px, the median of 3) and building a
``ConvVizLogger(model, probe, layers="auto", batch_size=--batch)`` on the same images: its
trace of the forward pass, the stage rule and the receptive fields. Peak memory is the
resident memory construction adds, sampled every millisecond.

    python benchmarks/construction.py [--size 96] [--batch 32] [--models resnet50 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings

import timm
import torch
import torchvision

from overhead import peak_extra
from tb_convviz import ConvVizLogger, ProbeSet

TORCHVISION = """alexnet vgg11_bn vgg16 resnet18 resnet50 resnext50_32x4d wide_resnet50_2 densenet121
    googlenet inception_v3 mobilenet_v2 mobilenet_v3_small efficientnet_b0 efficientnet_v2_s regnet_x_400mf
    regnet_y_400mf convnext_tiny shufflenet_v2_x1_0 squeezenet1_0 mnasnet0_5""".split()
TIMM = "resnet50 efficientnet_b0 convnext_nano regnetx_002 mobilenetv3_small_100 cspdarknet53".split()
ZOO = [f"torchvision.{n}" for n in TORCHVISION] + [f"timm.{n}" for n in TIMM]


def build(name: str) -> torch.nn.Module:
    """A random-init zoo model by its ``torchvision.<name>`` or ``timm.<name>`` name."""
    source, model = name.split(".", 1)
    if source == "timm":
        return timm.create_model(model, pretrained=False)
    extra = {"aux_logits": False, "init_weights": False} if model in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, model)(weights=None, **extra)


def measure(name: str, size: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = build(name).eval()
    images = torch.rand(batch, 3, size, size)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            model(images)
        times.append(time.perf_counter() - start)
    forward = statistics.median(times)
    probe, built = ProbeSet(images), {}

    def construct():
        with tempfile.TemporaryDirectory() as log_dir, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fewer-stages warning
            start = time.perf_counter()
            logger = ConvVizLogger(model, probe, log_dir, batch_size=batch)
            built["s"] = time.perf_counter() - start
            built["layers"] = logger.layers
            built["methods"] = sorted({i.receptive_field.method for i in logger._layer_infos.values()})
            logger.close()

    peak = peak_extra(construct)
    return {"model": name, "forward_s": forward, "construction_s": built["s"], "ratio": built["s"] / forward,
            "peak_extra_bytes": peak, "layers": built["layers"], "field_methods": built["methods"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", nargs="*", default=ZOO, help="e.g. torchvision.resnet50 timm.convnext_nano")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    for name in args.models:
        results.append(measure(name, args.size, args.batch))
        r = results[-1]
        if not args.json:
            print(f"{name:32s} construction {r['construction_s']:6.2f} s ÷ forward {r['forward_s']:6.3f} s = "
                  f"{r['ratio']:5.2f}   peak +{r['peak_extra_bytes'] / 2 ** 20:6.1f} MiB   "
                  f"fields {','.join(r['field_methods'])}", flush=True)
        else:
            print(f"{name}: {r['ratio']:.2f}", file=sys.stderr, flush=True)
    ratios = [r["ratio"] for r in results]
    summary = {"benchmark": "construction", "size": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
               "max_ratio": max(ratios), "median_ratio": statistics.median(ratios), "results": results}
    print(json.dumps(summary) if args.json else
          f"max ratio {summary['max_ratio']:.2f}, median {summary['median_ratio']:.2f} over {len(results)} models")


if __name__ == "__main__":
    main()
