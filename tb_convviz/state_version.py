"""Version counters of a model's parameters and buffers: whether its weights changed since a point in time."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(model.parameters(), model.buffers()))


def state_version(tensors: list[torch.Tensor]) -> int | None:
    """A number that grows with every in-place change to ``tensors``.

    Optimizer steps and BatchNorm statistics update parameters and buffers in place, which
    bumps their version counters (fused optimizers do not). None if some tensor has no counter.
    """
    try:
        return sum(t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None
