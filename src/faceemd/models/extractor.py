"""Lightning wrapper that turns image batches into the features two-stage ranking needs."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from faceemd.emd.weights import grid_to_patches

__all__ = ["FaceFeatureExtractor", "extract_batch"]


def extract_batch(backbone: nn.Module, batch: dict, flip: bool = False) -> dict:
    """Features of one loader batch (see :class:`FaceFeatureExtractor`), for any module whose
    validation/test step feeds :class:`faceemd.callbacks.FeatureCollector`."""
    if "image" not in batch:  # every image of the batch was bad and skipped
        return {"skipped": batch["skipped"]}
    x = batch["image"]
    out = backbone(x)
    embedding = out.embedding
    if flip:
        embedding = embedding + backbone(torch.flip(x, dims=[3])).embedding
    return {
        "embedding": embedding.float(),
        "patches": grid_to_patches(out.grid).float(),
        "grid_shape": tuple(out.grid.shape[-2:]),
        "image_size": tuple(x.shape[-2:]),
        "landmarks": batch["landmarks"].float(),
        "label": batch["label"],
        "index": batch["index"],
        "skipped": batch["skipped"],
    }


class FaceFeatureExtractor(L.LightningModule):
    """Runs a backbone in eval mode and returns per-image features at its native grid.

    backbone: a :class:`faceemd.models.backbones.FaceBackbone`.
    flip: add the embedding of the horizontally flipped image (common test-time practice;
    the patch grid stays that of the original image).
    Each step returns ``embedding (B, D)``, ``patches (B, gh*gw, C)`` (row-major),
    ``grid_shape``, ``image_size``, ``landmarks (B, 68, 2)`` (NaN where unknown), ``label``,
    ``index`` and ``skipped``. Pooling and landmark weights are applied later
    (:meth:`faceemd.features.ExtractedFeatures.to_bank`), so cached features serve any grid.
    """

    def __init__(self, backbone: nn.Module, flip: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.flip = flip

    def extract(self, batch: dict) -> dict:
        return extract_batch(self.backbone, batch, self.flip)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return self.extract(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self.extract(batch)
