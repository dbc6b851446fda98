"""How tb-convviz calls a user's model on probe images: the user's ``forward``, float32, no autocast.

The probe pass must rank the same values wherever ``log()`` is called: inside a training
``autocast`` region or not, and whatever precision the model is trained in. So autocast is
off in it, and a float16/bfloat16 model runs with float32 copies of its parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

Forward = Callable[[nn.Module, torch.Tensor], Any]
"""``forward(model, images)`` calls the model on a probe batch, e.g. ``lambda m, x: m(x, mask_for(x))``."""

# Parameter dtypes the probe pass widens to float32.
_WIDENED = (torch.float16, torch.bfloat16)


class Calling(nn.Module):
    """``net`` as one module whose ``forward(x)`` is ``forward(net, x)`` (or ``net(x)``).

    One module, so that ``torch.func.functional_call`` can run a user's call with
    parameters of its choosing (prefixed ``net.``).
    """

    def __init__(self, net: nn.Module, forward: Forward | None = None) -> None:
        super().__init__()
        self.net = net
        self.call = forward

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x) if self.call is None else self.call(self.net, x)


def check_forward(forward: Forward | None) -> Forward | None:
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, images), got {type(forward).__name__}")
    return forward


def check_probe_input(dtype: torch.dtype, forward: Forward | None) -> None:
    """Refuse integer probe images that would reach the model un-normalised.

    timm's prefetcher pipeline loads uint8 images and normalises them on the device, in the
    loader; the probe pass casts to float and calls the model directly, so it would rank
    0..255 pixels the model never sees in training. A ``forward`` is trusted to normalise.
    """
    if dtype.is_floating_point or forward is not None:
        return
    raise ValueError(
        f"the probe images are {str(dtype).removeprefix('torch.')}, not normalised floats: the probe pass would "
        "feed the model raw 0..255 pixels it never sees in training (timm's prefetcher normalises on the device, "
        "after the dataset). Build the probe from the eval transform, as the model sees its input:\n"
        "    data_config = timm.data.resolve_data_config(model=model)\n"
        "    dataset_eval.transform = timm.data.create_transform(**data_config, is_training=False)\n"
        "    probe = ProbeSet.from_dataset(dataset_eval, n=1024, mean=data_config['mean'], std=data_config['std'])\n"
        "or normalise in the probe pass as the prefetcher does: forward=lambda model, x: model((x / 255 - MEAN) / STD), "
        "with MEAN and STD the model's per-channel [1, C, 1, 1] tensors on its device.")


def probe_dtype(net: nn.Module) -> torch.dtype:
    """float32, or the model's float64; float16/bfloat16 models are run in float32."""
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_enabled(*device_types: str) -> list[str]:
    """The device types among ``device_types`` (and CPU/CUDA) where autocast is on."""
    enabled = []
    for device_type in dict.fromkeys(("cpu", "cuda", *device_types)):
        try:
            if torch.is_autocast_enabled(device_type):
                enabled.append(device_type)
        except RuntimeError:  # a device type this build does not know
            continue
    return enabled


@contextlib.contextmanager
def autocast_off(*device_types: str) -> Iterator[None]:
    """Autocast disabled for ``device_types`` (and CPU/CUDA) where it is on."""
    with contextlib.ExitStack() as stack:
        for device_type in autocast_enabled(*device_types):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


class ProbeCall:
    """Calls ``net`` on a probe batch as the probe pass does: ``forward``, its dtype, autocast off."""

    def __init__(self, net: nn.Module, forward: Forward | None, device: torch.device) -> None:
        self.net, self.calling, self.device = net, Calling(net, forward), device

    def __call__(self, batch: torch.Tensor) -> Any:
        # Looked up per call: a trainer may convert the model (say, to bfloat16) after the logger is built.
        dtype = probe_dtype(self.net)
        x = batch.to(self.device, dtype, non_blocking=True)
        tensors = dict(self.net.named_parameters())
        tensors.update(self.net.named_buffers())
        # Float32 copies for this call only: the model and its training are untouched.
        widened = {f"net.{name}": t.detach().to(dtype) for name, t in tensors.items() if t.dtype in _WIDENED}
        with autocast_off(self.device.type):
            if not widened:
                return self.calling(x)
            return torch.func.functional_call(self.calling, widened, (x,), strict=False)
