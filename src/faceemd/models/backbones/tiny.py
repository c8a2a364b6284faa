"""A small CNN for CPU demos and tests: 64x64 grayscale in, 8x8x128 grid, 128-d embedding."""

from __future__ import annotations

from torch import Tensor, nn

from faceemd.models.backbones.base import FaceBackbone

__all__ = ["TinyFaceNet"]


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)
    )


class TinyFaceNet(FaceBackbone):
    """Four 3x3 conv stages (stride 1, 2, 2, 2) to a ``(N, 128, 8, 8)`` grid at 64x64 input,
    then dropout, a linear layer and batch norm to the embedding (ArcFace-style ``fc5``/``bn5``)."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 128, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(in_channels, width, 1),
            _conv(width, 2 * width, 2),
            _conv(2 * width, 4 * width, 2),
            _conv(4 * width, 4 * width, 2),
        )
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width * 8 * 8, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.body(x)
        return grid, self.bn(self.fc(self.dropout(grid.flatten(1))))
