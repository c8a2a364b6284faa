"""Classification heads with angular/cosine margins for face-recognition training.

Each head maps embeddings ``(B, D)`` and labels ``(B,)`` to logits ``(B, num_classes)`` for a
cross-entropy (or focal) loss; at inference the backbone's embedding is used alone.
- :class:`ArcFaceHead` (Deng et al. 2019): ``s * cos(theta_y + m)`` for the true class, with the
  usual fallback ``cos(theta) - m * sin(m)`` once ``theta + m`` passes pi (or, with
  ``easy_margin``, no margin where ``cos(theta) < 0``).
- :class:`CosFaceHead` (Wang et al. 2018): ``s * (cos(theta_y) - m)``.
- :class:`SphereFaceHead` (Liu et al. 2017, A-Softmax): ``||x|| * psi(theta_y)`` with
  ``psi(theta) = (-1)^k cos(m theta) - 2k`` on ``[k pi / m, (k + 1) pi / m]``, blended with
  ``cos`` by ``lambda`` that anneals from ``base`` to ``lambda_min`` as in the original code.
- :class:`SoftmaxHead`: a plain linear classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ArcFaceHead", "CosFaceHead", "SoftmaxHead", "SphereFaceHead", "focal_loss"]


class _CosineHead(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x.float()), F.normalize(self.weight.float())).clamp(-1, 1)


class ArcFaceHead(_CosineHead):
    """Additive angular margin; s=30, m=0.5 as the public ArcFace recipe."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 30.0,
        m: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_dim, num_classes)
        self.s, self.m, self.easy_margin = s, m, easy_margin
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(x)
        sin = (1.0 - cos.pow(2)).clamp_min(0).sqrt()
        phi = cos * math.cos(self.m) - sin * math.sin(self.m)
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > self.th, phi, cos - self.mm)
        one_hot = F.one_hot(labels, cos.shape[1]).bool()
        return self.s * torch.where(one_hot, phi, cos)


class CosFaceHead(_CosineHead):
    """Additive cosine margin; s=30, m=0.35."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 30.0, m: float = 0.35):
        super().__init__(embedding_dim, num_classes)
        self.s, self.m = s, m

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(x)
        return self.s * (cos - self.m * F.one_hot(labels, cos.shape[1]).to(cos.dtype))


class SphereFaceHead(_CosineHead):
    """Multiplicative angular margin m (integer, 4 in the paper) with lambda annealing:
    ``lambda = max(lambda_min, base * (1 + gamma * step) ** -power)``; target logit
    ``||x|| * (lambda * cos + psi) / (1 + lambda)``."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__(embedding_dim, num_classes)
        self.m, self.base, self.gamma, self.power, self.lambda_min = (
            m,
            base,
            gamma,
            power,
            lambda_min,
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def current_lambda(self) -> float:
        return max(self.lambda_min, self.base * (1 + self.gamma * float(self.step)) ** -self.power)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(x)
        theta = cos.acos()
        k = (self.m * theta / math.pi).floor()
        sign = 1.0 - 2.0 * (k % 2)
        psi = sign * torch.cos(self.m * theta) - 2.0 * k
        lam = self.current_lambda()
        if self.training:
            self.step += 1
        target = (lam * cos + psi) / (1.0 + lam)
        one_hot = F.one_hot(labels, cos.shape[1]).bool()
        return x.float().norm(dim=1, keepdim=True) * torch.where(one_hot, target, cos)


class SoftmaxHead(nn.Module):
    """Plain linear classifier (no margin)."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.fc(x.float())


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss ``mean((1 - p_y)^gamma * -log p_y)`` (Lin et al. 2017)."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-(1 - logp.exp()).pow(gamma) * logp).mean()
