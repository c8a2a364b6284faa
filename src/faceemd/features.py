"""Extracted features of one image set, in the form they are cached and shared between jobs.

Extraction keeps the backbone's *native* patch grid (ArcFace 8x8, MobileFaceNet 7x6, ...) and
raw landmarks; pooling to a coarser grid (paper Sec. 3.1: 8x8 -> 4x4) and the LMK density are
computed when a job turns the features into a :class:`faceemd.emd.bank.FeatureBank`. So one
extraction serves every job of a grid x weighting x alpha x k sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from faceemd.emd.bank import FeatureBank
from faceemd.emd.weights import landmark_density, pool_patches

__all__ = ["ExtractedFeatures"]


@dataclass
class ExtractedFeatures:
    """Features of the images of one set that could be read, in set order.

    embeddings: ``(N, D)`` float32 final embeddings (with the flipped image's added when the
    backbone config asks for flip_test).
    patches: ``(N, gh*gw, C)`` the last conv grid, row-major, float32 or float16 (may be a
    read-only memory map from the feature cache).
    index: ``(N,)`` position of each row in its image set (rows of skipped images are absent).
    landmarks: ``(N, 68, 2)`` (x, y) in the network-input image, NaN where unknown.
    grid_shape: ``(gh, gw)``; image_size: ``(h, w)`` of the network input.
    skipped: images of the set that could not be read and were skipped.
    labels: ``(N,)`` integer identities of this run's label vocabulary; not cached (the
    vocabulary depends on which sets a job combines), set by the job.
    key: the feature-cache key of the set when it is cached (keys derived results).
    summaries: optional patch norms ``(N, R)`` and means ``(N, C)`` at the native grid (stored
    by the feature cache); verified: known finite (see :class:`FeatureBank`).
    """

    embeddings: Tensor
    patches: Tensor
    index: Tensor
    landmarks: Tensor
    grid_shape: tuple[int, int]
    image_size: tuple[int, int]
    skipped: int = 0
    labels: Tensor | None = None
    key: str | None = None
    summaries: tuple[Tensor, Tensor] | None = None
    verified: bool = False

    def __post_init__(self) -> None:
        n = self.embeddings.shape[0]
        if self.patches.shape[0] != n or self.index.shape != (n,) or self.landmarks.shape[0] != n:
            raise ValueError(
                f"inconsistent feature rows: embeddings {tuple(self.embeddings.shape)}, patches "
                f"{tuple(self.patches.shape)}, index {tuple(self.index.shape)}, landmarks "
                f"{tuple(self.landmarks.shape)}"
            )
        self.grid_shape = (int(self.grid_shape[0]), int(self.grid_shape[1]))
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def select(self, rows: Tensor, tag: str) -> ExtractedFeatures:
        """The features of ``rows`` (a ``(N,)`` bool mask or row indices), keyed as this set's
        ``tag`` subset (so that scores cached for the subset never pass for the whole set's)."""
        rows = torch.as_tensor(rows)
        rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.long()
        summaries = None if self.summaries is None else tuple(s[rows] for s in self.summaries)
        return ExtractedFeatures(
            embeddings=self.embeddings[rows],
            patches=self.patches[rows],
            index=self.index[rows],
            landmarks=self.landmarks[rows],
            grid_shape=self.grid_shape,
            image_size=self.image_size,
            skipped=self.skipped,
            labels=None if self.labels is None else self.labels[rows],
            key=None if self.key is None else f"{self.key}:{tag}",
            summaries=summaries,
            verified=self.verified,
        )

    def with_labels(self, labels_by_position: Tensor) -> ExtractedFeatures:
        """Attach labels, given the label of every position of the set ``(len(set),)``."""
        self.labels = labels_by_position[self.index]
        return self

    def to_bank(self, grid: tuple[int, int] | None = None) -> FeatureBank:
        """The :class:`FeatureBank` for ranking, pooled to ``grid`` (None: native grid).

        LMK weights are attached when every image of the set has landmarks.
        """
        if self.labels is None:
            raise ValueError("labels are not set: call with_labels() first")
        target = self.grid_shape if grid is None else (int(grid[0]), int(grid[1]))
        if target[0] > self.grid_shape[0] or target[1] > self.grid_shape[1]:
            raise ValueError(
                f"cannot pool the {self.grid_shape[0]}x{self.grid_shape[1]} grid to a finer "
                f"{target[0]}x{target[1]}; choose rerank grid <= the backbone's grid"
            )
        patches = pool_patches(self.patches, self.grid_shape, target)
        lmk = None
        if len(self) and bool(torch.isfinite(self.landmarks).all()):
            lmk = landmark_density(self.landmarks, self.image_size, target)
        summaries = self.summaries if target == self.grid_shape else None
        return FeatureBank(self.embeddings, patches, self.labels, lmk, summaries, self.verified)
