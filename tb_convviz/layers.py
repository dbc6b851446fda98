"""Which modules to log: name resolution, wrapper unwrapping and the ``layers="auto"`` rule.

The auto rule: torchvision AlexNet logs the ReLU after each of its 5 convs;
VGG the max-pool ending each of its 5 blocks; ResNet the stem's ReLU and
layer1..layer4. Any other model: take its Conv2d modules in execution order,
pick 5 evenly spaced ones (all if fewer) and log, for each, the first
activation module that runs after it and before the next conv, else the conv.
"""

from __future__ import annotations

import dataclasses
import difflib

import torch
from torch import nn

AUTO_LAYERS = 5
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.PReLU, nn.Tanh)
WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


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


def trace_calls(model: nn.Module, batch: torch.Tensor, call=None) -> list[Call]:
    """Run ``model(batch)`` (or ``call(batch)``) and list every module call in execution order."""
    calls: list[Call] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, _inputs, output):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        calls.append(Call(names.get(module, "?"), module, shape))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        (call or model)(batch)
    finally:
        for h in handles:
            h.remove()
    return calls


def auto_layers(model: nn.Module, calls: list[Call]) -> list[str]:
    """Module names picked by the ``layers="auto"`` rule (see module docstring)."""
    known = _known_architecture(model, "", calls)
    # A wrapper such as a LightningModule holding `self.model = resnet18()`.
    children = [(n, m) for n, m in model.named_children() if next(m.parameters(), None) is not None]
    if known is None and len(children) == 1:
        known = _known_architecture(children[0][1], children[0][0] + ".", calls)
    if known is not None:
        return known
    convs = _conv_positions(calls)
    if not convs:
        raise ValueError(
            "layers='auto' found no nn.Conv2d in the model's forward; pass layers=[...] with module names"
        )
    if len(convs) > AUTO_LAYERS:
        step = (len(convs) - 1) / (AUTO_LAYERS - 1)
        convs = [convs[round(i * step)] for i in range(AUTO_LAYERS)]
    return _after_convs(calls, convs)


def _known_architecture(model: nn.Module, prefix: str, calls: list[Call]) -> list[str] | None:
    """Names for torchvision's AlexNet, VGG and ResNet layouts (``model`` is the root's ``prefix``), else None."""
    kind = type(model).__name__
    modules = dict(model.named_modules())
    if kind == "AlexNet" and isinstance(getattr(model, "features", None), nn.Sequential):
        return _after_convs(calls, _conv_positions(calls))  # call names are the root's already
    if kind == "VGG" and isinstance(getattr(model, "features", None), nn.Sequential):
        pools = [n for n, m in model.features.named_children() if isinstance(m, nn.MaxPool2d)]
        if len(pools) == 5:
            return [f"{prefix}features.{n}" for n in pools]
    if all(n in modules for n in ("relu", "layer1", "layer2", "layer3", "layer4")):
        return [prefix + n for n in ("relu", "layer1", "layer2", "layer3", "layer4")]
    return None


def _conv_positions(calls: list[Call]) -> list[int]:
    return [i for i, c in enumerate(calls) if isinstance(c.module, nn.Conv2d)]


def _after_convs(calls: list[Call], convs: list[int]) -> list[str]:
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    picked = []
    for pos in convs:
        conv = calls[pos]
        choice = conv.name
        for later in calls[pos + 1:]:
            if isinstance(later.module, nn.Conv2d):
                break
            if isinstance(later.module, ACTIVATIONS) and counts[later.name] == 1 and later.output == conv.output:
                choice = later.name
                break
        picked.append(choice)
    return picked
