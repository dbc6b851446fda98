"""The layers="auto" stage rule on small hand-built nets, where the right answer is plain to see."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tb_convviz import ConvVizLogger, ProbeSet


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Gated(nn.Module):
    """A residual block with a squeeze-excitation gate: its 1×1 maps are never stages."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = conv(channels, channels)
        self.squeeze, self.excite = nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        y = self.body(x)
        return x + y * torch.sigmoid(self.excite(self.squeeze(y)))


class Net(nn.Module):
    def __init__(self, downsamplings: int):
        super().__init__()
        self.stem = conv(3, 4)
        self.stages = nn.Sequential(*(nn.Sequential(conv(4, 4, 2), Gated(4)) for _ in range(downsamplings)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def picks(model: nn.Module, log_dir, size: int = 128) -> tuple[list[str], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = ConvVizLogger(model, ProbeSet(torch.rand(4, 3, size, size)), log_dir, k=2)
    return logger.layers, [w for w in caught if "stage" in str(w.message)]


def test_more_than_five_stages_are_spread_over_the_depth_first_and_last_included(tmp_path):
    # 7 stages: the stem (stride 1) and six strided stages (strides 2..64); 5 at indices 0, 2, 3, 4, 6.
    layers, warned = picks(Net(6), tmp_path)
    assert layers == ["stem", "stages.1", "stages.2", "stages.3", "stages.5"]
    assert not warned


def test_fewer_stages_are_all_logged_with_one_warning_and_gates_are_never_picked(tmp_path):
    layers, warned = picks(Net(2), tmp_path)
    assert layers == ["stem", "stages.0", "stages.1"]
    assert len(warned) == 1 and "has 3 stage(s), not 5" in str(warned[0].message)
    assert warned[0].filename == __file__  # it points at the caller's line


def test_a_gate_can_still_be_asked_for_by_name(tmp_path):
    logger = ConvVizLogger(Net(2), ProbeSet(torch.rand(4, 3, 64, 64)), tmp_path, k=2, layers=["stages.0.1.excite"])
    assert logger.layers == ["stages.0.1.excite"]


def pooled_blocks(blocks: int = 5) -> list[nn.Sequential]:
    widths = [3, 8, 16, 16, 32, 32][: blocks + 1]
    return [nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2))
            for a, b in zip(widths, widths[1:])]


def test_conv_bn_relu_pool_blocks_end_each_stage_at_their_activation_nested_or_flat(tmp_path):
    # 64 px: the convs run at 64, 32, 16, 8, 4 px, and the last pool outputs 2 px: 6 stages, of
    # which 5 are spread over the depth (indices 0, 1, 2, 4, 5). A pool only halves its input:
    # it starts the next stage, it never ends one.
    blocks = pooled_blocks()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))
    flat = nn.Sequential(nn.Sequential(*(m for b in blocks for m in b)), head)
    nested = nn.Sequential(nn.Sequential(*blocks), head)
    flat_layers, _ = picks(flat, tmp_path / "flat", size=64)
    nested_layers, _ = picks(nested, tmp_path / "nested", size=64)
    assert flat_layers == ["0.2", "0.6", "0.10", "0.18", "0.19"]
    assert nested_layers == ["0.0.2", "0.1.2", "0.2.2", "0.4.2", "0.4.3"]
    # The same module objects: nesting changes the names, not the picks.
    flat_modules, nested_modules = dict(flat.named_modules()), dict(nested.named_modules())
    assert [flat_modules[n] for n in flat_layers] == [nested_modules[n] for n in nested_layers]


def test_fewer_pooled_blocks_log_every_conv_stage_once(tmp_path):
    # 3 blocks: convs at 64, 32, 16 px and the last pool at 8 px, each stage once.
    blocks = pooled_blocks(3)
    model = nn.Sequential(nn.Sequential(*blocks), nn.Flatten(), nn.Linear(16 * 8 * 8, 2))
    layers, warned = picks(model, tmp_path, size=64)
    assert layers == ["0.0.2", "0.1.2", "0.2.2", "0.2.3"]
    assert len(warned) == 1
