"""What every backbone returns: the embedding for stage 1 and the spatial grid for stage 2."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn


class BackboneOutput(NamedTuple):
    """embedding ``(N, D)`` (stage 1); grid ``(N, C, H, W)``: the last conv feature map, whose
    cells are the patches of stage 2."""

    embedding: Tensor
    grid: Tensor


class FaceBackbone(nn.Module):
    """Base class: subclasses implement ``features(x) -> (grid, embedding)``.

    Module attribute names follow the public checkpoints exactly, so their state dicts load
    strictly (see :mod:`faceemd.models.checkpoint`).
    """

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> BackboneOutput:
        grid, embedding = self.features(x)
        return BackboneOutput(embedding, grid)
