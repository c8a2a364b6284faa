"""Iterative L-inf dodging attacks on a face model, in the aligned face's 8-bit pixel space.

TALFW (paper Sec. 4.2, Tab. 3) perturbs LFW faces so that a face model no longer matches them
to their identity. :func:`dodge` does that with a differentiable **surrogate** model: starting
from the clean image ``x0`` (pixel levels 0..255), each step moves every pixel by ``step`` levels
against the gradient of the cosine between the perturbed face's embedding and the clean one
(the dodging objective), then projects back into ``|x - x0| <= eps`` and ``0..255``:

- ``pgd``: ``x <- clip(x - step * sign(grad))`` (I-FGSM/PGD without a random start,
  Kurakin et al. 2017; Madry et al. 2018);
- ``mifgsm``: the sign of an accumulated gradient ``g <- mu * g + grad / mean|grad|``
  (Dong et al. 2018, "Boosting adversarial attacks with momentum"), which transfers better to
  models other than the surrogate.

Both start from a random point of the budget, ``x0 + eps * u`` with ``u`` uniform in [-1, 1]
(Madry et al.'s random start). It is needed here, not only customary: at ``x = x0`` the cosine
to the clean embedding is at its maximum, so its gradient is zero and a first step from there
would follow rounding noise. The caller draws ``u`` per image (from the image's own seed), and
the surrogate runs in eval mode, so an image's perturbation does not depend on the other images
of its batch.

In float32 a batched convolution rounds differently from a single one, so a pixel whose
gradient lies within rounding of zero may step the other way and the difference can grow over
the steps; in float64 (the test's surrogate) the perturbation is the same alone or in a batch.

The result is rounded to whole levels. ``x0`` and ``eps`` are whole levels, so the rounded image
still lies within the budget exactly, and what is written to disk (PNG) is what is attacked.

:class:`DifferentiableInput` is the surrogate's :class:`faceemd.data.transforms.FaceInput` (frame
warp or resize, channels, colour order, normalisation) written with torch ops, so that the
gradient reaches the pixels of the image as it is on disk.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceemd.data.transforms import FaceInput

__all__ = ["ATTACK_METHODS", "AttackSettings", "DifferentiableInput", "dodge", "random_start"]

ATTACK_METHODS = ("pgd", "mifgsm")


@dataclass(frozen=True)
class AttackSettings:
    """method: ``pgd`` or ``mifgsm``; eps_levels: the L-inf budget in 8-bit levels (8 = 8/255);
    steps: attack iterations; step_levels: the per-step move in levels; momentum: MI-FGSM's mu
    (unused by ``pgd``)."""

    method: str = "mifgsm"
    eps_levels: int = 8
    steps: int = 10
    step_levels: float = 2.0
    momentum: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ATTACK_METHODS:
            raise ValueError(f"attack method must be one of {ATTACK_METHODS}, got {self.method!r}")
        if int(self.eps_levels) != self.eps_levels or not 0 < self.eps_levels <= 255:
            raise ValueError(
                f"eps_levels must be a whole number of 8-bit levels in 1..255 (8 = 8/255), "
                f"got {self.eps_levels}"
            )
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if not self.step_levels > 0:
            raise ValueError(f"step_levels must be > 0, got {self.step_levels}")
        if not self.momentum >= 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")

    def recipe(self) -> dict:
        """What keys an adversarial set's folder (every field, as plain numbers)."""
        out = asdict(self)
        out["eps_levels"], out["steps"] = int(self.eps_levels), int(self.steps)
        out["step_levels"], out["momentum"] = float(self.step_levels), float(self.momentum)
        return out


class DifferentiableInput(nn.Module):
    """``FaceInput`` as torch ops: pixels ``(B, c, H, W)`` in levels 0..255 (c = 1 grey or 3
    RGB, as decoded) -> the network input ``(B, channels, h, w)``.

    The frame warp is a bilinear ``grid_sample`` with black outside (OpenCV's ``warpAffine``
    convention: pixel centres on integer coordinates); a plain resize is a bilinear
    ``interpolate`` (antialiased when shrinking). Both follow OpenCV's to within interpolation
    details: the surrogate's gradient needs the same geometry, not the same bits."""

    def __init__(self, face_input: FaceInput) -> None:
        super().__init__()
        self.face_input = face_input

    def forward(self, pixels: Tensor) -> Tensor:
        spec = self.face_input
        th, tw = spec.size
        h, w = pixels.shape[-2:]
        if spec.warp is not None:
            pixels = F.grid_sample(
                pixels, self._grid(pixels, h, w), mode="bilinear", padding_mode="zeros",
                align_corners=False,
            )  # fmt: skip
        elif (h, w) != (th, tw):
            pixels = F.interpolate(
                pixels, size=(th, tw), mode="bilinear", align_corners=False, antialias=th < h
            )
        c = pixels.shape[1]
        if spec.channels == 1 and c == 3:  # cv2's RGB -> gray weights
            coeffs = pixels.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            pixels = (pixels * coeffs).sum(1, keepdim=True)
        elif spec.channels == 3 and c == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif spec.channels == 3 and spec.colour == "bgr":
            pixels = pixels.flip(1)
        return spec.normalise(pixels)

    def _grid(self, pixels: Tensor, h: int, w: int) -> Tensor:
        """Sampling grid ``(B, th, tw, 2)``: each input pixel's source position, normalised."""
        th, tw = self.face_input.size
        m = np.vstack([np.asarray(self.face_input.warp, np.float64), [0.0, 0.0, 1.0]])
        inv = torch.as_tensor(np.linalg.inv(m)[:2], dtype=pixels.dtype, device=pixels.device)
        v, u = torch.meshgrid(
            torch.arange(th, dtype=pixels.dtype, device=pixels.device),
            torch.arange(tw, dtype=pixels.dtype, device=pixels.device),
            indexing="ij",
        )
        src = torch.stack([u, v, torch.ones_like(u)], -1) @ inv.T  # (th, tw, 2) in pixels
        size = pixels.new_tensor([w, h])
        grid = (2 * src + 1) / size - 1
        return grid.unsqueeze(0).expand(pixels.shape[0], -1, -1, -1)


def random_start(shape: tuple[int, ...], seed: int, key: str) -> Tensor:
    """The random start of one image: uniform in [-1, 1], drawn from ``(seed, crc32(key))``
    (``key``: the image's relative path), so it does not depend on the batch or the order."""
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
    return torch.from_numpy(rng.uniform(-1.0, 1.0, shape).astype(np.float32))


def _unit_embedding(model: nn.Module, prepare: nn.Module, pixels: Tensor) -> Tensor:
    return F.normalize(model(prepare(pixels)).embedding.float(), dim=1)


def dodge(
    model: nn.Module,
    prepare: nn.Module,
    images: Tensor,
    start: Tensor,
    settings: AttackSettings,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Attack ``images`` (uint8 ``(B, c, H, W)``) against ``model`` (eval mode, differentiable;
    its output's ``embedding`` is used) through ``prepare`` (:class:`DifferentiableInput`),
    from the random start ``start`` (same shape, values in [-1, 1], in units of the budget).

    Returns the adversarial images (uint8, same shape, within ``eps_levels`` of the originals
    pixel by pixel) and per image ``(B,)``: ``cos_after`` (the surrogate's cosine between the rounded adversarial and the clean embedding),
    ``linf`` and ``l2`` (the perturbation's norms in levels)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be uint8 (B, c, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if model.training:
        raise ValueError("the surrogate must be in eval mode (no batch statistics)")
    x0 = images.to(next(model.parameters()).dtype)
    eps, step = float(settings.eps_levels), float(settings.step_levels)
    with torch.no_grad():
        target = _unit_embedding(model, prepare, x0)
    if start.shape != images.shape or not bool((start.abs() <= 1).all()):
        raise ValueError(f"start must be {tuple(images.shape)} with values in [-1, 1]")
    x = (x0 + eps * start.to(x0.dtype)).clamp_(0, 255)
    g = torch.zeros_like(x0)
    for _ in range(int(settings.steps)):
        x.requires_grad_(True)
        cos = (_unit_embedding(model, prepare, x) * target).sum()
        (grad,) = torch.autograd.grad(cos, x)
        with torch.no_grad():
            if settings.method == "mifgsm":
                scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                g = settings.momentum * g + grad / scale
                direction = g.sign()
            else:
                direction = grad.sign()
            x = x.detach() - step * direction
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp_(0, 255)
    adv = x.detach().round().clamp_(0, 255)
    with torch.no_grad():
        after = (_unit_embedding(model, prepare, adv) * target).sum(1)
    delta = (adv - x0).flatten(1)
    stats = {
        "cos_after": after,
        "linf": delta.abs().amax(1),
        "l2": delta.norm(dim=1),
    }
    return adv.to(torch.uint8), stats
