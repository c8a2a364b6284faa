"""Identification metrics (P@1, R-Precision, MAP@R, max precision at k) and verification
metrics (10-fold accuracy, ROC AUC, EER, TAR at a FAR).

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

Verification (:func:`verification_metrics`) scores pairs: a higher score means "same person".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_roc

__all__ = [
    "best_threshold",
    "hits_from_ranking",
    "identification_metrics",
    "relevant_counts",
    "per_query_scores",
    "verification_metrics",
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
    # Only the hits within each query's first R places count (a few per query on face
    # benchmarks): work on their positions, not on (Q, L) float tables (a sweep's every job
    # scores two rankings of 8,790 x 530 places).
    hits, valid = hits.bool(), r > 0
    rf = r.clamp_min(1).double()
    places = torch.arange(1, hits.shape[1] + 1, device=hits.device)
    rows, cols = (hits & (places[None, :] <= r[:, None])).nonzero(as_tuple=True)  # row-major
    found = torch.bincount(rows, minlength=hits.shape[0])
    first = torch.cumsum(found, 0) - found
    # precision at the place of each counted hit: (its number among the query's hits) / place
    number = torch.arange(1, len(rows) + 1, device=hits.device) - first[rows]
    ap = torch.zeros(hits.shape[0], dtype=torch.float64, device=hits.device)
    ap.index_add_(0, rows, number.double() / (cols + 1))
    p1 = hits[:, 0].double() if hits.shape[1] else rf.new_zeros(hits.shape[0])
    rp = found.double() / rf
    map_r = ap / rf
    nan = torch.tensor(float("nan"), device=hits.device, dtype=torch.float64)
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


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold ``t`` (accept when ``score >= t``) with the highest accuracy on these
    pairs: candidates are the midpoints between consecutive distinct scores and one value
    below and above all of them; the lowest of equally accurate candidates is taken."""
    values = np.unique(scores)
    candidates = np.concatenate(
        [[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]]
    )
    pos, neg = np.sort(scores[same]), np.sort(scores[~same])
    correct = (len(pos) - np.searchsorted(pos, candidates, "left")) + np.searchsorted(
        neg, candidates, "left"
    )
    return float(candidates[int(np.argmax(correct))])


def verification_metrics(
    scores: np.ndarray, same: np.ndarray, fold: np.ndarray, far: float = 1e-3
) -> dict[str, float]:
    """Verification metrics of pair ``scores (N,)`` with ground truth ``same (N,)`` bool and
    ``fold (N,)`` ids.

    - ``accuracy`` / ``accuracy_std``: for each fold, the threshold of :func:`best_threshold`
      on the other folds, applied to this fold; mean and (population) standard deviation over
      the folds (the LFW / CFP protocol);
    - ``auc``: area under the ROC curve (ties count half);
    - ``eer``: equal error rate, where the false accept rate equals the false reject rate,
      linearly interpolated between the ROC points around the crossing;
    - ``tar_at_far_<far>`` (e.g. ``tar_at_far_0.001``): the highest true accept rate of a threshold whose false accept rate is
      at most ``far``.
    """
    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    fold = np.asarray(fold)
    if scores.shape != same.shape or scores.shape != fold.shape or scores.ndim != 1:
        raise ValueError(
            f"scores, same and fold must be equal-length vectors, got {scores.shape}, "
            f"{same.shape}, {fold.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} pair scores are not finite")
    if same.all() or not same.any():
        raise ValueError("verification needs both same-person and different-person pairs")
    folds = np.unique(fold)
    if len(folds) < 2:
        raise ValueError("verification accuracy needs at least 2 folds")
    accuracy = []
    for f in folds:
        test = fold == f
        t = best_threshold(scores[~test], same[~test])
        accuracy.append(float(((scores[test] >= t) == same[test]).mean()))
    # the ROC is invariant to a monotone map: scale into [0, 1] so torchmetrics takes the scores
    # as probabilities (outside [0, 1] it would apply a sigmoid)
    span = scores.max() - scores.min()
    probs = torch.from_numpy((scores - scores.min()) / (span if span > 0 else 1.0))
    target = torch.from_numpy(same.astype(np.int64))
    fpr, tpr, _ = (x.double().numpy() for x in binary_roc(probs, target))
    fnr = 1.0 - tpr
    cross = int(np.argmax(fpr >= fnr))  # fpr rises from 0 and fnr falls to 0 along the curve
    if cross == 0:
        eer = float(fpr[0])
    else:
        d0, d1 = fpr[cross - 1] - fnr[cross - 1], fpr[cross] - fnr[cross]
        w = d0 / (d0 - d1)
        eer = float(fpr[cross - 1] + w * (fpr[cross] - fpr[cross - 1]))
    return {
        "accuracy": float(np.mean(accuracy)),
        "accuracy_std": float(np.std(accuracy)),
        "auc": float(binary_auroc(probs, target)),
        "eer": eer,
        f"tar_at_far_{far:g}": float(tpr[fpr <= far].max()),
    }
