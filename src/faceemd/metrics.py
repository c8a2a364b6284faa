"""Identification metrics: P@1, R-Precision, MAP@R and max precision at k.

Definitions follow Musgrave et al. 2020 ("A Metric Learning Reality Check"), as the paper does:
for a query with R relevant gallery items (its own image excluded when it is in the gallery),

- P@1 = 1 if the top-ranked item is relevant;
- R-Precision = (relevant items among the top R) / R;
- MAP@R = (1 / R) * sum_{i <= R} rel(i) * precision@i;
- max precision at k = 1 if any of the stage-1 top k is relevant (the P@1 a perfect re-ranker of
  the top k could reach, paper Tab. 1).

Queries with R = 0 are excluded from the means and counted. Everything works on rankings
``(Q, L)`` of gallery indices with ``L >= max R``, never on a dense ``Q x G`` matrix. The
functions are pure; distributed runs gather the rankings, not partial metric sums
(:mod:`faceemd.ranking`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hits_from_ranking",
    "identification_metrics",
    "relevant_counts",
    "per_query_scores",
]


def relevant_counts(
    query_labels: Tensor,
    gallery_labels: Tensor,
    exclude: Tensor | None = None,
    count_query: bool = False,
) -> Tensor:
    """R per query ``(Q,)``: gallery items with the query's label, minus its own image.

    exclude: optional ``(Q,)`` gallery row of each query's own image (-1 for none).
    count_query: the public DeepFace-EMD code's definition (``utils/metrics.py``), with which
    the paper's RP / MAP@R on query-equals-gallery protocols were computed: the query's own
    image, though never ranked, still counts in R, so RP and MAP@R cannot reach 1. A query
    with no other relevant image keeps R = 0 (excluded, as in the default definition).
    """
    labels = torch.cat([query_labels, gallery_labels])
    _, inverse = torch.unique(labels, return_inverse=True)
    q_ids, g_ids = inverse[: len(query_labels)], inverse[len(query_labels) :]
    counts = torch.bincount(g_ids, minlength=int(inverse.max()) + 1 if len(inverse) else 0)
    r = counts[q_ids]
    if exclude is not None:
        own = exclude >= 0
        same = torch.zeros_like(own)
        same[own] = gallery_labels[exclude[own]] == query_labels[own]
        others = r - same.long()
        r = torch.where(others > 0, r, 0) if count_query else others
    return r


def hits_from_ranking(index: Tensor, query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """Boolean ``(Q, L)``: whether each ranked gallery item has the query's label."""
    return gallery_labels[index] == query_labels[:, None]


def per_query_scores(hits: Tensor, r: Tensor) -> dict[str, Tensor]:
    """Per-query P@1, R-Precision and MAP@R ``(Q,)`` for hits ``(Q, L)`` and R ``(Q,)``.

    Queries with R = 0 get NaN. Raises ``ValueError`` if L < R for some query.
    """
    if hits.dim() != 2 or r.shape != hits.shape[:1]:
        raise ValueError(
            f"hits must be (Q, L) and r (Q,), got {tuple(hits.shape)}, {tuple(r.shape)}"
        )
    if hits.shape[0] and int(r.max()) > hits.shape[1]:
        raise ValueError(
            f"rankings are {hits.shape[1]} deep but a query has R={int(r.max())} relevant items; "
            "rank at least max(R) deep"
        )
    h = hits.double()
    valid = r > 0
    pos = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
    within = pos[None, :] <= r[:, None]
    rf = r.clamp_min(1).to(h.dtype)
    p1 = h[:, 0] if h.shape[1] else h.new_zeros(h.shape[0])
    rp = (h * within).sum(1) / rf
    precision_at_i = h.cumsum(1) / pos
    map_r = (precision_at_i * h * within).sum(1) / rf
    nan = torch.tensor(float("nan"), device=h.device, dtype=h.dtype)
    return {
        "p_at_1": torch.where(valid, p1, nan),
        "r_precision": torch.where(valid, rp, nan),
        "map_at_r": torch.where(valid, map_r, nan),
    }


def identification_metrics(
    hits: Tensor, r: Tensor, stage1_hits: Tensor | None = None, k: int | None = None
) -> dict[str, float]:
    """Mean P@1, R-Precision, MAP@R over queries with R > 0, plus counts.

    stage1_hits, k: when given, adds ``max_precision_at_k`` from the stage-1 top-k.
    Returns floats in [0, 1] and counts ``num_queries`` (used) and ``num_excluded`` (R = 0).
    """
    valid = r > 0
    scores = per_query_scores(hits, r)
    n = int(valid.sum())
    out = {name: (float(v[valid].mean()) if n else float("nan")) for name, v in scores.items()}
    if stage1_hits is not None and k is not None and k > 0:
        top = stage1_hits[:, :k].any(1).double()
        out["max_precision_at_k"] = float(top[valid].mean()) if n else float("nan")
    out["num_queries"] = n
    out["num_excluded"] = int((~valid).sum())
    return out
