"""Run code on a user's model without touching its training state."""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved(model: nn.Module, *, no_grad: bool = True) -> Iterator[None]:
    """Eval mode (and no_grad) inside; each module's train flag and the CPU/CUDA RNG states restored after.

    Eval mode keeps BatchNorm running statistics and dropout untouched, no_grad
    keeps ``.grad`` and the autograd graph untouched.
    """
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted({t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers())
                      if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), (torch.no_grad() if no_grad else contextlib.nullcontext()):
        try:
            model.eval()
            yield
        finally:
            for module, training in flags:
                module.training = training
