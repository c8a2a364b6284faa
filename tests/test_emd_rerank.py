"""Two-stage ranking: stage-1 against brute force, alpha=0, k edge cases, a planted case."""

import pytest
import torch

from faceemd.emd import FeatureBank, RerankConfig, stage1_topk, two_stage_rank


def _bank(n, d=16, r=4, c=8, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    return FeatureBank(
        embeddings=torch.randn(n, d, generator=g),
        patches=torch.randn(n, r, c, generator=g),
        labels=torch.arange(n) if labels is None else labels,
    )


def test_stage1_chunked_matches_brute_force_with_exclusion():
    q, g = _bank(13, seed=1), _bank(50, seed=2)
    exclude = torch.full((13,), -1)
    exclude[:5] = torch.arange(5) * 3
    s, i = stage1_topk(q.embeddings, g.embeddings, 7, exclude, chunk_size=6, query_batch=4)
    full = (
        torch.nn.functional.normalize(q.embeddings, dim=1)
        @ torch.nn.functional.normalize(g.embeddings, dim=1).T
    )
    for row in range(13):
        if exclude[row] >= 0:
            full[row, exclude[row]] = float("-inf")
    ref = full.topk(7, dim=1)
    torch.testing.assert_close(s, ref.values)
    assert torch.equal(i, ref.indices)
    assert not bool((i[:5] == exclude[:5, None]).any())


def test_alpha_zero_reproduces_stage1_and_k_edge_cases():
    q, g = _bank(9, seed=3), _bank(30, seed=4)
    for cfg in (RerankConfig(top_k=10, alpha=0.0), RerankConfig(top_k=0), RerankConfig(top_k=1)):
        rk = two_stage_rank(q, g, cfg, depth=12)
        assert torch.equal(rk.stage1_index, rk.stage2_index)
        assert rk.stage2_index.shape == (9, 12)


def test_alpha_zero_blend_keeps_the_cosine_order_whatever_the_emd():
    """The invariant on the blend itself (two_stage_rank skips stage 2 at alpha = 0, so the
    test above never reaches it): any EMD similarities, alpha = 0 -> stage-1 order and
    scores; alpha = 1 -> the EMD order."""
    from faceemd.emd import blend_stage2

    q, g = _bank(9, seed=3), _bank(30, seed=4)
    s1, i1 = stage1_topk(q.embeddings, g.embeddings, 12)
    emd = torch.rand(9, 10, generator=torch.Generator().manual_seed(7))
    score, index = blend_stage2(s1, i1, emd, alpha=0.0)
    assert torch.equal(index, i1)
    torch.testing.assert_close(score, s1)
    _, index = blend_stage2(s1, i1, emd, alpha=1.0)
    assert torch.equal(index[:, :10], i1[:, :10].gather(1, emd.argsort(1, descending=True)))
    assert torch.equal(index[:, 10:], i1[:, 10:])


def test_rest_of_ranking_keeps_stage1_order():
    q, g = _bank(5, seed=5), _bank(40, seed=6)
    rk = two_stage_rank(q, g, RerankConfig(top_k=8, alpha=1.0, weighting="uniform"), depth=20)
    assert torch.equal(rk.stage2_index[:, 8:], rk.stage1_index[:, 8:])
    assert torch.equal(rk.stage2_index[:, :8].sort(1).values, rk.stage1_index[:, :8].sort(1).values)


def test_planted_case_stage2_moves_true_match_to_rank_1():
    # The query's embedding is closest to a distractor (label 1), but its patches equal those of
    # the true match (label 0) up to a permutation of patch positions; EMD with uniform weights
    # is permutation-invariant, so stage 2 must put the true match first.
    g = torch.Generator().manual_seed(7)
    patches = torch.randn(4, 9, 32, generator=g)
    emb = torch.eye(4, 8)
    query_emb = (emb[1] * 0.9 + emb[0] * 0.4).unsqueeze(0)
    query_patches = patches[0][torch.randperm(9, generator=g)].unsqueeze(0)
    gallery = FeatureBank(emb, patches, torch.tensor([0, 1, 2, 3]))
    query = FeatureBank(query_emb, query_patches, torch.tensor([0]))
    rk = two_stage_rank(query, gallery, RerankConfig(top_k=4, alpha=0.7, weighting="uniform"))
    assert int(rk.stage1_index[0, 0]) == 1
    assert int(rk.stage2_index[0, 0]) == 0


def test_sum_blend_and_exact_solver_agree_on_planted_case():
    g = torch.Generator().manual_seed(8)
    patches = torch.randn(5, 4, 16, generator=g)
    emb = torch.randn(5, 8, generator=g)
    q = FeatureBank(emb[:2] + 0.1, patches[:2] + 0.05, torch.tensor([0, 1]))
    gal = FeatureBank(emb, patches, torch.arange(5))
    a = two_stage_rank(q, gal, RerankConfig(top_k=5, blend="sum", solver="exact"))
    b = two_stage_rank(q, gal, RerankConfig(top_k=5, blend="sum", eps=0.01))
    assert torch.equal(a.stage2_index[:, 0], b.stage2_index[:, 0])


def test_bad_input_messages():
    q, g = _bank(3), _bank(5)
    with pytest.raises(ValueError, match="exceeds"):
        two_stage_rank(q, g, RerankConfig(top_k=6))
    with pytest.raises(ValueError, match="alpha must be in"):
        RerankConfig(alpha=1.5)
    with pytest.raises(ValueError, match="unknown weighting"):
        RerankConfig(weighting="xyz")
    bad = _bank(3)
    bad.embeddings[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf values in 1 row\(s\): 1"):
        two_stage_rank(bad, g, RerankConfig(top_k=2))
    with pytest.raises(ValueError, match="patches must be"):
        FeatureBank(torch.zeros(3, 4), torch.zeros(2, 4, 4), torch.zeros(3))
    other = FeatureBank(g.embeddings, torch.randn(5, 9, 8), g.labels)
    with pytest.raises(ValueError, match="extract both with one backbone"):
        two_stage_rank(q, other, RerankConfig(top_k=2))
    with pytest.raises(ValueError, match="equal D"):
        stage1_topk(torch.zeros(2, 3), torch.zeros(4, 5), 1)


def test_row_gather_matches_indexing_for_any_row_size():
    from faceemd.memory import take_rows

    for shape, dtype in [
        ((9, 4, 8), torch.int8),
        ((9, 3, 5), torch.float32),
        ((9, 2, 2), torch.float16),
    ]:
        rows = (torch.rand(shape) * 100).to(dtype)
        index = torch.tensor([3, 0, 7, 3])
        out = torch.empty((4, *shape[1:]), dtype=dtype)
        assert torch.equal(take_rows(rows, index, out), rows[index])
        assert torch.equal(take_rows(rows[1:], index, out), rows[1:][index])  # offset storage


def test_memory_mapped_gallery_pages_are_released_and_scores_unchanged(tmp_path):
    import numpy as np

    from faceemd.emd import stage2_scores
    from faceemd.memory import shared_file_mapping

    g = torch.Generator().manual_seed(5)
    patches = torch.randn(40, 16, 32, generator=g).relu()
    arr = np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.float32, tuple(patches.shape))
    arr[:] = patches.numpy()
    arr.flush()
    mapped = torch.from_numpy(np.load(tmp_path / "p.npy", mmap_mode="r+"))
    assert shared_file_mapping(mapped) is not None
    assert shared_file_mapping(patches) is None  # anonymous memory is never released
    emb = torch.randn(40, 8, generator=g)
    query = FeatureBank(emb[:6], patches[:6] + 0.1, torch.arange(6))
    _, cand = stage1_topk(query.embeddings, emb, 10)
    cfg = RerankConfig(top_k=10, query_batch=2)
    in_memory = stage2_scores(query, FeatureBank(emb, patches, torch.arange(40)), cand, cfg)
    from_map = stage2_scores(query, FeatureBank(emb, mapped, torch.arange(40)), cand, cfg)
    assert torch.equal(from_map, in_memory)
    assert torch.equal(mapped, patches)  # released pages read back from the file unchanged


def test_unconverged_sinkhorn_problems_are_reported_once_with_statistics():
    """max_iter too small for tol: one warning with the count, statistics in the ranking and
    in the job's metrics (eval/solver_*)."""
    from faceemd.ranking import evaluate_features

    g = torch.Generator().manual_seed(0)
    q = FeatureBank(torch.randn(6, 8, generator=g), torch.randn(6, 9, 8, generator=g).relu(),
                    torch.arange(6) % 3)  # fmt: skip
    cfg = RerankConfig(top_k=4, max_iter=2, check_every=1, tol=1e-9, eps=0.01, eps_start=None)
    with pytest.warns(RuntimeWarning, match=r"24 of 24 Sinkhorn problems stopped at max_iter=2"):
        results, ranking = evaluate_features(q, q, cfg, True)
    assert ranking.solver_stats == {"problems": 24, "mean_iterations": 2.0, "max_iterations": 2,
                                    "unconverged": 24}  # fmt: skip
    # eps-scaling 0.05 -> 0.01 runs 3 stages (0.04, 0.02, 0.01), max_iter each
    scaled = RerankConfig(top_k=4, max_iter=2, check_every=1, tol=1e-9, eps=0.01, eps_start=0.05)
    with pytest.warns(RuntimeWarning, match="24 of 24"):
        _, ranking = evaluate_features(q, q, scaled, True)
    assert ranking.solver_stats["mean_iterations"] == 6.0
    assert results["eval/solver_unconverged"] == 24
    converged = RerankConfig(top_k=4, tol=1e-3)
    results, _ = evaluate_features(q, q, converged, True)
    assert results["eval/solver_unconverged"] == 0
    assert 0 < results["eval/solver_mean_iterations"] <= results["eval/solver_max_iterations"]


def test_scores_for_several_weightings_equal_one_pass_per_weighting():
    """One gathering and product for four weightings (two with query probes in the product,
    one reading the cosines, one landmark densities) gives each weighting's scores as its
    own stage-2 pass does, to float32 rounding of the padded product (1e-5)."""
    from faceemd.emd import stage2_scores, stage2_scores_for

    q, g = _bank(6, d=8, r=9, c=8, seed=3), _bank(30, d=8, r=9, c=8, seed=4)
    gen = torch.Generator().manual_seed(5)
    q.lmk = torch.softmax(torch.randn(6, 9, generator=gen), 1)
    g.lmk = torch.softmax(torch.randn(30, 9, generator=gen), 1)
    _, cand = stage1_topk(q.embeddings, g.embeddings, 7)
    weightings = ["uniform", "apc", "cc", "sc", "lmk"]  # cc: D = C = 8, its own probe row
    settings = {"eps": 0.1, "eps_start": None}  # random patches: converged within max_iter
    together = stage2_scores_for(q, g, cand, RerankConfig(weighting="sc", **settings), weightings)
    assert list(together) == weightings
    for w in weightings:
        alone = stage2_scores(q, g, cand, RerankConfig(weighting=w, **settings))
        torch.testing.assert_close(together[w], alone, atol=1e-5, rtol=0)
    # the weightings differ on these features (else the check above would prove little)
    assert (together["uniform"] - together["sc"]).abs().max() > 1e-3


def test_stage1_key_reuses_the_last_ranking_only_for_the_same_key_and_settings(monkeypatch):
    """A sweep's jobs pass the same stage1_key: stage 1 runs once; another key, depth or
    exclusion runs it again. The reused ranking equals a fresh one."""
    import faceemd.emd.rerank as rerank_module

    calls = []
    real = rerank_module.stage1_topk

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(rerank_module, "stage1_topk", counted)
    monkeypatch.setattr(rerank_module, "_STAGE1", {})
    q, g = _bank(5, d=8, r=4, c=8, seed=1), _bank(20, d=8, r=4, c=8, seed=2)
    cfg = RerankConfig(top_k=3, eps=0.1, eps_start=None)
    fresh = two_stage_rank(q, g, cfg, depth=6)
    first = two_stage_rank(q, g, cfg, depth=6, stage1_key="a")
    again = two_stage_rank(q, g, cfg, depth=6, stage1_key="a")
    assert len(calls) == 2  # the keyless call and the first keyed one
    for ranking in (first, again):
        torch.testing.assert_close(ranking.stage1_index, fresh.stage1_index, rtol=0, atol=0)
        torch.testing.assert_close(ranking.stage2_index, fresh.stage2_index, rtol=0, atol=0)
    two_stage_rank(q, g, cfg, depth=7, stage1_key="a")
    two_stage_rank(q, g, cfg, depth=7, stage1_key="b")
    two_stage_rank(q, q, cfg, exclude=torch.arange(5), depth=3, stage1_key="b")
    assert calls == [6, 6, 7, 7, 3]


def test_a_grid_of_few_patches_is_warned_about():
    from faceemd.emd import FeatureBank, RerankConfig, two_stage_rank

    g = torch.Generator().manual_seed(0)
    bank = FeatureBank(torch.randn(6, 8, generator=g), torch.rand(6, 4, 5, generator=g),
                       torch.arange(6) // 2)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="only 4 patches per face"):
        two_stage_rank(bank, bank, RerankConfig(top_k=3, weighting="uniform"))
