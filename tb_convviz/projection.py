"""Project single activations back to pixel space: deconvnet, guided backprop or the plain gradient.

Zeiler & Fergus's Fig. 2 shows, beside each top-k patch, the signal that one activation
sends back to the input when every other activation of its layer is zero. Here that is a
backward pass seeded with 1 at the record's (unit, y, x), with ReLU's backward replaced
by the rule's. Images do not interact in eval mode, so one forward and one backward over
a batch in which each row carries its own record's image and seed projects every record
of a checkpoint, whatever their layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tb_convviz import projection_format as fmt
from tb_convviz.geometry import ReceptiveField, record_box
from tb_convviz.isolation import preserved
from tb_convviz.ranking import Agreement, agreed, buffers_of_rank_0, rank, world

RULES = ("deconvnet", "guided", "gradient")
PROJECTIONS = ("top1", "topk", None)

# Nonlinearities no rule rewrites: they pass the plain gradient, and the layer says so.
_UNCOVERED = {
    F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.mish,
    F.softplus, F.hardtanh, F.relu6, F.prelu, F.glu, F.logsigmoid, torch.sigmoid, torch.tanh,
    torch.Tensor.sigmoid, torch.Tensor.tanh, F.tanh, F.sigmoid,
}


def check_options(projections: str | None, rule: str, topk_every: int | str | None) -> None:
    """Raise ValueError (saying what is valid) for bad projection options."""
    if projections not in PROJECTIONS:
        raise ValueError(f"projections must be 'top1', 'topk' or None, got {projections!r}")
    if rule not in RULES:
        raise ValueError(f"projection_rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    if topk_every is not None:
        if topk_every != "last" and (not isinstance(topk_every, int) or isinstance(topk_every, bool) or topk_every < 1):
            raise ValueError("projections_topk_every must be a positive int (every n-th checkpoint) or 'last', "
                             f"got {topk_every!r}")
        if projections != "top1":
            raise ValueError("projections_topk_every adds all-k checkpoints to projections='top1'; "
                             f"it has no effect with projections={projections!r}")


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward rectifies the backward signal, ignoring the forward input (deconvnet)."""

    @staticmethod
    def forward(ctx, x):
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0)


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward masks by both the forward input and the backward signal (guided backprop)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0).to(grad.dtype)


class RuleMode(TorchFunctionMode):
    """Inside: every ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``relu_``, in place or not) uses ``rule``'s backward.

    ``uncovered`` collects the names of other nonlinearities seen, which keep their gradient.
    """

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.uncovered: set[str] = set()
        self._relu = {"deconvnet": _DeconvReLU, "guided": _GuidedReLU}.get(rule)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _UNCOVERED:
            self.uncovered.add(getattr(func, "__name__", str(func)))
        elif self._relu is not None and func in (F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_):
            x = args[0]
            inplace = func in (torch.relu_, torch.Tensor.relu_) or bool(
                kwargs.get("inplace", args[1] if len(args) > 1 else False))
            out = self._relu.apply(x)
            # In place as the model asked, so code that ignores the return value still sees it.
            return x.copy_(out) if inplace else out
        return func(*args, **kwargs)


_forcing = threading.local()
_forcing_lock = threading.Lock()
_forcing_users = 0
_set_grad_enabled = torch._C._set_grad_enabled


def _forced_set_grad_enabled(mode: bool) -> None:
    _set_grad_enabled(True if getattr(_forcing, "on", False) else mode)


@contextlib.contextmanager
def grad_forced() -> Iterator[None]:
    """Gradients on inside, on this thread, even where the model turns them off in its forward.

    A frozen backbone (``with torch.no_grad(): f = backbone(x)`` in ``forward``) is the usual
    fine-tuning pattern, and projections take gradients with respect to the input only, which
    the frozen part must still pass back. ``no_grad``, ``set_grad_enabled`` and ``enable_grad``
    all switch through ``torch._C._set_grad_enabled``, which is wrapped while any thread is
    inside; other threads keep their own grad mode. ``torch.inference_mode`` cannot be overridden.
    """
    global _forcing_users
    with _forcing_lock:
        if _forcing_users == 0:
            torch._C._set_grad_enabled = _forced_set_grad_enabled
        _forcing_users += 1
    try:
        with torch.enable_grad():
            _forcing.on = True
            try:
                yield
            finally:
                _forcing.on = False  # before enable_grad restores the caller's mode
    finally:
        with _forcing_lock:
            _forcing_users -= 1
            if _forcing_users == 0:
                torch._C._set_grad_enabled = _set_grad_enabled


# Projections are one backward row per record; above this many per probe image (and this many in
# all), a checkpoint's projections cost over ~100x its probe pass (measured: ResNet-18, 8 rows per
# image, 21x), and the logger says so when it is built.
COSTLY_ROWS_PER_IMAGE = 50
COSTLY_ROWS = 20000


def cost_warning(units: dict[str, int], ranks: int, probe_images: int) -> str | None:
    """What to say when projecting ``ranks`` records of each of ``units`` (per layer) would dwarf the probe pass."""
    rows = ranks * sum(units.values())
    if rows <= max(COSTLY_ROWS, COSTLY_ROWS_PER_IMAGE * probe_images):
        return None
    widest = sorted(units, key=units.get, reverse=True)[:3]
    return (f"projections will take {rows} backward rows per checkpoint ({ranks} per unit; "
            + ", ".join(f"{name!r}: {units[name]} units" for name in widest)
            + f"), {rows / probe_images:.0f} per image of the {probe_images}-image probe pass, so each checkpoint "
            "will cost far more than its probe pass. Pass projections=None, or layers=[...] without the widest "
            "layers" + (", or projections='top1' without projections_topk_every" if ranks > 1 else ""))


def failure_message(step: int, error: Exception) -> str:
    """The warning for a checkpoint whose projections failed (its records are logged without them): why, and what to do."""
    text = f"{type(error).__name__}: {error}"
    if "inference" in str(error).lower():
        hint = ("The model runs part of its forward under torch.inference_mode(), through which no gradient "
                "can pass: use torch.no_grad() there instead (projections pass through no_grad). ")
    elif isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        hint = "Pass a smaller batch_size= (projections run batch_size records at once). "
    else:
        hint = ""
    return (f"the projections of the checkpoint at step {step} failed ({text}); its top-k records and probe "
            f"images are logged without them. {hint}Pass projections=None to stop projecting; later "
            "checkpoints do not repeat this warning until projections work again")


class _Stop(Exception):
    """Raised by the last needed layer's hook: the rest of the forward pass is not needed."""


@dataclasses.dataclass
class Projection:
    """The input-space signals of a batch of records, ``[B, C, H, W]`` float32, and per layer the uncovered nonlinearities."""

    pixels: torch.Tensor
    uncovered: dict[str, list[str]]


def project(net: nn.Module, layers: Sequence[str], images: torch.Tensor, layer_of_row: Sequence[int],
            unit: Sequence[int], position: Sequence[int], rule: str = "deconvnet",
            call: Callable[[torch.Tensor], object] | None = None) -> Projection:
    """Project row b's activation (layer ``layers[layer_of_row[b]]``, ``unit[b]``, flat ``position[b]``) back onto ``images[b]``.

    ``position`` is ``y * width + x`` (-1 for ``[N, F]`` outputs); ``unit`` -1 seeds every unit at that
    position (a conv layer's effective field); ``call(images)`` runs the
    model (default ``net(images)``; the logger's runs the user's ``forward=``). One forward pass and one
    backward pass, in eval mode as the caller sets it; gradients are taken with respect to the
    input only, so no parameter's ``.grad`` changes.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    rows = len(layer_of_row)
    wanted = sorted(set(layer_of_row))
    modules = dict(net.named_modules())
    outputs: dict[int, torch.Tensor] = {}
    uncovered: dict[str, list[str]] = {}
    mode = RuleMode(rule)

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            outputs[i] = output
            uncovered[layers[i]] = sorted(mode.uncovered)
            if len(outputs) == len(wanted):
                raise _Stop
            # Later in-place ops must not change the tensor the backward starts from.
            return output.clone()
        return hook

    handles = [modules[layers[i]].register_forward_hook(hook_for(i)) for i in wanted]
    x = images.detach().clone().requires_grad_(True)
    try:
        with grad_forced(), mode:
            (net if call is None else call)(x)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layers[i] for i in wanted if i not in outputs]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the forward pass")
    cut = [i for i in wanted if not outputs[i].requires_grad]
    if cut:
        how = ("computed under torch.inference_mode()" if any(outputs[i].is_inference() for i in cut)
               else "detached from the input in the forward")
        raise RuntimeError(f"layers {[layers[i] for i in cut]} give outputs that no gradient connects to the "
                           f"input: they were {how}")
    rows_t = torch.arange(rows, device=x.device)
    layer_t = torch.as_tensor(list(layer_of_row), device=x.device)
    unit_t = torch.as_tensor(list(unit), device=x.device)
    position_t = torch.as_tensor(list(position), device=x.device)
    seeds = []
    for i in wanted:
        out = outputs[i]
        seed = torch.zeros_like(out)
        mine = layer_t == i
        if out.dim() == 2:
            seed[rows_t[mine], unit_t[mine]] = 1
        else:
            flat = seed.view(rows, out.shape[1], -1)
            one, every = mine & (unit_t >= 0), mine & (unit_t < 0)
            flat[rows_t[one], unit_t[one], position_t[one]] = 1
            flat[rows_t[every], :, position_t[every]] = 1
        seeds.append(seed)
    (grad,) = torch.autograd.grad([outputs[i] for i in wanted], [x], seeds, allow_unused=True)
    pixels = torch.zeros_like(x, dtype=torch.float32) if grad is None else grad.float()
    return Projection(pixels=pixels, uncovered=uncovered)


def stored_crops(pixels: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """The stored part of each of ``[n, C, H, W]`` projections: its record's box (``boxes[i]``) inside the image.

    Views, not copies. A box wholly outside the image (then the projection is zero there) gives one zero pixel.
    """
    height, width = pixels.shape[2:]
    out = []
    for one, box in zip(pixels, boxes):
        region = fmt.stored_region(tuple(int(v) for v in box), height, width)
        out.append(one[:, region[0]:region[2], region[1]:region[3]] if region else np.zeros((len(one), 1, 1), one.dtype))
    return out


@dataclasses.dataclass
class Target:
    """A logged layer as projections need it: name, receptive field, and feature-map width (0 if fully connected)."""

    name: str
    field: ReceptiveField
    fmap_w: int


@dataclasses.dataclass
class LayerProjections:
    """One layer's projections at a checkpoint, stored form: ``INDEX_DTYPE`` rows and their encoded images."""

    index: np.ndarray
    images: list[bytes]
    uncovered: list[str]

    @staticmethod
    def concat(parts: Sequence["LayerProjections"]) -> "LayerProjections":
        return LayerProjections(np.concatenate([p.index for p in parts]), [b for p in parts for b in p.images],
                                sorted({u for p in parts for u in p.uncovered}))


def project_records(net: nn.Module, probe, targets: Sequence[Target], image: dict[str, np.ndarray],
                    position: dict[str, np.ndarray], *, ranks: int, rule: str, batch_size: int,
                    device: torch.device, dtype: torch.dtype | None = None, share: tuple[int, int] = (0, 1),
                    call: Callable[[torch.Tensor], object] | None = None,
                    uncovered: dict[str, list[str]] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(target, records, pixels, boxes)`` for this process's ``share`` = (rank, world) of the records.

    The records are the top-``ranks`` of every unit of ``targets`` (``image``/``position``:
    ``[units, k]`` per layer), as ``INDEX_DTYPE`` rows without their scale; ``pixels`` are their
    float32 projections, ``[n, C, H, W]``, and ``boxes`` their receptive-field boxes (top, left,
    bottom, right), which may run past the image (see :func:`stored_crops`). One forward and one
    backward pass per batch of up to ``batch_size`` records of one layer: its forward stops at
    that layer and its backward starts there (on the demo net 15% faster than batches that mix
    layers and run to the deepest). Each layer's uncovered nonlinearities are put in ``uncovered``.
    """
    rows = [(i, u, r, int(image[t.name][u, r]), int(position[t.name][u, r]))
            for i, t in enumerate(targets) for u in range(image[t.name].shape[0])
            for r in range(min(ranks, image[t.name].shape[1])) if image[t.name][u, r] >= 0]
    rank, world = share
    rows = np.array(rows[len(rows) * rank // world:len(rows) * (rank + 1) // world], np.int64).reshape(-1, 5)
    names = [t.name for t in targets]
    cache: dict[int, torch.Tensor] = {}
    layer_starts = np.flatnonzero(np.diff(rows[:, 0], prepend=-1, append=-1)).tolist()
    batches = [(first, min(first + batch_size, end)) for start, end in zip(layer_starts, layer_starts[1:])
               for first in range(start, end, batch_size)]
    for first, stop in batches:
        chunk = rows[first:stop]
        for img in chunk[:, 3].tolist():
            if img not in cache:
                cache[img] = probe.image(img)
        images = torch.stack([cache[img] for img in chunk[:, 3].tolist()])
        # Integer probes (normalised by the user's `forward`) take gradients as floats.
        images = images.to(device, dtype or (images.dtype if images.is_floating_point() else torch.float32))
        result = project(net, names, images, chunk[:, 0].tolist(), chunk[:, 1].tolist(),
                         np.maximum(chunk[:, 4], 0).tolist(), rule, call)
        if uncovered is not None:
            uncovered.update(result.uncovered)
        i, pos = int(chunk[0, 0]), chunk[:, 4]
        t, positional = targets[i], targets[i].fmap_w > 0
        y, x = (np.where(pos >= 0, pos // t.fmap_w, -1), np.where(pos >= 0, pos % t.fmap_w, -1)) if positional \
            else (np.full(len(pos), -1), np.full(len(pos), -1))
        records = np.zeros(len(chunk), fmt.INDEX_DTYPE)
        records["unit"], records["rank"], records["image"], records["y"], records["x"] = (
            chunk[:, 1], chunk[:, 2], chunk[:, 3], y, x)
        boxes = np.array([record_box(t.field, positional, a, b) for a, b in zip(y.tolist(), x.tolist())], np.int64)
        yield i, records, result.pixels.cpu().numpy(), boxes.reshape(-1, 4)


def project_checkpoint(net: nn.Module, probe, targets: Sequence[Target], image: dict[str, np.ndarray],
                       position: dict[str, np.ndarray], *, encoding: str = fmt.ENCODING,
                       **options) -> dict[str, LayerProjections]:
    """:func:`project_records`, quantised and encoded: per layer, the stored form of this process's share."""
    index: dict[str, list[np.ndarray]] = {t.name: [] for t in targets}
    images: dict[str, list[bytes]] = {t.name: [] for t in targets}
    uncovered: dict[str, list[str]] = {t.name: [] for t in targets}
    for i, records, pixels, boxes in project_records(net, probe, targets, image, position, uncovered=uncovered,
                                                     **options):
        quantized = [fmt.quantize(crop) for crop in stored_crops(pixels, boxes)]
        records["scale"] = [scale for _, scale in quantized]
        index[targets[i].name].append(records)
        images[targets[i].name].extend(fmt.encode_many([q for q, _ in quantized], encoding))
    return {
        name: LayerProjections(np.concatenate(parts) if parts else np.zeros(0, fmt.INDEX_DTYPE), images[name],
                               uncovered[name])
        for name, parts in index.items()
    }


def project_ranks(net: nn.Module, probe, targets: Sequence[Target], results: dict, *, ranks: int, rule: str,
                  batch_size: int, device: torch.device, call: Callable[[torch.Tensor], object],
                  alone: bool = False, agreement: Agreement | None = None) -> dict[str, LayerProjections]:
    """A checkpoint's projections of ``results`` (per layer, :class:`~tb_convviz.topk.TopK` on the CPU).

    ``probe`` is anything with ``image(index)``. Each rank projects its share; rank 0 gets them
    all, the other ranks {}; ``alone``: this process projects every record, with no collective.
    The model's train flags, RNG, grads and (under DDP) own buffers are as before.
    """
    def local() -> dict[str, LayerProjections]:
        with preserved(net, no_grad=False), contextlib.nullcontext() if alone else buffers_of_rank_0(net):
            return project_checkpoint(
                net, probe, targets, {n: t.image.numpy() for n, t in results.items()},
                {n: t.position.numpy() for n, t in results.items()}, ranks=ranks, rule=rule,
                batch_size=batch_size, device=device, share=(0, 1) if alone else (rank(), world()), call=call,
            )

    # Every rank's share must have succeeded before the gather: else all ranks skip them.
    mine = local() if alone else agreed(local, agreement, "the projections")
    if alone or world() == 1:
        return mine
    shares = [None] * world() if rank() == 0 else None
    dist.gather_object(mine, shares, dst=0)
    return {name: LayerProjections.concat([s[name] for s in shares]) for name in mine} if rank() == 0 else {}
