"""Verification of a job's pairs: the metrics, and one CSV line per scored pair."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from faceemd.emd import RerankConfig
from faceemd.features import ExtractedFeatures
from faceemd.storage.atomic import atomic_write
from faceemd.storage.score_cache import ScoreCache
from faceemd.verification import evaluate_pairs

__all__ = ["verify", "write_pair_scores"]


def verify(feats: ExtractedFeatures, bank, datamodule, rerank: RerankConfig, scores: ScoreCache):
    """Verification metrics of the datamodule's pairs. Pairs with an image that has no feature
    row (skipped when read) are dropped and counted with those that lost it earlier.
    Returns ``(metrics, PairScores, used)``; ``used`` describes the scored pairs: ``rows``
    ``(N, 2)`` bank rows, ``positions`` ``(N, 2)`` set positions, ``same`` and ``fold`` ``(N,)``."""
    pairs = datamodule.pairs
    row_of = np.full(len(datamodule.query), -1, np.int64)
    row_of[feats.index.numpy()] = np.arange(len(feats.index))
    first, second = row_of[pairs.first], row_of[pairs.second]
    keep = (first >= 0) & (second >= 0)
    first_rows, second_rows = torch.from_numpy(first[keep]), torch.from_numpy(second[keep])
    results, pair_scores = evaluate_pairs(
        bank, first_rows, second_rows, pairs.same[keep], pairs.fold[keep], rerank, scores.lookup
    )
    results["eval/dropped_pairs"] = pairs.dropped + int((~keep).sum())
    results["eval/num_images"] = len(feats.index)
    used = {
        "rows": torch.stack([first_rows, second_rows], 1),
        "positions": np.stack([pairs.first[keep], pairs.second[keep]], 1),
        "same": pairs.same[keep],
        "fold": pairs.fold[keep],
    }
    return results, pair_scores, used


def write_pair_scores(path: Path, faces, used: dict, pair_scores) -> None:
    """One line per scored pair of :func:`verify`: both images, same person, fold and the
    scores of each stage (for ROC curves and error analysis); written atomically."""
    files = getattr(faces, "files", None)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["first", "second", "same", "fold", "cosine", "emd", "stage2"])
        for i, (a, b) in enumerate(used["positions"].tolist()):
            emd = "" if pair_scores.emd is None else f"{float(pair_scores.emd[i]):.6f}"
            out.writerow([
                files[a] if files else a, files[b] if files else b,
                int(used["same"][i]), int(used["fold"][i]),
                f"{float(pair_scores.cosine[i]):.6f}", emd, f"{float(pair_scores.stage2[i]):.6f}",
            ])  # fmt: skip
