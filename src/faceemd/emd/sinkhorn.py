"""Batched entropic optimal transport (Sinkhorn) for patch-wise face EMD.

DeepFace-EMD (Phan & Nguyen, CVPR 2022) compares two faces by the Earth Mover's Distance
between their patch embeddings (Eq. 1-4). The ground distance is the cosine distance between
patches (Eq. 5), so the transport cost lies in [0, 2] and the total flow is 1 (both weight
vectors are normalised). This module solves many such problems at once:

    cost   C[b, k, i, j] = 1 - cos(q[b, i], g[b, k, j])         (B, K, R, R)
    flow   T = argmin <T, C> - eps * H(T)  s.t. T 1 = u, T^T 1 = v
    EMD    <T, C>;  similarity <T, cos> = 1 - EMD                (B, K)

Two update rules are offered: the multiplicative one (scalings ``a, b`` of the kernel
exp(-C / eps); used while the kernel's dynamic range exp((max C - min C) / eps) stays within
float32, i.e. (max C - min C) / eps <= 80) and the log-domain one (log-sum-exp, stable for any
eps; chosen automatically when some problem's range is too wide). Both run in float32 whatever
the input dtype. The multiplicative rule has two backends with the same stopping rule:

- ``torch`` (any device): all problems advance together through batched row-vector x matrix
  products; every ``check_every`` iterations the marginal error is read per problem (one host
  sync) and converged problems leave the working set.
- ``numba`` (CPU tensors; :mod:`faceemd.emd.sinkhorn_cpu`): each problem runs to its own
  convergence with its kernel in the L1 cache, several times faster on a CPU.

``backend='auto'`` picks numba for CPU tensors and torch elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EMDResult", "SinkhornSettings", "eps_schedule", "sinkhorn", "solve"]

# exp(-80) ~ 1.8e-35 is still a normal float32; beyond it the multiplicative kernel underflows.
_MAX_KERNEL_EXPONENT = 80.0
# L1 marginal error at which an eps-scaling stage before the last one stops.
_STAGE_TOL = 1e-2
_BACKENDS = ("auto", "torch", "numba")


@dataclass
class EMDResult:
    """Output of an EMD solve over a batch of problems of shape ``batch``.

    distance: ``<T, 1 - cos>`` per problem, ``batch``.
    similarity: ``<T, cos>`` per problem, ``batch`` (= 1 - distance when sum(T) = 1).
    flow: the transport plan ``batch + (R, R)``, or None unless requested.
    iterations: Sinkhorn iterations each problem ran (0 for the exact solver), ``batch``.
    marginal_error: L1 error of the marginals at exit (one side is exact), ``batch``.
    """

    distance: Tensor
    similarity: Tensor
    flow: Tensor | None
    iterations: Tensor
    marginal_error: Tensor

    def reshape(self, *shape: int) -> EMDResult:
        """The results laid out as ``shape`` problems (the flow as ``shape + (R, R')``)."""
        flow = None if self.flow is None else self.flow.reshape(*shape, *self.flow.shape[-2:])
        return EMDResult(
            self.distance.reshape(shape), self.similarity.reshape(shape), flow,
            self.iterations.reshape(shape), self.marginal_error.reshape(shape),
        )  # fmt: skip

    def __getitem__(self, index) -> EMDResult:
        """The results of ``index`` into the batch (e.g. one weight set of a shared solve)."""
        flow = None if self.flow is None else self.flow[index]
        return EMDResult(
            self.distance[index], self.similarity[index], flow, self.iterations[index],
            self.marginal_error[index],
        )  # fmt: skip


@dataclass
class SinkhornSettings:
    """eps: entropic regularisation in cost units. max_iter: iteration cap per problem.
    tol: L1 marginal error at which a problem counts as converged. check_every: iterations
    between convergence checks of the torch backend (one host sync each). log_domain: force
    the log-domain updates. backend: ``'auto'``, ``'torch'`` or ``'numba'`` (CPU only).
    eps_start: eps-scaling: solve at about ``eps_start`` (``eps`` times the nearest power of
    two), then at half of it, ... down to ``eps``, each stage warm-started from the last
    (:func:`eps_schedule`); this reaches an ``eps`` small enough for the plan to be near the
    exact EMD's at a fraction of a cold start's iterations. None (or ``<= eps``): one stage at
    ``eps``.

    These are the only Sinkhorn defaults (:class:`faceemd.emd.RerankConfig` and
    ``conf/rerank/emd.yaml`` take them; the YAML's comment says why eps 0.02 from 0.04 rather
    than the paper's one stage at 0.05)."""

    eps: float = 0.02
    max_iter: int = 2000
    tol: float = 1e-3
    check_every: int = 10
    log_domain: bool = False
    backend: str = "auto"
    eps_start: float | None = 0.04

    def __post_init__(self) -> None:
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.max_iter < 1 or self.check_every < 1:
            raise ValueError("max_iter and check_every must be >= 1")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.eps_start is not None and self.eps_start <= 0:
            raise ValueError(f"eps_start must be > 0 (or None), got {self.eps_start}")
        if self.eps_start is not None and self.eps_start > self.eps and self.log_domain:
            raise ValueError("eps-scaling (eps_start) runs multiplicative updates: no log_domain")


def sinkhorn(
    cost: Tensor, u: Tensor, v: Tensor, return_flow: bool = False, **settings
) -> EMDResult:
    """Entropic OT between weight vectors ``u`` and ``v`` under ``cost``.

    cost: ``(..., R, R')`` ground cost (cosine distance for EMD, values in [0, 2]).
    u: ``(..., R)`` and v: ``(..., R')`` non-negative weights summing to 1 per problem
    (see :mod:`faceemd.emd.weights`); zero entries are allowed. settings: fields of
    :class:`SinkhornSettings` (its defaults for the others; ``eps_start=None`` for one stage).
    Returns an :class:`EMDResult`; ``similarity`` is ``<T, 1 - cost>``.
    """
    settings = SinkhornSettings(**settings)
    batch = cost.shape[:-2]
    r1, r2 = cost.shape[-2:]
    if u.shape != cost.shape[:-1] or v.shape != batch + cost.shape[-1:]:
        raise ValueError(
            f"weights do not match the cost: cost {tuple(cost.shape)}, u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}; expected u (..., R) and v (..., R') with cost (..., R, R')"
        )
    sim = torch.rsub(cost.float().reshape(-1, r1, r2), 1.0)
    out = solve(sim, u.reshape(-1, r1), v.reshape(-1, r2), settings, return_flow)
    return out.reshape(*batch)


def solve(
    sim: Tensor,
    u: Tensor,
    v: Tensor,
    settings: SinkhornSettings,
    return_flow: bool = False,
    sim_bound: float | None = None,
) -> EMDResult:
    """Solve ``N`` problems with cost ``1 - sim``: sim ``(N, R, R')`` float32, u ``(..., N, R)``,
    v ``(..., N, R')``. Leading dimensions of the weights are further weight sets (e.g. several
    weightings) of the same ``N`` problems: they share the kernels, so one exponential pass
    serves them all. ``sim_bound``: a known bound on ``|sim|`` (1 for clamped cosines), which
    spares a pass to find the kernel's range. Returns an :class:`EMDResult` over
    ``u.shape[:-1]``.

    With eps-scaling (:func:`eps_schedule`; Schmitzer 2019, Sec. 3.2) each stage is warm-started
    from the previous one's dual potentials ``f, g``: its kernel is ``exp((f_i + g_j - C_ij) /
    eps)``, and with eps halved that is the previous stage's plan squared, ``(a_i K_ij b_j)^2``,
    so only the first stage needs exponentials (``exp((sim_ij - max_j sim_ij) / eps_0)``, row
    maxima as the first potentials). A converged plan has entries <= 1, so every stage's kernel
    is <= 1 (no overflow) and entries that underflow to 0 carry less than exp(-87) of mass: the
    multiplicative updates stay exact to float32 at any eps. Stages before the last stop at an
    L1 marginal error of ``max(tol, 1e-2)`` (only their plans are kept); the last at ``tol``.
    ``max_iter`` bounds each stage; iterations are summed over stages.
    """
    n, r1, r2 = sim.shape
    batch = u.shape[:-1]
    u, v = u.float().reshape(-1, r1), v.float().reshape(-1, r2)
    copies = len(u) // max(n, 1)
    if u.shape[0] != copies * n or v.shape[0] != u.shape[0]:
        raise ValueError(
            f"weights u {tuple(u.shape)}, v {tuple(v.shape)} do not match {n} problems"
        )
    schedule = eps_schedule(settings)
    kernel = _first_kernel(sim, settings, schedule, sim_bound)
    if kernel is None:
        sim = sim.repeat(copies, 1, 1)
        cost = torch.rsub(sim, 1.0)
        flow, iters, err = _sinkhorn_log(
            cost, u, v, settings.eps, settings.max_iter, settings.tol, settings.check_every
        )
        similarity = (flow * sim).sum((-1, -2))
        distance = (flow * cost).sum((-1, -2))
    else:
        a, b, kernel, similarity, total, err, iters = _scalings(
            kernel, sim, u, v, settings, len(schedule)
        )
        distance = total - similarity
        flow = a.unsqueeze(-1) * kernel * b.unsqueeze(-2) if return_flow else None
    return EMDResult(distance, similarity, flow if return_flow else None, iters, err).reshape(
        *batch
    )


def eps_schedule(settings: SinkhornSettings) -> list[float]:
    """The entropic regularisations of a solve, one per stage: ``[eps]`` without eps-scaling;
    with it ``eps * 2^m, ..., 2 eps, eps``, where ``2^m`` (m >= 1) is the power of two nearest
    ``eps_start / eps`` in log scale (halving stages: each stage's kernel is the previous plan
    squared, see :func:`solve`)."""
    if settings.eps_start is None or settings.eps_start <= settings.eps:
        return [settings.eps]
    m = max(1, round(math.log2(settings.eps_start / settings.eps)))
    return [settings.eps * 2.0**i for i in range(m, -1, -1)]


def _scalings(kernel: Tensor, sim: Tensor, u: Tensor, v: Tensor, settings, stages: int):
    """Multiplicative Sinkhorn over ``stages`` eps-halving stages from the first kernels
    ``(N, R, R')`` with the configured backend; ``u (M, R)``, ``v (M, R')`` with ``M`` a multiple
    of ``N`` (problem ``p`` uses kernel ``p mod N``). Returns the scalings ``a (M, R)``,
    ``b (M, R')``, the last stage's kernels ``(M, R, R')``, then ``<T, sim>``, ``sum(T)``, the
    L1 marginal error and the iterations, each ``(M,)``."""
    backend = settings.backend
    if backend == "auto":
        backend = "numba" if sim.device.type == "cpu" else "torch"
    stage_tol = max(settings.tol, _STAGE_TOL)
    if backend == "numba":
        if sim.device.type != "cpu":
            raise ValueError("the numba Sinkhorn backend runs on CPU tensors; use 'torch'")
        from faceemd.emd.sinkhorn_cpu import sinkhorn_cpu

        return sinkhorn_cpu(kernel, sim, u, v, stages, stage_tol, settings.tol, settings.max_iter)
    copies = len(u) // max(len(kernel), 1)
    if copies > 1:
        kernel, sim = kernel.repeat(copies, 1, 1), sim.repeat(copies, 1, 1)
    iterations = torch.zeros(len(u), dtype=torch.int32, device=sim.device)
    for stage in range(stages):
        last = stage == stages - 1
        a, b, iters, err, row = _sinkhorn_mult(
            kernel, u, v, settings.max_iter, settings.tol if last else stage_tol,
            settings.check_every,
        )  # fmt: skip
        iterations += iters
        if not last:  # the plan squared; a zero-weight patch (scaling 0) keeps its scale
            a, b = torch.where(a > 0, a, 1.0), torch.where(b > 0, b, 1.0)
            # plan entries are masses <= 1: capped as in sinkhorn_cpu (no overflow to inf)
            kernel = (a.unsqueeze(-1) * kernel * b.unsqueeze(-2)).clamp_(max=1.0).square_()
    # <T, sim> = a^T (K o sim) b without forming T.
    similarity = (torch.bmm(a.unsqueeze(1), kernel * sim).squeeze(1) * b).sum(-1)
    return a, b, kernel, similarity, row.sum(-1), err, iterations


def _first_kernel(
    sim: Tensor, settings: SinkhornSettings, schedule: list[float], bound: float | None
) -> Tensor | None:
    """The first stage's kernel ``(N, R, R')`` for :func:`eps_schedule`'s ``schedule``: with
    eps-scaling ``exp((sim - rowmax) / eps_0)``; otherwise ``exp((sim - shift) / eps)``, or None
    when the log domain is forced or some problem's range exceeds what the multiplicative
    kernel can hold."""
    if len(schedule) > 1:
        return torch.sub(sim, sim.amax(-1, keepdim=True)).mul_(1.0 / schedule[0]).exp_()
    if settings.log_domain:
        return None
    limit = _MAX_KERNEL_EXPONENT * settings.eps
    if sim.numel() == 0 or (bound is not None and bound <= limit):
        # |sim| <= bound: exp(sim / eps) lies in [exp(-80), exp(80)], all normal float32.
        return torch.mul(sim, 1.0 / settings.eps).exp_()
    lo, hi = torch.aminmax(sim)
    if float(hi - lo) > limit:
        spread = sim.amax(dim=(-1, -2)) - sim.amin(dim=(-1, -2))
        if bool((spread > limit).any()):
            return None
        hi = sim.amax(dim=(-1, -2), keepdim=True)
    # The plan is invariant to a constant added to a problem's cost: the shift makes the largest
    # kernel entry 1 and the smallest >= exp(-80), a normal float32.
    return torch.sub(sim, hi).mul_(1.0 / settings.eps).exp_()


def _sinkhorn_mult(kernel, u, v, max_iter, tol, check_every):
    """Batched multiplicative Sinkhorn on ``kernel (N, R, R')``; returns the scalings
    ``a (N, R)``, ``b (N, R')``, iterations ``(N,)``, L1 row-marginal error ``(N,)`` and the
    plan's row sums ``(N, R)``.

    Products are row vector times matrix (``bmm((N, 1, R'), (N, R', R))``), 2-4x faster on CPU
    than matrix times column, so the transposed kernel is kept too. The row error of the
    current ``(a, b)`` falls out of the next a-update (``a * (K b) - u`` with ``K b`` computed
    for it anyway), so a check costs no extra product.
    """
    kernel_t = kernel.transpose(1, 2).contiguous()  # (N, R', R)
    tiny = torch.finfo(torch.float32).tiny
    n = kernel.shape[0]
    a_all, b_all = torch.ones_like(u), torch.ones_like(v)
    iters = torch.zeros(n, dtype=torch.int32, device=kernel.device)
    active = torch.arange(n, device=kernel.device)
    k_act, kt_act, u_act, v_act, b = kernel, kernel_t, u, v, b_all
    a = None
    done = 0
    while n:
        kb = torch.bmm(b.unsqueeze(1), kt_act).squeeze(1)
        if a is not None and (done % check_every == 0 or done == max_iter):
            keep = (a * kb).sub_(u_act).abs_().sum(-1) > tol
            if done == max_iter:
                keep[:] = False
            if not bool(keep.all()):
                finished = active[~keep]
                a_all[finished], b_all[finished] = a[~keep], b[~keep]
                iters[finished] = done
                if not bool(keep.any()):
                    break
                active, k_act, kt_act = active[keep], k_act[keep], kt_act[keep]
                u_act, v_act, a, b = u_act[keep], v_act[keep], a[keep], b[keep]
                kb = kb[keep]
        a = u_act / kb.clamp_min_(tiny)
        b = v_act / torch.bmm(a.unsqueeze(1), k_act).squeeze(1).clamp_min_(tiny)
        done += 1
    # Row sums of the plan a * (K b) at exit: the marginal error and the total mass.
    row = a_all * torch.bmm(b_all.unsqueeze(1), kernel_t).squeeze(1)
    return a_all, b_all, iters, (row - u).abs().sum(-1), row


def _sinkhorn_log(cost, u, v, eps, max_iter, tol, check_every):
    """Log-domain Sinkhorn (dual potentials f, g); returns (flow, iterations, marginal error)."""
    neg_inf = torch.tensor(float("-inf"), device=cost.device)
    log_u = torch.where(u > 0, u.clamp_min(1e-38).log(), neg_inf)
    log_v = torch.where(v > 0, v.clamp_min(1e-38).log(), neg_inf)
    scaled = -cost / eps
    f = torch.zeros_like(u)
    g = torch.zeros_like(v)
    active = torch.ones(cost.shape[:-2], dtype=torch.bool, device=cost.device)
    iters = torch.zeros(cost.shape[:-2], dtype=torch.int32, device=cost.device)

    def lse(x, dim):
        out = torch.logsumexp(x, dim=dim)
        return torch.nan_to_num(out, neginf=-1e30)

    done = 0
    while done < max_iter:
        steps = min(check_every, max_iter - done)
        mask = active.unsqueeze(-1)
        for _ in range(steps):
            f_new = log_u - lse(scaled + g.unsqueeze(-2), -1)
            g_new = log_v - lse(scaled + f_new.unsqueeze(-1), -2)
            f = torch.where(mask, f_new, f)
            g = torch.where(mask, g_new, g)
        done += steps
        iters += active.to(torch.int32) * steps
        row = torch.exp(f.unsqueeze(-1) + scaled + g.unsqueeze(-2)).sum(-1)
        err = (row - u).abs().sum(-1)
        active = active & (err > tol)
        if not bool(active.any()):
            break
    flow = torch.exp(f.unsqueeze(-1) + scaled + g.unsqueeze(-2))
    err = (flow.sum(-1) - u).abs().sum(-1)
    return flow, iters, err
