"""What the training and validation streams cost, measured side by side in one run on the CPU.

* a training step (forward, backward, SGD step) with ``stream="train"`` ÷ the same step without,
  for the demo's AlexNet-style net at 64x64, batch 128, and torchvision's resnet18 at 64x64,
  batch 64: two copies of each model, steps interleaved, the median of per-step ratios;
* a validation pass (``torch.no_grad()``, eval mode, 2,048 images in batches of 256, the size of
  the demo's test set) with ``stream="eval"`` ÷ without, for the demo net and resnet18: the same
  images every pass, a checkpoint closing the window before each, as between epochs; and the
  same pass fed twice with no checkpoint between (a user who validates twice), the second timed;
* a checkpoint with both streams ÷ the same checkpoint without (1024 probe images, no
  projections), after a window of training steps and a validation pass;
* the streams' pool after that window, and the peak extra memory of the checkpoints;
* with ``--floor``, the demo's validation pass once more with the eval stream's hooks cut to
  what any exact ranking by content needs: the spatial maximum of every logged map, then also
  the content hash of every image (none of the bars, positions, merges or copies).

    python benchmarks/streams.py [--repeats 5] [--floor] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile

import torch
import torchvision

from overhead import peak_extra, timed
from tb_convviz import ConvVizLogger, ProbeSet
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.streams import StreamHooks, content_ids
from tb_convviz.topk import peak_values

NEVER = 10 ** 9  # a schedule step no benchmark reaches: only the streams' hooks run
VALIDATION_IMAGES = 2048  # the demo's test set: 2,000 images


def loggers(model, probe, log_dir, layers, **options):
    """A model without a logger, and a copy with one (its streams' hooks on), from the same weights."""
    hooked = copy.deepcopy(model)
    return model, hooked, ConvVizLogger(hooked, probe, log_dir, layers=layers, k=9, steps=[NEVER],
                                        projections=None, **options)


def train_step(model, x, y, optimizer) -> None:
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def validation(model, batches) -> None:
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)


def interleaved(plain, hooked, repeats: int, before=lambda: None) -> float:
    """Median over ``repeats`` of hooked() time ÷ plain() time, each pair timed back to back, ``before()`` untimed."""
    before()
    plain(), hooked()  # warm-up
    ratios = []
    for _ in range(repeats):
        before()
        a = timed(plain)
        ratios.append(timed(hooked) / ((a + timed(plain)) / 2))
    return statistics.median(ratios)


def step_ratio(model, layers, batch, repeats, probe) -> float:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 64, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)
    with tempfile.TemporaryDirectory() as d:
        plain, hooked, logger = loggers(model, probe, d, layers, stream="train")
        sgd = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (plain, hooked)]
        # Fresh images each step, as in training: each may enter a unit's top-k.
        ratio = interleaved(lambda: train_step(plain, torch.rand_like(x), y, sgd[0]),
                            lambda: train_step(hooked, torch.rand_like(x), y, sgd[1]), repeats)
        logger.close(final_checkpoint=False)
    return ratio


def validation_ratio(model, layers, repeats, probe, *, fed_again: bool) -> float:
    """A validation pass over the demo's 2,048 test images (8 batches of 256) with the eval stream ÷ without.

    As between epochs, a checkpoint (untimed) closes the window before each pass over the same
    images; ``fed_again``: the pass runs once more, untimed, before the timed one, as when a
    user validates twice with no checkpoint between.
    """
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(256, 3, 64, 64, generator=g) for _ in range(VALIDATION_IMAGES // 256)]
    with tempfile.TemporaryDirectory() as d:
        plain, hooked, logger = loggers(model, probe, d, layers, stream="eval")
        steps = iter(range(repeats + 1))

        def close_window():
            logger.log(next(steps))
            if fed_again:
                validation(hooked, batches)

        ratio = interleaved(lambda: validation(plain, batches), lambda: validation(hooked, batches), repeats,
                            before=close_window)
        logger.close(final_checkpoint=False)
    return ratio


@contextlib.contextmanager
def floor(*, hashes: bool):
    """Stream hooks built inside keep only every logged map's spatial maximum (and, ``hashes``, every image's id)."""
    layer, end = StreamHooks._layer, StreamHooks._end

    def floor_layer(self, name):
        def hook(_module, _inputs, output):
            if self._current is not None:
                with torch.no_grad():
                    self._found[name] = peak_values(output.detach())
        return hook

    def floor_end(self, *_):
        current, self._current, self._found = self._current, None, {}
        if current is not None and hashes:
            content_ids(current[1])

    StreamHooks._layer, StreamHooks._end = floor_layer, floor_end
    try:
        yield
    finally:
        StreamHooks._layer, StreamHooks._end = layer, end


def checkpoint(repeats: int, probe) -> dict:
    """Checkpoint with both streams ÷ without, after a window of 8 training steps and 1024 validation images."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    validation_set = [torch.rand(256, 3, 64, 64, generator=g) for _ in range(4)]
    model = DemoAlexNet()
    ratios, pools, memory = [], [], {"streams": 0, "probe": 0}
    with tempfile.TemporaryDirectory() as d:
        plain = ConvVizLogger(copy.deepcopy(model), probe, f"{d}/plain", layers=DemoAlexNet.LOGGED_LAYERS, k=9,
                              steps=[NEVER], projections=None)
        streams = ConvVizLogger(model, probe, f"{d}/streams", layers=DemoAlexNet.LOGGED_LAYERS, k=9, steps=[NEVER],
                                projections=None, stream=("train", "eval"))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for step in range(repeats):
            for _ in range(8):
                train_step(model, torch.rand(128, 3, 64, 64, generator=g), torch.randint(0, 10, (128,), generator=g),
                           optimizer)
            validation(model, validation_set)
            plain.model.load_state_dict(model.state_dict())
            pools.append(streams.stream_pool_bytes_held)
            a = timed(lambda: plain.log(step))
            b = timed(lambda: streams.log(step))
            ratios.append(b / a)
            if step == repeats - 1:  # memory once, outside the timing
                for _ in range(8):
                    train_step(model, torch.rand(128, 3, 64, 64, generator=g),
                               torch.randint(0, 10, (128,), generator=g), optimizer)
                validation(model, validation_set)
                memory["streams"] = peak_extra(lambda: streams.log(step + 1))
                memory["probe"] = peak_extra(lambda: plain.log(step + 1))
        plain.close(final_checkpoint=False)
        streams.close(final_checkpoint=False)
    return {"ratio": statistics.median(ratios), "pool_bytes": max(pools), "peak_extra_bytes": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--floor", action="store_true",
                        help="also the demo's validation pass with hooks that take only maxima (and hashes)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the text")
    args = parser.parse_args()
    torch.manual_seed(0)
    probe = ProbeSet(torch.rand(1024, 3, 64, 64))
    resnet = torchvision.models.resnet18(num_classes=10)
    resnet_layers = ["relu", "layer1", "layer2", "layer3", "layer4"]
    say = (lambda *_: None) if args.json else lambda text: print(text, flush=True)
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} interleaved pairs")
    out = {"train_step_demo": step_ratio(DemoAlexNet(), DemoAlexNet.LOGGED_LAYERS, 128, args.repeats, probe)}
    say(f"training step, stream='train' / without, demo net batch 128 : {out['train_step_demo']:6.3f}  (target <= 1.05)")
    out["train_step_resnet18"] = step_ratio(resnet, resnet_layers, 64, args.repeats, probe)
    say(f"training step, stream='train' / without, resnet18 64px b64  : {out['train_step_resnet18']:6.3f}  (target <= 1.05)")
    out["validation_demo"] = validation_ratio(DemoAlexNet(), DemoAlexNet.LOGGED_LAYERS, args.repeats, probe,
                                              fed_again=False)
    say(f"validation pass, stream='eval' / without, demo net          : {out['validation_demo']:6.3f}  (target <= 1.05)")
    out["validation_fed_again_demo"] = validation_ratio(DemoAlexNet(), DemoAlexNet.LOGGED_LAYERS, args.repeats,
                                                        probe, fed_again=True)
    say(f"  the same pass fed again, no checkpoint between            : "
        f"{out['validation_fed_again_demo']:6.3f}")
    if args.floor:
        for name, hashes, what in (("maxima", False, "spatial maxima alone"),
                                   ("maxima_and_hashes", True, "maxima and content hashes")):
            with floor(hashes=hashes):
                out[f"validation_demo_floor_{name}"] = validation_ratio(
                    DemoAlexNet(), DemoAlexNet.LOGGED_LAYERS, args.repeats, probe, fed_again=False)
            say(f"  the same pass, hooks cut to {what:30s}: {out[f'validation_demo_floor_{name}']:6.3f}")
    out["validation_resnet18"] = validation_ratio(torchvision.models.resnet18(num_classes=10), resnet_layers,
                                                  args.repeats, probe, fed_again=False)
    say(f"validation pass, stream='eval' / without, resnet18 64px      : {out['validation_resnet18']:6.3f}  (target <= 1.05)")
    c = out["checkpoint"] = checkpoint(args.repeats, probe)
    mib = 1 << 20
    say(f"checkpoint with both streams / without (1024 probe images)   : {c['ratio']:6.3f}")
    say(f"streams' CPU pool after 8 steps + 1024 validation images    : {c['pool_bytes'] / mib:6.1f} MiB")
    say(f"peak extra memory of a checkpoint: with streams {c['peak_extra_bytes']['streams'] / mib:.1f} MiB, "
        f"probe only {c['peak_extra_bytes']['probe'] / mib:.1f} MiB")
    if args.json:
        print(json.dumps({"benchmark": "streams", "threads": torch.get_num_threads(), "repeats": args.repeats, **out}))


if __name__ == "__main__":
    main()
