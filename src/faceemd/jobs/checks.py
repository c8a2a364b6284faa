"""Checks of an evaluation job's settings that would otherwise fail or mislead only after the
extraction, and the metric it returns to Hydra sweepers."""

from __future__ import annotations

import dataclasses
import logging
import re

from omegaconf import DictConfig

from faceemd.data.datamodule import VerificationDataModule
from faceemd.emd import RerankConfig

__all__ = ["METRIC_KEY", "VERIFICATION_KEY", "check_job_settings", "optimized_metric"]

log = logging.getLogger(__name__)


def check_job_settings(cfg: DictConfig, datamodule, rerank: RerankConfig) -> RerankConfig:
    """Settings that would fail or mislead only after the extraction, checked before it:
    ``visualize.queries`` ids, ``optimized_metric``, and a ``top_k`` deeper than the gallery
    (capped with a warning). Returns the rerank settings to use."""
    n_query = len(datamodule.query)
    vis = cfg.get("visualize") or {}
    verification = isinstance(datamodule, VerificationDataModule)
    if verification and (vis.get("queries") or vis.get("num_queries")):
        raise ValueError(
            "visualize draws rankings of identification queries; this is "
            "verification data: set visualize.num_queries=0 and queries=null"
        )
    bad = [q for q in vis.get("queries") or [] if not 0 <= q < n_query]
    if bad:
        raise ValueError(f"visualize.queries {bad} are not query ids (0..{n_query - 1})")
    metric = cfg.get("optimized_metric")
    pattern = VERIFICATION_KEY if verification else METRIC_KEY
    if metric and not pattern.fullmatch(metric):
        raise ValueError(
            f"optimized_metric {metric!r} is not a metric of this job; use stage1/ or stage2/ "
            + (
                "followed by accuracy, accuracy_std, auc, eer or tar_at_far_0.001"
                if verification
                else "followed by p_at_1, r_precision, map_at_r (or stage1/max_precision_at_k)"
            )
        )
    half = cfg.get("identity_half")
    if half is not None and (half not in (0, 1) or (not verification and datamodule.same_images)):
        raise ValueError(
            f"identity_half={half!r}: use 0 or 1, on a protocol with a separate gallery or on "
            "verification pairs (where the queries are the gallery, half of the people would "
            "also leave the gallery)"
        )
    if verification:
        return rerank
    gallery = n_query - 1 if datamodule.same_images else len(datamodule.gallery)
    if rerank.top_k > gallery:
        log.warning(
            "rerank.top_k=%d is deeper than the %d gallery items a query can be ranked "
            "against: using top_k=%d",
            rerank.top_k,
            gallery,
            gallery,
        )
        rerank = dataclasses.replace(rerank, top_k=max(gallery, 0))
    return rerank


METRIC_KEY = re.compile(r"stage[12]/(p_at_1|r_precision|map_at_r)|stage1/max_precision_at_k")
VERIFICATION_KEY = re.compile(r"stage[12]/(accuracy|accuracy_std|auc|eer|tar_at_far_[0-9.e-]+)")


def optimized_metric(cfg: DictConfig, results: dict[str, float]) -> str:
    """The metric returned to sweepers: ``optimized_metric``, else the job's headline metric
    (stage-2 accuracy for verification, stage-2 P@1 for identification)."""
    chosen = cfg.get("optimized_metric")
    if chosen:
        return chosen
    return "stage2/accuracy" if "stage2/accuracy" in results else "stage2/p_at_1"
