"""Sources of a checkpoint's candidates: the probe pass over the fixed probe set.

A source ranks its images on the model's device and hands this rank's share to
:func:`tb_convviz.ranking.merge_ranks`.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from tb_convviz.caller import user_stacklevel
from tb_convviz.isolation import preserved
from tb_convviz.probe import ProbeSet
from tb_convviz.ranking import Ranked, buffers_of_rank_0, share
from tb_convviz.topk import TopK, TopKAccumulator, peaks
from tb_convviz.warning import ConvVizWarning


class _StopForward(Exception):
    """Raised by the last layer's hook: the rest of the forward pass is not needed."""


def unit_spans(layers: Sequence[str], units: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Each layer's ``[lo, hi)`` among all layers' units side by side: one accumulator serves them all."""
    spans, start = {}, 0
    for name in layers:
        spans[name] = (start, start + units[name])
        start = spans[name][1]
    return spans


def split_ranked(accumulator: TopKAccumulator, spans: dict[str, tuple[int, int]], k: int,
                 device: torch.device) -> Ranked:
    """An accumulator over all layers' units, cut back into per-layer records (empty if it saw nothing)."""
    topk, not_finite = {}, {}
    for name, (lo, hi) in spans.items():
        if accumulator.result is None:
            topk[name] = TopK.empty(hi - lo, k, device)
            not_finite[name] = torch.zeros(hi - lo, dtype=torch.bool, device=device)
        else:
            whole = accumulator.result
            topk[name] = TopK(whole.values[lo:hi], whole.image[lo:hi], whole.position[lo:hi])
            not_finite[name] = accumulator.not_finite[lo:hi]
    return Ranked(topk, not_finite)


class ProbeSource:
    """The probe pass: this rank's share of the probe set, ranked per unit of ``layers`` in eval mode.

    ``call`` is the logger's :class:`~tb_convviz.model_call.ProbeCall`; records name probe images by index.
    """

    def __init__(self, net: nn.Module, probe: ProbeSet, layers: Sequence[str], units: dict[str, int], *, k: int,
                 batch_size: int, call: Callable[[torch.Tensor], object], device: torch.device) -> None:
        self.net, self.probe, self.layers, self.k = net, probe, list(layers), k
        self.batch_size, self.call, self.device = batch_size, call, device
        self.spans = unit_spans(self.layers, units)
        self._inputs_checked = False  # the probe set is fixed: its pixels are checked on the first pass only

    def rank_images(self, images: Iterable[tuple[int, torch.Tensor]], *, check_inputs: bool = False) -> Ranked:
        """Rank ``images`` (``(first index, batch)`` pairs, in index order) through ``call`` in eval mode."""
        accumulator = TopKAccumulator(self.k)
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook_for(name):
            def hook(_module, _inputs, output):
                found[name] = peaks(output, accumulator.held(*self.spans[name], output.device))
                if len(found) == len(self.layers):
                    raise _StopForward
            return hook

        modules = dict(self.net.named_modules())
        handles = [modules[name].register_forward_hook(hook_for(name)) for name in self.layers]
        try:
            with preserved(self.net), buffers_of_rank_0(self.net):
                for first, batch in images:
                    if check_inputs:
                        _check_inputs(first, batch)
                    found.clear()
                    try:
                        self.call(batch)
                    except _StopForward:
                        pass
                    wrong = [name for name in self.layers if name not in found
                             or found[name][0].shape[1] != self.spans[name][1] - self.spans[name][0]]
                    if wrong:
                        raise RuntimeError(f"layers {wrong} did not run in the forward pass, or changed their number "
                                           "of units since the logger was built")
                    accumulator.add(torch.cat([found[n][0] for n in self.layers], dim=1),
                                    torch.cat([found[n][1] for n in self.layers], dim=1), first)
        finally:
            for handle in handles:
                handle.remove()
        return split_ranked(accumulator, self.spans, self.k, self.device)

    def local(self) -> Ranked:
        """This rank's share of the probe pass, not yet merged with the other ranks'."""
        begin, end = share(len(self.probe), self.batch_size)
        ranked = self.rank_images(self.probe.batches(self.batch_size, start=begin, stop=end),
                                  check_inputs=not self._inputs_checked)
        self._inputs_checked = True
        return ranked


def _check_inputs(first: int, batch: torch.Tensor) -> None:
    if not batch.is_floating_point():
        return
    bad = (~batch.isfinite()).flatten(1).any(dim=1).nonzero().flatten()
    if len(bad):
        warnings.warn(
            f"convviz: probe image(s) {(bad + first).tolist()[:8]} have NaN or infinite pixels; the units "
            "whose activations they make non-finite are recorded as not finite", ConvVizWarning,
            stacklevel=user_stacklevel(),
        )
