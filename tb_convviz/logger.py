"""ConvVizLogger: at each checkpoint, the top-k probe images of every unit of layers 1..5."""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import os
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from tb_convviz import layers as layer_select
from tb_convviz import effective_field, plugin_data_pb2
from tb_convviz.budget import DEFAULT_BUDGET, OverheadBudget
from tb_convviz.caller import user_stacklevel
from tb_convviz.geometry import ReceptiveField
from tb_convviz.isolation import preserved
from tb_convviz.logdir_lock import LogDirLock
from tb_convviz.model_call import Forward, ProbeCall, autocast_off, check_forward, check_probe_input, probe_dtype
from tb_convviz.probe import ProbeSet
from tb_convviz.projection import LayerProjections, Target, check_options, cost_warning, failure_message, project_ranks
from tb_convviz.ranking import Agreement, merge_ranks, on_rank_0, rank, world
from tb_convviz.reader import event_files, read_run
from tb_convviz.receptive_field import receptive_fields
from tb_convviz.records import RecordWriter
from tb_convviz.resume import check_same_model
from tb_convviz.schedule import Schedule
from tb_convviz.state_version import state_tensors, state_version
from tb_convviz.sources import ProbeSource
from tb_convviz.streams import (POOL_BYTES, ImagesAt, StreamHooks, StreamSource, check_streams, compiled,
                                locate_images)
from tb_convviz.topk import TopK
from tb_convviz.warning import ConvVizWarning

# Records store y and x as int16.
MAX_FMAP_SIDE = 32767


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
    ``stream`` ("train", "eval" or both) also ranks the images of the user's own training-mode
    or eval-mode forwards, re-scored at each checkpoint as probe images are, and records their
    top-k beside the probe's. The images are the model's first positional argument (or the one
    ``forward`` passes the probe batch in), else ``stream_images``: an argument position, a
    keyword, or ``images(args, kwargs)``. Candidates wait on the CPU, ``stream_pool_bytes`` at most per stream.
    ``overhead_budget`` (a fraction, None for no limit) defers or thins the scheduled checkpoints
    of ``maybe_log`` so that they take at most that share of training's wall time (see ``budget``).
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
        stream: str | Sequence[str] | None = None,
        stream_images: ImagesAt | None = None,
        stream_pool_bytes: int = POOL_BYTES,
        overhead_budget: float | None = DEFAULT_BUDGET,
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
        check_probe_input(probe.dtype, self._forward)
        self._call = ProbeCall(self._net, self._forward, self.device)
        self.schedule = Schedule(every_n_steps=every_n_steps, steps=steps, total_steps=total_steps)
        self._budget = OverheadBudget(overhead_budget, self.schedule, self.device)
        check_options(projections, projection_rule, projections_topk_every)
        self.projections, self.projection_rule = projections, projection_rule
        self.projections_topk_every = projections_topk_every
        self._last_scheduled = max(steps) if steps is not None else total_steps
        self._checkpoints = 0
        self._final = False  # while close() logs the final checkpoint
        self.log_dir = os.fspath(log_dir) if log_dir is not None else _writer_log_dir(writer)
        awkward = sorted({c for c in '"\\\t' if c in os.path.abspath(self.log_dir)})
        if awkward:
            # TensorBoard's Rust data server cannot parse its own blob keys for such run names.
            warnings.warn(
                f"convviz: the log dir {self.log_dir!r} contains {', '.join(map(repr, awkward))}; under TensorBoard's "
                "default (Rust) data server a run whose name holds these characters shows no images "
                "(\"failed to parse blob key\"). Rename the directory, or run tensorboard with --load_fast=false",
                ConvVizWarning, stacklevel=user_stacklevel(),
            )

        self.layers = self._pick_layers(layers)
        self._layer_infos = self._describe_layers()
        costly = projections and cost_warning({n: i.units for n, i in self._layer_infos.items()},
                                              1 if projections == "top1" and not projections_topk_every else k,
                                              len(probe))
        if costly:
            warnings.warn(f"convviz: {costly}", ConvVizWarning, stacklevel=2)
        # The checkpoint's data flow: sources rank candidates, ranking merges the ranks' shares,
        # projections and records follow. The logger holds the options and the schedule.
        self._probe_source = ProbeSource(self._net, probe, self.layers, {n: s[1] for n, s in self._shapes.items()},
                                         k=k, batch_size=batch_size, call=self._call, device=self.device)
        self._records = RecordWriter(self.log_dir, writer, net=self._net, probe=probe, layer_infos=self._layer_infos,
                                     first_conv=self._first_conv, projection_rule=projection_rule)
        self._streams = self._stream_sources(stream, stream_images, stream_pool_bytes)
        self._last_step = -1
        self._agreement = Agreement()  # every rank, together: before any other collective
        self._lock: LogDirLock | None = None
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
        self._state = state_tensors(self._net)
        self._distributed = world() > 1
        self._warned_not_finite: set[str] = set()
        self._hooks = StreamHooks(self._net, self._streams, compiled=compiled(model)) if self._streams else None

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

    def _stream_sources(self, stream, images_at: ImagesAt | None, pool_bytes: int) -> list[StreamSource]:
        modes = check_streams(stream)
        if not modes:
            return []
        if not isinstance(pool_bytes, int) or pool_bytes < 0:
            raise ValueError(f"stream_pool_bytes must be a non-negative int, got {pool_bytes!r}")
        sample = next(self.probe.batches(min(2, len(self.probe))))[1].to(self.device, probe_dtype(self._net))
        images_at = locate_images(self._net, self._call, sample, images_at)
        # An eval-mode forward without forward= may score as the re-scoring does (see StreamSource).
        return [StreamSource(mode, self._probe_source, images_at, pool_bytes=pool_bytes,
                             exact_forwards=mode == "eval" and self._forward is None) for mode in modes]

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
        def take_and_read() -> None:
            self._lock = LogDirLock(self.log_dir)
            if event_files(self.log_dir):
                self._read_existing()

        # A refused log dir (locked, or holding another model) is the same error on every rank.
        on_rank_0(take_and_read, self._agreement, "taking the log dir on rank 0")
        # Every rank joins each checkpoint's gather, so all must skip what rank 0 skips; only
        # rank 0 writes, and only it is sure to see the log dir (it may be on its node's disk).
        self._last_step = self._agreement.rank_0s(self._last_step, "building the logger")

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
        check_same_model(run, self._layer_infos, self.log_dir)
        if run.steps:
            self._last_step = run.steps[-1]
        self._records.resume(run, self._last_step)
        for stream in self._streams:  # new images get numbers the run's stored ones do not have
            stream.next_number = max(run.stream_images(stream.mode), default=-1) + 1

    # -- logging ------------------------------------------------------------------------

    @property
    def last_step(self) -> int:
        """The last step logged in ``log_dir`` (by this logger or an earlier run), -1 if none."""
        return self._last_step

    def maybe_log(self, step: int, *, labels: torch.Tensor | None = None) -> bool:
        """Log if ``step`` has reached the next scheduled checkpoint; returns whether it logged.

        ``step`` must not go back: pass a global step (``epoch * steps_per_epoch + i``), not
        a counter that restarts every epoch. ``labels``: the classes of the last forward's
        images, for the streams' class histograms.
        """
        step = _check_step(step)
        if labels is not None:
            self.label(labels)
        self._warn_if_backwards(step)
        if self._budget.seen(step):  # the rest of the schedule was thinned to the overhead budget
            self._due = self.schedule.next_due(self._last_step)
        logged = False
        if step <= self._resumed_at and self._last_step == self._resumed_at:
            # A resumed run replaying steps the log dir already holds: say so once. Its last step
            # itself is where a resumed job starts (the final checkpoint of the session before).
            if step < self._resumed_at:
                self._warn_order(step)
        elif self._due is not None and step >= self._due and self._budget.allows(step, self._due):
            self._due = self.schedule.next_due(step)
            with self._budget.measure(step):
                logged = self.log(step)
            # Renewed here, as `.to()` replaces buffers; walking the modules every step would cost 20x the sum.
            self._state = state_tensors(self._net)
        self._seen_step, self._seen_version = max(self._seen_step, step), state_version(self._state)
        return logged

    def _warn_if_backwards(self, step: int) -> None:
        if self._warned_backwards or step >= self._seen_step:
            return
        self._warned_backwards = True
        warnings.warn(
            f"convviz: maybe_log({step}) came after maybe_log({self._seen_step}): a step that goes back is "
            f"never logged, so nothing is logged until step {self._due}. If your step counter restarts "
            "every epoch, pass a global step instead, such as `epoch * steps_per_epoch + i` (in Lightning, "
            "trainer.global_step)", ConvVizWarning, stacklevel=user_stacklevel(),
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
        self._agreement.same_step(step, "log()")  # before any collective: a clear error for a rank that is not here
        try:
            with self.paused():
                ranked = merge_ranks(self._probe_source.local, self.k, agreement=self._agreement)
                ranks = self._projection_ranks(step)
                self._checkpoints += 1
                # Failed projections are left out; the checkpoint's records are worth keeping without them.
                projections = self._projected(step, ranks, self.probe, ranked.topk)
                streams = {s.mode: s.checkpoint(functools.partial(self._projected, step, ranks, alone=True),
                                                self._agreement) for s in self._streams}
        except Exception as e:
            self._failed("probe pass", f"the probe pass of the checkpoint at step {step} failed "
                         f"({type(e).__name__}: {e}); checkpoints are skipped until it works again")
            return False
        self._failing.discard("probe pass")
        self._last_step = step
        if rank() != 0:
            return True
        self._warn_not_finite(step, ranked.not_finite)
        try:  # on rank 0 alone, which writes it: no rank waits on it, and all agree on the stored box
            with self.paused():  # the logger's own pass: never ranked by the streams
                fields = effective_field.measure(self._net, self.probe, self._layer_infos, call=self._call,
                                                 device=self.device)
            self._failing.discard("effective field")
        except Exception as e:
            fields = {}
            self._failed("effective field", f"the effective fields at step {step} could not be measured "
                         f"({type(e).__name__}: {e}); the checkpoint is logged without them")
        try:
            self._follow_log_dir(step)
            self._records.write(step, ranked.topk, projections, streams, fields)
        except Exception as e:
            self._failed("write", f"could not write the checkpoint at step {step} to {self.log_dir!r} "
                         f"({type(e).__name__}: {e}); training goes on and the next checkpoint tries again")
            self._records.failed()
            return False
        self._failing.discard("write")
        return True

    def _failed(self, kind: str, message: str) -> None:
        if kind not in self._failing:
            warnings.warn(f"convviz: {message}", ConvVizWarning, stacklevel=user_stacklevel())
            self._failing.add(kind)

    def _warn_order(self, step: int) -> None:
        if not self._warned_order:
            warnings.warn(
                f"convviz: step {step} is not after the last logged step {self._last_step} in "
                f"{self.log_dir!r}; checkpoints up to {self._last_step} are skipped, because TensorBoard "
                "would drop the records logged after a repeated step", ConvVizWarning, stacklevel=user_stacklevel(),
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
                    ConvVizWarning, stacklevel=user_stacklevel(),
                )

    def _projection_ranks(self, step: int) -> int:
        if self.projections is None:
            return 0
        every = self.projections_topk_every
        last = self._final or (self._last_scheduled is not None and step >= self._last_scheduled)
        if self.projections == "topk" or (every == "last" and last) or (
                isinstance(every, int) and self._checkpoints % every == 0):
            return self.k
        return 1

    def _project(self, ranks: int, images: Any, results: dict[str, TopK], *,
                 alone: bool = False) -> dict[str, LayerProjections]:
        """Projections of ``results``' top ``ranks`` (on rank 0; other ranks compute their share and get {})."""
        if not ranks:
            return {}
        targets = [Target(name, ReceptiveField.from_proto(info.receptive_field), info.fmap_w)
                   for name, info in self._layer_infos.items()]
        return project_ranks(self._net, images, targets, results, ranks=ranks, rule=self.projection_rule,
                             batch_size=self.batch_size, device=self.device, call=self._call, alone=alone,
                             agreement=self._agreement)

    def _projected(self, step: int, ranks: int, images: Any, results: dict[str, TopK], *,
                   alone: bool = False) -> dict[str, LayerProjections]:
        """:meth:`_project`, or {} with one warning (what failed, what to do) when it fails."""
        try:
            projections = self._project(ranks, images, results, alone=alone)
        except Exception as e:
            self._failed("projections", failure_message(step, e))
            return {}
        self._failing.discard("projections")
        return projections

    def _follow_log_dir(self, step: int) -> None:
        """Start anew where the log dir was deleted or moved since its event file and lock were made.

        Otherwise checkpoints would go on into a deleted file, and another logger could take the
        recreated dir. Raises RuntimeError if another logger has taken it.
        """
        gone = self._records.moved()
        if not gone and self._lock is not None and self._lock.held():
            return
        if gone:
            self._records.restart()
            if not self._warned_moved:
                self._warned_moved = True
                warnings.warn(
                    f"convviz: the log dir {self.log_dir!r} was deleted or moved during training: checkpoints from "
                    f"step {step} on go into a new event file there, with the probe images they name; earlier "
                    "checkpoints are not in it", ConvVizWarning, stacklevel=4,
                )
        self._release_lock()
        self._lock = LogDirLock(self.log_dir)

    @property
    def stream_pool_bytes_held(self) -> int:
        """Bytes of candidate images the streams hold on the CPU now."""
        return sum(s.pool.bytes for s in self._streams)

    def paused(self) -> contextlib.AbstractContextManager:
        """A context in which the streams rank no forward: for eval-mode forwards that are not a validation pass."""
        return self._hooks.paused() if self._hooks is not None else contextlib.nullcontext()

    def label(self, labels: torch.Tensor) -> None:
        """The classes ``[N]`` of the images of the last forward a stream ranked."""
        if self._hooks is not None and self._hooks.last is not None:
            self._hooks.last.label(labels)

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
            self._budget.report()
            self._records.close()
        finally:
            if self._hooks is not None:
                self._hooks.remove()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _log_final(self) -> None:
        if self._seen_step < 0:  # maybe_log was never called: the caller chose every step
            return
        changed = self._seen_version is not None and state_version(self._state) != self._seen_version
        step = self._seen_step + int(changed)
        if self._distributed:
            if world() == 1:
                warnings.warn("convviz: close() came after the process group was destroyed, so the final "
                              "checkpoint is skipped: call close() before destroy_process_group()",
                              ConvVizWarning, stacklevel=user_stacklevel())
                return
            # Every rank must take the same decision, as every rank joins the checkpoint's gather.
            step = self._agreement.rank_0s(step, "close()")
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


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _writer_log_dir(writer: Any) -> str:
    log_dir = getattr(writer, "log_dir", None) or getattr(writer, "get_logdir", lambda: None)()
    if not log_dir:
        raise TypeError("writer must be a torch.utils.tensorboard.SummaryWriter (or have a log_dir)")
    return os.fspath(log_dir)
