"""FaceNet Inception-ResNet-v1 with the facenet-pytorch parameter layout (VGGFace2 weights).

Input ``(N, 3, 160, 160)`` normalised as (x - 127.5) / 128. The grid is the 1792x3x3 output of
``block8``; the embedding is ``last_bn(last_linear(avgpool(grid)))`` (512-d, not L2-normalised
here: ranking normalises). The public state dict also holds the VGGFace2 classifier
``logits.*``; it is not part of the feature extractor, so the backbone config lists it under
``ignore_keys``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from faceemd.models.backbones.base import FaceBackbone


class BasicConv2d(nn.Module):
    """Conv (no bias) + BN (eps 1e-3, as converted from TensorFlow) + ReLU."""

    def __init__(self, cin, cout, kernel_size, stride, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class _Residual(nn.Module):
    """Inception-ResNet block: concatenated branches, 1x1 up-projection, scaled residual."""

    def __init__(
        self, branches: list[nn.Module], width: int, channels: int, scale: float, relu: bool = True
    ) -> None:
        super().__init__()
        for i, branch in enumerate(branches):
            setattr(self, f"branch{i}", branch)
        self.n_branches = len(branches)
        self.scale = scale
        self.conv2d = nn.Conv2d(width, channels, kernel_size=1, stride=1)
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], 1)
        out = self.conv2d(out) * self.scale + x
        return out if self.relu is None else self.relu(out)


def block35(scale: float = 0.17) -> _Residual:
    return _Residual(
        [
            BasicConv2d(256, 32, 1, 1),
            nn.Sequential(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1)),
            nn.Sequential(
                BasicConv2d(256, 32, 1, 1),
                BasicConv2d(32, 32, 3, 1, 1),
                BasicConv2d(32, 32, 3, 1, 1),
            ),
        ],
        96,
        256,
        scale,
    )


def block17(scale: float = 0.10) -> _Residual:
    return _Residual(
        [
            BasicConv2d(896, 128, 1, 1),
            nn.Sequential(
                BasicConv2d(896, 128, 1, 1),
                BasicConv2d(128, 128, (1, 7), 1, (0, 3)),
                BasicConv2d(128, 128, (7, 1), 1, (3, 0)),
            ),
        ],
        256,
        896,
        scale,
    )


def block8(scale: float = 0.20, relu: bool = True) -> _Residual:
    return _Residual(
        [
            BasicConv2d(1792, 192, 1, 1),
            nn.Sequential(
                BasicConv2d(1792, 192, 1, 1),
                BasicConv2d(192, 192, (1, 3), 1, (0, 1)),
                BasicConv2d(192, 192, (3, 1), 1, (1, 0)),
            ),
        ],
        384,
        1792,
        scale,
        relu,
    )


class _Mixed(nn.Module):
    """Reduction block: branches concatenated along channels."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        for i, branch in enumerate(branches):
            setattr(self, f"branch{i}", branch)
        self.n_branches = len(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], 1)


def mixed_6a() -> _Mixed:
    return _Mixed(
        [
            BasicConv2d(256, 384, 3, 2),
            nn.Sequential(
                BasicConv2d(256, 192, 1, 1),
                BasicConv2d(192, 192, 3, 1, 1),
                BasicConv2d(192, 256, 3, 2),
            ),
            nn.MaxPool2d(3, stride=2),
        ]
    )


def mixed_7a() -> _Mixed:
    return _Mixed(
        [
            nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 384, 3, 2)),
            nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 2)),
            nn.Sequential(
                BasicConv2d(896, 256, 1, 1),
                BasicConv2d(256, 256, 3, 1, 1),
                BasicConv2d(256, 256, 3, 2),
            ),
            nn.MaxPool2d(3, stride=2),
        ]
    )


class InceptionResnetV1(FaceBackbone):
    """Inception-ResNet-v1: grid 1792x3x3 at 160x160 input, embedding 512."""

    def __init__(
        self, in_channels: int = 3, embedding_dim: int = 512, dropout: float = 0.6
    ) -> None:
        super().__init__()
        self.conv2d_1a = BasicConv2d(in_channels, 32, 3, 2)
        self.conv2d_2a = BasicConv2d(32, 32, 3, 1)
        self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3, 1)
        self.conv2d_4b = BasicConv2d(192, 256, 3, 2)
        self.repeat_1 = nn.Sequential(*[block35() for _ in range(5)])
        self.mixed_6a = mixed_6a()
        self.repeat_2 = nn.Sequential(*[block17() for _ in range(10)])
        self.mixed_7a = mixed_7a()
        self.repeat_3 = nn.Sequential(*[block8() for _ in range(5)])
        self.block8 = block8(scale=1.0, relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.last_linear = nn.Linear(1792, embedding_dim, bias=False)
        self.last_bn = nn.BatchNorm1d(embedding_dim, eps=0.001, momentum=0.1)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool_3a(self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x))))
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.repeat_2(self.mixed_6a(self.repeat_1(x)))
        grid = self.block8(self.repeat_3(self.mixed_7a(x)))
        pooled = self.avgpool_1a(grid).flatten(1)
        embedding = self.last_bn(self.last_linear(self.dropout(pooled)))
        return grid, embedding
