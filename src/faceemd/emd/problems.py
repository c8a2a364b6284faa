"""EMD problems between a query and its candidates (paper Eq. 4-8) and their one solver dispatch.

:func:`emd_problems` builds the patch cosines (the cost is ``1 - cos``, Eq. 5) and the patch
weights of one or more weightings; :func:`solve_problems` hands them to the exact LP or to
Sinkhorn; :func:`pairwise_emd` does both for float grids (figures, tests, small runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from faceemd.emd.cost import COST_DTYPES, patch_cosine, quantize_patches
from faceemd.emd.exact import exact_emd
from faceemd.emd.settings import RerankConfig
from faceemd.emd.sinkhorn import EMDResult, SinkhornSettings, solve
from faceemd.emd.weights import compute_weights, weight_probe

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
    ``solver`` (``exact``: POT's network simplex; ``sinkhorn`` with ``settings``). Leading
    dimensions of the weights are further weight sets of the same pairs (e.g. one per
    weighting; Sinkhorn shares their kernels). The result's fields are shaped
    ``u.shape[:-1]`` (flow ``u.shape[:-1] + (R, R')``)."""
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
    shape = u.shape[:-1]
    return EMDResult(
        out.distance.view(shape),
        out.similarity.view(shape),
        None if out.flow is None else out.flow.view(*shape, r, r2),
        out.iterations.view(shape),
        out.marginal_error.view(shape),
    )


def pairwise_emd(
    query_patches: Tensor,
    candidate_patches: Tensor,
    cfg: RerankConfig,
    query_embedding: Tensor | None = None,
    candidate_embedding: Tensor | None = None,
    query_lmk: Tensor | None = None,
    candidate_lmk: Tensor | None = None,
    return_flow: bool = False,
) -> tuple[EMDResult, Tensor, Tensor]:
    """EMD between each query ``(B, R, C)`` and its candidates ``(B, K, R, C)`` (float grids;
    arguments as in :func:`emd_problems`). Returns ``(result, u, v)``: the :class:`EMDResult`
    over ``(B, K)`` and the weights used, ``u, v (B, K, R)``.
    """
    sim, weights = emd_problems(
        query_patches,
        candidate_patches,
        (cfg.weighting,),
        cfg.cost_dtype,
        query_embedding,
        candidate_embedding,
        query_lmk,
        candidate_lmk,
    )
    u, v = weights[cfg.weighting]
    result = solve_problems(sim, u, v, cfg.solver, cfg.sinkhorn_settings(), return_flow)
    return result, u, v


def emd_problems(
    query_patches: Tensor,
    candidate_patches: Tensor,
    weightings: Sequence[str],
    cost_dtype: str = "float32",
    query_embedding: Tensor | None = None,
    candidate_embedding: Tensor | None = None,
    query_lmk: Tensor | None = None,
    candidate_lmk: Tensor | None = None,
    candidate_norms: Tensor | None = None,
    candidate_pooled: Tensor | None = None,
    candidate_scales: Tensor | None = None,
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """The EMD problems between each query ``(B, R, C)`` and its candidates ``(B, K, R', C)``:
    patch cosines ``sim (B, K, R, R')`` in [-1, 1] (the cost is ``1 - sim``), computed in
    ``cost_dtype`` (see :mod:`faceemd.emd.cost`), and ``{weighting: (u (B, K, R),
    v (B, K, R'))}`` for each of ``weightings``. The product is made once for all of them (the
    query-side probes of every weighting that needs one ride along in it), so scoring several
    weightings of the same pairs costs one product.

    candidate_norms ``(B, K, R')`` and candidate_pooled ``(B, K, C)``: optional per-gallery
    precomputations (patch L2 norms, patch means) that spare passes over the candidates.
    Candidates may be int8 codes (see :func:`faceemd.emd.cost.quantize_patches`) with their
    ``candidate_scales (B, K, R')``; APC then needs the norms and pooled means, CC the norms
    and candidate embeddings. Float candidates with ``cost_dtype='int8'`` are quantised
    here.
    """
    if query_patches.dim() != 3 or candidate_patches.dim() != 4:
        raise ValueError(
            f"expected query patches (B, R, C) and candidates (B, K, R, C), got "
            f"{tuple(query_patches.shape)} and {tuple(candidate_patches.shape)}"
        )
    if (
        query_patches.shape[0] != candidate_patches.shape[0]
        or query_patches.shape[2] != candidate_patches.shape[3]
    ):
        raise ValueError(
            f"query patches {tuple(query_patches.shape)} and candidates "
            f"{tuple(candidate_patches.shape)} disagree on batch size or channels"
        )
    codes = candidate_patches
    if cost_dtype == "int8" and candidate_patches.dtype != torch.int8:
        b, k, r2, c = candidate_patches.shape
        if candidate_norms is None:
            candidate_norms = torch.linalg.vector_norm(candidate_patches.float(), dim=-1)
        codes, candidate_scales = quantize_patches(candidate_patches.reshape(b * k, r2, c))
        codes, candidate_scales = codes.view(b, k, r2, c), candidate_scales.view(b, k, r2)
    probes: dict[str, Tensor] = {}  # weighting -> its query-side probe (B, 1, C)
    if candidate_norms is not None:  # without the norms the cosines cannot give <g_j, p>
        for weighting in weightings:
            probe = weight_probe(weighting, query_patches, query_embedding)
            if probe is not None:
                probes[weighting] = probe
    rows = list(probes)
    dtype = COST_DTYPES.get(cost_dtype)
    sim = patch_cosine(
        query_patches, codes, dtype, candidate_norms, candidate_scales,
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
            query_patches,
            candidate_patches,
            query_embedding,
            candidate_embedding,
            query_lmk,
            candidate_lmk,
            candidate_pooled,
            probe_cos[:, :, rows.index(weighting)] if weighting in probes else None,
            candidate_norms,
        )
    return sim.clamp_(-1.0, 1.0), weights
