"""Projections on real torchvision and timm models (random init): logged for every auto layer, zero outside the field."""

import numpy as np
import pytest
import torch

from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.projection import project

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=4),
    "timm_mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4),
}
UNCOVERED = {"timm_mobilenetv3_small_050": {"hardswish"}}
# Squeeze-and-excitation gates each channel by a global pool, so a unit's gradient reaches the
# whole image, weakly; the receptive field (and the crop) leaves the gate out by design.
GATED = {"timm_mobilenetv3_small_050"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_model_projections(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    probe = ProbeSet(torch.randn(4, 3, 32, 32))
    with ConvVizLogger(model, probe, tmp_path, k=1, batch_size=64, steps=[0], projection_rule="guided") as logger:
        assert logger.log(0)
    run = read_run(tmp_path)
    for layer in run.layers:
        info = run.projection_info(layer.name)
        assert (info.height, info.width) == layer.receptive_field.size
        assert set(info.uncovered) >= (UNCOVERED.get(name, set()) if layer.index > 1 else set())
        if name not in UNCOVERED:
            assert info.uncovered == []
        projections = [run.projection(layer.name, 0, u) for u in range(layer.units)]
        assert all(p.shape == (3, *layer.receptive_field.size) for p in projections)
        alive = run.topk(layer.name, 0).values[:, 0] > 0
        assert any(np.abs(p).max() > 0 for p, a in zip(projections, alive) if a), layer.name
    # The uncropped projection of a record lies inside its receptive field (the analytic walk's box);
    # with gates, all but a trace of it.
    layer = run.layers[2]
    records = run.topk(layer.name, 0)
    units = [u for u in range(min(layer.units, 4)) if records.image[u, 0] >= 0]
    images = torch.stack([probe.image(int(records.image[u, 0])) for u in units])
    position = [int(records.y[u, 0] * layer.fmap[1] + records.x[u, 0]) for u in units]
    pixels = project(model, [layer.name], images, [0] * len(units), units, position, "gradient").pixels.numpy()
    for b, u in enumerate(units):
        top, left, bottom, right = layer.receptive_field.box(int(records.y[u, 0]), int(records.x[u, 0]))
        outside = pixels[b].copy()
        outside[:, max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = 0
        where = f"{name} {layer.name} unit {u} reaches outside {(top, left, bottom, right)}"
        if name in GATED:
            # Measured: the gate's signal outside the box peaks at 1.2% of the projection's peak
            # (blocks.1, unit 0); the bound says it stays a trace, not that it is exactly 1%.
            assert np.abs(outside).max() <= 0.05 * np.abs(pixels[b]).max(), where
        else:
            assert not outside.any(), where
