"""ConvVizCallback: convviz for Lightning training, in the same run as Lightning's TensorBoard scalars.

Needs ``pip install "tb-convviz[lightning]"``; nothing else in tb_convviz imports lightning.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from tb_convviz.logger import ConvVizLogger
from tb_convviz.probe import ProbeSet
from tb_convviz.projection import check_options
from tb_convviz.schedule import Schedule
from tb_convviz.streams import POOL_BYTES, ImagesAt, check_streams

FALLBACK_NAME = "convviz_logs"


class ConvVizCallback(Callback):
    """Logs the top-``k`` probe images of each unit of ``layers`` at scheduled ``trainer.global_step`` values.

    Writes into the run directory of the trainer's ``TensorBoardLogger``; without one,
    into ``<default_root_dir>/convviz_logs/version_N`` (it warns), or into ``log_dir`` if
    given. The schedule (``every_n_steps``, ``steps`` or ``total_steps``; by default 0, 1,
    2, 5, 10, 20, ...), ``layers`` (names within the LightningModule) and ``batch_size``
    are those of :class:`~tb_convviz.ConvVizLogger`. The probe pass runs on the
    LightningModule's device; under DDP every rank ranks its share of the probe set and
    global rank 0 writes. Training ends with a checkpoint of the trained model at the last
    global step, whatever the schedule. ``projections``, ``projection_rule`` and
    ``projections_topk_every`` are passed to the logger, e.g.
    ``ConvVizCallback(probe, projections_topk_every=4)`` for all k projections at every 4th checkpoint.
    ``stream``, ``stream_images`` and ``stream_pool_bytes`` rank the training and validation batches
    as the logger does; a batch ``(images, labels, ...)`` gives the stream images their labels.
    """

    def __init__(
        self,
        probe: ProbeSet | torch.Tensor,
        layers: str | Sequence[str] = "auto",
        k: int = 9,
        every_n_steps: int | None = None,
        *,
        steps: Iterable[int] | None = None,
        total_steps: int | None = None,
        batch_size: int = 128,
        log_dir: str | os.PathLike | None = None,
        projections: str | None = "top1",
        projection_rule: str = "deconvnet",
        projections_topk_every: int | str | None = None,
        stream: str | Sequence[str] | None = None,
        stream_images: ImagesAt | None = None,
        stream_pool_bytes: int = POOL_BYTES,
    ) -> None:
        steps = list(steps) if steps is not None else None
        Schedule(every_n_steps=every_n_steps, steps=steps, total_steps=total_steps)  # fail at construction
        check_options(projections, projection_rule, projections_topk_every)
        check_streams(stream)
        self._projections = {"projections": projections, "projection_rule": projection_rule,
                             "projections_topk_every": projections_topk_every, "stream": stream,
                             "stream_images": stream_images, "stream_pool_bytes": stream_pool_bytes}
        self.probe, self.layers, self.k, self.batch_size = probe, layers, k, batch_size
        self._schedule: dict[str, Any] = {"every_n_steps": every_n_steps, "steps": steps, "total_steps": total_steps}
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self._logger: ConvVizLogger | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(final_checkpoint=False)
        self._logger = ConvVizLogger(
            pl_module, self.probe, self._run_dir(trainer), layers=self.layers, k=self.k,
            batch_size=self.batch_size, device=pl_module.device, **self._schedule, **self._projections,
        )
        self._logger.maybe_log(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._logger is not None:
            self._logger.maybe_log(trainer.global_step, labels=_labels(batch))

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        labels = _labels(batch)
        if self._logger is not None and labels is not None:
            self._logger.label(labels)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(final_checkpoint=True)  # the trained model, at the last global step

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close(final_checkpoint=False)

    def _run_dir(self, trainer: Trainer) -> str:
        # Called on every rank: TensorBoardLogger picks its version on rank 0 only, so rank 0's choice
        # is broadcast (the other ranks do not write, but must agree on what is already logged).
        if self.log_dir is not None:
            return self.log_dir
        tensorboard = next((l for l in trainer.loggers if isinstance(l, TensorBoardLogger)), None)
        if tensorboard is None:
            tensorboard = TensorBoardLogger(trainer.default_root_dir, name=FALLBACK_NAME)
            rank_zero_warn(
                f"ConvVizCallback: the Trainer has no TensorBoardLogger, so convviz writes to "
                f"{tensorboard.log_dir!r}; see it with `tensorboard --logdir {tensorboard.root_dir}`, or pass "
                "Trainer(logger=TensorBoardLogger(...)) to put Lightning's scalars in the same run"
            )
        return trainer.strategy.broadcast(tensorboard.log_dir)

    def _close(self, *, final_checkpoint: bool) -> None:
        if self._logger is not None:
            self._logger.close(final_checkpoint=final_checkpoint)
            self._logger = None


def _labels(batch: Any) -> torch.Tensor | None:
    """The labels of an ``(images, labels, ...)`` batch, else None."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor) \
            and batch[1].dim() == 1 and not batch[1].is_floating_point():
        return batch[1]
    return None
