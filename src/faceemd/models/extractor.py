"""Lightning wrapper that turns image batches into the features two-stage ranking needs."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from faceemd.emd.weights import grid_to_patches, landmark_density

__all__ = ["FaceFeatureExtractor"]


class FaceFeatureExtractor(L.LightningModule):
    """Runs a backbone in eval mode and returns per-image features.

    backbone: a :class:`faceemd.models.backbones.FaceBackbone`.
    grid: optional ``(H', W')`` to average-pool the patch grid to (paper: 8x8 -> 4x4).
    flip: add the embedding of the horizontally flipped image (common test-time practice;
    the patch grid stays that of the original image).
    Each step returns ``embedding (B, D)``, ``patches (B, R, C)``, ``label``, ``index``,
    ``skipped`` and, when all landmarks in the batch are known, ``lmk (B, R)`` weights.
    """

    def __init__(
        self, backbone: nn.Module, grid: Sequence[int] | None = None, flip: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.grid = tuple(grid) if grid is not None else None
        self.flip = flip

    def extract(self, batch: dict) -> dict:
        if "image" not in batch:  # every image of the batch was bad and skipped
            return {"skipped": batch["skipped"]}
        x = batch["image"]
        out = self.backbone(x)
        embedding = out.embedding
        if self.flip:
            embedding = embedding + self.backbone(torch.flip(x, dims=[3])).embedding
        grid = out.grid
        patches = grid_to_patches(grid, self.grid)
        gh, gw = self.grid or tuple(grid.shape[-2:])
        result = {
            "embedding": embedding.float(),
            "patches": patches,
            "label": batch["label"],
            "index": batch["index"],
            "skipped": batch["skipped"],
        }
        lmk: Tensor = batch["landmarks"]
        if bool(torch.isfinite(lmk).all()):
            result["lmk"] = landmark_density(lmk, tuple(x.shape[-2:]), (gh, gw))
        return result

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return self.extract(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self.extract(batch)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.extract(batch)
