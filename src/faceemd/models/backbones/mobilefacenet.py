"""MobileFaceNet as trained on CASIA-WebFace by the public MobileFaceNet_Pytorch code.

Input ``(N, 3, 112, 96)`` normalised as (x - 127.5) / 128. The grid is the 512x7x6 output of
``conv2`` (after its PReLU, before the global depthwise ``linear7``); the embedding is
``linear1`` (128-d). Parameter names match ``mobilefacenet_casia_068.ckpt``'s
``net_state_dict`` (see ``shared/data/README.md``).
"""

from __future__ import annotations

from torch import Tensor, nn

from faceemd.models.backbones.base import FaceBackbone

# (expansion t, output channels c, repeats n, first stride s) per stage.
BOTTLENECK_SETTING = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]


class ConvBlock(nn.Module):
    """Conv + BN (+ PReLU unless ``linear``); attribute names ``conv``, ``bn``, ``prelu``."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, groups=1, linear=False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = None if linear else nn.PReLU(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear project (``conv.0``-``conv.7``)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.connect else self.conv(x)


class MobileFaceNet(FaceBackbone):
    """MobileFaceNet for 112x96 faces: grid 512x7x6, embedding 128."""

    def __init__(self, in_channels: int = 3, embedding_dim: int = 128) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_channels, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, groups=64)
        blocks, cin = [], 64
        for t, c, n, s in BOTTLENECK_SETTING:
            for i in range(n):
                blocks.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(128, 512, 1)
        self.linear7 = ConvBlock(512, 512, (7, 6), groups=512, linear=True)
        self.linear1 = ConvBlock(512, embedding_dim, 1, linear=True)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.conv2(self.blocks(self.dw_conv1(self.conv1(x))))
        embedding = self.linear1(self.linear7(grid)).flatten(1)
        return grid, embedding
