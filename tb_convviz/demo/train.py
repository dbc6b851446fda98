"""The demo's training loop: loss and accuracy scalars and convviz checkpoints in one run."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from tb_convviz import ConvVizLogger, ProbeSet
from tb_convviz.demo.data import DemoData


def train(
    model: nn.Module,
    data: DemoData,
    run_dir: str | os.PathLike,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    probe_size: int = 1024,
    k: int = 9,
    seed: int = 0,
    layers: str | list[str] = "auto",
) -> float:
    """Train ``model`` (already on its device) on ``data``; returns the final test accuracy.

    Writes ``loss/*`` and ``accuracy/*`` scalars and convviz checkpoints to ``run_dir``,
    the first before any training step. ``seed`` orders the batches; the probe images
    (from the test set) do not depend on it, so runs of different seeds compare.
    """
    device = next(model.parameters()).device
    loader = DataLoader(
        data.train, batch_size=batch_size, shuffle=True, drop_last=len(data.train) > batch_size,
        generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda",
    )
    total_steps = epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.2)
    probe = ProbeSet.from_dataset(
        data.test, n=probe_size, seed=0, mean=data.mean, std=data.std, class_names=data.class_names,
    )
    writer = SummaryWriter(os.fspath(run_dir))
    logger = ConvVizLogger(model, probe, writer=writer, layers=layers, k=min(k, len(probe)),
                           total_steps=total_steps, stream=("train", "eval"))
    step, test_accuracy = 0, float("nan")
    with writer, logger, tqdm(total=total_steps, unit="step", dynamic_ncols=True) as bar:
        checkpoints = int(logger.maybe_log(step))
        for epoch in range(1, epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}")
            model.train()
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                accuracy = (logits.argmax(1) == labels).float().mean().item()
                writer.add_scalar("loss/train", loss.item(), step)
                writer.add_scalar("accuracy/train", accuracy, step)
                checkpoints += logger.maybe_log(step, labels=labels)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.0%}", convviz=checkpoints, refresh=False)
                bar.update()
            test_loss, test_accuracy = evaluate(model, data, batch_size=2 * batch_size, logger=logger)
            writer.add_scalar("loss/test", test_loss, step)
            writer.add_scalar("accuracy/test", test_accuracy, step)
            bar.write(f"epoch {epoch}: test accuracy {test_accuracy:.1%}, test loss {test_loss:.3f}")
    return test_accuracy


@torch.no_grad()
def evaluate(model: nn.Module, data: DemoData, *, batch_size: int = 256,
             logger: ConvVizLogger | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on the test set (the validation stream of ``logger``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for images, labels in DataLoader(data.test, batch_size=batch_size):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        if logger is not None:
            logger.label(labels)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    model.train(was_training)
    n = len(data.test)
    return loss_sum / n, correct / n
