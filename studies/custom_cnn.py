"""A model of your own, for studies/custom_cnn.yaml: a small residual CNN.

dlsearch calls `build(model, input_shape, n_classes)` once per trial:

- `model` is the study's `model:` section as a plain dict, with this trial's
  sampled values merged in: this file's own keys (`filters`, `stages`) sit beside
  the built-in ones it reuses (`dropout`, `activation`);
- `input_shape` is one sample's shape, `(1, 28, 28)` for MNIST;
- `n_classes` is the number of classes (10).

It returns an `nn.Module` mapping a batch `(B, *input_shape)` to logits
`(B, n_classes)`. Everything else is dlsearch's: the training loop, `model.init`
(applied to every Conv/Linear layer when the study sets it; the last layer counts
as the head), schedules, early stopping, checkpoints, pruning and tracking.
"""

from __future__ import annotations

from typing import Any

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def build(model: dict[str, Any], input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return ResidualCNN(
        in_channels=input_shape[0], n_classes=n_classes, filters=model["filters"], stages=model["stages"],
        dropout=model["dropout"], activation=model["activation"],
    )


class ResidualCNN(nn.Module):
    """stem conv -> `stages` x (residual block, then halve the map and double the channels)
    -> global average pool -> dropout -> linear head. The pooling makes it fit any image size."""

    def __init__(self, in_channels: int, n_classes: int, filters: int, stages: int, dropout: float,
                 activation: str):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, filters, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(filters), act())
        blocks: list[nn.Module] = []
        channels = filters
        for _ in range(stages):
            blocks += [ResidualBlock(channels, act),
                       # A strided conv halves height and width; doubling the channels keeps the cost per layer.
                       nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False),
                                     nn.BatchNorm2d(2 * channels), act())]
            channels *= 2
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x))).flatten(1)
        return self.head(self.dropout(x))


class ResidualBlock(nn.Module):
    """x + conv-bn-act-conv-bn(x), then act: the skip lets gradients reach the early layers."""

    def __init__(self, channels: int, act: type[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), act(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )
        self.act = act()

    def forward(self, x):
        return self.act(x + self.body(x))
