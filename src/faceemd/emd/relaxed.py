"""The relaxed EMD (Kusner et al., ICML 2015, "RWMD"): each side's mass moved to its nearest
patch on the other side, with the other marginal ignored.

Dropping one marginal constraint can only lower the optimal cost, so each one-sided cost
``sum_i u_i min_j C_ij`` (and ``sum_j v_j min_i C_ij``) is a lower bound of the EMD's, and so
is their maximum, the relaxed EMD; its similarity ``1 - cost`` is an upper bound of the EMD
similarity. It needs no solver: row and column extremes of the cosine matrix the product made.
``rerank.refine_top`` screens candidates with it before solving the most promising
(:func:`faceemd.emd.stage2.stage2_scores_for`); ``rerank.solver=relaxed`` ranks by it alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faceemd.emd.sinkhorn import EMDResult

__all__ = ["relaxed_emd"]


def relaxed_emd(sim: Tensor, u: Tensor, v: Tensor) -> EMDResult:
    """Relaxed EMD of the problems ``sim (B, K, R, R')`` (patch cosines; cost ``1 - sim``)
    under weights ``u (..., B, K, R)``, ``v (..., B, K, R')`` (leading dimensions: further
    weight sets of the same pairs; each weight vector is normalised to mass 1). Fields shaped
    ``u.shape[:-1]``: ``distance`` the relaxed cost (<= the EMD), ``similarity`` ``1 -`` it,
    no flow, ``iterations`` and ``marginal_error`` 0 (it solves nothing)."""
    if (
        u.shape[-3:] != sim.shape[:-1]
        or v.shape[:-1] != u.shape[:-1]
        or v.shape[-1] != sim.shape[-1]
    ):
        raise ValueError(
            f"weights do not match the problems: sim {tuple(sim.shape)}, u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}"
        )
    u = u / u.sum(-1, keepdim=True)
    v = v / v.sum(-1, keepdim=True)
    query_side = (u * sim.amax(-1)).sum(-1)  # each query patch to its most similar candidate's
    candidate_side = (v * sim.amax(-2)).sum(-1)
    similarity = torch.minimum(query_side, candidate_side)
    zeros = torch.zeros(similarity.shape, dtype=torch.int32, device=sim.device)
    return EMDResult(1.0 - similarity, similarity, None, zeros, zeros.float())
