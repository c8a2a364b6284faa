"""Fused multiplicative Sinkhorn for CPU tensors (numba), one problem per task.

The batched torch solver (:mod:`faceemd.emd.sinkhorn`) streams every kernel through two
matrix-vector products per iteration and pays a dispatch per operation; on a CPU that makes
Sinkhorn memory- and overhead-bound. Here each ``(R, R')`` problem (16 KB at 8x8) is solved to
its own convergence while its kernel sits in the L1 cache, problems spread over the CPU's
threads with ``prange``, and the marginal check comes free with every column update, so no
problem runs an iteration more than it needs.

Same update rule and stopping rule as the torch solver: ``a = u / (K b)``, ``b = v / (K^T a)``;
stop when the L1 error of the column marginals of ``diag(a) K diag(b_prev)`` (whose rows are
exact) is ``<= tol`` or after ``max_iter`` iterations.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["sinkhorn_cpu"]

_FLOOR = np.float32(1e-38)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _solve(kernel, sim, u, v, tol, max_iter, a_out, b_out, ka_out, stats):  # pragma: no cover
    n, r1, r2 = kernel.shape
    for p in numba.prange(n):
        k = kernel[p]
        a = a_out[p]
        b = b_out[p]
        ka = ka_out[p]  # column sums K^T a; preallocated: no allocation inside the parallel loop
        b[:] = 1.0
        it = 0
        err = np.float32(0.0)
        while True:
            for i in range(r1):
                s = np.float32(0.0)
                for j in range(r2):
                    s += k[i, j] * b[j]
                a[i] = u[p, i] / max(s, _FLOOR)
            ka[:] = 0.0
            for i in range(r1):
                ai = a[i]
                for j in range(r2):
                    ka[j] += k[i, j] * ai
            it += 1
            err = np.float32(0.0)
            for j in range(r2):
                err += abs(b[j] * ka[j] - v[p, j])
            if err <= tol or it >= max_iter:
                break
            for j in range(r2):
                b[j] = v[p, j] / max(ka[j], _FLOOR)
        s = sim[p]
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
        stats[p, 3] = it


def sinkhorn_cpu(
    kernel: Tensor, sim: Tensor, u: Tensor, v: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Solve ``N`` problems given their kernels ``(N, R, R')`` (entries in (0, 1], float32),
    patch cosines ``sim (N, R, R')`` and weights ``u (N, R)``, ``v (N, R')``.

    Returns ``a (N, R)``, ``b (N, R')`` (the plan is ``a_i K_ij b_j``), ``<T, sim>``,
    ``sum(T)``, the L1 marginal error and the iterations, each ``(N,)``. Runs on
    ``torch.get_num_threads()`` threads (at most numba's own limit).
    """
    n, r1, r2 = kernel.shape
    a = torch.empty(n, r1)
    b = torch.empty(n, r2)
    ka = torch.empty(n, r2)
    stats = torch.empty(n, 4)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _solve(
        kernel.contiguous().numpy(),
        sim.float().contiguous().numpy(),
        u.float().contiguous().numpy(),
        v.float().contiguous().numpy(),
        np.float32(tol),
        int(max_iter),
        a.numpy(),
        b.numpy(),
        ka.numpy(),
        stats.numpy(),
    )
    return a, b, stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3].int()
