"""Stage 2 in a compressed patch space (``rerank.patch_dim``): patches projected onto the top
``d`` principal directions of the gallery's own patches.

The patch-cosine product of stage 2 costs ``R * R' * C`` per problem; in ``d < C`` dimensions
it costs ``d / C`` of that, and the grids stage 2 gathers (and a feature cache stores and maps)
shrink by ``C / d``. The basis is fitted on gallery patches only (never on queries, so a query
cannot change it, and no training set is needed for a user's own model): up to ``max_patches``
unit-normalised patches drawn with a seeded generator, their top-``d`` right singular vectors
(an orthonormal ``(C, d)`` matrix). Query and gallery patches are replaced by their
coordinates in it (an orthogonal projection, not renormalised: where the basis spans the
patches, every dot product, cosine and mean is kept exactly), so the cosine ground distance,
the patch means of APC and the sums of SC are those of the projected patches; CC correlates
them with the embeddings projected onto the same basis (where the embeddings have the
patches' size, which CC needs). Stage 1 keeps the embeddings as they are, and LMK its landmark
densities. ``patch_dim=None`` keeps the full dimension.

A projected bank keeps the full-dimension bank it came from (:attr:`FeatureBank.full`), which
``rerank.refine_top`` rescores its few best candidates with (:mod:`faceemd.emd.stage2`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from faceemd.emd.bank import FeatureBank, patch_summaries

__all__ = [
    "BASIS_SAMPLE",
    "fit_patch_basis",
    "project_bank",
    "project_patches",
    "reduced_banks",
]

BASIS_SAMPLE = 100_000  # gallery patches the basis is fitted on (at most)


def fit_patch_basis(
    patches: Tensor, dim: int, max_patches: int = BASIS_SAMPLE, seed: int = 0
) -> Tensor:
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


def project_patches(patches: Tensor, basis: Tensor, chunk_rows: int = 4096) -> Tensor:
    """Coordinates ``(N, R, d)`` float32 of ``patches (N, R, C)`` in ``basis (C, d)``, a block
    of rows at a time (a memory-mapped gallery is streamed, not copied whole)."""
    n, r, _ = patches.shape
    out = torch.empty(n, r, basis.shape[1])
    for i in range(0, n, chunk_rows):
        torch.matmul(patches[i : i + chunk_rows].float(), basis, out=out[i : i + chunk_rows])
    return out


def project_bank(
    bank: FeatureBank,
    basis: Tensor,
    patches: Tensor | None = None,
    summaries: tuple[Tensor, Tensor] | None = None,
) -> FeatureBank:
    """``bank`` with its patches ``(N, R, C)`` as coordinates ``(N, R, d)`` in ``basis (C, d)``
    (``patches``: those coordinates when already made, e.g. read from a cache; ``summaries``:
    their norms and means, else computed), and the full-dimension bank kept as ``full``; int8
    codes are dropped (they are of the full patches)."""
    reduced = project_patches(bank.patches, basis) if patches is None else patches
    summaries = summaries or patch_summaries(reduced)
    return dataclasses.replace(
        bank, patches=reduced, summaries=summaries, quantized=None, full=bank, basis=basis
    )


def reduced_banks(
    query: FeatureBank,
    gallery: FeatureBank,
    patch_dim: int | None,
    same_images: bool,
    store=None,
) -> tuple[FeatureBank, FeatureBank]:
    """The query and gallery banks in the ``patch_dim`` space fitted on the gallery (unchanged
    for ``None`` or a ``patch_dim`` of at least the patches' channels, so that one setting
    serves backbones of any width); one bank when the queries are the gallery.

    store: optional :class:`faceemd.storage.patch_space.PatchSpaceStore` (anything with its
    ``gallery(dim, make)`` and ``query(basis, make)``): the basis and reduced grids are taken
    from it, or made and stored in it."""
    if patch_dim is None or int(patch_dim) >= gallery.patches.shape[-1]:
        return query, gallery  # d >= C: a rotation of the full space, which changes nothing
    dim = int(patch_dim)

    def gallery_space() -> tuple[Tensor, Tensor]:
        basis = fit_patch_basis(gallery.patches, dim)
        return basis, project_patches(gallery.patches, basis)

    if store is None:
        basis, g_grids = gallery_space()
    else:
        basis, g_grids = store.gallery(dim, gallery_space)
    reduced_gallery = project_bank(gallery, basis, g_grids)
    if same_images:
        return reduced_gallery, reduced_gallery
    q_grids = None
    if store is not None:
        q_grids = store.query(basis, lambda: project_patches(query.patches, basis))
    return project_bank(query, basis, q_grids), reduced_gallery
