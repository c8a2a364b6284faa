"""SphereFace-20 of the public CosFace_pytorch code (``sphere(type=20)``).

Input ``(N, 3, 112, 96)`` normalised as (x - 127.5) / 128. The grid is the 512x7x6 output of
``layer4``; the embedding is ``fc`` (512-d). Parameter names match the public state dicts.
"""

from __future__ import annotations

from torch import Tensor, nn

from faceemd.models.backbones.base import FaceBackbone


class Block(nn.Module):
    """Residual pair of 3x3 convs with per-channel PReLU."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.prelu1 = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.prelu2 = nn.PReLU(planes)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, 2, 1), nn.PReLU(cout)]
    layers += [Block(cout) for _ in range(blocks)]
    return nn.Sequential(*layers)


class SphereFace20(FaceBackbone):
    """SphereFace-20: stages of (1, 2, 4, 1) blocks, grid 512x7x6, embedding 512."""

    def __init__(self, in_channels: int = 3, embedding_dim: int = 512) -> None:
        super().__init__()
        self.layer1 = _stage(in_channels, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 4)
        self.layer4 = _stage(256, 512, 1)
        self.fc = nn.Linear(512 * 7 * 6, embedding_dim)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return grid, self.fc(grid.flatten(1))
