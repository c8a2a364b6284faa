"""Two-stage face identification (paper Sec. 2.3, Fig. 2): stage 1
(:mod:`faceemd.emd.stage1`) then stage 2 (:mod:`faceemd.emd.stage2`) for every query.

``depth >= top_k`` is kept so that R-Precision and MAP@R, which look R items deep, can be
computed from the returned rankings alone.
"""

from __future__ import annotations

import time
import warnings

from torch import Tensor

from faceemd.emd.ann import ivf_topk
from faceemd.emd.bank import FeatureBank, Ranking, check_finite
from faceemd.emd.settings import RerankConfig
from faceemd.emd.stage1 import stage1_topk
from faceemd.emd.stage2 import stage2_depth, stage2_rerank, stage2_scores

__all__ = ["MIN_PATCHES", "two_stage_rank"]

# Fewer patches per face than this leave stage 2 little to match (a 2x2 grid: 4); warned about.
MIN_PATCHES = 9

# stage1_key's memo: {(key, sizes, depth, exclusion, index settings): (scores, index)}
_STAGE1: dict[tuple, tuple[Tensor, Tensor]] = {}


def two_stage_rank(
    query: FeatureBank,
    gallery: FeatureBank,
    cfg: RerankConfig,
    exclude: Tensor | None = None,
    depth: int | None = None,
    emd_scores=None,
    stage1_key: str | None = None,
) -> Ranking:
    """Stage 1 then stage 2 for every query (paper Fig. 2).

    exclude: optional ``(Q,)`` gallery row of each query's own image (-1 for none), for
    protocols where query and gallery share images. depth: ranking length to keep, at least
    ``cfg.top_k`` (default ``cfg.top_k``); metrics need it >= the largest R.
    emd_scores: optional ``callable(candidates (Q, k)) -> (Q, k) EMD similarities or None``
    (a cache lookup); computed with :func:`stage2_scores` when it returns None.
    stage1_key: names the content of both embeddings (e.g. their feature cache keys): the
    stage-1 ranking is kept in this process for the next call with the same key and settings
    (the jobs of a sweep rank the same embeddings; only stage 2 differs).
    """
    for name, bank in (("query", query), ("gallery", gallery)):
        if not bank.verified:
            check_finite(f"{name} embeddings", bank.embeddings)
            if cfg.top_k > 0:
                check_finite(f"{name} patches", bank.patches)
    if cfg.top_k > 0:
        if 0 < query.patches.shape[1] < MIN_PATCHES:
            warnings.warn(
                f"stage 2 matches only {query.patches.shape[1]} patches per face: too few for "
                f"re-ranking to change much (at least {MIN_PATCHES}, e.g. 3x3, is advised); take "
                "the grid from an earlier layer with a larger map (backbone.net.grid_layer / "
                "grid) or a coarser rerank.grid only where the map is large",
                RuntimeWarning,
                stacklevel=2,
            )
        if query.patches.shape[1:] != gallery.patches.shape[1:]:
            raise ValueError(
                f"query patches {tuple(query.patches.shape[1:])} and gallery patches "
                f"{tuple(gallery.patches.shape[1:])} differ: extract both with one backbone/grid"
            )
    depth = max(cfg.top_k, depth or 0, 1)
    t0 = time.perf_counter()
    memo = None
    if stage1_key is not None:
        excluded = None if exclude is None else exclude.cpu().numpy().tobytes()
        memo = (stage1_key, len(query), len(gallery), depth, excluded, cfg.stage1_index,
                cfg.ivf_nprobe)  # fmt: skip
    if memo is not None and memo in _STAGE1:
        s1, i1 = (t.clone() for t in _STAGE1[memo])
    elif cfg.stage1_index == "ivf":
        s1, i1 = ivf_topk(
            query.embeddings, gallery.embeddings, depth, exclude, nprobe=cfg.ivf_nprobe
        )
    else:
        s1, i1 = stage1_topk(
            query.embeddings, gallery.embeddings, depth, exclude, chunk_size=cfg.chunk_size
        )
    if memo is not None:
        _STAGE1.clear()  # the last ranking only: a sweep's jobs come one after another
        _STAGE1[memo] = (s1.clone(), i1.clone())
    t1 = time.perf_counter()
    k = stage2_depth(cfg.method, i1.shape[1])
    emd = None
    stats: dict = {}
    if k:
        emd = emd_scores(i1[:, :k]) if emd_scores is not None else None
        if emd is None:
            emd = stage2_scores(query, gallery, i1[:, :k], cfg, stats)
    s2, i2 = stage2_rerank(query, gallery, s1, i1, cfg, emd)
    return Ranking(i1, s1, i2, s2, t1 - t0, time.perf_counter() - t1, emd, stats)
