"""Batched entropic optimal transport (Sinkhorn) for patch-wise face EMD.

DeepFace-EMD (Phan & Nguyen, CVPR 2022) compares two faces by the Earth Mover's Distance
between their patch embeddings (Eq. 1-4). The ground distance is the cosine distance between
patches (Eq. 5), so the transport cost lies in [0, 2] and the total flow is 1 (both weight
vectors are normalised). This module solves many such problems at once:

    cost   C[b, k, i, j] = 1 - cos(q[b, i], g[b, k, j])         (B, K, R, R)
    flow   T = argmin <T, C> - eps * H(T)  s.t. T 1 = u, T^T 1 = v
    EMD    <T, C>;  similarity <T, cos> = 1 - EMD                (B, K)

Two update rules are offered: the multiplicative one (matrix-vector products with the kernel
exp(-C / eps), fast; used while the kernel's dynamic range exp((max C - min C) / eps) stays
within float32, i.e. (max C - min C) / eps <= 80) and the log-domain one (log-sum-exp, stable
for any eps; chosen automatically for a batch whose range is too wide). Both run in
float32 whatever the input dtype. Convergence is measured on the row marginals per problem,
every ``check_every`` iterations only, so the host synchronises once per check rather than once
per iteration; problems that have converged are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EMDResult", "patch_cosine", "sinkhorn"]

# exp(-80) ~ 1.8e-35 is still a normal float32; beyond it the multiplicative kernel underflows.
_MAX_KERNEL_EXPONENT = 80.0


@dataclass
class EMDResult:
    """Output of an EMD solve over a batch of problems of shape ``batch``.

    distance: ``<T, 1 - cos>`` per problem, ``batch``.
    similarity: ``<T, cos>`` per problem, ``batch`` (= 1 - distance when sum(T) = 1).
    flow: the transport plan ``batch + (R, R)``, or None unless requested.
    iterations: Sinkhorn iterations each problem ran (0 for the exact solver), ``batch``.
    marginal_error: L1 error of the row marginals at exit, ``batch``.
    """

    distance: Tensor
    similarity: Tensor
    flow: Tensor | None
    iterations: Tensor
    marginal_error: Tensor


def patch_cosine(
    query: Tensor,
    candidates: Tensor,
    dtype: torch.dtype | None = None,
    candidate_norms: Tensor | None = None,
) -> Tensor:
    """Cosine similarity between every query patch and every candidate patch (Eq. 5).

    query: ``(B, R, C)``; candidates: ``(B, K, R', C)``. Returns ``(B, K, R, R')`` in float32.
    ``dtype`` (e.g. ``torch.bfloat16``) is the precision of the matrix product only; the
    normalisation is done in float32 and the result is returned in float32.
    candidate_norms: optional precomputed L2 norms ``(B, K, R')`` of the candidate patches; with
    them the candidates are used as they are and the product is divided afterwards, which saves
    a normalisation pass over ``(B, K, R', C)`` (the costliest memory pass of stage 2).
    """
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    g = (
        candidates
        if candidate_norms is not None
        else torch.nn.functional.normalize(candidates.float(), dim=-1)
    )
    dtype = dtype or torch.float32
    q, g = q.to(dtype), g.to(dtype)
    b, k, r2, c = g.shape
    # One (R, C) x (C, K*R') product per query: (B, R, K*R') -> (B, K, R, R').
    flat = torch.bmm(q, g.reshape(b, k * r2, c).transpose(1, 2))
    sim = flat.view(b, q.shape[1], k, r2).transpose(1, 2).float()
    if candidate_norms is not None:
        sim = sim / candidate_norms.float().clamp_min(1e-12).unsqueeze(-2)
    return sim


def sinkhorn(
    cost: Tensor,
    u: Tensor,
    v: Tensor,
    eps: float = 0.05,
    max_iter: int = 200,
    tol: float = 1e-4,
    check_every: int = 10,
    log_domain: bool = False,
    return_flow: bool = False,
) -> EMDResult:
    """Entropic OT between weight vectors ``u`` and ``v`` under ``cost``.

    cost: ``(..., R, R')`` ground cost (cosine distance for EMD, values in [0, 2]).
    u: ``(..., R)`` and v: ``(..., R')`` non-negative weights summing to 1 per problem
    (see :mod:`faceemd.emd.weights`); zero entries are allowed.
    eps: entropic regularisation in cost units. tol: L1 row-marginal error at which a problem
    counts as converged. check_every: iterations between convergence checks (one host sync
    each). log_domain: force the log-domain updates (otherwise used only where the kernel would
    underflow). Returns an :class:`EMDResult`; ``similarity`` is ``<T, 1 - cost>``.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1 or check_every < 1:
        raise ValueError("max_iter and check_every must be >= 1")
    cost = cost.float()
    u = u.float()
    v = v.float()
    batch = cost.shape[:-2]
    if u.shape != cost.shape[:-1] or v.shape != batch + cost.shape[-1:]:
        raise ValueError(
            f"weights do not match the cost: cost {tuple(cost.shape)}, u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}; expected u (..., R) and v (..., R') with cost (..., R, R')"
        )
    spread = cost.amax(dim=(-1, -2)) - cost.amin(dim=(-1, -2))
    if log_domain or bool((spread > _MAX_KERNEL_EXPONENT * eps).any()):
        flow, iters, err = _sinkhorn_log(cost, u, v, eps, max_iter, tol, check_every)
    else:
        flow, iters, err = _sinkhorn_mult(cost, u, v, eps, max_iter, tol, check_every)
    distance = (flow * cost).sum((-1, -2))
    similarity = (flow * (1.0 - cost)).sum((-1, -2))
    return EMDResult(distance, similarity, flow if return_flow else None, iters, err)


def _sinkhorn_mult(cost, u, v, eps, max_iter, tol, check_every):
    """Multiplicative Sinkhorn; returns (flow, iterations, marginal error).

    Problems are flattened to ``(N, R, R')``. Matrix-vector products are written as row
    vector times matrix (``bmm((N, 1, R'), (N, R', R))``), which runs 2-4x faster on CPU than
    matrix times column. At every check the problems that converged are dropped from the
    working set, so the remaining iterations only touch the unconverged ones.
    """
    batch, (r1, r2) = cost.shape[:-2], cost.shape[-2:]
    c = cost.reshape(-1, r1, r2)
    u_all, v_all = u.reshape(-1, r1), v.reshape(-1, r2)
    # Shift by the per-problem minimum: the plan is invariant to a constant added to the cost,
    # and the largest kernel entry becomes exactly 1.
    kernel = torch.exp((c - c.amin(dim=(-1, -2), keepdim=True)) / -eps)  # (N, R, R')
    kernel_t = kernel.transpose(1, 2).contiguous()  # (N, R', R)
    tiny = torch.finfo(torch.float32).tiny
    n = c.shape[0]
    a_all, b_all = torch.ones_like(u_all), torch.ones_like(v_all)
    iters = torch.zeros(n, dtype=torch.int32, device=c.device)
    active = torch.arange(n, device=c.device)
    k_act, kt_act, u_act, v_act, b = kernel, kernel_t, u_all, v_all, b_all
    done = 0
    while done < max_iter:
        steps = min(check_every, max_iter - done)
        for _ in range(steps):
            a = u_act / torch.bmm(b.unsqueeze(1), kt_act).squeeze(1).clamp_min(tiny)
            b = v_act / torch.bmm(a.unsqueeze(1), k_act).squeeze(1).clamp_min(tiny)
        done += steps
        iters[active] += steps
        a_all[active], b_all[active] = a, b
        # After the b-update the columns match v exactly; rows are off by a * (K b) - u.
        row = a * torch.bmm(b.unsqueeze(1), kt_act).squeeze(1)
        keep = (row - u_act).abs().sum(-1) > tol
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            active, k_act, kt_act = active[keep], k_act[keep], kt_act[keep]
            u_act, v_act, b = u_act[keep], v_act[keep], b[keep]
    flow = a_all.unsqueeze(-1) * kernel * b_all.unsqueeze(-2)
    err = (flow.sum(-1) - u_all).abs().sum(-1)
    return flow.reshape(cost.shape), iters.reshape(batch), err.reshape(batch)


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
