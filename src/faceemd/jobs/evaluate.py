"""The evaluation job behind ``evaluate.py``: extract, rank or verify, score, report.

Composes the configured parts (data, backbone, rerank, cache, logger, trainer), takes each
set's features from the feature cache or extracts them with Lightning's test loop, then either
ranks the queries against the gallery (identification data) or scores the listed pairs
(verification data, :class:`faceemd.data.datamodule.VerificationDataModule`), prints a stage-1
vs stage-2 table and writes ``metrics.json`` into the run folder (verification also
``pair_scores.csv``). W&B is always finished, also on errors, so that each job of a multirun
gets its own run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from faceemd.console import quiet_console
from faceemd.data.datamodule import VerificationDataModule
from faceemd.data.errors import SKIP_CAUSES
from faceemd.data.identity_split import half_positions
from faceemd.emd.projection import reduced_banks
from faceemd.jobs.checks import check_job_settings, optimized_metric
from faceemd.jobs.extraction import load_or_extract, skipped_images
from faceemd.jobs.figures import log_figures, render_figures
from faceemd.jobs.instantiators import (
    build_cache,
    build_loggers,
    finish_loggers,
    rerank_config,
)
from faceemd.jobs.pair_scores import verify, write_pair_scores
from faceemd.jobs.sweep import swept_values
from faceemd.jobs.tables import print_results
from faceemd.models.build import build_backbone, build_face_input
from faceemd.ranking import evaluate_features
from faceemd.storage.atomic import write_json
from faceemd.storage.feature_cache import cache_key
from faceemd.storage.patch_space import PatchSpaceStore
from faceemd.storage.score_cache import ScoreCache

__all__ = ["evaluate_job", "own_original_rows", "run_evaluation"]

log = logging.getLogger(__name__)


def own_original_rows(datamodule, feats: dict) -> torch.Tensor | None:
    """``(Q,)`` gallery feature row of each query feature row's clean original (-1: none), or
    None when the protocol keeps the originals (``data.exclude_own_original``)."""
    positions = datamodule.own_originals()
    if positions is None:
        return None
    row_of = np.full(len(datamodule.gallery), -1, np.int64)
    row_of[feats["gallery"].index.numpy()] = np.arange(len(feats["gallery"].index))
    own = positions[feats["query"].index.numpy()]
    return torch.from_numpy(np.where(own >= 0, row_of[np.maximum(own, 0)], -1))


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    """Run one evaluation job; returns the metrics dict (also written to metrics.json).

    ``metrics.json`` is written as soon as the ranking is done; what follows (the stage-2
    score cache, figures) is optional and only warns when it fails. On processes other than
    rank 0 of a distributed run it returns an empty dict after the sharded extraction.
    """
    quiet_console()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rerank = rerank_config(cfg.rerank)
    backbone = build_backbone(cfg.backbone)
    datamodule = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
    datamodule.setup("test")
    rerank = check_job_settings(cfg, datamodule, rerank)
    out_dir = Path(cfg.paths.output_dir)
    loggers = build_loggers(cfg.get("logger"))
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        cache = build_cache(cfg.get("cache"))
        feats, counters, is_zero = load_or_extract(cfg, backbone, datamodule, loggers, cache)
        extracted = dict(feats)  # every set's rows (skipped images are those without one)
        half = cfg.get("identity_half")
        if half is not None:  # one half of the people only: settings chosen on the other
            mine = half_positions(datamodule.query, int(half), int(cfg.identity_split_seed))
            if isinstance(datamodule, VerificationDataModule):
                pairs = datamodule.pairs
                datamodule.pairs = pairs.select(mine[pairs.first] & mine[pairs.second])
            else:
                rows = torch.from_numpy(mine[feats["query"].index.numpy()])
                feats["query"] = feats["query"].select(rows, f"identity_half{half}")
        same = datamodule.same_images
        query = feats["query"].to_bank(rerank.grid)
        gallery = query if same else feats["gallery"].to_bank(rerank.grid)
        g_key = feats["query" if same else "gallery"].key
        store = None
        if cache is not None and feats["query"].key and g_key:
            store = PatchSpaceStore(cache, feats["query"].key, g_key, rerank.grid)
        query, gallery = reduced_banks(query, gallery, rerank.screen_dim, same, store)
        ranking = pair_scores = None
        if isinstance(datamodule, VerificationDataModule):
            scores = ScoreCache(cache, feats, rerank)
            results, pair_scores, used = verify(feats["query"], query, datamodule, rerank, scores)
        else:
            # every process ranks its block of queries (one block without a process group)
            r_counts_query = bool((cfg.get("metrics") or {}).get("r_counts_query", False))
            share = cache is not None and cache.settings.sweep_weightings
            others = swept_values("rerank.weighting") if share else []
            scores = ScoreCache(cache, feats, rerank, (query, gallery), others)
            keys = [f.key for f in feats.values()]
            results, ranking = evaluate_features(
                query, gallery, rerank, same, scores.lookup, r_counts_query,
                cache_key(kind="embeddings", features=keys) if all(keys) else None,
                own_original_rows(datamodule, feats),
            )  # fmt: skip
            if datamodule.exclude_own_original:
                results["eval/own_original_excluded"] = 1
            if datamodule.limit_queries is not None:
                results["eval/limited_queries"] = datamodule.limit_queries
                log.warning("a quick subset: only the first %d queries", datamodule.limit_queries)
            results.update({f"eval/solver_{k}": v for k, v in scores.stats.items()})
            results["eval/prefetched_weightings"] = len(scores.prefetched)
        results["eval/cached_stage2"] = int(scores.hit)
        if half is not None:
            results["eval/identity_half"] = int(half)
        if not is_zero:
            return {}
        results.update(counters)
        sets = {"query": datamodule.query, "gallery": datamodule.gallery}
        for role, faces in sets.items():  # adversarial sets: the perturbations' actual norms
            if hasattr(faces, "attack_summary"):
                results.update({f"{role}/attack_{k}": v for k, v in faces.attack_summary().items()})
        results["eval/unusable_images"] = sum(
            len(getattr(faces, "skip_list", [])) for faces in sets.values()
        )
        for cause in SKIP_CAUSES:  # why the made sets left them out
            results[f"eval/unusable_{cause}"] = sum(
                getattr(faces, "skip_causes", {}).get(cause, 0) for faces in sets.values()
            )
        skipped = {k: v for k, v in skipped_images(extracted, sets).items() if v}
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        config["optimized_metric"] = optimized_metric(cfg, results)
        write_json(out_dir / "metrics.json", {"metrics": results, "config": config})
        log.info("metrics written to %s", out_dir / "metrics.json")
        if skipped:
            write_json(out_dir / "skipped_images.json", skipped)
            for name, files in skipped.items():
                log.warning(
                    "%s set: %d image(s) skipped: %s", name, len(files), ", ".join(files[:20])
                )
        for lg in loggers:
            lg.log_metrics({k: float(v) for k, v in results.items()}, step=0)
            lg.save()
        if ranking is None:
            _optional(
                "writing pair_scores.csv",
                write_pair_scores, out_dir / "pair_scores.csv", datamodule.query, used, pair_scores,
            )  # fmt: skip
            emd = None if pair_scores.emd is None else pair_scores.emd.view(-1, 1)
            _optional("storing the stage-2 scores in the cache", scores.store, used["rows"], emd)
        else:
            k = 0 if ranking.emd_similarity is None else ranking.emd_similarity.shape[1]
            store = (ranking.stage1_index[:, :k], ranking.emd_similarity)
            _optional("storing the stage-2 scores in the cache", scores.store, *store)
            figures = _optional(
                "drawing the ranking figures",
                render_figures, cfg, datamodule, feats, query, gallery, ranking, rerank,
            )  # fmt: skip
            _optional("logging the figures", log_figures, loggers, figures or [])
    finally:
        finish_loggers()
    print_results(results, f"{cfg.task_name}: {cfg.data_name} / {cfg.backbone.name}")
    return results


def evaluate_job(cfg: DictConfig) -> float | None:
    """What ``evaluate.py`` and ``faceemd evaluate`` run: the job, returning the configured
    ``optimized_metric`` to Hydra sweepers (None on processes other than rank 0 of a
    distributed run, which return no metrics)."""
    results = run_evaluation(cfg)
    metric = optimized_metric(cfg, results)
    return float(results[metric]) if metric in results else None


def _optional(what: str, step, *args):
    """Run a step that comes after the metrics were saved; a failure only warns."""
    try:
        return step(*args)
    except Exception as err:  # noqa: BLE001 - the results are saved; say what was not done
        log.warning("%s failed (%s: %s); the metrics are saved", what, type(err).__name__, err)
        return None
