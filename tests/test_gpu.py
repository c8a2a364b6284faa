"""Stage 2 on a CUDA device agrees with the CPU engine (skipped where no GPU is present).

The CPU runs the fused numba Sinkhorn and ``torch._int_mm``; the GPU runs the batched torch
Sinkhorn and float products of the int8 codes, so these compare two implementations."""

import pytest
import torch
from torch.testing import assert_close

from faceemd.emd import (
    FeatureBank,
    RerankConfig,
    sinkhorn,
    stage1_topk,
    stage2_scores,
    two_stage_rank,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _banks(device, grid=8, channels=64, gallery=80, queries=16):
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(gallery, grid * grid, channels, generator=g).relu()
    noisy = patches[:queries] + 0.4 * torch.randn(queries, grid * grid, channels, generator=g)
    emb = torch.randn(gallery, 32, generator=g)
    q_emb = emb[:queries] + 0.5 * torch.randn(queries, 32, generator=g)
    labels = torch.arange(gallery)
    return (
        FeatureBank(q_emb.to(device), noisy.relu().to(device), labels[:queries].to(device)),
        FeatureBank(emb.to(device), patches.to(device), labels.to(device)),
    )


@pytest.mark.parametrize("cost_dtype", ["float32", "int8"])
def test_stage2_scores_match_cpu(cost_dtype):
    cfg = RerankConfig(top_k=20, tol=1e-6, max_iter=2000, cost_dtype=cost_dtype)
    scores = {}
    for device in ("cpu", "cuda"):
        query, gallery = _banks(device)
        _, cand = stage1_topk(query.embeddings, gallery.embeddings, 20)
        scores[device] = stage2_scores(query, gallery, cand, cfg)
        assert scores[device].device.type == device
    # Same problems, two solvers each stopped within tol = 1e-6 of the same fixed point.
    assert_close(scores["cuda"].cpu(), scores["cpu"], atol=1e-4, rtol=0)


def test_bfloat16_cost_close_to_float32_on_gpu():
    query, gallery = _banks("cuda")
    _, cand = stage1_topk(query.embeddings, gallery.embeddings, 20)
    ref = stage2_scores(query, gallery, cand, RerankConfig(top_k=20, tol=1e-6))
    low = stage2_scores(
        query, gallery, cand, RerankConfig(top_k=20, tol=1e-6, cost_dtype="bfloat16")
    )
    assert_close(low, ref, atol=2e-2, rtol=0)  # bf16 keeps 8 mantissa bits of each product


def test_log_domain_matches_cpu():
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(3, 5, 9, 9, generator=g) * 2
    u = torch.rand(3, 5, 9, generator=g)
    v = torch.rand(3, 5, 9, generator=g)
    u, v = u / u.sum(-1, keepdim=True), v / v.sum(-1, keepdim=True)
    cpu = sinkhorn(
        cost, u, v, eps=0.005, eps_start=None, tol=1e-6, max_iter=3000
    )  # range/eps > 80: log domain
    gpu = sinkhorn(cost.cuda(), u.cuda(), v.cuda(), eps=0.005, eps_start=None, tol=1e-6,
                   max_iter=3000)  # fmt: skip
    assert_close(gpu.distance.cpu(), cpu.distance, atol=1e-5, rtol=0)


def test_two_stage_ranking_matches_cpu():
    cfg = RerankConfig(top_k=20, tol=1e-6, max_iter=2000)
    rankings = {d: two_stage_rank(*_banks(d), cfg) for d in ("cpu", "cuda")}
    assert torch.equal(rankings["cuda"].stage1_index.cpu(), rankings["cpu"].stage1_index)
    # Stage-2 scores agree to 1e-4; the order can only differ between near-ties.
    s_cpu, s_gpu = rankings["cpu"].stage2_score, rankings["cuda"].stage2_score.cpu()
    assert_close(s_gpu, s_cpu, atol=1e-4, rtol=0)
    same = rankings["cuda"].stage2_index.cpu()[:, 0] == rankings["cpu"].stage2_index[:, 0]
    assert bool(same.all())
