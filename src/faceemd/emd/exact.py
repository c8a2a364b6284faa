"""Exact EMD by network simplex (POT's ``ot.emd``), the reference solver behind the same
interface as :func:`faceemd.emd.sinkhorn.sinkhorn`.

It loops over problems on the CPU in float64, so it is for tests and small "exact" runs, not
for sweeps: about a millisecond per 64x64 problem.
"""

from __future__ import annotations

import numpy as np
import ot
import torch
from torch import Tensor

from faceemd.emd.sinkhorn import EMDResult

__all__ = ["exact_emd"]


def exact_emd(cost: Tensor, u: Tensor, v: Tensor, return_flow: bool = False) -> EMDResult:
    """Solve ``min <T, cost>`` s.t. ``T 1 = u``, ``T^T 1 = v``, ``T >= 0`` exactly (Eq. 1-4).

    cost: ``(..., R, R')``; u: ``(..., R)``; v: ``(..., R')``, each summing to 1.
    Returns an :class:`EMDResult` with ``iterations`` 0 and the flow when asked.
    """
    batch = cost.shape[:-2]
    if u.shape != cost.shape[:-1] or v.shape != batch + cost.shape[-1:]:
        raise ValueError(
            f"weights do not match the cost: cost {tuple(cost.shape)}, u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}"
        )
    c = cost.detach().double().cpu().reshape(-1, *cost.shape[-2:]).numpy()
    a = u.detach().double().cpu().reshape(-1, u.shape[-1]).numpy()
    b = v.detach().double().cpu().reshape(-1, v.shape[-1]).numpy()
    flows = np.empty_like(c)
    for n in range(c.shape[0]):
        # POT needs equal masses to machine precision.
        an, bn = a[n] / a[n].sum(), b[n] / b[n].sum()
        flows[n] = ot.emd(an, bn, np.ascontiguousarray(c[n]), numItermax=1_000_000)
    flow = torch.from_numpy(flows).reshape(cost.shape).to(cost.device, torch.float32)
    cost32 = cost.float()
    distance = (flow * cost32).sum((-1, -2))
    similarity = (flow * (1.0 - cost32)).sum((-1, -2))
    err = (flow.sum(-1) - u.float()).abs().sum(-1)
    iters = torch.zeros(batch, dtype=torch.int32, device=cost.device)
    return EMDResult(distance, similarity, flow if return_flow else None, iters, err)
