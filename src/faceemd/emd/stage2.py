"""Stage 2 (paper Sec. 2.3, Eq. 9): EMD similarities of each query's top-k candidates, and the
blend ``alpha * emd + (1 - alpha) * cos`` that re-orders them; positions past ``top_k`` keep
their stage-1 order."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from faceemd.emd.bank import FeatureBank, patch_summaries
from faceemd.emd.cost import quantize_patches
from faceemd.emd.problems import emd_problems, solve_problems
from faceemd.emd.settings import MethodSettings, RerankConfig
from faceemd.emd.weights import CandidateInputs, QueryInputs
from faceemd.memory import shared_file_mapping, stage2_query_batch, take_rows

_BAR_PROBLEMS = 100_000  # (query, candidate) problems from which stage 2 shows a progress bar

__all__ = [
    "blend_scores",
    "blend_stage2",
    "emd_has_weight",
    "merge_solver_stats",
    "prepare_gallery",
    "refined_columns",
    "stage2_depth",
    "stage2_rerank",
    "stage2_scores",
    "stage2_scores_for",
]


def stage2_scores(
    query: FeatureBank,
    gallery: FeatureBank,
    candidates: Tensor,
    cfg: RerankConfig,
    stats: dict | None = None,
) -> Tensor:
    """EMD similarity ``(Q, k)`` between each query and its candidates ``(Q, k)`` (gallery
    rows). Independent of alpha and blend, so it can be computed once per sweep.

    Queries go ``cfg.query_batch`` at a time (None: see :class:`RerankConfig`); an
    out-of-memory error halves that batch and retries. The gallery's per-item summaries (and
    int8 codes for ``cost_dtype='int8'``) are taken from ``gallery`` when it has them, else
    computed for this call (:func:`prepare_gallery` makes them once for many calls).
    stats: optional dict filled with the solver's iteration statistics (``problems``,
    ``mean_iterations``, ``max_iterations``, ``unconverged``: problems that stopped at
    ``max_iter`` with an L1 marginal error above ``tol``); unconverged problems are also
    reported by one warning.
    """
    return stage2_scores_for(query, gallery, candidates, cfg, (cfg.weighting,), stats)[
        cfg.weighting
    ]


def stage2_scores_for(
    query: FeatureBank,
    gallery: FeatureBank,
    candidates: Tensor,
    cfg: RerankConfig,
    weightings: Sequence[str],
    stats: dict | None = None,
) -> dict[str, Tensor]:
    """:func:`stage2_scores` under each of ``weightings`` (``cfg.weighting`` is ignored):
    ``{weighting: (Q, k)}``. The candidates are gathered and their patch cosines computed once
    per query batch for all of them (:func:`faceemd.emd.problems.emd_problems`); only the
    solves are per weighting. ``stats`` describe the first weighting's solves. From
    ``_BAR_PROBLEMS`` problems on, a ``stage 2`` progress bar counts the queries.

    With ``cfg.refine_top``, the relaxed EMD screens all ``k`` candidates (in the reduced
    patch space of :func:`faceemd.emd.projection.reduced_banks` when the banks are in one) and
    only the most promising are solved, at full dimension (:func:`_screen_and_refine`);
    candidates must then be in stage-1 order (best cosine first), as
    :func:`faceemd.emd.two_stage_rank` passes them."""
    if candidates.dim() != 2 or candidates.shape[0] != len(query):
        raise ValueError(
            f"candidates must be (Q, k) with Q = {len(query)} queries, got {tuple(candidates.shape)}"
        )
    weightings = list(dict.fromkeys(weightings))
    if cfg.refine_top is not None:
        return _screen_and_refine(query, gallery, candidates, cfg, weightings, stats)
    gallery = prepare_gallery(gallery, cfg)
    norms, pooled = gallery.summaries
    rows, scales = gallery.quantized if cfg.cost_dtype == "int8" else (gallery.patches, None)
    q, k = candidates.shape
    r, r2 = query.patches.shape[1], gallery.patches.shape[1]
    batch = cfg.query_batch or stage2_query_batch(query.patches.device, k, r, r2)
    out = {w: torch.zeros(q, k, device=query.patches.device) for w in weightings}
    mapped = shared_file_mapping(rows)  # a gallery mapped from disk: release what was read
    gathered = None  # reused between batches: fresh multi-MB buffers cost page faults each time
    solver_settings = cfg.sinkhorn_settings()
    iterations = torch.zeros(q, k, dtype=torch.long)
    unconverged = dict.fromkeys(weightings, 0)
    q0 = 0
    # a bar for the long runs only (a real protocol's thousands of queries), not for tests
    bar = tqdm(total=q, desc="stage 2", unit="query", leave=False, disable=q * k < _BAR_PROBLEMS)
    while q0 < q and k:
        q1 = min(q0 + batch, q)
        cand = candidates[q0:q1]
        try:
            if gathered is None or gathered.shape[0] < cand.numel():
                gathered = rows.new_empty((batch * k, *rows.shape[1:]))
            part = take_rows(rows, cand.reshape(-1), gathered[: cand.numel()], mapped)
            sim, weights = emd_problems(
                QueryInputs(
                    query.patches[q0:q1],
                    query.patch_space_embeddings(slice(q0, q1)),
                    None if query.lmk is None else query.lmk[q0:q1],
                ),
                CandidateInputs(
                    part.view(*cand.shape, *rows.shape[1:]),
                    gallery.patch_space_embeddings(cand),
                    None if gallery.lmk is None else gallery.lmk[cand],
                    norms=norms[cand],
                    pooled=pooled[cand],
                    scales=None if scales is None else scales[cand],
                ),
                weightings,
                cfg.cost_dtype,
            )
            u = torch.stack([u for u, _ in weights.values()])  # (W, B, k, R): one per weighting
            v = torch.stack([v for _, v in weights.values()])
            solved = solve_problems(sim, u, v, cfg.solver, solver_settings)
            results = {w: solved[i] for i, w in enumerate(weights)}
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)
            gathered = None
            warnings.warn(
                f"out of memory in stage 2: retrying with query_batch={batch}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        for w, result in results.items():
            out[w][q0:q1] = result.similarity
            if cfg.solver == "sinkhorn":
                unconverged[w] += int((result.marginal_error > cfg.tol).sum())
        iterations[q0:q1] = results[weightings[0]].iterations.cpu()
        bar.update(q1 - q0)
        q0 = q1
    bar.close()
    for w, count in unconverged.items():
        if count:
            which = f" ({w} weights)" if len(out) > 1 else ""
            warnings.warn(
                f"{count} of {q * k} Sinkhorn problems{which} stopped at max_iter={cfg.max_iter} "
                f"with a marginal error above tol={cfg.tol}: raise rerank.max_iter or rerank.eps",
                RuntimeWarning,
                stacklevel=2,
            )
    if stats is not None and q * k:
        stats.update(
            problems=q * k,
            mean_iterations=float(iterations.float().mean()),
            max_iterations=int(iterations.max()),
            unconverged=unconverged[weightings[0]],
        )
    return out


def refined_columns(screened: Tensor, m: int) -> Tensor:
    """``(Q, min(m, k))`` columns of each query's ``k`` candidates (in stage-1 order) worth
    rescoring: taken alternately from the order of ``screened (Q, k)`` (best EMD similarity
    first) and the stage-1 order (best cosine first), each taken once. Any blend of the two
    scores ranks its winner near the front of one of the two orders, whatever alpha is, so the
    choice (and the cached scores) need not depend on alpha."""
    q, k = screened.shape
    by_emd = torch.argsort(screened, dim=1, descending=True, stable=True)
    positions = torch.arange(k).expand(q, k)
    rank_emd = torch.empty_like(by_emd).scatter_(1, by_emd, positions)
    # 2 * (best of the two ranks), + 1 when the cosine's is the better: unique per query
    priority = 2 * torch.minimum(rank_emd, positions) + (rank_emd > positions).long()
    return torch.topk(priority, min(m, k), dim=1, largest=False, sorted=True).indices


def _screen_and_refine(
    query: FeatureBank,
    gallery: FeatureBank,
    candidates: Tensor,
    cfg: RerankConfig,
    weightings: list[str],
    stats: dict | None,
) -> dict[str, Tensor]:
    """``rerank.refine_top``: relaxed-EMD similarities (:mod:`faceemd.emd.relaxed`) of all
    candidates, in the banks' space (reduced when they are), then the :func:`refined_columns`
    of each query solved with ``cfg.solver`` at full dimension (``query.full`` and
    ``gallery.full`` when the banks are reduced). The other candidates keep their screened
    similarity shifted by the query's mean difference between the two over its solved
    candidates, so that both kinds sit on one scale. ``stats`` describe the solves."""
    plain = dataclasses.replace(cfg, refine_top=None)
    full_query = query if query.full is None else query.full
    full_gallery = gallery if gallery.full is None else gallery.full
    if candidates.shape[1] <= int(cfg.refine_top):  # all chosen (e.g. verification pairs)
        return stage2_scores_for(full_query, full_gallery, candidates, plain, weightings, stats)
    screen = dataclasses.replace(plain, solver="relaxed")
    screened = stage2_scores_for(query, gallery, candidates, screen, weightings)
    out = {}
    for w in weightings:
        cols = refined_columns(screened[w], int(cfg.refine_top))
        solved = stage2_scores_for(
            full_query, full_gallery, candidates.gather(1, cols), plain, [w],
            stats if w == weightings[0] else None,
        )[w]  # fmt: skip
        offset = (solved - screened[w].gather(1, cols)).mean(1, keepdim=True)
        out[w] = (screened[w] + offset).scatter_(1, cols, solved)
    return out


def merge_solver_stats(blocks: list[dict]) -> dict:
    """The solver statistics of :func:`stage2_scores_for` over several blocks of problems
    (query blocks, pair chunks) from each block's; ``{}`` when none was solved."""
    blocks = [b for b in blocks if b]
    if not blocks:
        return {}
    n = sum(b["problems"] for b in blocks)
    return {
        "problems": n,
        "mean_iterations": sum(b["mean_iterations"] * b["problems"] for b in blocks) / n,
        "max_iterations": max(b["max_iterations"] for b in blocks),
        "unconverged": sum(b["unconverged"] for b in blocks),
    }


def prepare_gallery(gallery: FeatureBank, cfg: RerankConfig) -> FeatureBank:
    """``gallery`` with the per-item data stage 2 reads: patch norms and means, and the int8
    codes for ``cost_dtype='int8'`` (each item is a candidate of many queries). A new bank when
    something had to be computed; the input is never changed."""
    summaries = gallery.summaries or patch_summaries(gallery.patches, cfg.chunk_size)
    quantized = gallery.quantized
    if cfg.cost_dtype == "int8" and quantized is None:
        quantized = quantize_patches(gallery.patches)
    if summaries is gallery.summaries and quantized is gallery.quantized:
        return gallery
    return dataclasses.replace(gallery, summaries=summaries, quantized=quantized)


def blend_stage2(
    stage1_score: Tensor,
    stage1_index: Tensor,
    emd_similarity: Tensor,
    alpha: float,
    blend: str = "linear",
) -> tuple[Tensor, Tensor]:
    """Eq. 9 on the first ``k = emd_similarity.shape[1]`` columns of a stage-1 ranking:
    ``alpha * emd + (1 - alpha) * cos`` (or ``emd + cos`` for ``blend='sum'``), re-sorted;
    columns from ``k`` on keep their stage-1 order."""
    k = emd_similarity.shape[1]
    cos, cand = stage1_score[:, :k], stage1_index[:, :k]
    blended = blend_scores(emd_similarity, cos, alpha, blend)
    order = torch.sort(blended, dim=1, descending=True, stable=True).indices
    return (
        torch.cat([blended.gather(1, order), stage1_score[:, k:]], 1),
        torch.cat([cand.gather(1, order), stage1_index[:, k:]], 1),
    )


def blend_scores(emd: Tensor, cos: Tensor, alpha: float, blend: str = "linear") -> Tensor:
    """Eq. 9: ``alpha * emd + (1 - alpha) * cos`` (``blend='linear'``) or ``emd + cos``
    (``'sum'``), elementwise."""
    return alpha * emd + (1.0 - alpha) * cos if blend == "linear" else emd + cos


def emd_has_weight(method: MethodSettings) -> bool:
    """Whether the EMD enters the blend at all (not with alpha = 0 and the linear blend)."""
    return not (method.blend == "linear" and method.alpha == 0.0)


def stage2_rerank(
    query: FeatureBank,
    gallery: FeatureBank,
    stage1_score: Tensor,
    stage1_index: Tensor,
    cfg: RerankConfig,
    emd_similarity: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Re-rank the first ``cfg.top_k`` columns of a stage-1 ranking by Eq. 9.

    stage1_score, stage1_index: ``(Q, depth)`` from :func:`stage1_topk`; emd_similarity:
    optional precomputed :func:`stage2_scores` of those candidates. Returns ``(score, index)``
    of the same shape; columns from ``top_k`` on are unchanged.
    """
    k = stage2_depth(cfg.method, stage1_index.shape[1])
    if k == 0:
        return stage1_score.clone(), stage1_index.clone()
    if emd_similarity is None:
        emd_similarity = stage2_scores(query, gallery, stage1_index[:, :k], cfg)
    return blend_stage2(stage1_score, stage1_index, emd_similarity, cfg.alpha, cfg.blend)


def stage2_depth(method: MethodSettings, depth: int) -> int:
    """Candidates stage 2 re-ranks: 0 when it cannot change the order (k <= 1, or alpha = 0
    with the linear blend)."""
    k = min(method.top_k, depth)
    return k if k > 1 and emd_has_weight(method) else 0
