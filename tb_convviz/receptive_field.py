"""Receptive fields of a ConvNet's layers: analytic where the graph allows, else by gradient.

The analytic walk traces one forward pass under a ``TorchFunctionMode``, so functional
calls (``F.relu``, ``torch.cat``, ``x + y``, in-place ops) are followed as well as modules.
Each tensor derived from the input carries, per spatial axis, the field size ``r``, the jump
``j`` between neighbouring units and the centre ``c`` of unit 0, all in input pixels.
Anything the walk cannot follow makes that layer fall back to the gradient method, which
measures the field on the model itself with constant weights; nothing is guessed. In both,
a gate computed from a global pool (squeeze-excitation, ECA) scales the main path without
widening its field, as published receptive-field tables count it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tb_convviz import layers as layer_select
from tb_convviz.geometry import ReceptiveField
from tb_convviz.isolation import preserved
from tb_convviz.model_call import Calling, Forward

__all__ = ["receptive_field", "receptive_fields"]

_METHODS = ("auto", "analytic", "gradient")
# The gradient method enlarges the input by these factors (up to _MAX_SIDE) while fields
# touch its border; a field that still does at the largest size is reported as global.
_SCALES = (1, 2, 4)
_MAX_SIDE = 2048
# How many units of the central diagonal the gradient method seeds per input size (one
# image each), giving the triples of adjacent units it tries.
_UNITS = 5

_Axis = tuple[int, int, float]  # (size r, jump j, centre c of unit 0), in input pixels


@dataclasses.dataclass(frozen=True)
class _Lost:
    """The walk could not follow ``op``; the layer falls back to the gradient method."""

    op: str


@dataclasses.dataclass(frozen=True)
class _Map:
    """A tensor with spatial positions: per spatial axis (r, j, c), and where those axes are.

    ``dims`` counts from the end: (-2, -1) for (N, C, H, W), (-3, -2) for channels-last
    (N, H, W, C) as ConvNeXt's blocks permute to.
    """

    axes: tuple[_Axis, _Axis]
    dims: tuple[int, int] = (-2, -1)


# Every element depends on the whole input (global pooling, or anything computed from it).
_GLOBAL = "global"
_State = Union[_Map, str, _Lost]

_POINTWISE = frozenset("""
    relu relu_ relu6 hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_
    gelu silu mish sigmoid sigmoid_ tanh tanh_ hardsigmoid hardswish softplus softsign prelu
    threshold threshold_ logsigmoid clamp clamp_ clip clip_ clamp_min clamp_max abs abs_ neg
    neg_ exp exp_ log log_ sqrt sqrt_ rsqrt pow pow_ square reciprocal add add_ __add__
    __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ mul mul_ __mul__ __rmul__ __imul__ div
    div_ __truediv__ __rtruediv__ __itruediv__ maximum minimum where addcmul batch_norm
    local_response_norm dropout dropout1d dropout2d dropout3d alpha_dropout
    feature_alpha_dropout
""".split())
# Reshapes keep positions whenever the last two sizes are unchanged (row-major order).
_RESHAPES = frozenset("""
    view view_as reshape reshape_as flatten unflatten unsqueeze unsqueeze_ squeeze squeeze_
    expand expand_as repeat contiguous clone detach detach_ to type type_as float double half
    bfloat16
""".split())
# Ops that join or cut tensors along one dimension, which must not be spatial.
_JOINS = {"cat": 1, "concat": 1, "concatenate": 1, "chunk": 2, "split": 2, "tensor_split": 2}
# A factor computed from a global pool scales the main path (squeeze-excitation, ECA, CBAM's
# channel attention): the field stays the main path's, as published receptive-field tables do.
_MULTIPLY = frozenset("mul mul_ __mul__ __rmul__ __imul__ div div_ __truediv__ __itruediv__".split())
# Saturating activations become identity in the gradient method, where large sums would
# otherwise sit on their flat parts and hide pixels the unit does depend on.
_SATURATING = frozenset("relu6 hardtanh hardtanh_ hardswish clamp clamp_ clip clip_".split())
# Ops along one dimension: (argument index, keyword, default, counted in the output's dims).
_ALONG_DIM = {
    "stack": (1, "dim", 0, True), "unbind": (1, "dim", 0, False),
    "softmax": (1, "dim", None, False), "log_softmax": (1, "dim", None, False),
    "normalize": (2, "dim", 1, False), "transpose": (1, "dim0", 0, False),
    "swapaxes": (1, "axis0", 0, False), "swapdims": (1, "dim0", 0, False),
}
# Results that do not depend on the values of their tensor arguments.
_FRESH = frozenset("""
    zeros_like ones_like full_like empty_like rand_like randn_like randint_like new_zeros
    new_ones new_full new_empty new_tensor
""".split())
_REDUCTIONS = frozenset("mean sum amax amin max min logsumexp std var nanmean nansum".split())
_WINDOWED = frozenset("""
    conv2d max_pool2d max_pool2d_with_indices avg_pool2d lp_pool2d adaptive_avg_pool2d
    adaptive_max_pool2d adaptive_max_pool2d_with_indices
""".split())
_NORMS = frozenset("batch_norm instance_norm group_norm layer_norm local_response_norm".split())
_DROPOUTS = frozenset(
    "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout".split())
_MAX_POOL = re.compile(r"(adaptive_)?max_pool([123])d(_with_indices)?")


class _Done(BaseException):
    """Ends the forward pass once every requested layer has run.

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it.
    """


def receptive_field(model: nn.Module, layer: str, input_size: int | Sequence[int], *,
                    in_channels: int = 3, method: str = "auto",
                    forward: Forward | None = None) -> ReceptiveField:
    """Receptive field of the units of ``layer`` (a module name) for inputs of ``input_size``."""
    return receptive_fields(model, [layer], input_size, in_channels=in_channels,
                            method=method, forward=forward)[layer]


def receptive_fields(model: nn.Module, layers: Iterable[str], input_size: int | Sequence[int], *,
                     in_channels: int = 3, method: str = "auto",
                     forward: Forward | None = None) -> dict[str, ReceptiveField]:
    """Receptive fields of several layers, from one trace of the model.

    ``method="auto"`` walks the graph analytically and measures by gradient only the layers
    the walk cannot follow; ``"analytic"`` raises for those instead; ``"gradient"`` measures
    every layer. Layers with 2-D (fully connected) outputs see the whole input. The model's
    parameters, buffers, gradients, train/eval flags and the RNG states are left untouched.
    ``forward(model, images)`` calls a model that takes more than one tensor; it gets
    small batches, at ``input_size`` and larger.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    layers = [layers] if isinstance(layers, str) else list(layers)
    size = _input_size(input_size)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    net = layer_select.unwrap(model)
    calling = Calling(net, forward)
    modules = dict(zip(layers, layer_select.resolve(net, layers).values()))
    names = {module: name for name, module in reversed(modules.items())}
    with preserved(net, no_grad=False):
        fields: dict[nn.Module, ReceptiveField | _Lost] = {}
        if method != "gradient":
            fields = _analytic(net, calling, names, size, in_channels)
        lost = {m: name for m, name in names.items() if not isinstance(fields.get(m), ReceptiveField)}
        if method == "analytic" and lost:
            module, name = next(iter(lost.items()))
            raise ValueError(
                f"the analytic walk cannot follow the graph up to layer {name!r}: it stops at "
                f"`{fields[module].op}`; use method='auto' to measure it by gradient instead")
        if lost:
            fields.update(_gradient(net, calling, lost, size, in_channels))
    return {name: fields[module] for name, module in modules.items()}


def _input_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"input_size must be a positive int or an (h, w) pair, got {input_size!r}")
    return size


def _params_and_buffers(net: nn.Module) -> Iterator[torch.Tensor]:
    yield from net.parameters()
    yield from net.buffers()


def _capture(run: Callable[[torch.Tensor], Any], x: torch.Tensor, names: Mapping[nn.Module, str],
             on_output: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """Run ``run(x)``, handing each named module's output to ``on_output``; stop once all ran."""
    seen = set()

    def hook(module, args, output):
        name = names[module]
        if module in seen:
            raise ValueError(f"layer {name!r} runs more than once per forward pass, so its units "
                             f"have no single receptive field; pick a module that runs once")
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 4):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {name!r} outputs {shape}; receptive fields need a 4-D "
                             f"(N, C, H, W) or 2-D (N, F) tensor")
        seen.add(module)
        on_output(module, output)
        if len(seen) == len(names):
            raise _Done

    handles = [module.register_forward_hook(hook) for module in names]
    try:
        run(x)
    except _Done:
        pass
    except ValueError:
        raise
    except Exception as error:
        raise RuntimeError(f"the model failed on a {tuple(x.shape)} input while computing receptive "
                           f"fields ({error}); check input_size and in_channels") from error
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for module, name in names.items() if module not in seen]
    if missing:
        raise ValueError(f"layers {missing} did not run in the model's forward pass")


# Analytic walk --------------------------------------------------------------------------


def _analytic(net: nn.Module, calling: Calling, names: Mapping[nn.Module, str], size: tuple[int, int],
              in_channels: int) -> dict[nn.Module, ReceptiveField | _Lost]:
    reference = next((t for t in _params_and_buffers(net) if t.is_floating_point()), None)
    x = torch.zeros(1, in_channels, *size, device=reference.device if reference is not None else None,
                    dtype=reference.dtype if reference is not None else None)
    walk = _Walk()
    walk.track(x, _Map(((1, 1, 0.0), (1, 1, 0.0))))
    fields = {}

    def on_output(module, output):
        state = _GLOBAL if output.dim() == 2 else walk.state(output)
        if isinstance(state, _Map) and state.dims != (-2, -1):
            state = _Lost(f"{type(module).__name__} output in channels-last layout")
        fields[module] = _field(state or _Lost(f"{type(module).__name__} output"), size)

    with torch.no_grad(), walk:
        _capture(calling, x, names, on_output)
    return fields


def _field(state: _State, size: tuple[int, int]) -> ReceptiveField | _Lost:
    if isinstance(state, _Lost):
        return state
    if state == _GLOBAL:
        return ReceptiveField.whole_input(*size)
    (rh, jh, ch), (rw, jw, cw) = state.axes
    return ReceptiveField(size=(rh, rw), stride=(jh, jw), offset=(ch, cw), method="analytic")


class _Walk(TorchFunctionMode):
    """Follows the field state of every tensor derived from the input through each torch call."""

    def __init__(self):
        super().__init__()
        # Holding the tensors keeps their ids from being reused during the trace.
        self._states: dict[int, tuple[torch.Tensor, _State]] = {}

    def track(self, tensor: torch.Tensor, state: _State) -> None:
        self._states[id(tensor)] = (tensor, state)

    def state(self, tensor: torch.Tensor) -> _State | None:
        entry = self._states.get(id(tensor))
        return entry[1] if entry is not None else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        tracked = [(t, s) for t in _tensors((args, kwargs)) if (s := self.state(t)) is not None]
        if not tracked or name in _FRESH:
            return out
        if name == "__setitem__":  # a partial write may widen the field of some units
            self.track(args[0], _Lost(name))
            return out
        outputs = list(_tensors(out))
        if outputs:
            try:
                state = _follow(name, args, kwargs, tracked, outputs)
            except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError):
                state = _Lost(name)  # an unusual call signature: measure instead of guessing
            for tensor in outputs:
                self.track(tensor, state)
        return out


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _follow(name: str, args: tuple, kwargs: dict, tracked: list[tuple[torch.Tensor, _State]],
            outputs: list[torch.Tensor]) -> _State:
    states = [s for _, s in tracked]
    lost = next((s for s in states if isinstance(s, _Lost)), None)
    if lost is not None:
        return lost
    if all(s == _GLOBAL for s in states):
        return _GLOBAL
    if name in _MULTIPLY:  # a gate from a global pool does not widen the field
        tracked = [(t, s) for t, s in tracked if s != _GLOBAL]
        states = [s for _, s in tracked]
    x = _arg(args, kwargs, 0, "input")
    dims = {s.dims for s in states if isinstance(s, _Map)}
    if len(dims) > 1:
        return _Lost(f"{name} of tensors in different layouts")
    layout = out_layout = dims.pop()
    spatial = {x.dim() + d for d in layout} if isinstance(x, torch.Tensor) else set()
    if name in _WINDOWED or name == "pad":
        if len(tracked) != 1 or tracked[0][0] is not x or x.dim() < 3 or layout != (-2, -1):
            return _Lost(name)
        if name == "pad":
            pad = list(_arg(args, kwargs, 1, "pad"))
            (rh, jh, ch), (rw, jw, cw) = states[0].axes
            top = pad[2] if len(pad) >= 4 else 0
            return _Map(((rh, jh, ch - top * jh), (rw, jw, cw - pad[0] * jw)))
        return _windowed(name, args, kwargs, states[0], x, outputs[0])
    if name == "permute":
        order = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
        order = [d % x.dim() for d in (order or kwargs["dims"])]
        return _Map(states[0].axes, tuple(order.index(d) - x.dim() for d in sorted(spatial)))
    if name in ("layer_norm", "linear"):  # over the last dims only
        normalised = len(_arg(args, kwargs, 1, "normalized_shape")) if name == "layer_norm" else 1
        if len(tracked) != 1 or tracked[0][0] is not x or min(layout) >= -normalised:
            return _Lost(name)
        return _Map(states[0].axes, layout)
    dim = _arg(args, kwargs, 1, "dim")
    if name in _REDUCTIONS and not isinstance(dim, torch.Tensor):  # torch.max(a, b) is pointwise
        reduced = _dims(dim, x.dim())
        if spatial <= reduced:
            return _GLOBAL
        if spatial & reduced:
            return _Lost(name)
        if not _arg(args, kwargs, 2, "keepdim", False):  # dims after the spatial ones go away
            out_layout = tuple(d + sum(1 for r in reduced if r > x.dim() + d) for d in layout)
    elif name in _JOINS:
        along = _arg(args, kwargs, _JOINS[name], "dim", 0)
        if not all(isinstance(t, torch.Tensor) for t, _ in tracked) or {(along % t.dim()) - t.dim() for t, _ in tracked} & set(layout):
            return _Lost(name)
    elif name in _RESHAPES:
        # Row-major reshapes keep positions whenever the sizes from the first spatial axis on are kept.
        if any(o.dim() < -min(layout) or o.shape[min(layout):] != x.shape[min(layout):] for o in outputs):
            return _Lost(name)
    elif not (name in _POINTWISE or _spatial_dims_kept(name, args, kwargs, outputs, layout)):
        return _Lost(name)
    for tensor, state in tracked:
        if state != _GLOBAL and (tensor.dim() < -min(layout) or any(
                o.dim() < -min(out_layout) or any(o.shape[d] != tensor.shape[e] for d, e in zip(out_layout, layout))
                for o in outputs)):
            return _Lost(name)
    return _merge(states, out_layout)


def _spatial_dims_kept(name: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor],
                       layout: tuple[int, int]) -> bool:
    """Whether an op that may touch any dimension leaves the spatial ones alone."""
    x = args[0]
    if name in _ALONG_DIM:
        index, keyword, default, of_output = _ALONG_DIM[name]
        ndim = outputs[0].dim() if of_output else x.dim()
        dims = [_arg(args, kwargs, index, keyword, default)]
        if name in ("transpose", "swapaxes", "swapdims"):
            dims.append(_arg(args, kwargs, index + 1, keyword[:-1] + "1"))
        return all(d is None or d % ndim - ndim not in layout for d in dims)
    if name == "__getitem__":
        return layout == (-2, -1) and _indexes_leading_dims(args[1], x.dim())
    return False


def _indexes_leading_dims(key: Any, ndim: int) -> bool:
    """Whether ``tensor[key]`` takes every spatial row and column, in order."""
    key = key if isinstance(key, tuple) else (key,)
    if not all(k is None or k is Ellipsis or isinstance(k, (int, slice)) for k in key):
        return False
    consuming = [k for k in key if k is not None]
    if Ellipsis in consuming:
        cut = consuming.index(Ellipsis)
        before, after = consuming[:cut], consuming[cut + 1:]
        positioned = list(enumerate(before)) + [(ndim - len(after) + i, k) for i, k in enumerate(after)]
    else:
        positioned = list(enumerate(consuming))
    return all(isinstance(k, slice) and k.step in (None, 1)
               for position, k in positioned if position >= ndim - 2)


def _dims(dim: Any, ndim: int) -> set[int]:
    if dim is None:
        return set(range(ndim))
    return {d % ndim for d in ([dim] if isinstance(dim, int) else dim)}


def _merge(states: list[_State], layout: tuple[int, int]) -> _State:
    """Union of the fields of the combined tensors (the largest, when they are nested)."""
    if any(s == _GLOBAL for s in states):
        return _GLOBAL
    axes = []
    for per_axis in zip(*(s.axes for s in states)):
        jumps = {j for _, j, _ in per_axis}
        if len(jumps) > 1:
            return _Lost("branches with different strides")
        low = min(c - (r - 1) / 2 for r, _, c in per_axis)
        high = max(c + (r - 1) / 2 for r, _, c in per_axis)
        axes.append((round(high - low) + 1, jumps.pop(), (low + high) / 2))
    return _Map(tuple(axes), layout)


def _windowed(name: str, args: tuple, kwargs: dict, state: _State, x: torch.Tensor,
              out: torch.Tensor) -> _State:
    """Conv and pooling: ``r += (k_eff - 1) j``, ``c += ((k_eff - 1) / 2 - p) j``, ``j *= s``."""
    if name == "conv2d":
        kernel = tuple(_arg(args, kwargs, 1, "weight").shape[-2:])
        stride, padding, dilation = (_arg(args, kwargs, i, k, d) for i, k, d in
                                     ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
    elif name.startswith("adaptive"):
        size_in, size_out = tuple(x.shape[-2:]), tuple(out.shape[-2:])
        if size_in != size_out and size_out == (1, 1):
            return _GLOBAL
        if any(i % o for i, o in zip(size_in, size_out)):
            return _Lost(name)  # uneven bins
        kernel = stride = tuple(i // o for i, o in zip(size_in, size_out))
        padding, dilation = 0, 1
    elif name == "lp_pool2d":
        kernel, stride = _arg(args, kwargs, 2, "kernel_size"), _arg(args, kwargs, 3, "stride")
        padding, dilation = 0, 1
    else:
        kernel, stride, padding = (_arg(args, kwargs, i, k, d) for i, k, d in
                                   ((1, "kernel_size", None), (2, "stride", None), (3, "padding", 0)))
        dilation = _arg(args, kwargs, 4, "dilation", 1) if name.startswith("max") else 1
    kernel, dilation = _pair(kernel), _pair(dilation)
    stride = _pair(stride) if stride not in (None, (), []) else kernel
    span = tuple(d * (k - 1) for k, d in zip(kernel, dilation))
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        padding = tuple(s // 2 for s in span)  # PyTorch puts the odd pixel on the far side
    else:
        padding = _pair(padding)
    return _Map(tuple((r + e * j, j * s, c + (e / 2 - p) * j)
                      for (r, j, c), e, s, p in zip(state.axes, span, stride, padding)))


def _arg(args: tuple, kwargs: dict, index: int, keyword: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(keyword, default)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[-2], value[-1])


# Gradient method ------------------------------------------------------------------------


def _gradient(net: nn.Module, calling: Calling, names: Mapping[nn.Module, str], size: tuple[int, int],
              in_channels: int) -> dict[nn.Module, ReceptiveField]:
    """Measure fields as the support of central units' input gradients, with constant weights.

    Positive weights, zero biases, normalisation and saturating activations as identity and
    max pooling as averaging make every path from an input pixel to a unit count, so the
    support is the full field; gates from a global pool are held constant, as in the
    analytic walk. The model runs through ``torch.func.functional_call`` with stand-in
    parameters (in float64, against underflow along deep paths), so it is never modified or
    copied. Each input size costs one forward of a batch of ``_UNITS`` images and one
    backward per layer: image ``b`` seeds unit ``b`` of the central diagonal.
    """
    reference = next(_params_and_buffers(net), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    probe = {f"net.{name}": t for name, t in _probe_tensors(net, dtype).items()}
    fields: dict[nn.Module, ReceptiveField] = {}
    failures: dict[nn.Module, str] = {}
    pending = dict(names)
    for scale in _SCALES:
        h, w = size[0] * scale, size[1] * scale
        if scale > 1 and max(h, w) > _MAX_SIDE:
            break
        image = torch.ones(_UNITS, in_channels, h, w, device=device, dtype=dtype, requires_grad=True)
        outputs = {}
        with torch.enable_grad(), _Smoothed():
            _capture(lambda x: torch.func.functional_call(calling, probe, (x,)), image.clone(),
                     pending, outputs.__setitem__)
        for module, output in outputs.items():
            field = ReceptiveField.whole_input(*size) if output.dim() == 2 else _measure(output, image)
            if isinstance(field, ReceptiveField):
                fields[module] = field
                del pending[module]
            else:
                failures[module] = field
        del outputs
        if not pending:
            break
    for module, name in pending.items():
        if failures[module] == "independent":
            raise ValueError(f"layer {name!r} does not depend on the input (is its path "
                             f"detached?), so it has no receptive field")
        if failures[module] == "irregular":
            raise ValueError(f"the units of layer {name!r} do not lie on a regular grid in the "
                             f"input (e.g. after upsampling), so they have no single receptive "
                             f"field and stride")
        # Still clipped at the largest input: the field grows with the input, so it is global.
        fields[module] = ReceptiveField.whole_input(*size)
    return fields


def _probe_tensors(net: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stand-ins for the parameters and floating buffers of ``net`` for the gradient probe."""
    tensors = {}
    for name, p in net.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("bias"):
            value = 0.0
        else:  # weights average over their fan-in, so activations stay near 1
            value = 1.0 / p[0].numel() if p.dim() >= 2 else 1.0
        tensors[name] = torch.full(p.shape, value, dtype=dtype, device=p.device)
    for name, b in net.named_buffers():
        if b.is_floating_point():
            tensors[name] = b.to(dtype)
    return tensors


def _measure(output: torch.Tensor, image: torch.Tensor) -> ReceptiveField | str:
    """Field from the input gradients of adjacent units along the central diagonal, or why not.

    Tries the most central triple of units first. The reasons for failing: "small" (fewer
    than 3x3 units), "clipped" (a field touches the input border), "irregular" (the fields
    are not translates of each other: padding or reflection inside the net reaches them, or
    the units lie on no grid, as after upsampling) and "independent" (a unit sees no input
    pixel). The first two and border effects go away on a larger input.
    """
    h, w = output.shape[-2:]
    n = min(len(image), h, w)
    if n < 3:
        return "small"
    units = [((h - n) // 2 + i, (w - n) // 2 + i) for i in range(n)]
    boxes = _unit_boxes(output, image, units)
    starts = sorted(range(n - 2), key=lambda i: abs(i - (n - 3) / 2))
    reasons = set()
    for first in starts:
        triple = boxes[first:first + 3]
        y, x = units[first]
        if None in triple:
            reasons.add("independent")
            continue
        if any(b[0] == 0 or b[1] == 0 or b[2] == image.shape[-2] - 1 or b[3] == image.shape[-1] - 1
               for b in triple):
            reasons.add("clipped")
            continue
        steps = {(b[0] - a[0], b[1] - a[1]) for a, b in zip(triple, triple[1:])}
        sizes = {(b[2] - b[0] + 1, b[3] - b[1] + 1) for b in triple}
        stride = steps.pop()
        if steps or len(sizes) > 1 or min(stride) < 1:
            reasons.add("irregular")
            continue
        size = sizes.pop()
        offset = (triple[0][0] + (size[0] - 1) / 2 - y * stride[0],
                  triple[0][1] + (size[1] - 1) / 2 - x * stride[1])
        return ReceptiveField(size=size, stride=stride, offset=offset, method="gradient")
    return next(r for r in ("clipped", "irregular", "independent") if r in reasons)


def _unit_boxes(output: torch.Tensor, image: torch.Tensor,
                units: list[tuple[int, int]]) -> list[tuple[int, ...] | None]:
    """(top, left, bottom, right) of the input pixels each unit depends on (None if none).

    One backward: unit ``b`` is seeded in image ``b`` of the batch, which no other image sees.
    """
    rows, cols = zip(*units)
    batch = torch.arange(len(units), device=output.device)
    seed = output[batch, :, torch.tensor(rows), torch.tensor(cols)].sum()
    grad, = torch.autograd.grad(seed, image, retain_graph=True)
    boxes = []
    for hit in grad[:len(units)].ne(0).any(1):
        ys, xs = hit.any(1).nonzero().flatten().tolist(), hit.any(0).nonzero().flatten().tolist()
        boxes.append((ys[0], xs[0], ys[-1], xs[-1]) if ys else None)
    return boxes


class _Smoothed(TorchFunctionMode):
    """Max pooling becomes averaging over the same windows; normalisation, dropout and
    saturating activations, identity; gates (1×1 maps scaling larger ones), constants."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _NORMS or name in _DROPOUTS or name in _SATURATING:
            # A copy, so that in-place ops after it cannot clobber tensors autograd saved.
            return _arg(args, kwargs, 0, "input").clone()
        if name in _MULTIPLY and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
            maps = [a for a in args if a.dim() >= 3 and a.shape[-2:] != (1, 1)]
            if maps:
                args = tuple(a.detach() if a.dim() >= 3 and a.shape[-2:] == (1, 1) else a for a in args)
                return func(*args, **kwargs)
        match = _MAX_POOL.fullmatch(name)
        if match is None:
            return func(*args, **kwargs)
        x = _arg(args, kwargs, 0, "input")
        with torch.no_grad():
            reference = func(*args, **kwargs)  # the true output shape, and indices if asked for
        pooled = reference[0] if isinstance(reference, tuple) else reference
        nd = int(match.group(2))
        if match.group(1):
            average = getattr(F, f"adaptive_avg_pool{nd}d")(x, pooled.shape[-nd:])
        else:
            average = _window_average(x, pooled.shape[-nd:], nd, *(
                _arg(args, kwargs, i, k, d) for i, k, d in
                ((1, "kernel_size", None), (2, "stride", None), (3, "padding", 0), (4, "dilation", 1))))
        return (average, reference[1]) if isinstance(reference, tuple) else average


def _window_average(x: torch.Tensor, shape: Sequence[int], nd: int, kernel, stride, padding,
                    dilation) -> torch.Tensor:
    """Average over exactly the windows (dilated, padded, ceil-mode) of a max pooling."""
    def tup(v):
        return (v,) * nd if isinstance(v, int) else tuple(v)

    kernel, dilation, padding = tup(kernel), tup(dilation), tup(padding)
    stride = tup(stride) if stride not in (None, (), []) else kernel
    pad = []
    for axis in reversed(range(nd)):  # F.pad lists the last dimension first
        needed = (shape[axis] - 1) * stride[axis] + dilation[axis] * (kernel[axis] - 1) + 1
        length = x.shape[axis - nd]
        pad += [padding[axis], max(0, needed - length - padding[axis])]
    channels = x.shape[-nd - 1]
    weight = x.new_full((channels, 1, *kernel), 1.0 / torch.Size(kernel).numel())
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = conv(F.pad(x, pad), weight, stride=stride, dilation=dilation, groups=channels)
    return out[(..., *(slice(0, n) for n in shape))]
