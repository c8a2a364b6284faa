"""Approximate stage 1 (faiss IVF) against brute-force cosine top-k."""

from __future__ import annotations

import pytest
import torch

from faceemd.emd import FeatureBank, RerankConfig, two_stage_rank

faiss = pytest.importorskip("faiss")

from faceemd.emd.ann import ivf_topk  # noqa: E402


def _data(g=3000, q=40, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(50, d, generator=gen)
    gallery = centres[torch.arange(g) % 50] + 0.5 * torch.randn(g, d, generator=gen)
    query = gallery[:q] + 0.3 * torch.randn(q, d, generator=gen)
    return query, gallery


def _brute(query, gallery, k, exclude=None):
    s = (
        torch.nn.functional.normalize(query, dim=1)
        @ torch.nn.functional.normalize(gallery, dim=1).T
    )
    if exclude is not None:
        s[torch.arange(len(query)), exclude] = float("-inf")
    return torch.topk(s, k, dim=1)


def test_probing_every_cell_is_exhaustive():
    query, gallery = _data()
    top = _brute(query, gallery, 20)
    scores, index = ivf_topk(query, gallery, 20, nlist=16, nprobe=16)
    assert torch.equal(index, top.indices)
    torch.testing.assert_close(scores, top.values, atol=1e-5, rtol=0)


def test_exclude_drops_the_own_row():
    query, gallery = _data()
    own = torch.arange(len(query))
    top = _brute(query, gallery, 20, own)
    scores, index = ivf_topk(query, gallery, 20, exclude=own, nlist=16, nprobe=16)
    assert not bool((index == own[:, None]).any())
    assert torch.equal(index, top.indices)


def test_few_probes_return_true_cosines_and_high_recall():
    query, gallery = _data(g=6000)
    top = _brute(query, gallery, 10)
    scores, index = ivf_topk(query, gallery, 10, nprobe=4)
    true = (
        torch.nn.functional.normalize(query, dim=1)[:, None]
        * torch.nn.functional.normalize(gallery, dim=1)[index]
    ).sum(-1)
    torch.testing.assert_close(scores, true, atol=1e-5, rtol=0)  # scores are exact cosines
    recall = sum(
        len(set(a.tolist()) & set(b.tolist())) for a, b in zip(index, top.indices, strict=True)
    )
    assert recall / top.indices.numel() > 0.9  # clustered data, 4 of 77 cells probed


def test_two_stage_rank_with_the_ivf_index_matches_exact_when_exhaustive():
    query, gallery = _data(g=1200, d=16)
    gen = torch.Generator().manual_seed(1)
    gp = torch.rand(len(gallery), 4, 8, generator=gen)
    qp = gp[: len(query)] + 0.1 * torch.rand(len(query), 4, 8, generator=gen)
    labels = torch.arange(len(gallery)) % 50
    qb, gb = FeatureBank(query, qp, labels[: len(query)]), FeatureBank(gallery, gp, labels)
    exact = two_stage_rank(qb, gb, RerankConfig(top_k=10))
    approx = two_stage_rank(qb, gb, RerankConfig(top_k=10, stage1_index="ivf", ivf_nprobe=10_000))
    assert torch.equal(approx.stage1_index, exact.stage1_index)
    assert torch.equal(approx.stage2_index, exact.stage2_index)
