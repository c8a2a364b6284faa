"""EMD problems between a query and its candidates (paper Eq. 4-8) and their one solver dispatch.

:func:`emd_problems` builds the patch cosines (the cost is ``1 - cos``, Eq. 5) and the patch
weights of one or more weightings; :func:`solve_problems` hands them to the exact LP or to
Sinkhorn; :func:`pairwise_emd` does both for float grids (figures, tests, small runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from faceemd.emd.cost import COST_DTYPES, patch_cosine, quantize_patches
from faceemd.emd.exact import exact_emd
from faceemd.emd.relaxed import relaxed_emd
from faceemd.emd.settings import RerankConfig
from faceemd.emd.sinkhorn import EMDResult, SinkhornSettings, solve
from faceemd.emd.weights import CandidateInputs, QueryInputs, compute_weights, weight_probe

__all__ = ["emd_problems", "pairwise_emd", "solve_problems"]


def solve_problems(
    sim: Tensor,
    u: Tensor,
    v: Tensor,
    solver: str,
    settings: SinkhornSettings,
    return_flow: bool = False,
) -> EMDResult:
    """Solve the problems ``sim (B, K, R, R')``, ``u (..., B, K, R)``, ``v (..., B, K, R')`` with
    ``solver`` (``exact``: POT's network simplex; ``sinkhorn`` with ``settings``; ``relaxed``:
    the relaxed EMD, a bound that solves nothing, no flow). Leading
    dimensions of the weights are further weight sets of the same pairs (e.g. one per
    weighting; Sinkhorn shares their kernels). The result's fields are shaped
    ``u.shape[:-1]`` (flow ``u.shape[:-1] + (R, R')``)."""
    if solver == "relaxed":
        if return_flow:
            raise ValueError("the relaxed EMD has no transport plan: use solver sinkhorn or exact")
        return relaxed_emd(sim, u, v)
    if solver == "exact":
        cost = torch.rsub(sim, 1.0).expand(*u.shape[:-1], *sim.shape[-2:])
        return exact_emd(cost, u, v, return_flow=return_flow)
    r, r2 = sim.shape[-2:]
    flat = sim.reshape(-1, r, r2)
    lead = u.shape[:-3]
    out = solve(
        flat, u.reshape(*lead, -1, r), v.reshape(*lead, -1, r2), settings, return_flow,
        sim_bound=1.0,
    )  # fmt: skip
    return out.reshape(*u.shape[:-1])


def pairwise_emd(
    query: QueryInputs | Tensor,
    candidates: CandidateInputs | Tensor,
    cfg: RerankConfig,
    return_flow: bool = False,
) -> tuple[EMDResult, Tensor, Tensor]:
    """EMD between each query and its candidates (float grids; a tensor stands for the patches
    alone: ``(B, R, C)`` and ``(B, K, R, C)``) under ``cfg``'s weighting and solver. Returns
    ``(result, u, v)``: the :class:`EMDResult` over ``(B, K)`` and the weights used,
    ``u, v (B, K, R)``.
    """
    query = query if isinstance(query, QueryInputs) else QueryInputs(query)
    if not isinstance(candidates, CandidateInputs):
        candidates = CandidateInputs(candidates)
    sim, weights = emd_problems(query, candidates, (cfg.weighting,), cfg.cost_dtype)
    u, v = weights[cfg.weighting]
    result = solve_problems(sim, u, v, cfg.solver, cfg.sinkhorn_settings(), return_flow)
    return result, u, v


def emd_problems(
    query: QueryInputs,
    candidates: CandidateInputs,
    weightings: Sequence[str],
    cost_dtype: str = "float32",
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """The EMD problems between each query ``(B, R, C)`` and its candidates ``(B, K, R', C)``:
    patch cosines ``sim (B, K, R, R')`` in [-1, 1] (the cost is ``1 - sim``), computed in
    ``cost_dtype`` (see :mod:`faceemd.emd.cost`), and ``{weighting: (u (B, K, R),
    v (B, K, R'))}`` for each of ``weightings``. The product is made once for all of them (the
    query-side probes of every weighting that needs one ride along in it), so scoring several
    weightings of the same pairs costs one product.

    Candidates may be int8 codes with their scales (:class:`CandidateInputs`); float
    candidates with ``cost_dtype='int8'`` are quantised here.
    """
    q_patches, c_patches = query.patches, candidates.patches
    if q_patches.dim() != 3 or c_patches.dim() != 4:
        raise ValueError(
            f"expected query patches (B, R, C) and candidates (B, K, R, C), got "
            f"{tuple(q_patches.shape)} and {tuple(c_patches.shape)}"
        )
    if q_patches.shape[0] != c_patches.shape[0] or q_patches.shape[2] != c_patches.shape[3]:
        raise ValueError(
            f"query patches {tuple(q_patches.shape)} and candidates "
            f"{tuple(c_patches.shape)} disagree on batch size or channels"
        )
    codes, norms, scales = c_patches, candidates.norms, candidates.scales
    if cost_dtype == "int8" and c_patches.dtype != torch.int8:
        b, k, r2, c = c_patches.shape
        if norms is None:
            norms = torch.linalg.vector_norm(c_patches.float(), dim=-1)
            candidates = replace(candidates, norms=norms)
        codes, scales = quantize_patches(c_patches.reshape(b * k, r2, c))
        codes, scales = codes.view(b, k, r2, c), scales.view(b, k, r2)
    probes: dict[str, Tensor] = {}  # weighting -> its query-side probe (B, 1, C)
    if norms is not None:  # without the norms the cosines cannot give <g_j, p>
        for weighting in weightings:
            probe = weight_probe(weighting, query)
            if probe is not None:
                probes[weighting] = probe
    rows = list(probes)
    dtype = COST_DTYPES.get(cost_dtype)
    sim = patch_cosine(
        q_patches, codes, dtype, norms, scales,
        torch.cat([probes[w] for w in rows], 1) if rows else None,
    )  # fmt: skip
    probe_cos = None
    if rows:
        sim, probe_cos = sim
    weights = {}
    for weighting in weightings:
        weights[weighting] = compute_weights(
            weighting,
            sim,
            query,
            candidates,
            probe_cos[:, :, rows.index(weighting)] if weighting in probes else None,
        )
    return sim.clamp_(-1.0, 1.0), weights
