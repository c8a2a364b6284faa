"""Backbone input preparation: frame, size, channels, colour order and normalisation.

``FaceInput`` turns a decoded face (uint8 ``(H, W)`` grayscale or ``(H, W, 3)`` RGB) and its
landmarks into the tensor ``(C, h, w)`` a backbone expects, normalised as ``(x - mean) / std``,
and maps the landmarks along.

Frames. A backbone is trained on faces aligned to one 5-point template (``template``: a name of
:data:`faceemd.data.align.TEMPLATES`, e.g. SFace's ``arcface_112``); a data set's images are
aligned to another (its ``frame``, e.g. the LFW ``align-112x96`` faces are in
``sphereface_112x96``). When both are known and differ, :meth:`FaceInput.in_frame` returns an
input that warps each image by the similarity taking the frame's template points onto the
backbone's (for ``sphereface_112x96 -> arcface_112`` that is exactly 8 black columns on each
side). When either is unknown the image is only resized, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from faceemd.data.align import TEMPLATES, resolve_template, template_points, umeyama

__all__ = ["FaceInput"]

_COLOURS = ("rgb", "bgr")


def _plain(value):
    """A number, or a list/tuple (an OmegaConf ``ListConfig`` included) as a tuple."""
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def _per_channel(name: str, value, channels: int) -> float | tuple[float, ...]:
    """``value`` as a float, or a tuple of ``channels`` floats; anything else a ``ValueError``."""
    value = _plain(value)
    if isinstance(value, tuple):
        if len(value) != channels:
            raise ValueError(
                f"input.{name} has {len(value)} values but the input has {channels} channel(s): "
                f"give one number or {channels}"
            )
        return tuple(float(v) for v in value)
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"input.{name} must be a number or one per channel, got {value!r}"
        ) from err


def _as_tensor(value, like: torch.Tensor) -> float | torch.Tensor:
    """A per-channel tuple as a ``(C, 1, 1)`` tensor of ``like``'s dtype and device (it
    broadcasts over ``(C, h, w)`` and ``(B, C, h, w)``); a float as it is."""
    return like.new_tensor(value).view(-1, 1, 1) if isinstance(value, tuple) else value


class FaceInput:
    """size: ``(h, w)``; channels: 1 (grayscale) or 3 (colour, grayscale copied); mean, std:
    one number, or one per channel in the input's channel order (as model cards and timm's
    ``pretrained_cfg`` state them, e.g. ``[122.782, 117.001, 104.298]``);
    colour: ``rgb`` or ``bgr`` channel order for 3 channels; template: the backbone's alignment
    template (None: unknown); warp: ``(2, 3)`` source-frame -> input-frame matrix, set by
    :meth:`in_frame` (None: resize only).

    A plain class, not a dataclass: Hydra would turn a dataclass passed to ``instantiate``
    into a config node."""

    def __init__(
        self,
        size: Sequence[int],
        channels: int,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        colour: str = "rgb",
        template: str | None = None,
        warp: Sequence[Sequence[float]] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if colour not in _COLOURS:
            raise ValueError(f"colour must be one of {_COLOURS}, got {colour!r}")
        self.size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.mean, self.std = (
            _per_channel("mean", mean, channels),
            _per_channel("std", std, channels),
        )
        if any(s == 0 for s in (self.std if isinstance(self.std, tuple) else (self.std,))):
            raise ValueError("input.std must not be 0")
        template = resolve_template(template)
        self.colour, self.template = colour, template
        self.warp = None if warp is None else [list(map(float, row)) for row in warp]
        if template is not None:
            if tuple(TEMPLATES[template].size) != self.size:
                raise ValueError(
                    f"template {template} is {TEMPLATES[template].size} (h, w) but the input "
                    f"size is {self.size}: make them agree"
                )

    def in_frame(self, frame: str | None) -> FaceInput:
        """This input for images aligned to template ``frame`` (None: unknown frame)."""
        frame = resolve_template(frame)
        warp = None
        if frame is not None and self.template is not None and frame != self.template:
            warp = umeyama(template_points(frame), template_points(self.template)).tolist()
        spec = (self.size, self.channels, self.mean, self.std, self.colour, self.template)
        return FaceInput(*spec, warp=warp)

    def frame_image(
        self, image: np.ndarray, lmk: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``image`` (uint8) and ``lmk (68, 2)`` brought into the network's frame and size."""
        h, w = image.shape[:2]
        th, tw = self.size
        if self.warp is not None:
            m = np.asarray(self.warp, np.float64)
            image = cv2.warpAffine(image, m, (tw, th), flags=cv2.INTER_LINEAR, borderValue=0)
            if lmk is not None:
                lmk = (lmk @ m[:, :2].T + m[:, 2]).astype(np.float32)
        elif (h, w) != (th, tw):
            interp = cv2.INTER_AREA if th < h else cv2.INTER_LINEAR
            image = cv2.resize(image, (tw, th), interpolation=interp)
            if lmk is not None:
                lmk = lmk * np.array([tw / w, th / h], dtype=np.float32)
        return image, lmk

    def __call__(self, image: np.ndarray, lmk: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        image, lmk = self.frame_image(image, lmk)
        if self.channels == 1 and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.channels == 3 and image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        elif self.channels == 3 and self.colour == "bgr":
            image = image[..., ::-1]
        x = torch.from_numpy(np.ascontiguousarray(image)).float()
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return self.normalise(x), lmk

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` of images ``(C, h, w)`` or ``(B, C, h, w)``, per channel where
        mean or std has one value per channel."""
        return (x - _as_tensor(self.mean, x)) / _as_tensor(self.std, x)

    @classmethod
    def from_config(cls, spec) -> FaceInput:
        """From a backbone config's ``input`` block (``size, channels, mean, std`` and
        optional ``colour``, ``template``)."""
        return cls(
            size=tuple(spec.size),
            channels=spec.channels,
            mean=_plain(spec.mean),
            std=_plain(spec.std),
            colour=spec.get("colour", "rgb"),
            template=spec.get("template"),
        )
