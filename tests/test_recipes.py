"""The README's recipes, on small copies of the structure of timm's train.py and torchvision's reference train.py.

Each loop is shaped like its script's (where the step comes from, when the scheduler is
built, the EMA model, the resume); the logger lines are the README's, with projections=None
to keep the test fast. CPU, random init, a generated ImageFolder, nothing downloaded.
"""

from __future__ import annotations

import os
import warnings

import timm
import timm.data
import timm.scheduler
import timm.utils
import torch
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision import transforms

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.warning import ConvVizWarning
from test_timm_data import CLASSES, image_folder


def timm_train_one_epoch(epoch, model, loader, optimizer, loss_fn, lr_scheduler, model_ema, convviz, convviz_ema):
    updates_per_epoch = len(loader)
    num_updates = epoch * updates_per_epoch
    for batch_idx, (input, target) in enumerate(loader):
        convviz.maybe_log(num_updates)  # the model after num_updates updates
        convviz_ema.maybe_log(num_updates)
        loss = loss_fn(model(input), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        model_ema.update(model, step=num_updates)
        lr_scheduler.step_update(num_updates=num_updates)


def test_timm_train_py_recipe(tmp_path):
    image_folder(tmp_path / "data", splits=("train", "validation"))
    output_dir = tmp_path / "output"
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(CLASSES))
    data_config = {**timm.data.resolve_data_config(model=model), "input_size": (3, 32, 32), "crop_pct": 1.0}
    model_ema = timm.utils.ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset_train = timm.data.create_dataset("", root=str(tmp_path / "data"), split="train", is_training=True)
    dataset_eval = timm.data.create_dataset("", root=str(tmp_path / "data"), split="validation")
    loader_train = timm.data.create_loader(dataset_train, input_size=data_config["input_size"], batch_size=4,
                                           is_training=True, use_prefetcher=False, num_workers=0)
    updates_per_epoch = len(loader_train)
    lr_scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=2, updates_per_epoch=updates_per_epoch, step_on_epochs=False)

    # The README's recipe: the probe from the eval transform, total_steps once the scheduler is built.
    probe_set = timm.data.create_dataset("", root=str(tmp_path / "data"), split="validation")
    probe_set.transform = timm.data.create_transform(**data_config, is_training=False)
    probe = ProbeSet.from_dataset(probe_set, n=1024, mean=data_config["mean"], std=data_config["std"])
    total_steps = num_epochs * updates_per_epoch
    convviz = ConvVizLogger(model, probe, os.path.join(output_dir, "convviz"), total_steps=total_steps,
                            projections=None)
    convviz_ema = ConvVizLogger(model_ema.module, probe, os.path.join(output_dir, "convviz_ema"),
                                total_steps=total_steps, projections=None)

    for epoch in range(num_epochs):
        timm_train_one_epoch(epoch, model, loader_train, optimizer, torch.nn.CrossEntropyLoss(), lr_scheduler,
                             model_ema, convviz, convviz_ema)
        lr_scheduler.step(epoch + 1)
    convviz.close()  # before torch.distributed.destroy_process_group()
    convviz_ema.close()

    assert len(dataset_eval) == len(probe) and probe.class_names == CLASSES
    for name in ("convviz", "convviz_ema"):
        run = read_run(output_dir / name)
        assert run.steps[0] == 0 and run.steps[-1] == total_steps == 6, (name, run.steps)
        assert len(run.layers) == 5 and run.probe.class_names == CLASSES
    model_last = read_run(output_dir / "convviz").topk("layer4", total_steps).values
    ema_last = read_run(output_dir / "convviz_ema").topk("layer4", total_steps).values
    assert not torch.equal(torch.as_tensor(model_last), torch.as_tensor(ema_last))  # two models, two runs


def torchvision_train_one_epoch(model, criterion, optimizer, data_loader, epoch, model_ema, convviz):
    model.train()
    for i, (image, target) in enumerate(data_loader):
        convviz.maybe_log(epoch * len(data_loader) + i)
        loss = criterion(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model_ema.update_parameters(model)


def torchvision_main(data: str, output_dir: str, start_epoch: int, epochs: int, checkpoint: dict) -> None:
    """torchvision's references/classification/train.py main(), cut down; `checkpoint` stands in for --resume."""
    normalize = transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    dataset = torchvision.datasets.ImageFolder(os.path.join(data, "train"), transforms.Compose(
        [transforms.RandomResizedCrop(32), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    dataset_test = torchvision.datasets.ImageFolder(os.path.join(data, "validation"), transforms.Compose(
        [transforms.Resize(36), transforms.CenterCrop(32), transforms.ToTensor(), normalize]))
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    if checkpoint:  # --resume
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    # The README's recipe.
    probe = ProbeSet.from_dataset(dataset_test, n=1024, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    convviz = ConvVizLogger(model, probe, os.path.join(output_dir, "convviz"), total_steps=epochs * len(data_loader),
                            projections=None)
    for epoch in range(start_epoch, epochs):
        torchvision_train_one_epoch(model, criterion, optimizer, data_loader, epoch, model_ema, convviz)
        lr_scheduler.step()
        checkpoint.update(model=model.state_dict(), optimizer=optimizer.state_dict(),
                          lr_scheduler=lr_scheduler.state_dict())
        if epoch + 1 == start_epoch + 1 and epoch + 1 < epochs and not checkpoint.get("resumed"):
            break  # the first session stops after one epoch, as a preempted job would
    convviz.close()


def test_torchvision_reference_train_py_recipe_with_a_resume(tmp_path):
    image_folder(tmp_path / "data", splits=("train", "validation"))
    checkpoint: dict = {}
    torchvision_main(str(tmp_path / "data"), str(tmp_path / "out"), 0, 3, checkpoint)
    first = read_run(tmp_path / "out" / "convviz").steps
    assert first[0] == 0 and first[-1] == 3  # one epoch of 3 steps, and the model after it
    checkpoint["resumed"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchvision_main(str(tmp_path / "data"), str(tmp_path / "out"), 1, 3, checkpoint)
    assert not [w for w in caught if issubclass(w.category, ConvVizWarning)]  # resuming at the last step is silent
    run = read_run(tmp_path / "out" / "convviz")
    assert run.steps[: len(first)] == first and run.steps[-1] == 9
    assert run.restarts == [run.steps[len(first)]]  # the resumed session is marked
    assert run.probe.class_names == CLASSES
