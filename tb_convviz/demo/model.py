"""A small AlexNet for 64x64 images: five conv layers, so layers 1..5 mean what they mean in the paper."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class DemoAlexNet(nn.Module):
    """AlexNet's layout (conv1-conv5, three max-pools, two hidden FC layers) scaled to 64x64 inputs.

    Module names spell out the layers: ``features.conv1`` ... ``features.conv5``, each
    followed by ``features.bn<i>`` and ``features.relu<i>`` (the activations convviz
    logs). BatchNorm, which AlexNet predates, lets it train in minutes on a CPU.
    ``width`` scales every layer's channel count.
    """

    # The paper's layers 1..5; ``layers="auto"`` would take stages, and conv3..5 share one resolution.
    LOGGED_LAYERS = [f"features.relu{i}" for i in range(1, 6)]

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = width, 2 * width, 3 * width, 3 * width, 2 * width
        self.features = nn.Sequential(OrderedDict([
            *_conv_bn_relu(1, in_channels, c1, kernel_size=7, stride=2, padding=3),  # 64 -> 32
            ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),  # -> 16
            *_conv_bn_relu(2, c1, c2, kernel_size=5, padding=2),
            ("pool2", nn.MaxPool2d(3, stride=2, padding=1)),  # -> 8
            *_conv_bn_relu(3, c2, c3, kernel_size=3, padding=1),
            *_conv_bn_relu(4, c3, c4, kernel_size=3, padding=1),
            *_conv_bn_relu(5, c4, c5, kernel_size=3, padding=1),
            ("pool5", nn.MaxPool2d(3, stride=2, padding=1)),  # -> 4
        ]))
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Dropout(0.3),
            nn.Linear(c5 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def _conv_bn_relu(i: int, c_in: int, c_out: int, **conv) -> list[tuple[str, nn.Module]]:
    return [
        (f"conv{i}", nn.Conv2d(c_in, c_out, bias=False, **conv)),
        (f"bn{i}", nn.BatchNorm2d(c_out)),
        (f"relu{i}", nn.ReLU(inplace=True)),
    ]
