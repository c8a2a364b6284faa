"""Ranking and scoring extracted features: two-stage ranking of every query (each process of a
distributed run ranks a block of the queries, gathered on every process) and the
identification metrics of both stages."""

from __future__ import annotations

import torch
from torch import Tensor

from faceemd.emd import FeatureBank, Ranking, RerankConfig, two_stage_rank
from faceemd.emd.stage2 import merge_solver_stats
from faceemd.metrics import hits_from_ranking, identification_metrics, relevant_counts

__all__ = ["evaluate_features"]


def evaluate_features(
    query: FeatureBank,
    gallery: FeatureBank,
    cfg: RerankConfig,
    same_images: bool,
    emd_scores=None,
    r_counts_query: bool = False,
    stage1_key: str | None = None,
    exclude: Tensor | None = None,
) -> tuple[dict[str, float], Ranking]:
    """Two-stage ranking plus metrics for extracted features.

    same_images: query row i is gallery row i (excluded from its own ranking).
    emd_scores: optional cached stage-2 scores lookup (see :func:`two_stage_rank`).
    r_counts_query: R-Precision / MAP@R with the public code's R, which counts the query's own
    image on query-equals-gallery protocols (:func:`relevant_counts`); P@1 is unchanged.
    stage1_key: names the embeddings' content; see :func:`two_stage_rank`.
    exclude: ``(Q,)`` gallery row to leave out of each query's ranking and R (-1: none), e.g.
    each query's clean original; ``same_images`` implies each query's own row.
    Returns ``(metrics, ranking)``; metric keys ``stage{1,2}/{p_at_1,r_precision,map_at_r}``,
    ``stage1/max_precision_at_k`` and ``eval/*`` counts and seconds. Inside a process group
    (DDP), every process must call it: each ranks a contiguous block of the queries and the
    blocks are gathered, so all processes return the same full result.
    """
    if same_images:
        exclude = torch.arange(len(query))
    r = relevant_counts(query.labels, gallery.labels, exclude, count_query=r_counts_query)
    r_depth = int(r.max()) if len(r) else 1
    if exclude is not None:
        r_depth = min(r_depth, len(gallery) - 1)  # a counted own image is never ranked
    depth = max(r_depth, cfg.top_k, 1)
    ranking = _sharded_rank(query, gallery, cfg, exclude, depth, emd_scores, stage1_key)
    hits1 = _hits(ranking.stage1_index, query.labels, gallery.labels, r)
    hits2 = _hits(ranking.stage2_index, query.labels, gallery.labels, r)
    m1 = identification_metrics(hits1, r, hits1, cfg.top_k)
    m2 = identification_metrics(hits2, r)
    out = {f"stage1/{k}": v for k, v in m1.items() if not k.startswith("num_")}
    out.update({f"stage2/{k}": v for k, v in m2.items() if not k.startswith("num_")})
    out["eval/num_queries"] = m1["num_queries"]
    out["eval/num_excluded_queries"] = m1["num_excluded"]
    out["eval/gallery_size"] = len(gallery)
    out["eval/stage1_seconds"] = ranking.stage1_seconds
    out["eval/stage2_seconds"] = ranking.stage2_seconds
    for name, value in ranking.solver_stats.items():  # empty when scores came from the cache
        out[f"eval/solver_{name}"] = value
    return out, ranking


def _hits(index: Tensor, query_labels: Tensor, gallery_labels: Tensor, r: Tensor) -> Tensor:
    """Hits ``(Q, max(L, max R))``: past the ranking (only where R counts the never-ranked own
    image) nothing is relevant."""
    hits = hits_from_ranking(index, query_labels, gallery_labels)
    missing = (int(r.max()) if len(r) else 0) - hits.shape[1]
    if missing > 0:
        hits = torch.cat([hits, hits.new_zeros(hits.shape[0], missing)], 1)
    return hits


def _sharded_rank(
    query: FeatureBank,
    gallery: FeatureBank,
    cfg: RerankConfig,
    exclude: Tensor | None,
    depth: int,
    emd_scores=None,
    stage1_key: str | None = None,
) -> Ranking:
    """Two-stage ranking of this process's block of queries, gathered from every process."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return two_stage_rank(query, gallery, cfg, exclude, depth, emd_scores, stage1_key)
    rank = dist.get_rank()
    bounds = [len(query) * i // world for i in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    block = FeatureBank(
        query.embeddings[lo:hi],
        query.patches[lo:hi],
        query.labels[lo:hi],
        None if query.lmk is None else query.lmk[lo:hi],
    )
    mine = (
        two_stage_rank(
            block,
            gallery,
            cfg,
            None if exclude is None else exclude[lo:hi],
            depth,
            emd_scores,
            None if stage1_key is None else f"{stage1_key}:{lo}:{hi}",
        )  # fmt: skip
        if hi > lo
        else None
    )
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    parts = [p for p in parts if p is not None]
    return Ranking(
        torch.cat([p.stage1_index for p in parts]),
        torch.cat([p.stage1_score for p in parts]),
        torch.cat([p.stage2_index for p in parts]),
        torch.cat([p.stage2_score for p in parts]),
        max(p.stage1_seconds for p in parts),
        max(p.stage2_seconds for p in parts),
        None
        if any(p.emd_similarity is None for p in parts)
        else torch.cat([p.emd_similarity for p in parts]),
        merge_solver_stats([p.solver_stats for p in parts]),
    )
