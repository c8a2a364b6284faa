"""ArcFace ResNet-18 of the public arcface-pytorch code (``resnet_face18``, no SE).

Input ``(N, 1, 128, 128)`` grayscale normalised as (x - 127.5) / 127.5. The 512x8x8 grid is taken
after ``bn4`` (the BN following the last residual stage), the embedding is ``bn5(fc5(grid))``
(512-d), as DeepFace-EMD uses it. Parameter names match ``resnet18_110.pth``.
"""

from __future__ import annotations

from torch import Tensor, nn

from faceemd.models.backbones.base import FaceBackbone


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IRBlock(nn.Module):
    """Pre-BN residual block with one shared PReLU (as in arcface-pytorch)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, inplanes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()
        self.conv2 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + residual)


class ArcFaceResNet18(FaceBackbone):
    """``resnet_face18(use_se=False)``: grid 512x8x8, embedding 512."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        inplanes = 64
        for i, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            layer = nn.Sequential(IRBlock(inplanes, planes, stride, down), IRBlock(planes, planes))
            setattr(self, f"layer{i}", layer)
            inplanes = planes
        self.bn4 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc5 = nn.Linear(512 * 8 * 8, embedding_dim)
        self.bn5 = nn.BatchNorm1d(embedding_dim)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        grid = self.bn4(x)
        embedding = self.bn5(self.fc5(self.dropout(grid).flatten(1)))
        return grid, embedding
