"""Scoring verification pairs with extracted features: a stage-1 score (cosine of the
embeddings) and a stage-2 score (paper Eq. 9, ``alpha * EMD similarity + (1 - alpha) * cosine``,
the EMD solved only for the listed pairs), and the verification metrics of both.

The features come from one extraction of every image the pairs name
(:class:`faceemd.data.datamodule.VerificationDataModule`); pair members are rows of that bank.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from faceemd.emd import FeatureBank, RerankConfig, check_finite, prepare_gallery, stage2_scores
from faceemd.emd.stage2 import blend_scores, emd_has_weight, merge_solver_stats
from faceemd.metrics import verification_metrics

__all__ = ["PairScores", "bank_rows", "evaluate_pairs", "score_pairs", "uses_stage2"]


@dataclasses.dataclass
class PairScores:
    """Per-pair scores ``(N,)``: cosine (stage 1), EMD similarity (None without stage 2) and
    the stage-2 blend; seconds of each stage and the solver statistics."""

    cosine: Tensor
    emd: Tensor | None
    stage2: Tensor
    stage1_seconds: float
    stage2_seconds: float
    solver_stats: dict


def uses_stage2(cfg: RerankConfig) -> bool:
    """Stage 2 changes a pair's score unless it is off (``top_k=0``, ``rerank=none``) or its
    weight is zero (``alpha=0`` with the linear blend)."""
    return cfg.top_k > 0 and emd_has_weight(cfg.method)


def bank_rows(bank: FeatureBank, rows: Tensor) -> FeatureBank:
    """The rows ``rows`` of ``bank`` as a new bank (copies of those rows only; of its
    full-dimension bank too when it is in a reduced patch space)."""
    return FeatureBank(
        bank.embeddings[rows],
        bank.patches[rows],
        bank.labels[rows],
        None if bank.lmk is None else bank.lmk[rows],
        verified=bank.verified,
        full=None if bank.full is None else bank_rows(bank.full, rows),
        basis=bank.basis,
    )


def score_pairs(
    bank: FeatureBank,
    first: Tensor,
    second: Tensor,
    cfg: RerankConfig,
    emd_lookup=None,
    chunk_pairs: int = 1024,
) -> PairScores:
    """Scores of the pairs ``(first[i], second[i])`` (bank rows, ``(N,)`` each).

    emd_lookup: optional ``callable(pairs (N, 2)) -> (N, 1) EMD similarities or None`` (a
    cache). The EMD is solved with the first image as the query and the second as its one
    candidate, ``chunk_pairs`` pairs at a time (bounding the gathered query rows).
    """
    if not bank.verified:
        check_finite("embeddings", bank.embeddings)
    t0 = time.perf_counter()
    emb = F.normalize(bank.embeddings.float(), dim=1)
    cosine = (emb[first] * emb[second]).sum(1)
    t1 = time.perf_counter()
    emd, stats = None, {}
    if uses_stage2(cfg) and len(first):
        if not bank.verified:
            check_finite("patches", bank.patches)
        pairs = torch.stack([first, second], 1)
        emd = emd_lookup(pairs) if emd_lookup is not None else None
        if emd is None:
            gallery = prepare_gallery(bank, cfg)
            parts, part_stats = [], []
            for p0 in range(0, len(first), chunk_pairs):
                rows = first[p0 : p0 + chunk_pairs]
                part_stats.append({})
                parts.append(
                    stage2_scores(
                        bank_rows(bank, rows),
                        gallery,
                        second[p0 : p0 + chunk_pairs, None],
                        cfg,
                        part_stats[-1],
                    )
                )
            emd = torch.cat(parts)
            stats = merge_solver_stats(part_stats)
        emd = emd.reshape(-1)
        stage2 = blend_scores(emd, cosine, cfg.alpha, cfg.blend)
    else:
        stage2 = cosine.clone()
    return PairScores(cosine, emd, stage2, t1 - t0, time.perf_counter() - t1, stats)


def evaluate_pairs(
    bank: FeatureBank,
    first: Tensor,
    second: Tensor,
    same: np.ndarray,
    fold: np.ndarray,
    cfg: RerankConfig,
    emd_lookup=None,
    far: float = 1e-3,
) -> tuple[dict[str, float], PairScores]:
    """Scores plus metrics of both stages: keys ``stage{1,2}/{accuracy, accuracy_std, auc,
    eer, tar_at_far_<far>}`` (:func:`faceemd.metrics.verification_metrics`) and ``eval/*``
    counts and seconds."""
    scores = score_pairs(bank, first, second, cfg, emd_lookup)
    out = {}
    for stage, values in (("stage1", scores.cosine), ("stage2", scores.stage2)):
        metrics = verification_metrics(values.double().numpy(), same, fold, far)
        out.update({f"{stage}/{k}": v for k, v in metrics.items()})
    out["eval/num_pairs"] = len(first)
    out["eval/num_same_pairs"] = int(np.sum(same))
    out["eval/num_folds"] = len(np.unique(fold))
    out["eval/stage1_seconds"] = scores.stage1_seconds
    out["eval/stage2_seconds"] = scores.stage2_seconds
    for name, value in scores.solver_stats.items():
        out[f"eval/solver_{name}"] = value
    return out, scores
