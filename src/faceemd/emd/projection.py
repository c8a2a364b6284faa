"""Stage 2 in a compressed patch space (``rerank.patch_dim``): patches projected onto the top
``d`` principal directions of the gallery's own patches.

The patch-cosine product of stage 2 costs ``R * R' * C`` per problem; in ``d < C`` dimensions
it costs ``d / C`` of that. The basis is fitted on gallery patches only (never on queries, so
a query cannot change it): up to ``max_patches`` unit-normalised patches drawn with a seeded
generator, their top-``d`` right singular vectors (an orthonormal ``(C, d)`` matrix). Query and
gallery patches are replaced by their coordinates in it (an orthogonal projection: where the
basis spans the patches, every dot product, cosine and mean is kept exactly), so the cosine
ground distance, the patch means of APC and the sums of SC are those of the projected
patches. Embeddings (stage 1, CC) are unchanged. ``patch_dim=None`` keeps the full dimension.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from faceemd.emd.bank import FeatureBank

__all__ = ["fit_patch_basis", "project_bank", "reduced_banks"]


def fit_patch_basis(patches: Tensor, dim: int, max_patches: int = 100_000, seed: int = 0) -> Tensor:
    """Orthonormal ``(C, dim)`` basis of the top principal directions (uncentred: the cosine
    geometry of unit patches) of ``patches (N, R, C)``; deterministic for ``seed``."""
    n, r, c = patches.shape
    if not 1 <= dim <= c:
        raise ValueError(f"rerank.patch_dim must be in 1..{c} (the patches' channels), got {dim}")
    total = n * r
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(total, generator=g)[:max_patches] if total > max_patches else None
    flat = patches.reshape(total, c)
    sample = flat[rows] if rows is not None else flat
    sample = F.normalize(sample.float(), dim=-1)
    _, _, vh = torch.linalg.svd(sample, full_matrices=False)
    basis = vh[:dim].T.contiguous()
    # fix each direction's sign (an SVD's are arbitrary): the largest entry positive
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return basis * sign


def project_bank(bank: FeatureBank, basis: Tensor) -> FeatureBank:
    """``bank`` with its patches ``(N, R, C)`` as coordinates ``(N, R, d)`` in ``basis (C, d)``;
    patch summaries and int8 codes are dropped (they are of the old patches)."""
    patches = bank.patches.float() @ basis
    return dataclasses.replace(bank, patches=patches, summaries=None, quantized=None)


def reduced_banks(
    query: FeatureBank, gallery: FeatureBank, patch_dim: int | None, same_images: bool
) -> tuple[FeatureBank, FeatureBank]:
    """The query and gallery banks in the ``patch_dim`` space fitted on the gallery (unchanged
    for ``None``); one bank when the queries are the gallery."""
    if patch_dim is None:
        return query, gallery
    basis = fit_patch_basis(gallery.patches, int(patch_dim))
    gallery = project_bank(gallery, basis)
    return (gallery if same_images else project_bank(query, basis)), gallery
