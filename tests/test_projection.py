"""Stage 2 in a compressed patch space (rerank.patch_dim) against the full dimension."""

import pytest
import torch
from torch.testing import assert_close

from faceemd.emd import FeatureBank, RerankConfig, stage1_topk, stage2_scores
from faceemd.emd.projection import fit_patch_basis, reduced_banks
from faceemd.emd.stage2 import refined_columns
from faceemd.storage.feature_cache import FeatureCache
from faceemd.storage.patch_space import PatchSpaceStore


def _banks(span: int | None, c: int = 16, seed: int = 0):
    """Query and gallery banks whose patches and (C-sized, as CC needs) embeddings lie in a
    ``span``-dimensional subspace of R^c (None: everywhere)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(span or c, c, generator=g)

    def bank(n):
        patches = torch.randn(n, 9, span or c, generator=g) @ mix
        embeddings = torch.randn(n, span or c, generator=g) @ mix
        return FeatureBank(embeddings, patches, torch.arange(n) % 4)

    return bank(6), bank(20)


@pytest.mark.parametrize("weighting", ["uniform", "apc", "apc_dot", "cc", "cc_dot", "sc", "sc_eq8"])
def test_a_basis_spanning_the_patches_reproduces_the_full_dimension_scores(weighting):
    """Patches and embeddings in a 5-dimensional subspace of R^16, patch_dim 5: the projection
    keeps every dot product, so the stage-2 scores equal the full dimension's to float32 rounding
    (stated tolerance 1e-5; Sinkhorn converged to tol 1e-6)."""
    query, gallery = _banks(span=5)
    cfg = RerankConfig(top_k=5, weighting=weighting, tol=1e-6, max_iter=5000, refine_top=None)
    _, cand = stage1_topk(query.embeddings, gallery.embeddings, 5)
    full = stage2_scores(query, gallery, cand, cfg)
    q5, g5 = reduced_banks(query, gallery, 5, False)
    assert q5.patches.shape[-1] == g5.patches.shape[-1] == 5
    assert_close(stage2_scores(q5, g5, cand, cfg), full, atol=1e-5, rtol=0)


def test_a_smaller_space_changes_the_scores():
    query, gallery = _banks(span=None)
    cfg = RerankConfig(top_k=5, refine_top=None)  # every candidate solved in the small space
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
    # refine_top solving all top_k candidates ranks nothing in the small space: none is fitted
    assert RerankConfig(top_k=20, patch_dim=6, refine_top=20).screen_dim is None
    assert RerankConfig(top_k=21, patch_dim=6, refine_top=20).screen_dim == 6
    assert RerankConfig(top_k=5, patch_dim=6, refine_top=None).screen_dim == 6
    # a dimension of at least the channels keeps the banks as they are (one setting, any width)
    for dim in (16, 64):
        same_query, same_gallery = reduced_banks(query, gallery, dim, False)
        assert same_query is query and same_gallery is gallery


def test_refined_columns_alternate_the_emd_and_cosine_orders():
    """Hand-worked: screened EMD [0.1, 0.9, 0.5, 0.3] orders the columns 1, 2, 3, 0; the
    cosine order is 0, 1, 2, 3. Alternating (EMD first), each once: 1, 0, 2, 3."""
    screened = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert refined_columns(screened, 3).tolist() == [[1, 0, 2]]
    assert refined_columns(screened, 10).tolist() == [[1, 0, 2, 3]]
    # the EMD's best is also the cosine's best: the next of each order follow
    assert refined_columns(torch.tensor([[0.9, 0.1, 0.5, 0.3]]), 3).tolist() == [[0, 2, 1]]


@pytest.mark.parametrize("patch_dim", [3, None])
def test_refine_top_solves_the_chosen_candidates_at_full_dimension(patch_dim):
    """refine_top 4 of 8 candidates, screened in 3 of 16 dimensions or in all 16: the chosen
    candidates' scores equal the full-dimension Sinkhorn scores (brute force over all
    candidates, tolerance 1e-6); the others are the relaxed EMD's shifted by the mean
    solved - screened difference of the chosen."""
    query, gallery = _banks(span=None)
    _, cand = stage1_topk(query.embeddings, gallery.embeddings, 8)
    cfg = RerankConfig(top_k=8, patch_dim=patch_dim, refine_top=4)
    full = stage2_scores(query, gallery, cand, RerankConfig(top_k=8, refine_top=None))
    q3, g3 = reduced_banks(query, gallery, patch_dim, False)
    screened = stage2_scores(q3, g3, cand, RerankConfig(top_k=8, solver="relaxed", refine_top=None))
    refined = stage2_scores(q3, g3, cand, cfg)
    cols = refined_columns(screened, 4)
    assert_close(refined.gather(1, cols), full.gather(1, cols), atol=1e-6, rtol=0)
    offset = (full.gather(1, cols) - screened.gather(1, cols)).mean(1, keepdim=True)
    rest = torch.ones_like(refined, dtype=torch.bool).scatter_(1, cols, False)
    assert_close(refined[rest], (screened + offset)[rest], atol=1e-6, rtol=0)
    # every candidate refined (or more asked for than there are): the full dimension's scores
    for m in (8, 50):
        every = RerankConfig(top_k=8, patch_dim=patch_dim, refine_top=m)
        assert_close(stage2_scores(q3, g3, cand, every), full, atol=1e-6, rtol=0)


def test_reduced_grids_are_cached_and_rebuilt_when_the_dimension_or_basis_changes(tmp_path):
    query, gallery = _banks(span=None)
    cache = FeatureCache(tmp_path)
    made = []

    def store(g_key="g"):
        return PatchSpaceStore(cache, "q", g_key, None)

    def counting(s):  # a store that records what it had to make
        gallery_space, query_grids = s.gallery, s.query
        s.gallery = lambda d, make: gallery_space(d, lambda: made.append("g") or make())
        s.query = lambda b, make: query_grids(b, lambda: made.append("q") or make())
        return s

    q6, g6 = reduced_banks(query, gallery, 6, False, counting(store()))
    assert made == ["g", "q"]
    plain_q, plain_g = reduced_banks(query, gallery, 6, False)
    assert torch.equal(q6.patches, plain_q.patches) and torch.equal(g6.patches, plain_g.patches)
    again_q, again_g = reduced_banks(query, gallery, 6, False, counting(store()))
    assert made == ["g", "q"]  # both read back
    assert torch.equal(again_q.patches, q6.patches) and torch.equal(again_g.patches, g6.patches)
    reduced_banks(query, gallery, 4, False, counting(store()))
    assert made == ["g", "q", "g", "q"]  # another dimension: another basis, other query grids
    # another gallery (its features re-extracted): a new basis, so the query's grids are remade
    _, other_gallery = _banks(span=None, seed=5)
    reduced_banks(query, other_gallery, 6, False, counting(store("g2")))
    assert made[4:] == ["g", "q"]


def test_evaluate_with_patch_dim_reads_the_reduced_grids_back(compose_evaluate, tmp_path):
    """A second job with the same patch_dim takes the basis and grids from the cache and gets
    the first job's metrics; the first job's match a job without the cache."""
    from faceemd.jobs.evaluate import run_evaluation

    base = [f"paths.log_dir={tmp_path}", "data.query.num_identities=6", "rerank.top_k=5",
            "backbone=tiny_cnn", "logger=none", "trainer.enable_progress_bar=false",
            "rerank.patch_dim=8", "rerank.refine_top=2"]  # fmt: skip
    first = run_evaluation(compose_evaluate(base))
    stored = {p.name for p in (tmp_path / "cache").rglob("*.safetensors")}
    second = run_evaluation(compose_evaluate(base))
    off = run_evaluation(compose_evaluate([*base, "cache=off"]))
    assert {p.name for p in (tmp_path / "cache").rglob("*.safetensors")} == stored
    for key in ("stage1/p_at_1", "stage2/p_at_1", "stage2/map_at_r"):
        assert first[key] == second[key] == off[key]
