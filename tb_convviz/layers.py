"""Which modules to log: name resolution, wrapper unwrapping and the ``layers="auto"`` rule.

The auto rule picks the network's stages. Stage *i* ends with the last tensor at one spatial
resolution before the next downsampling, after its activation and residual add: its name is
the module that outputs it (the outermost, when blocks nest). Stages come, in order of
preference, from the layout a model publishes (timm's ``feature_info``), from torchvision's
known layouts (AlexNet's 5 conv ReLUs, VGG's 5 pools, ResNet's ``relu, layer1..4``,
SqueezeNet's ``features``), or else from one traced forward: wherever the main path's
resolution drops, the tensor entering the downsampling block ends a stage, and the last
spatial tensor ends the last one. A block that convolves at a resolution before it pools
(``Sequential(conv, bn, relu, maxpool)``) is not a downsampling block: its pooling starts
the next stage, so its activation ends this one, nested or written flat. Global pools (the
heads, and the squeeze-excitation gates inside blocks) and their 1×1 maps are never stages.
Of more than 5 stages, 5 are spread over the depth, first and last included.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings

import torch
from torch import nn

from tb_convviz.caller import user_stacklevel

AUTO_LAYERS = 5
WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
# A resolution at most this fraction of the stage's is a downsampling; unpadded convs
# (Inception's) shrink maps by a few pixels within a stage.
_DOWNSAMPLED = 0.75


# Name prefixes of wrapped modules: DataParallel/DDP's `module.`, torch.compile's `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel/DistributedDataParallel and ``torch.compile`` wrappers.

    A compiled model's eager module runs the probe pass: hooks see every layer, and
    nothing is recompiled for it.
    """
    while True:
        if isinstance(model, WRAPPERS):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch._dynamo's OptimizedModule
            model = model._orig_mod
        else:
            return model


def strip_prefix(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def resolve(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Map user-given module names (``module.`` prefixes allowed) to modules of the unwrapped model."""
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r}")
        key = name if name in modules else strip_prefix(name)
        if key not in modules or key == "":
            close = difflib.get_close_matches(key, [n for n in modules if n], n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown layer {name!r}.{hint} {_available(modules)}")
        if key in resolved:
            raise ValueError(f"layer {name!r} is listed twice")
        resolved[key] = modules[key]
    if not resolved:
        raise ValueError(f"no layers given. {_available(modules)}")
    return resolved


def _available(modules: dict[str, nn.Module]) -> str:
    names = sorted((n for n in modules if n), key=lambda n: n.count("."))  # the outline first
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return f"Available layers: {shown}. Pass layers=[...] with module names from model.named_modules()."


@dataclasses.dataclass
class Call:
    """One module call seen during a traced forward."""

    name: str
    module: nn.Module
    output: tuple[int, ...] | None  # shape, None if not a tensor
    start: int = 0  # order of the call's start and end among all starts and ends
    end: int = 0
    input_tensor: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    output_tensor: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def is_leaf(self) -> bool:
        return next(self.module.children(), None) is None

    def contains(self, other: "Call") -> bool:
        return self.start <= other.start and other.end <= self.end


def trace_calls(model: nn.Module, batch: torch.Tensor, call=None) -> list[Call]:
    """Run ``model(batch)`` (or ``call(batch)``) and list every module call in order of its end."""
    calls: list[Call] = []
    names = {m: n for n, m in model.named_modules()}
    clock, starts = iter(range(1 << 62)), []

    def pre_hook(module, inputs):
        starts.append((next(clock), next((t for t in inputs if isinstance(t, torch.Tensor)), None)))

    def hook(module, _inputs, output):
        start, first = starts.pop()
        tensor = output if isinstance(output, torch.Tensor) else None
        calls.append(Call(names.get(module, "?"), module, tuple(tensor.shape) if tensor is not None else None,
                          start, next(clock), first, tensor))

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook))]
    try:
        (call or model)(batch)
    finally:
        for h in handles:
            h.remove()
    root = max(calls, key=lambda c: c.end - c.start, default=None)
    if root is not None and root.input_tensor is None:  # `call` passed a dict or several inputs
        root.input_tensor = batch
    return calls


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage output: the module's name and its stride (input pixels per unit)."""

    name: str
    stride: int


def auto_layers(model: nn.Module, calls: list[Call]) -> list[str]:
    """Module names picked by the ``layers="auto"`` rule (see module docstring)."""
    stages = model_stages(model, calls)
    if len(stages) > AUTO_LAYERS:
        step = (len(stages) - 1) / (AUTO_LAYERS - 1)
        stages = [stages[round(i * step)] for i in range(AUTO_LAYERS)]
    elif len(stages) < AUTO_LAYERS:
        warnings.warn(f"layers='auto': the model has {len(stages)} stage(s), not {AUTO_LAYERS}, so "
                      f"tb-convviz logs all of them: {', '.join(s.name for s in stages)}. Pass "
                      f"layers=[...] with module names to choose others.", stacklevel=user_stacklevel())
    return [s.name for s in stages]


def model_stages(model: nn.Module, calls: list[Call]) -> list[Stage]:
    """All stages of ``model`` (see module docstring), from a trace of its forward pass."""
    once = _called_once(calls)
    candidates = [(model, "")]
    # A wrapper such as a LightningModule holding `self.model = resnet18()`.
    children = [(m, n + ".") for n, m in model.named_children() if next(m.parameters(), None) is not None]
    if len(children) == 1:
        candidates += children
    for net, prefix in candidates:
        stages = _published(net, prefix, once) or _known_architecture(net, prefix, calls, once)
        if stages:
            return stages
    stages = _traced(calls, _input_size(calls))
    _refuse_non_convnets(stages, calls)
    return stages


def _called_once(calls: list[Call]) -> dict[str, Call]:
    """The calls of modules that ran exactly once, by name, with a 4-D output."""
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    return {c.name: c for c in calls
            if c.name and counts[c.name] == 1 and c.output is not None and len(c.output) == 4}


def _stride(call: Call, size: tuple[int, int]) -> int:
    return max(1, round(size[0] / call.output[2]))


def _published(net: nn.Module, prefix: str, once: dict[str, Call]) -> list[Stage] | None:
    """timm's ``feature_info`` (module names and reductions), if every listed module ran once, 4-D."""
    info = getattr(net, "feature_info", None)
    if not isinstance(info, list) or not info or not all(isinstance(d, dict) and "module" in d for d in info):
        return None
    stages = []
    for entry in info:
        name = prefix + entry["module"]
        if name not in once or not isinstance(entry.get("reduction"), int):
            return None
        stage = Stage(name, entry["reduction"])
        if stages and stages[-1].stride == stage.stride:
            stages[-1] = stage  # the last of equal reductions ends the stage
        else:
            stages.append(stage)
    return stages if all(a.stride < b.stride for a, b in zip(stages, stages[1:])) else None


def _known_architecture(net: nn.Module, prefix: str, calls: list[Call],
                        once: dict[str, Call]) -> list[Stage] | None:
    """torchvision's AlexNet, VGG, ResNet and SqueezeNet layouts, else None."""
    kind = type(net).__name__
    features = getattr(net, "features", None)
    names: list[str] = []
    if kind == "AlexNet" and isinstance(features, nn.Sequential):
        convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
        names = [f"features.{i + 1}" for i in convs if isinstance(features[i + 1], nn.ReLU)]
    elif kind == "VGG" and isinstance(features, nn.Sequential):
        names = [f"features.{i}" for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    elif kind == "SqueezeNet" and isinstance(features, nn.Sequential):  # not its 1×1-conv classifier
        inside = [c for c in calls if c.name.startswith(prefix + "features.")]
        return _traced(inside, _input_size(calls)) or None
    elif all(hasattr(net, n) for n in ("relu", "layer1", "layer2", "layer3", "layer4")):
        names = ["relu", "layer1", "layer2", "layer3", "layer4"]
    names = [prefix + n for n in names]
    if not names or not all(n in once for n in names):
        return None
    size = _input_size(calls)
    return [Stage(n, _stride(once[n], size)) for n in names]


def _input_size(calls: list[Call]) -> tuple[int, int]:
    root = max(calls, key=lambda c: c.end - c.start)  # the model's own call
    return tuple(root.input_tensor.shape[-2:])


def _spatial(shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    """(h, w) of a 4-D shape with more than one position; None for 1×1 maps, vectors, tokens."""
    if shape is None or len(shape) != 4 or shape[2] * shape[3] <= 1:
        return None
    return shape[2], shape[3]


def _traced(calls: list[Call], size: tuple[int, int]) -> list[Stage]:
    """Stages from the order of module calls for ``size`` inputs (see module docstring)."""
    once = _called_once(calls)
    leaves = sorted((c for c in calls if c.is_leaf), key=lambda c: c.start)
    stages: list[Stage] = []
    resolution, previous_end, last_mixing = size, -1, -1
    for leaf in leaves:
        out = _spatial(leaf.output)
        if out is None:
            continue
        if not _downsampled(out, resolution):
            if _mixes_space(leaf.module):
                last_mixing = leaf.start
            continue
        # The outermost block that starts the downsampling takes the stage's output as input. A
        # block that first works at this resolution (conv, bn, relu, then pool) holds the last
        # tensor at it, so only blocks starting after its last spatial conv qualify: nesting
        # the same modules in blocks does not change the picks.
        after = max(previous_end, last_mixing)
        for block in sorted((c for c in calls if c.contains(leaf) and c.start > after), key=lambda c: c.start):
            shape = _spatial(tuple(block.input_tensor.shape)) if block.input_tensor is not None else None
            producer = _producer(block.input_tensor, once, previous_end, block.start)
            if shape is not None and not _downsampled(shape, resolution) and shape <= resolution and producer:
                stages.append(Stage(producer.name, _stride(producer, size)))
                previous_end = producer.end
                break
        resolution = out
    # The last stage ends with the last spatial output, outside any block that downsamples it.
    inner = _inside_resizing_blocks(calls)
    last = [c for c in once.values() if c.start > previous_end and _spatial(c.output) is not None
            and id(c) not in inner]
    if last:
        tail = max(last, key=lambda c: (c.end, -c.start))
        if not stages or _stride(tail, size) > stages[-1].stride:
            stages.append(Stage(tail.name, _stride(tail, size)))
    return stages


def _inside_resizing_blocks(calls: list[Call]) -> set[int]:
    """ids of the calls inside a (named) module call whose output has another resolution."""
    # The model, and a wrapper around all of it (a LightningModule's `self.model`, a module
    # called through the logger's `forward=`), hold every leaf: they are not resizing blocks.
    leaves = [c for c in calls if c.is_leaf] or calls
    first, last = min(c.start for c in leaves), max(c.end for c in leaves)
    inner, open_calls = set(), []
    for call in sorted(calls, key=lambda c: c.start):
        while open_calls and open_calls[-1].end < call.start:
            open_calls.pop()
        if any(outer.name and not (outer.start <= first and last <= outer.end)
               and _spatial(outer.output) != _spatial(call.output) for outer in open_calls):
            inner.add(id(call))
        open_calls.append(call)
    return inner


def _mixes_space(module: nn.Module) -> bool:
    """A convolution with a kernel larger than 1×1: it makes new features at its resolution."""
    return isinstance(module, nn.modules.conv._ConvNd) and any(k > 1 for k in module.kernel_size)


def _downsampled(shape: tuple[int, int], resolution: tuple[int, int]) -> bool:
    return shape[0] <= resolution[0] * _DOWNSAMPLED or shape[1] <= resolution[1] * _DOWNSAMPLED


def _producer(tensor: torch.Tensor, once: dict[str, Call], after: int, before: int) -> Call | None:
    """The outermost module that output ``tensor`` within (after, before), or None."""
    made = [c for c in once.values() if c.output_tensor is tensor and after < c.start and c.end < before]
    return max(made, key=lambda c: (c.end, -c.start)) if made else None


def _refuse_non_convnets(stages: list[Stage], calls: list[Call]) -> None:
    """A clear error for models whose trunk works on tokens (transformers, MLPs), not feature maps."""
    spatial = [c for c in calls if c.is_leaf and _spatial(c.output) is not None]
    tokens = [c for c in calls if c.is_leaf and c.output is not None and len(c.output) == 3]
    if stages and len(tokens) <= len(spatial):
        return
    model = type(max(calls, key=lambda c: c.end - c.start).module).__name__ if calls else "the model"
    first_token = min((c.start for c in tokens), default=float("inf"))
    maps = [c for c in spatial if c.start < first_token]
    found = (f"its (N, C, H, W) feature maps end at {maps[-1].name!r} {maps[-1].output}"
             if maps else "no module outputs an (N, C, H, W) feature map larger than 1×1")
    if tokens:
        found += f", and {len(tokens)} modules run on (N, L, C) token tensors, e.g. {tokens[-1].name!r}"
    raise ValueError(
        f"layers='auto' finds no ConvNet stages in {model}: {found} (a transformer or MLP?). "
        f"tb-convviz ranks units of (N, C, H, W) or (N, F) outputs: pass layers=[...] with their "
        f"module names from model.named_modules() to log them.")
