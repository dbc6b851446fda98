"""ConvVizLogger: at each checkpoint, the top-k probe images of every unit of layers 1..5."""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import warnings
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tensorboard.compat.proto import summary_pb2
from torch import nn

from tb_convviz import layers as layer_select
from tb_convviz import metadata, plugin_data_pb2, summary
from tb_convviz.geometry import ReceptiveField
from tb_convviz.isolation import preserved
from tb_convviz.logdir_lock import LogDirLock
from tb_convviz.model_call import Forward, ProbeCall, autocast_off, check_forward
from tb_convviz.probe import ProbeSet
from tb_convviz.projection import (LayerProjections, Target, check_options, cost_warning, failure_message,
                                  project_checkpoint)
from tb_convviz.projection_format import DOMINANT_RATIO, ENCODING, LEVELS, NEAR_ZERO_RATIO, encode_index, filter_flags
from tb_convviz.reader import event_files, read_run
from tb_convviz.receptive_field import receptive_fields
from tb_convviz.schedule import Schedule
from tb_convviz.topk import TopK, TopKAccumulator, emptied, merge, peaks

# Records store y and x as int16.
MAX_FMAP_SIDE = 32767


class ConvVizWarning(UserWarning):
    """A checkpoint that could not be logged; training goes on."""


class _StopForward(Exception):
    """Raised by the last layer's hook: the rest of the forward pass is not needed."""


class ConvVizLogger:
    """Logs, at each checkpoint, the top-``k`` probe images of every unit of ``layers``.

    Writes into ``log_dir`` (or into ``writer``, a ``torch.utils.tensorboard.SummaryWriter``),
    for TensorBoard's ConvViz tab. ``layers`` is ``"auto"`` (the model's stages, 5 at most, spread over the
    depth) or module names. The schedule is ``every_n_steps``, an explicit ``steps``
    list, or ``total_steps`` (checkpoints dense early); by default 0, 1, 2, 5, 10, 20, ...
    ``forward(model, images)`` calls a model that takes more than one tensor. The probe
    pass runs in float32 (float64 models: float64) with autocast off, wherever it is called.
    Under ``torch.distributed`` each rank ranks its share of the probe set and rank 0 writes.
    ``projections`` ("top1", "topk" or None) projects each unit's strongest record (or all k)
    back to pixel space with ``projection_rule`` ("deconvnet", "guided" or "gradient");
    ``projections_topk_every`` (n, or "last") projects all k at every n-th checkpoint, or at
    the last one (the schedule's last, and the final checkpoint ``close()`` logs). The first
    convolution's weights are logged at every checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet | torch.Tensor,
        log_dir: str | os.PathLike | None = None,
        *,
        writer: Any = None,
        layers: str | Sequence[str] = "auto",
        k: int = 9,
        batch_size: int = 128,
        every_n_steps: int | None = None,
        steps: Iterable[int] | None = None,
        total_steps: int | None = None,
        device: torch.device | str | None = None,
        forward: Forward | None = None,
        projections: str | None = "top1",
        projection_rule: str = "deconvnet",
        projections_topk_every: int | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(probe, torch.Tensor):
            probe = ProbeSet(probe)
        if not isinstance(probe, ProbeSet):
            raise TypeError(f"probe must be a ProbeSet or an [N, C, H, W] tensor, got {type(probe).__name__}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > len(probe):
            raise ValueError(f"k={k} is larger than the probe set ({len(probe)} images): use k <= {len(probe)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if (log_dir is None) == (writer is None):
            raise ValueError("pass exactly one of log_dir= or writer= (a torch SummaryWriter)")
        self.model, self.probe, self.k, self.batch_size = model, probe, k, batch_size
        self._net = layer_select.unwrap(model)
        self.device = torch.device(device) if device is not None else _device_of(self._net)
        self._forward = check_forward(forward)
        self._call = ProbeCall(self._net, self._forward, self.device)
        self.schedule = Schedule(every_n_steps=every_n_steps, steps=steps, total_steps=total_steps)
        check_options(projections, projection_rule, projections_topk_every)
        self.projections, self.projection_rule = projections, projection_rule
        self.projections_topk_every = projections_topk_every
        self._last_scheduled = max(steps) if steps is not None else total_steps
        self._checkpoints = 0
        self._final = False  # while close() logs the final checkpoint
        self.log_dir = os.fspath(log_dir) if log_dir is not None else _writer_log_dir(writer)
        self._user_writer = writer
        self._writer: summary.EventWriter | None = None
        awkward = sorted({c for c in '"\\\t' if c in os.path.abspath(self.log_dir)})
        if awkward:
            # TensorBoard's Rust data server cannot parse its own blob keys for such run names.
            warnings.warn(
                f"convviz: the log dir {self.log_dir!r} contains {', '.join(map(repr, awkward))}; under TensorBoard's "
                "default (Rust) data server a run whose name holds these characters shows no images "
                "(\"failed to parse blob key\"). Rename the directory, or run tensorboard with --load_fast=false",
                ConvVizWarning, stacklevel=2,
            )

        self.layers = self._pick_layers(layers)
        self._layer_infos = self._describe_layers()
        costly = projections and cost_warning({n: i.units for n, i in self._layer_infos.items()},
                                              1 if projections == "top1" and not projections_topk_every else k,
                                              len(probe))
        if costly:
            warnings.warn(f"convviz: {costly}", ConvVizWarning, stacklevel=2)
        self._probe_info = plugin_data_pb2.ProbeInfo(
            n=len(probe), channels=probe.shape[0], height=probe.shape[1], width=probe.shape[2],
            class_names=probe.class_names or [], fingerprint=probe.fingerprint,
        )
        self._last_step, self._chunk = -1, -1
        self._stored: set[int] = set()
        self._previous: dict[str, np.ndarray] = {}
        self._lock = LogDirLock(self.log_dir) if _rank() == 0 else None
        try:
            self._resume()
        except BaseException:
            self._release_lock()
            raise
        self._resumed_at = self._last_step
        self._due = self.schedule.next_due(self._last_step)
        # Kinds of failure ("probe pass", "write") warned about and not yet recovered from.
        self._failing: set[str] = set()
        self._warned_order = self._warned_backwards = self._warned_moved = False
        # The highest step given to maybe_log, and the model's state version right after that call.
        self._seen_step, self._seen_version = -1, None
        self._state = _state_tensors(self._net)
        self._distributed = _world() > 1
        self._warned_not_finite: set[str] = set()
        self._inputs_checked = False  # the probe set is fixed: its pixels are checked on the first pass only

    # -- construction ---------------------------------------------------------------

    def _pick_layers(self, layers: str | Sequence[str]) -> list[str]:
        _, sample = next(self.probe.batches(min(2, len(self.probe))))
        try:
            with preserved(self._net):
                calls = layer_select.trace_calls(self._net, sample, call=self._call)
        except Exception as e:
            if self._forward is not None:
                raise ValueError(
                    f"forward(model, images) failed on a probe batch of shape {tuple(sample.shape)} "
                    f"({type(e).__name__}: {e}). It must call the model on `images`, a batch of any size "
                    "(receptive fields use other input sizes too), building any other input from them."
                ) from e
            raise ValueError(
                f"the model failed on probe images of shape {tuple(sample.shape)} ({type(e).__name__}: {e}). "
                "Pass probe images shaped and normalised exactly as the model's training input, or "
                "forward=lambda model, images: ... if the model takes more than one input."
            ) from e
        if isinstance(layers, str):
            if layers != "auto":
                raise ValueError(f"layers must be 'auto' or a list of module names, got {layers!r}")
            names = layer_select.auto_layers(self._net, calls)
        else:
            names = list(layer_select.resolve(self._net, list(layers)))
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in names:
            seen = [c for c in calls if c.name == name]
            if len(seen) != 1:
                raise ValueError(
                    f"layer {name!r} ran {len(seen)} times in one forward pass; pick a module that runs "
                    "exactly once (for a shared activation such as ResNet blocks' relu, pick the block)"
                )
            shape = seen[0].output
            if shape is None or len(shape) not in (2, 4):
                raise ValueError(
                    f"layer {name!r} outputs {shape if shape else 'a non-tensor'}; tb-convviz needs "
                    "[N, C, H, W] (conv) or [N, F] (fully connected) outputs"
                )
            if len(shape) == 4 and max(shape[2:]) > MAX_FMAP_SIDE:
                raise ValueError(f"layer {name!r} has a feature map of {shape[2:]}, larger than {MAX_FMAP_SIDE}")
            self._shapes[name] = shape
        self._first_conv = next((c.name for c in calls if isinstance(c.module, nn.Conv2d)
                                 and c.module.in_channels == self.probe.shape[0]), None)
        return names

    def _describe_layers(self) -> dict[str, plugin_data_pb2.LayerInfo]:
        channels, height, width = self.probe.shape
        with autocast_off(self.device.type):
            fields = receptive_fields(self._net, self.layers, input_size=(height, width), in_channels=channels,
                                      forward=self._forward)
        infos = {}
        for index, name in enumerate(self.layers, start=1):
            shape = self._shapes[name]
            rf: ReceptiveField = fields[name]
            infos[name] = plugin_data_pb2.LayerInfo(
                name=name, index=index, units=shape[1], k=self.k, receptive_field=rf.to_proto(),
                fmap_h=shape[2] if len(shape) == 4 else 0, fmap_w=shape[3] if len(shape) == 4 else 0,
                input_h=height, input_w=width, probe_fingerprint=self.probe.fingerprint,
            )
        return infos

    def _resume(self) -> None:
        if _rank() == 0 and os.path.isdir(self.log_dir) and event_files(self.log_dir):
            self._read_existing()
        if _world() > 1:
            # Every rank joins each checkpoint's gather, so all must skip what rank 0 skips; only
            # rank 0 writes, and only it is sure to see the log dir (it may be on its node's disk).
            last = torch.tensor([self._last_step], device=self.device)
            dist.broadcast(last, src=0)
            self._last_step = int(last)

    def _read_existing(self) -> None:
        run = read_run(self.log_dir)
        if run.legacy_chunks:
            raise ValueError(
                f"{self.log_dir!r} holds convviz data in the format of tb-convviz before v2, which this version "
                "reads but does not extend (its probe chunks are paired by step): log into a new directory"
            )
        if run.probe is not None and run.probe.fingerprint != self.probe.fingerprint:
            raise ValueError(
                f"{self.log_dir!r} already holds convviz data from another probe set (fingerprint "
                f"{run.probe.fingerprint}, this one is {self.probe.fingerprint}): log into a new directory, "
                "or build the probe set exactly as before (same images, order and labels)"
            )
        if run.steps:
            self._last_step = run.steps[-1]
            for layer in run.layers:
                if layer.name in self._layer_infos:
                    with contextlib.suppress(KeyError):  # a layer missing at that step
                        self._previous[layer.name] = run.topk(layer.name, self._last_step).image
        self._stored, self._chunk = run.stored_images, run.last_chunk

    # -- logging ------------------------------------------------------------------------

    @property
    def last_step(self) -> int:
        """The last step logged in ``log_dir`` (by this logger or an earlier run), -1 if none."""
        return self._last_step

    def maybe_log(self, step: int) -> bool:
        """Log if ``step`` has reached the next scheduled checkpoint; returns whether it logged.

        ``step`` must not go back: pass a global step (``epoch * steps_per_epoch + i``), not
        a counter that restarts every epoch.
        """
        step = _check_step(step)
        self._warn_if_backwards(step)
        logged = False
        if step <= self._resumed_at and self._last_step == self._resumed_at:
            # A resumed run replaying steps the log dir already holds: say so once.
            self._warn_order(step)
        elif self._due is not None and step >= self._due:
            self._due = self.schedule.next_due(step)
            logged = self.log(step)
            # Renewed here, as `.to()` replaces buffers; walking the modules every step would cost 20x the sum.
            self._state = _state_tensors(self._net)
        self._seen_step, self._seen_version = max(self._seen_step, step), _state_version(self._state)
        return logged

    def _warn_if_backwards(self, step: int) -> None:
        if self._warned_backwards or step >= self._seen_step:
            return
        self._warned_backwards = True
        warnings.warn(
            f"convviz: maybe_log({step}) came after maybe_log({self._seen_step}): a step that goes back is "
            f"never logged, so nothing is logged until step {self._due}. If your step counter restarts "
            "every epoch, pass a global step instead, such as `epoch * steps_per_epoch + i` (in Lightning, "
            "trainer.global_step)", ConvVizWarning, stacklevel=3,
        )

    def log(self, step: int) -> bool:
        """Log a checkpoint at integer ``step`` now; returns whether it was written.

        Never raises for a failed checkpoint: training goes on, with one warning per kind
        of failure until that kind recovers.
        """
        step = _check_step(step)
        if step <= self._last_step:
            self._warn_order(step)
            return False
        try:
            results, not_finite = self._collect()
        except Exception as e:
            self._failed("probe pass", f"the probe pass of the checkpoint at step {step} failed "
                         f"({type(e).__name__}: {e}); checkpoints are skipped until it works again")
            return False
        self._failing.discard("probe pass")
        try:
            projections = self._project(step, results)
        except Exception as e:  # the records are worth keeping without them
            self._failed("projections", failure_message(step, e))
            projections = {}
        else:
            self._failing.discard("projections")
        self._last_step = step
        if _rank() != 0:
            return True
        self._warn_not_finite(step, not_finite)
        try:
            self._write(step, results, projections)
        except Exception as e:
            self._failed("write", f"could not write the checkpoint at step {step} to {self.log_dir!r} "
                         f"({type(e).__name__}: {e}); training goes on and the next checkpoint tries again")
            if self._writer is not None and (self._user_writer is not None or self._writer.broken):
                self._drop_writer()
            return False
        self._failing.discard("write")
        return True

    def _failed(self, kind: str, message: str) -> None:
        if kind not in self._failing:
            warnings.warn(f"convviz: {message}", ConvVizWarning, stacklevel=3)
            self._failing.add(kind)

    def _warn_order(self, step: int) -> None:
        if not self._warned_order:
            warnings.warn(
                f"convviz: step {step} is not after the last logged step {self._last_step} in "
                f"{self.log_dir!r}; checkpoints up to {self._last_step} are skipped, because TensorBoard "
                "would drop the records logged after a repeated step", ConvVizWarning, stacklevel=3,
            )
            self._warned_order = True

    def _warn_not_finite(self, step: int, not_finite: dict[str, torch.Tensor]) -> None:
        for name, units in not_finite.items():
            count = int(units.sum())
            if count and name not in self._warned_not_finite:
                self._warned_not_finite.add(name)
                warnings.warn(
                    f"convviz: layer {name!r}: {count} of {len(units)} units had NaN or infinite activations "
                    f"at step {step} (has training diverged?). They are recorded as not finite, without "
                    "ranks; later checkpoints do not repeat this warning for this layer.",
                    ConvVizWarning, stacklevel=3,
                )

    def _check_inputs(self, first: int, batch: torch.Tensor) -> None:
        if self._inputs_checked or not batch.is_floating_point():
            return
        bad = (~batch.isfinite()).flatten(1).any(dim=1).nonzero().flatten()
        if len(bad):
            warnings.warn(
                f"convviz: probe image(s) {(bad + first).tolist()[:8]} have NaN or infinite pixels; the units "
                "whose activations they make non-finite are recorded as not finite", ConvVizWarning, stacklevel=4,
            )

    def _collect(self) -> tuple[dict[str, TopK], dict[str, torch.Tensor]]:
        rank, world = _rank(), _world()
        n = len(self.probe)
        # Ranks split whole batches of the single-process pass: a kernel's rounding can depend on
        # the batch an image is in, and each image must get the value one process would give it.
        batches = -(-n // self.batch_size)
        begin = min(batches * rank // world * self.batch_size, n)
        end = min(batches * (rank + 1) // world * self.batch_size, n)
        # One accumulator over every layer's units side by side: a batch's records are merged
        # once, not once per layer. Each hook only takes its layer's peaks.
        spans, start = {}, 0
        for name in self.layers:
            spans[name] = (start, start + self._shapes[name][1])
            start = spans[name][1]
        accumulator = TopKAccumulator(self.k)
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook_for(name):
            def hook(_module, _inputs, output):
                threshold = accumulator.threshold()
                found[name] = peaks(output, None if threshold is None else threshold[slice(*spans[name])])
                if len(found) == len(self.layers):
                    raise _StopForward
            return hook

        modules = dict(self._net.named_modules())
        handles = [modules[name].register_forward_hook(hook_for(name)) for name in self.layers]
        try:
            with preserved(self._net), _buffers_of_rank_0(self._net):
                for first, batch in self.probe.batches(self.batch_size, start=begin, stop=end):
                    self._check_inputs(first, batch)
                    found.clear()
                    try:
                        self._call(batch)
                    except _StopForward:
                        pass
                    wrong = [name for name in self.layers
                             if name not in found or found[name][0].shape[1] != spans[name][1] - spans[name][0]]
                    if wrong:
                        raise RuntimeError(f"layers {wrong} did not run in the forward pass, or changed their number "
                                           "of units since the logger was built")
                    accumulator.add(torch.cat([found[n][0] for n in self.layers], dim=1),
                                    torch.cat([found[n][1] for n in self.layers], dim=1), first)
            self._inputs_checked = True
        finally:
            for handle in handles:
                handle.remove()
        results, not_finite = {}, {}
        for name, (lo, hi) in spans.items():
            if accumulator.result is None:
                topk = TopK.empty(hi - lo, self.k, self.device)
                bad = torch.zeros(hi - lo, dtype=torch.bool, device=self.device)
            else:
                whole = accumulator.result
                topk = TopK(whole.values[lo:hi], whole.image[lo:hi], whole.position[lo:hi])
                bad = accumulator.not_finite[lo:hi]
            if world > 1:
                topk = _gather(topk, self.k)
                bad = bad.to(torch.uint8)
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                bad = bad.bool()
            not_finite[name] = bad.to("cpu")
            results[name] = emptied(topk, bad).to("cpu")
        return results, not_finite

    def _projection_ranks(self, step: int) -> int:
        if self.projections is None:
            return 0
        every = self.projections_topk_every
        last = self._final or (self._last_scheduled is not None and step >= self._last_scheduled)
        if self.projections == "topk" or (every == "last" and last) or (
                isinstance(every, int) and self._checkpoints % every == 0):
            return self.k
        return 1

    def _project(self, step: int, results: dict[str, TopK]) -> dict[str, LayerProjections]:
        """This checkpoint's projections (on rank 0; other ranks compute their share and get {})."""
        ranks = self._projection_ranks(step)
        self._checkpoints += 1
        if not ranks:
            return {}
        targets = [Target(name, ReceptiveField.from_proto(info.receptive_field), info.fmap_w)
                   for name, info in self._layer_infos.items()]
        with preserved(self._net, no_grad=False), _buffers_of_rank_0(self._net):
            mine = project_checkpoint(
                self._net, self.probe, targets, {n: t.image.numpy() for n, t in results.items()},
                {n: t.position.numpy() for n, t in results.items()}, ranks=ranks, rule=self.projection_rule,
                batch_size=self.batch_size, device=self.device, share=(_rank(), _world()), call=self._call,
            )
        if _world() == 1:
            return mine
        shares = [None] * _world() if _rank() == 0 else None
        dist.gather_object(mine, shares, dst=0)
        return {name: LayerProjections.concat([s[name] for s in shares]) for name in mine} if _rank() == 0 else {}

    def _filter_values(self, scalars: dict[str, float]) -> list[summary_pb2.Summary.Value]:
        if self._first_conv is None:
            return []
        weight = dict(self._net.named_modules())[self._first_conv].weight.detach().float().cpu().numpy()
        dominant, near_zero = filter_flags(weight)
        scalars[metadata.scalar_tag(self._first_conv, "dominant_filters")] = float(dominant.sum())
        scalars[metadata.scalar_tag(self._first_conv, "near_zero_filters")] = float(near_zero.sum())
        info = plugin_data_pb2.FilterInfo(module=self._first_conv, dominant_ratio=DOMINANT_RATIO,
                                          near_zero_ratio=NEAR_ZERO_RATIO)
        return list(summary.filters_pb(info, weight).value)

    def _projection_values(self, projections: dict[str, LayerProjections]) -> list[summary_pb2.Summary.Value]:
        values = []
        channels, height, width = self.probe.shape
        for name, layer in projections.items():
            rf = self._layer_infos[name].receptive_field
            info = plugin_data_pb2.ProjectionInfo(
                layer=name, rule=self.projection_rule, channels=channels, height=rf.size_h, width=rf.size_w,
                uncovered=layer.uncovered, encoding=ENCODING, levels=LEVELS, clipped=True, image_height=height,
                image_width=width,
            )
            values.extend(summary.projections_pb(info, encode_index(layer.index), layer.images).value)
        return values

    def _write(self, step: int, results: dict[str, TopK], projections: dict[str, LayerProjections] | None = None) -> None:
        self._follow_log_dir(step)
        winners = set()
        for topk in results.values():
            winners.update(topk.image[topk.image >= 0].unique().tolist())
        new = sorted(winners - self._stored)
        encoded = [summary.encode_image(self.probe.display(i)) for i in new]
        writer = self._writer or self._open_writer()
        for part in summary.split_chunks([len(b) for b in encoded]):
            # A chunk step is used once, even by a write that fails: a reader must never meet two
            # different chunks at one step. Images of a chunk that was written are not written again.
            self._chunk += 1
            labels = [self.probe.label(i) for i in new[part]]
            writer.write(summary.probe_chunk_pb(self._probe_info, new[part], labels, encoded[part]), self._chunk)
            self._stored.update(new[part])
        values, scalars, images = [], {}, {}
        for name, topk in results.items():
            info = self._layer_infos[name]
            position = topk.position.numpy()
            has_position = info.fmap_w > 0
            y = np.where(position >= 0, position // max(info.fmap_w, 1), -1) if has_position else -1
            x = np.where(position >= 0, position % max(info.fmap_w, 1), -1) if has_position else -1
            image = topk.image.numpy()
            payload = metadata.encode_records(topk.values.numpy(), image, y, x)
            values.extend(summary.topk_pb(info, payload).value)
            scalars.update(self._layer_scalars(name, topk.values.numpy(), image))
            images[name] = image
        values.extend(self._projection_values(projections or {}))
        values.extend(self._filter_values(scalars))
        values.extend(summary.scalars_pb(scalars).value)
        writer.write(summary_pb2.Summary(value=values), step)
        writer.flush()
        self._previous = images

    def _layer_scalars(self, name: str, values: np.ndarray, image: np.ndarray) -> dict[str, float]:
        # Not-finite units are neither dead nor counted in the means; a layer of only those
        # gets a NaN mean peak (the Scalars dashboard shows the gap).
        peak, finite = values[:, 0], ~metadata.not_finite(values, image)
        out = {
            metadata.scalar_tag(name, "dead_fraction"): float(np.mean(finite & ~(peak > 0))),
            metadata.scalar_tag(name, "mean_peak"): float(np.mean(peak[finite])) if finite.any() else float("nan"),
        }
        previous = self._previous.get(name)
        if previous is not None and previous.shape == image.shape:
            both = finite & (previous >= 0).any(axis=1)
            if both.any():
                overlap = metadata.topk_overlap(image[both], previous[both]).mean().item()
                out[metadata.scalar_tag(name, "topk_overlap")] = overlap
        return out

    def _follow_log_dir(self, step: int) -> None:
        """Start anew where the log dir was deleted or moved since its event file and lock were made.

        Otherwise checkpoints would go on into a deleted file, and another logger could take the
        recreated dir. Raises RuntimeError if another logger has taken it.
        """
        gone = self._writer is not None and self._user_writer is None and self._writer.unlinked()
        if not gone and self._lock is not None and self._lock.held():
            return
        if gone:
            self._drop_writer()
            self._stored = set()  # the probe images went with the old file
            if not self._warned_moved:
                self._warned_moved = True
                warnings.warn(
                    f"convviz: the log dir {self.log_dir!r} was deleted or moved during training: checkpoints from "
                    f"step {step} on go into a new event file there, with the probe images they name; earlier "
                    "checkpoints are not in it", ConvVizWarning, stacklevel=4,
                )
        self._release_lock()
        self._lock = LogDirLock(self.log_dir)

    def _open_writer(self) -> summary.EventWriter:
        if self._user_writer is not None:
            target = getattr(self._user_writer, "_get_file_writer", lambda: self._user_writer)()
        else:
            os.makedirs(self.log_dir, exist_ok=True)
            target = self.log_dir
        self._writer = summary.EventWriter(target)
        return self._writer

    def _drop_writer(self) -> None:
        # Only when the file could not be cut back to its last record (or a torch writer failed,
        # whose thread dies on an I/O error): the next checkpoint opens a new file.
        writer, self._writer = self._writer, None
        if writer is not None and self._user_writer is None:
            try:
                writer.close()
            except Exception:
                pass

    def close(self, *, final_checkpoint: bool = True) -> None:
        """Log the model as it is now, unless it is logged already, then flush and close the event file.

        The final checkpoint's step is the last one given to ``maybe_log``, or the one after it
        if the model has changed since (the loop's last update), so the trained model is always
        logged. Under DDP, call it on every rank. A passed-in writer is flushed, not closed.
        Frees the log dir for another logger.
        """
        try:
            if final_checkpoint:
                self._log_final()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _log_final(self) -> None:
        if self._seen_step < 0:  # maybe_log was never called: the caller chose every step
            return
        changed = self._seen_version is not None and _state_version(self._state) != self._seen_version
        step = self._seen_step + int(changed)
        if self._distributed:
            if _world() == 1:
                warnings.warn("convviz: close() came after the process group was destroyed, so the final "
                              "checkpoint is skipped: call close() before destroy_process_group()",
                              ConvVizWarning, stacklevel=3)
                return
            # Every rank must take the same decision, as every rank joins the checkpoint's gather.
            decided = torch.tensor([step], device=self.device)
            dist.broadcast(decided, src=0)
            step = int(decided)
        if step > self._last_step:
            self._final = True
            try:
                self.log(step)
            finally:
                self._final = False

    def __enter__(self) -> "ConvVizLogger":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # After an exception (Ctrl-C included) the model may be broken, and the user waits.
        self.close(final_checkpoint=exc_type is None)


def _check_step(step: Any) -> int:
    """``step`` as an int; TypeError for anything but an integer (int, numpy or 0-d torch integer)."""
    if isinstance(step, bool) or (isinstance(step, torch.Tensor) and step.is_floating_point()):
        raise TypeError(f"step must be an integer, got {step!r}")
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(
            f"step must be an integer (int, numpy or 0-d torch integer), got {type(step).__name__} {step!r}: "
            "pass the global step counter, e.g. trainer.global_step or your own int"
        ) from None


def _gather(topk: TopK, k: int) -> TopK:
    parts = []
    for tensor in (topk.values, topk.image, topk.position):
        gathered = [torch.empty_like(tensor) for _ in range(_world())]
        dist.all_gather(gathered, tensor.contiguous())
        parts.append(gathered)
    merged = TopK(parts[0][0], parts[1][0], parts[2][0])
    for values, image, position in zip(*(p[1:] for p in parts)):
        merged = merge(merged, TopK(values, image, position), k)
    return merged


@contextlib.contextmanager
def _buffers_of_rank_0(model: nn.Module) -> Iterator[None]:
    """Rank 0's buffers in ``model`` while inside, each rank's own restored after.

    DDP keeps parameters in sync but not buffers: each rank updates its own BatchNorm
    statistics, and DDP copies rank 0's only at the next forward. The probe pass must
    rank every share with the model rank 0 writes about.
    """
    buffers = list(model.buffers()) if _world() > 1 else []
    own = [b.clone() for b in buffers] if _rank() != 0 else []
    for buffer in buffers:
        dist.broadcast(buffer, src=0)
    try:
        yield
    finally:
        for buffer, saved in zip(buffers, own):
            buffer.copy_(saved)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(model.parameters(), model.buffers()))


def _state_version(tensors: list[torch.Tensor]) -> int | None:
    """A number that grows with every in-place change to ``tensors``.

    Optimizer steps and BatchNorm statistics update parameters and buffers in place, which
    bumps their version counters (fused optimizers do not). None if some tensor has no counter.
    """
    try:
        return sum(t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def _writer_log_dir(writer: Any) -> str:
    log_dir = getattr(writer, "log_dir", None) or getattr(writer, "get_logdir", lambda: None)()
    if not log_dir:
        raise TypeError("writer must be a torch.utils.tensorboard.SummaryWriter (or have a log_dir)")
    return os.fspath(log_dir)
