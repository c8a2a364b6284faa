"""Fused multiplicative Sinkhorn for CPU tensors (numba), one problem per task.

The batched torch solver (:mod:`faceemd.emd.sinkhorn`) streams every kernel through two
matrix-vector products per iteration and pays a dispatch per operation; on a CPU that makes
Sinkhorn memory- and overhead-bound. Here each ``(R, R')`` problem (7 KB at 7x6) runs all its
eps-scaling stages to convergence while its kernel sits in the L1 cache, problems spread over
the CPU's threads with ``prange``, and the marginal check comes free with every column update,
so no problem runs an iteration more than it needs.

Same fixed point, stopping rule and stage rule as the torch solver: ``a = u / (K b)``,
``b = v / (K^T a)``; a stage stops when the L1 error of the column marginals of
``diag(a) K diag(b_prev)`` (whose rows are exact) is ``<= tol`` or after ``max_iter``
iterations; the next stage (eps halved) starts from the kernel ``(a_i K_ij b_j)^2``.

While a problem's error is above ``tol`` and did not rise in its last iteration, its updates
are over-relaxed (Thibault et al. 2017; Lehmann et al. 2022): ``a <- a^(1-w) (u / K b)^w`` with
``w = 1.5``, i.e. ``x sqrt(x / a)`` for the plain update ``x`` (no exponentials), the extra
factor kept within [0.5, 2] and only for scalings in (1e-38, 1e30), so none overflows. The fixed
point is the same; on real LFW grids (eps-scaling 0.04 -> 0.02, tol 1e-3) it cut the mean
iterations from 33 to 20.5. A stage never stops right after a relaxed row update (its rows
would not be exact), so the returned plan meets the same guarantee as the plain rule's.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["sinkhorn_cpu"]

# the smallest normal float32: fastmath flushes subnormals such as 1e-38 to 0 (then 0 / 0)
_FLOOR = np.float32(np.finfo(np.float32).tiny)
_CEIL = np.float32(1e30)  # scalings beyond it are not over-relaxed (no overflow to inf)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _solve(
    kernel, sim, u, v, stages, stage_tol, tol, max_iter, work, a_out, b_out, ka_out, stats
):  # pragma: no cover
    n0, r1, r2 = kernel.shape
    for p in numba.prange(u.shape[0]):
        k = work[p]  # this problem's kernel, squared in place between stages
        k[:, :] = kernel[p % n0]
        a = a_out[p]
        b = b_out[p]
        ka = ka_out[p]  # column sums K^T a; preallocated: no allocation inside the parallel loop
        up = u[p]
        vp = v[p]
        total_it = 0
        err = np.float32(0.0)
        for stage in range(stages):
            last = stage == stages - 1
            stop = tol if last else stage_tol
            b[:] = 1.0
            it = 0
            relax = False  # this iteration over-relaxes (see the module docstring)
            last_err = np.float32(np.inf)
            while True:
                for i in range(r1):
                    s = np.float32(0.0)
                    for j in range(r2):
                        s += k[i, j] * b[j]
                    x = up[i] / max(s, _FLOOR)
                    if relax and _FLOOR < a[i] < _CEIL:  # a^(1 - w) x^w, w = 1.5, step <= 2x
                        x *= min(max(np.sqrt(x / a[i]), np.float32(0.5)), np.float32(2.0))
                    a[i] = x
                ka[:] = 0.0
                for i in range(r1):
                    ai = a[i]
                    for j in range(r2):
                        ka[j] += k[i, j] * ai
                it += 1
                err = np.float32(0.0)
                for j in range(r2):
                    err += abs(b[j] * ka[j] - vp[j])
                if (err <= stop and not relax) or it >= max_iter:
                    break  # (after a relaxed a-update the rows are not exact: one plain more)
                relax = err > stop and err <= last_err
                last_err = err
                for j in range(r2):
                    x = vp[j] / max(ka[j], _FLOOR)
                    if relax and _FLOOR < b[j] < _CEIL:
                        x *= min(max(np.sqrt(x / b[j]), np.float32(0.5)), np.float32(2.0))
                    b[j] = x
            total_it += it
            if not last:  # next kernel: the plan squared; a zero-weight patch keeps its scale
                for j in range(r2):
                    if b[j] <= 0.0:
                        b[j] = 1.0
                for i in range(r1):
                    ai = a[i] if a[i] > 0.0 else np.float32(1.0)
                    for j in range(r2):
                        # a plan entry is a mass <= 1; capped so that a stage stopped far from
                        # it (over-relaxed scalings near the float32 limits) cannot overflow
                        t = min(ai * k[i, j] * b[j], np.float32(1.0))
                        k[i, j] = t * t
        s = sim[p % n0]
        total = np.float32(0.0)
        weighted = np.float32(0.0)
        for i in range(r1):
            for j in range(r2):
                f = a[i] * k[i, j] * b[j]
                total += f
                weighted += f * s[i, j]
        stats[p, 0] = weighted
        stats[p, 1] = total
        stats[p, 2] = err
        stats[p, 3] = total_it


def sinkhorn_cpu(
    kernel: Tensor,
    sim: Tensor,
    u: Tensor,
    v: Tensor,
    stages: int,
    stage_tol: float,
    tol: float,
    max_iter: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Solve ``M`` problems given the first-stage kernels ``(N, R, R')`` (entries in (0, 1],
    float32) and patch cosines ``sim (N, R, R')`` of ``N`` problems, and weights ``u (M, R)``,
    ``v (M, R')`` with ``M`` a multiple of ``N``: problem ``p`` uses kernel ``p mod N`` (several
    weightings of the same pairs share one kernel). ``stages`` eps-halving stages, the ones
    before the last stopping at ``stage_tol``, the last at ``tol``; ``max_iter`` per stage.

    Returns ``a (M, R)``, ``b (M, R')`` and the last stage's kernels ``(M, R, R')`` (the plan
    is ``a_i K_ij b_j``), ``<T, sim>``, ``sum(T)``, the L1 marginal error and the iterations
    summed over stages, each ``(M,)``. Runs on ``torch.get_num_threads()`` threads (at most
    numba's own limit).
    """
    n, r1, r2 = kernel.shape
    m = u.shape[0]
    if m % max(n, 1):
        raise ValueError(f"{m} weight vectors for {n} kernels: expected a multiple")
    a = torch.empty(m, r1)
    b = torch.empty(m, r2)
    ka = torch.empty(m, r2)
    work = torch.empty(m, r1, r2)
    stats = torch.empty(m, 4)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _solve(
        kernel.contiguous().numpy(),
        sim.float().contiguous().numpy(),
        u.float().contiguous().numpy(),
        v.float().contiguous().numpy(),
        int(stages),
        np.float32(stage_tol),
        np.float32(tol),
        int(max_iter),
        work.numpy(),
        a.numpy(),
        b.numpy(),
        ka.numpy(),
        stats.numpy(),
    )
    return a, b, work, stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3].int()
