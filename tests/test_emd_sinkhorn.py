"""Sinkhorn EMD against the exact LP (POT network simplex), invariants and bad input."""

import math

import pytest
import torch
from torch.testing import assert_close

from faceemd.emd import RerankConfig, exact_emd, pairwise_emd, patch_cosine, sinkhorn
from faceemd.emd.weights import normalise_weights


def _problem(b=3, k=5, r=9, c=16, noise=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, r, c, generator=g)
    cand = q[:, None] + noise * torch.randn(b, k, r, c, generator=g)
    cost = 1.0 - patch_cosine(q, cand)
    u = normalise_weights(torch.rand(b, k, r, generator=g))
    v = normalise_weights(torch.rand(b, k, r, generator=g))
    return cost, u, v


# The multiplicative rule's two backends (batched torch; fused per-problem numba on CPU) and the
# log-domain rule are each checked against the same references.
# One stage at the given eps (eps_start=None), unlike the method's default eps-scaling.
SOLVERS = [
    pytest.param({"backend": "torch", "eps_start": None}, id="torch"),
    pytest.param({"backend": "numba", "eps_start": None}, id="numba"),
    pytest.param({"log_domain": True, "eps_start": None}, id="log"),
]


@pytest.mark.parametrize("solver", SOLVERS)
def test_sinkhorn_matches_exact_lp(solver):
    cost, u, v = _problem()
    eps = 0.01
    approx = sinkhorn(cost, u, v, eps=eps, max_iter=3000, tol=1e-6, **solver)
    exact = exact_emd(cost, u, v)
    # Entropic OT overestimates the LP by at most eps * log(R * R') (entropy of the plan is
    # bounded by log(R R')); here that is 0.01 * log(81) = 0.044. In practice it is far closer.
    bound = eps * math.log(cost.shape[-1] * cost.shape[-2])
    gap = approx.distance - exact.distance
    assert bool((gap > -1e-4).all()), "Sinkhorn cost cannot be below the LP optimum"
    assert bool((gap < bound).all())
    assert_close(approx.distance, exact.distance, atol=1e-2, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_default_eps_preserves_exact_ranking(solver):
    cost, u, v = _problem(b=4, k=20, r=16, noise=0.8, seed=1)
    approx = sinkhorn(cost, u, v, eps=0.05, max_iter=500, tol=1e-5, **solver)
    exact = exact_emd(cost, u, v)
    # Ranking candidates is what stage 2 uses: the top candidate must agree.
    assert torch.equal(approx.distance.argmin(1), exact.distance.argmin(1))


@pytest.mark.parametrize("solver", SOLVERS)
def test_identical_grids_zero_distance_diagonal_flow(solver):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 16, 32, generator=g)
    cost = (1.0 - patch_cosine(q, q[:, None])).clamp_min(0)
    u = torch.full((2, 1, 16), 1 / 16)
    res = sinkhorn(cost, u, u, eps=0.01, max_iter=2000, tol=1e-7, return_flow=True, **solver)
    assert_close(res.distance, torch.zeros(2, 1), atol=5e-3, rtol=0)
    diag = res.flow.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert bool((diag > 0.95).all())
    ex = exact_emd(cost, u, u, return_flow=True)
    assert_close(ex.flow, torch.diag_embed(u), atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_marginals_match_weights(solver):
    cost, u, v = _problem(seed=3)
    res = sinkhorn(cost, u, v, eps=0.05, tol=1e-6, max_iter=2000, return_flow=True, **solver)
    assert_close(res.flow.sum(-1), u, atol=1e-5, rtol=0)
    assert_close(res.flow.sum(-2), v, atol=1e-5, rtol=0)
    assert bool((res.marginal_error <= 1e-5).all())
    assert_close(res.similarity, 1.0 - res.distance, atol=1e-5, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_permuting_patches_leaves_distance_unchanged(solver):
    cost, u, v = _problem(seed=4)
    pi, pj = torch.randperm(9), torch.randperm(9)
    a = sinkhorn(cost, u, v, eps=0.05, tol=1e-7, max_iter=2000, **solver)
    permuted = (cost[..., pi, :][..., pj], u[..., pi], v[..., pj])
    b = sinkhorn(*permuted, eps=0.05, tol=1e-7, max_iter=2000, **solver)
    assert_close(a.distance, b.distance, atol=1e-5, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_equals_looped(solver):
    cost, u, v = _problem(b=2, k=4, seed=5)
    batched = sinkhorn(cost, u, v, eps=0.05, tol=1e-6, max_iter=1000, **solver)
    for i in range(2):
        for j in range(4):
            one = sinkhorn(
                cost[i, j], u[i, j], v[i, j], eps=0.05, tol=1e-6, max_iter=1000, **solver
            )
            assert_close(batched.distance[i, j], one.distance, atol=1e-6, rtol=0)


def test_zero_weight_patches_and_all_zero_vectors_stay_finite():
    cost, u, v = _problem(seed=6)
    u = u.clone()
    u[..., :4] = 0
    u = u / u.sum(-1, keepdim=True)
    for solver in ({"backend": "torch"}, {"backend": "numba"}, {"log_domain": True}):
        res = sinkhorn(cost, u, v, return_flow=True, eps=0.05, eps_start=None, **solver)
        assert bool(torch.isfinite(res.distance).all())
        assert float(res.flow[..., :4, :].abs().max()) < 1e-6
    with pytest.warns(RuntimeWarning, match="all zero"):
        w = normalise_weights(torch.zeros(2, 5))
    assert_close(w, torch.full((2, 5), 0.2))


def test_sparse_weights_on_both_sides_stay_finite_under_eps_scaling():
    """APC clips negative correlations to zero, so both sides can keep only a few patches;
    with cosines near +-1 (3-d patches) the multiplicative updates meet row sums below the
    float32 normal range. numba's fastmath flushes subnormals to 0, so a subnormal floor on
    them once gave 0 / 0 = NaN here; the default eps-scaling solve must stay finite and agree
    with the torch backend (tolerance 2e-3: both stop at tol 1e-3)."""
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(400, 9, 3, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(400, 9, 3, generator=g), dim=-1)
    sim = torch.einsum("nic,njc->nij", q, c)
    u = torch.relu(torch.randn(400, 9, generator=g) - 0.8)
    v = torch.relu(torch.randn(400, 9, generator=g) - 0.8)
    keep = (u.sum(-1) > 0) & (v.sum(-1) > 0)
    sim, u, v = sim[keep], u[keep], v[keep]
    u, v = u / u.sum(-1, keepdim=True), v / v.sum(-1, keepdim=True)
    results = {b: sinkhorn(1 - sim, u, v, backend=b, max_iter=5000) for b in ("numba", "torch")}
    assert bool(torch.isfinite(results["numba"].similarity).all())
    assert_close(results["numba"].similarity, results["torch"].similarity, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 16, 64, generator=g)
    cand = q[:, None] + 0.5 * torch.randn(2, 6, 16, 64, generator=g)
    cfg = RerankConfig(weighting="apc")
    ref, _, _ = pairwise_emd(q, cand, cfg)
    low, _, _ = pairwise_emd(q.to(dtype), cand.to(dtype), cfg)
    assert low.distance.dtype == torch.float32
    assert bool(torch.isfinite(low.distance).all())
    assert_close(low.distance, ref.distance, atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_convergence_is_per_problem(backend):
    # Problem 0 is easy (uniform weights on a cost that is 0 on the diagonal, 2 elsewhere: the
    # first iteration is already feasible); problem 1 is a random hard one. Each must stop at
    # its own iteration count, not the batch's: the torch backend at its first check (5), the
    # numba one after the first iteration, whose check is free.
    cost, u, v = _problem(b=1, k=2, seed=8)
    cost = cost.clone()
    cost[0, 0] = 2.0 - 2.0 * torch.eye(9)
    u, v = u.clone(), v.clone()
    u[0, 0] = v[0, 0] = 1.0 / 9
    res = sinkhorn(cost, u, v, eps=0.05, tol=1e-5, max_iter=500, check_every=5, backend=backend)
    easy = 5 if backend == "torch" else 1
    assert res.iterations.shape == (1, 2)
    assert int(res.iterations[0, 0]) == easy
    assert int(res.iterations[0, 1]) > 5
    assert bool((res.marginal_error <= 1e-5).all())


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_iteration_cap_is_respected(backend):
    cost, u, v = _problem(seed=9)
    res = sinkhorn(cost, u, v, eps=0.01, eps_start=None, tol=1e-9, max_iter=7, check_every=3,
                   backend=backend)  # fmt: skip
    assert bool((res.iterations == 7).all())
    assert bool((res.marginal_error > 1e-9).all())


def test_bad_input():
    cost, u, v = _problem()
    with pytest.raises(ValueError, match="weights do not match"):
        sinkhorn(cost, u[..., :-1], v)
    with pytest.raises(ValueError, match="eps must be"):
        sinkhorn(cost, u, v, eps=0)
    with pytest.raises(ValueError, match="backend must be"):
        sinkhorn(cost, u, v, backend="cuda")
    with pytest.raises(ValueError, match="disagree"):
        pairwise_emd(torch.randn(2, 4, 8), torch.randn(2, 3, 4, 9), RerankConfig())


def test_backends_agree_on_converged_scores():
    cost, u, v = _problem(b=3, k=8, r=16, c=32, noise=0.8, seed=10)
    one_stage = {"eps": 0.05, "eps_start": None, "tol": 1e-6, "max_iter": 3000}
    torch_res = sinkhorn(cost, u, v, backend="torch", **one_stage)
    numba_res = sinkhorn(cost, u, v, backend="numba", **one_stage)
    # Both stop within tol = 1e-6 of the same fixed point; scores are sums of cost-weighted
    # flow, so they differ by about tol * max cost.
    assert_close(numba_res.similarity, torch_res.similarity, atol=1e-5, rtol=0)
    assert_close(numba_res.distance, torch_res.distance, atol=1e-5, rtol=0)


# eps-scaling (SinkhornSettings.eps_start): the same entropic problem at the final eps, reached
# through warm-started stages, and close to the exact EMD when eps is small.
SCALED = [pytest.param("torch", id="torch"), pytest.param("numba", id="numba")]


@pytest.mark.parametrize("backend", SCALED)
def test_eps_scaling_reaches_the_exact_emd(backend):
    cost, u, v = _problem(b=4, k=6, r=16, c=32)
    exact = exact_emd(cost, u, v).distance
    # max_iter leaves room: at eps 0.005 the slowest of these problems was still above tol
    # after 5,000 iterations on an AVX-512 CPU (both backends; numba's error 1.1e-3 there).
    out = sinkhorn(cost, u, v, eps=0.005, eps_start=0.05, max_iter=20000, tol=1e-4, backend=backend)
    # Stated tolerance of the scaled solve at eps 0.005: 2e-3 of the EMD (costs lie in [0, 2]);
    # the entropic bound eps * log(R R') is 0.028 here. The one-stage solve at the default
    # eps 0.05 is off by far more, which is what scaling buys.
    assert float((out.distance - exact).abs().max()) < 2e-3
    blurred = sinkhorn(
        cost, u, v, eps=0.05, eps_start=None, max_iter=200, tol=1e-4, backend=backend
    )
    blurred = blurred.distance
    assert float((blurred - exact).abs().mean()) > 5 * float((out.distance - exact).abs().mean())
    assert float(out.marginal_error.max()) < 1e-3


@pytest.mark.parametrize("backend", SCALED)
def test_eps_scaling_matches_pot_sinkhorn_at_the_final_eps(backend):
    """Independent reference: POT's Sinkhorn (float64, cold start) at the same eps; the warm
    start changes the path, not the entropic optimum."""
    import ot

    cost, u, v = _problem(b=2, k=3, r=9, c=16, seed=3)
    eps = 0.02
    out = sinkhorn(cost, u, v, eps=eps, eps_start=0.08, max_iter=5000, tol=1e-6, backend=backend)
    for i in range(2):
        for j in range(3):
            plan = ot.sinkhorn(
                u[i, j].double().numpy(), v[i, j].double().numpy(),
                cost[i, j].double().numpy(), eps, numItermax=20000, stopThr=1e-8,
            )  # fmt: skip
            ref = float((torch.from_numpy(plan) * cost[i, j].double()).sum())
            assert abs(float(out.distance[i, j]) - ref) < 1e-4


def test_eps_schedule_halves_down_to_eps():
    """Stages eps * 2^m, ..., eps with 2^m the power of two nearest eps_start / eps (m >= 1):
    halving lets each stage's kernel be the previous plan squared."""
    from faceemd.emd.sinkhorn import SinkhornSettings, eps_schedule

    assert eps_schedule(SinkhornSettings(eps=0.05)) == [0.05]
    assert eps_schedule(SinkhornSettings(eps=0.05, eps_start=0.01)) == [0.05]
    assert eps_schedule(SinkhornSettings(eps=0.01, eps_start=0.05)) == pytest.approx(
        [0.04, 0.02, 0.01]  # 5 -> 4
    )
    assert eps_schedule(SinkhornSettings(eps=0.0125, eps_start=0.05)) == pytest.approx(
        [0.05, 0.025, 0.0125]
    )
    assert eps_schedule(SinkhornSettings(eps=0.02, eps_start=0.05)) == pytest.approx([0.04, 0.02])
    assert eps_schedule(SinkhornSettings(eps=0.02, eps_start=0.025)) == pytest.approx([0.04, 0.02])
    with pytest.raises(ValueError, match="eps_start"):
        SinkhornSettings(eps=0.01, eps_start=-1.0)


@pytest.mark.parametrize("backend", SCALED)
@pytest.mark.parametrize("eps_start", [None, 0.08])
def test_weight_sets_sharing_the_kernels_equal_separate_solves(backend, eps_start):
    """Two weight sets of the same problems in one solve (shared first kernels) give what two
    separate solves give, to float32 rounding."""
    from faceemd.emd.sinkhorn import SinkhornSettings, solve

    cost, u, v = _problem(b=3, k=4, r=9, c=16, seed=7)
    sim = torch.rsub(cost.reshape(12, 9, 9), 1.0)
    u2 = torch.softmax(torch.randn(12, 9, generator=torch.Generator().manual_seed(8)), -1)
    v2 = torch.softmax(torch.randn(12, 9, generator=torch.Generator().manual_seed(9)), -1)
    settings = SinkhornSettings(eps=0.02, eps_start=eps_start, max_iter=5000, tol=1e-6,
                                backend=backend)  # fmt: skip
    both = solve(sim, torch.stack([u.reshape(12, 9), u2]), torch.stack([v.reshape(12, 9), v2]),
                 settings, return_flow=True)  # fmt: skip
    assert both.similarity.shape == (2, 12) and both.flow.shape == (2, 12, 9, 9)
    for i, (ui, vi) in enumerate([(u.reshape(12, 9), v.reshape(12, 9)), (u2, v2)]):
        alone = solve(sim, ui, vi, settings, return_flow=True)
        assert_close(both[i].similarity, alone.similarity, atol=1e-6, rtol=0)
        assert_close(both[i].flow, alone.flow, atol=1e-6, rtol=0)
        assert_close(both[i].flow.sum(-2), vi, atol=2e-6, rtol=0)  # columns within tol
    assert float((both.similarity[0] - both.similarity[1]).abs().max()) > 1e-3


def test_over_relaxed_numba_reaches_the_plain_fixed_point_in_fewer_iterations():
    """The numba backend over-relaxes (w = 1.5) while far from tol; the torch backend runs the
    plain rule. Same problems, same stopping rule: the same plans to within tol, and fewer
    iterations for the relaxed one (counted, not timed)."""
    cost, u, v = _problem(b=4, k=8, r=16, c=32, seed=11)
    kwargs = {"eps": 0.02, "eps_start": None, "max_iter": 20000, "tol": 1e-6, "check_every": 1,
              "return_flow": True}  # fmt: skip
    relaxed = sinkhorn(cost, u, v, backend="numba", **kwargs)
    plain = sinkhorn(cost, u, v, backend="torch", **kwargs)
    assert_close(relaxed.distance, plain.distance, atol=1e-5, rtol=0)
    assert_close(relaxed.flow.sum(-1), u, atol=1e-6, rtol=0)  # rows exact after the last update
    assert float(relaxed.marginal_error.max()) <= 1e-6
    assert float(relaxed.iterations.float().mean()) < 0.8 * float(plain.iterations.float().mean())
