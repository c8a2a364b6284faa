"""Stage 2 in a compressed patch space (rerank.patch_dim) against the full dimension."""

import pytest
import torch
from torch.testing import assert_close

from faceemd.emd import FeatureBank, RerankConfig, stage1_topk, stage2_scores
from faceemd.emd.projection import fit_patch_basis, reduced_banks


def _banks(span: int | None, c: int = 16, seed: int = 0):
    """Query and gallery banks whose patches lie in a ``span``-dimensional subspace of R^c
    (None: everywhere)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(span or c, c, generator=g)

    def bank(n):
        patches = torch.randn(n, 9, span or c, generator=g) @ mix
        return FeatureBank(torch.randn(n, 8, generator=g), patches, torch.arange(n) % 4)

    return bank(6), bank(20)


@pytest.mark.parametrize("weighting", ["uniform", "apc", "apc_dot", "sc", "sc_eq8"])
def test_a_basis_spanning_the_patches_reproduces_the_full_dimension_scores(weighting):
    """Patches in a 5-dimensional subspace of R^16, patch_dim 5: the projection keeps every
    dot product, so the stage-2 scores equal the full dimension's to float32 rounding
    (stated tolerance 1e-5; Sinkhorn converged to tol 1e-6)."""
    query, gallery = _banks(span=5)
    cfg = RerankConfig(top_k=5, weighting=weighting, tol=1e-6, max_iter=5000)
    _, cand = stage1_topk(query.embeddings, gallery.embeddings, 5)
    full = stage2_scores(query, gallery, cand, cfg)
    q5, g5 = reduced_banks(query, gallery, 5, False)
    assert q5.patches.shape[-1] == g5.patches.shape[-1] == 5
    assert_close(stage2_scores(q5, g5, cand, cfg), full, atol=1e-5, rtol=0)


def test_a_smaller_space_changes_the_scores():
    query, gallery = _banks(span=None)
    cfg = RerankConfig(top_k=5)
    _, cand = stage1_topk(query.embeddings, gallery.embeddings, 5)
    q3, g3 = reduced_banks(query, gallery, 3, False)
    assert float((stage2_scores(q3, g3, cand, cfg) - stage2_scores(query, gallery, cand, cfg))
                 .abs().max()) > 1e-3  # fmt: skip


def test_the_basis_is_orthonormal_deterministic_and_fitted_on_the_gallery_alone():
    query, gallery = _banks(span=None)
    basis = fit_patch_basis(gallery.patches, 6, max_patches=100, seed=3)
    assert basis.shape == (16, 6)
    assert_close(basis.T @ basis, torch.eye(6), atol=1e-5, rtol=0)
    assert torch.equal(basis, fit_patch_basis(gallery.patches, 6, max_patches=100, seed=3))
    other_query, _ = _banks(span=None, seed=9)
    _, g_a = reduced_banks(query, gallery, 6, False)
    _, g_b = reduced_banks(other_query, gallery, 6, False)
    assert torch.equal(g_a.patches, g_b.patches)  # a query never changes the basis
    with pytest.raises(ValueError, match="patch_dim must be in 1..16"):
        fit_patch_basis(gallery.patches, 17)
    with pytest.raises(ValueError, match="patch_dim must be >= 1"):
        RerankConfig(patch_dim=0)
