"""Backbone input preparation: resize, channel count and normalisation from the backbone config.

``FaceInput`` turns a decoded face (uint8 ``(H, W)`` or ``(H, W, 3)``) and its landmarks into the
tensor ``(C, h, w)`` a backbone expects, normalised as ``(x - mean) / std``, and maps landmarks
into the resized frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = ["FaceInput"]


class FaceInput:
    """size: ``(h, w)``; channels: 1 (grayscale) or 3 (RGB, grayscale copied); mean, std."""

    def __init__(self, size: Sequence[int], channels: int, mean: float, std: float) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.mean = float(mean)
        self.std = float(std)

    def __call__(self, image: np.ndarray, lmk: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        h, w = image.shape[:2]
        th, tw = self.size
        if (h, w) != (th, tw):
            interp = cv2.INTER_AREA if th < h else cv2.INTER_LINEAR
            image = cv2.resize(image, (tw, th), interpolation=interp)
            lmk = lmk * np.array([tw / w, th / h], dtype=np.float32)
        if self.channels == 1 and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.channels == 3 and image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        x = torch.from_numpy(np.ascontiguousarray(image)).float()
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return (x - self.mean) / self.std, lmk
