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

import csv
import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from faceemd.atomic import write_json
from faceemd.cache import FeatureCache, cache_key
from faceemd.console import quiet_console
from faceemd.data.datamodule import VerificationDataModule
from faceemd.emd import FeatureBank, RerankConfig, prepare_gallery, stage2_scores_for
from faceemd.extraction import load_or_extract
from faceemd.features import ExtractedFeatures
from faceemd.instantiators import build_cache, build_loggers, finish_loggers, rerank_config
from faceemd.models.build import build_backbone, build_face_input
from faceemd.ranking import evaluate_features
from faceemd.sweep import swept_values
from faceemd.verification import evaluate_pairs
from faceemd.visualize import save_figures

__all__ = [
    "ScoreCache",
    "check_job_settings",
    "evaluate_job",
    "log_figures",
    "optimized_metric",
    "print_results",
    "render_figures",
    "run_evaluation",
    "skipped_images",
]

log = logging.getLogger(__name__)


class ScoreCache:
    """Stage-2 EMD similarities cached per (query features, gallery features, stage-2 settings
    except alpha/blend, candidates): jobs of an alpha sweep compute them once. Candidates are
    the stage-1 top-k ``(Q, k)`` of a ranking, or the ``(N, 2)`` rows of verification pairs.

    others: further weightings to score whenever this job's own scores are missing (a ranking
    job given its ``banks``, the query and gallery :class:`FeatureBank`): they share its
    candidate gathering and patch products (:func:`faceemd.emd.stage2_scores_for`) and are
    cached for the later jobs of a sweep over weightings; those already cached, and those this
    data cannot give (e.g. ``lmk`` without landmarks), are left out."""

    # Bumped when the engine's numbers change beyond tol (v2: int8 cost, numba backend; v3:
    # apc/cc/sc follow the public code, the printed forms are apc_dot/cc_dot/sc_eq8).
    _ENGINE = 3

    def __init__(
        self,
        cache: FeatureCache | None,
        feats: dict,
        rerank: RerankConfig,
        banks: tuple[FeatureBank, FeatureBank] | None = None,
        others: list[str] | tuple[str, ...] = (),
    ) -> None:
        keys = [f.key for f in feats.values()]
        self.cache = cache if cache is not None and all(keys) else None
        self.rerank = rerank
        self.base = {"features": keys, **rerank.score_settings()}
        self.banks = banks
        self.others = [w for w in dict.fromkeys(others) if w != rerank.weighting]
        self.hit = False
        self.prefetched: list[str] = []
        self.stats: dict = {}

    def _key(self, candidates: torch.Tensor, weighting: str | None = None) -> str:
        digest = hashlib.sha256(candidates.long().contiguous().numpy().tobytes()).hexdigest()
        base = self.base if weighting is None else {**self.base, "weighting": weighting}
        return cache_key(kind="stage2_scores", engine=self._ENGINE, candidates=digest, **base)

    def lookup(self, candidates: torch.Tensor) -> torch.Tensor | None:
        """This job's cached scores of ``candidates``; on a miss with ``others`` to do, this
        job's scores computed with theirs (theirs cached now), else None."""
        if self.cache is None:
            return None
        found = self.cache.load_scores(self._key(candidates), candidates)
        self.hit = found is not None
        if found is None and self.banks is not None and self.others:
            return self._score_with_others(candidates)
        return found

    def store(self, candidates: torch.Tensor, emd: torch.Tensor | None) -> None:
        if self.cache is None or self.hit or emd is None:
            return
        self.cache.save_scores(self._key(candidates), candidates, emd)

    def _score_with_others(self, candidates: torch.Tensor) -> torch.Tensor | None:
        query, gallery = self.banks
        gallery = prepare_gallery(gallery, self.rerank)
        todo = [
            w
            for w in self.others
            if not self.cache.path(self._key(candidates, w)).is_file()
            and _scorable(query, gallery, candidates, self.rerank, w)
        ]
        if not todo:
            return None
        own = self.rerank.weighting
        log.info("stage 2: scoring %s with %s (for the sweep's later jobs)", own, ", ".join(todo))
        scores = stage2_scores_for(
            query, gallery, candidates, self.rerank, [own, *todo], self.stats
        )
        for w in todo:
            _optional(
                f"storing the {w} stage-2 scores in the cache",
                self.cache.save_scores, self._key(candidates, w), candidates, scores[w],
            )  # fmt: skip
        self.prefetched = todo
        return scores[own]


def _scorable(query, gallery, candidates: torch.Tensor, rerank: RerankConfig, weighting) -> bool:
    """Whether ``weighting`` can score these features (one query's first candidate tried)."""
    if not len(query) or not candidates.shape[1]:
        return False
    one = FeatureBank(
        query.embeddings[:1],
        query.patches[:1],
        query.labels[:1],
        None if query.lmk is None else query.lmk[:1],
    )
    try:
        stage2_scores_for(one, gallery, candidates[:1, :1], rerank, [weighting])
    except ValueError as err:
        log.info("stage 2: not scoring %s for the sweep (%s)", weighting, err)
        return False
    return True


def print_results(results: dict[str, float], title: str) -> None:
    """Stage 1 vs stage 2 table on the console."""
    if "stage1/accuracy" in results:
        return print_verification(results, title)
    table = Table(title=title)
    table.add_column("stage")
    for col in ("P@1", "RP", "MAP@R", "max P@k"):
        table.add_column(col, justify="right")
    for stage in ("stage1", "stage2"):
        row = [results.get(f"{stage}/{k}") for k in ("p_at_1", "r_precision", "map_at_r")]
        maxp = results.get(f"{stage}/max_precision_at_k")
        table.add_row(
            stage, *[f"{100 * v:.2f}" for v in row], "" if maxp is None else f"{100 * maxp:.2f}"
        )
    console = Console()
    console.print(table)
    console.print(
        f"queries {results['eval/num_queries']} (excluded, R=0: "
        f"{results['eval/num_excluded_queries']}), gallery {results['eval/gallery_size']}, "
        f"skipped images {results['eval/skipped_images']} (no face "
        f"{results.get('eval/unusable_images', 0)}); seconds: extract "
        f"{results['eval/extract_seconds']:.1f}, stage 1 {results['eval/stage1_seconds']:.2f}, "
        f"stage 2 {results['eval/stage2_seconds']:.2f}"
    )
    if "query/attack_linf_max" in results:
        console.print(
            f"adversarial queries: L-inf max {results['query/attack_linf_max']:.0f} / "
            f"{results['query/attack_eps_levels']:.0f} levels, L2 mean "
            f"{results['query/attack_l2_mean']:.1f} levels, surrogate cosine to the clean face "
            f"{results['query/attack_surrogate_cos_mean']:.3f}"
        )


def print_verification(results: dict[str, float], title: str) -> None:
    """Stage 1 vs stage 2 verification table on the console."""
    table = Table(title=title)
    tar = next((k.split("/", 1)[1] for k in results if k.startswith("stage1/tar_at_far_")), None)
    table.add_column("stage")
    for col in ("accuracy", "AUC", "EER", "TAR@FAR=" + tar[len("tar_at_far_") :] if tar else ""):
        table.add_column(col, justify="right")
    for stage in ("stage1", "stage2"):
        acc, std = results[f"{stage}/accuracy"], results[f"{stage}/accuracy_std"]
        table.add_row(
            stage,
            f"{100 * acc:.2f} +- {100 * std:.2f}",
            f"{100 * results[f'{stage}/auc']:.2f}",
            f"{100 * results[f'{stage}/eer']:.2f}",
            f"{100 * results[f'{stage}/{tar}']:.2f}" if tar else "",
        )
    console = Console()
    console.print(table)
    console.print(
        f"pairs {results['eval/num_pairs']} ({results['eval/num_same_pairs']} same, "
        f"{results['eval/num_folds']} folds; dropped: {results['eval/dropped_pairs']}), images "
        f"{results['eval/num_images']}, skipped images {results['eval/skipped_images']} (no face "
        f"{results.get('eval/unusable_images', 0)}); "
        f"seconds: extract {results['eval/extract_seconds']:.1f}, stage 1 "
        f"{results['eval/stage1_seconds']:.2f}, stage 2 {results['eval/stage2_seconds']:.2f}"
    )


def _input_image(faces, position: int, face_input) -> np.ndarray:
    """Set item ``position`` as the network sees it (in its frame and size), uint8."""
    return face_input.frame_image(faces[position][0])[0]


def render_figures(cfg, datamodule, feats, query, gallery, ranking, rerank) -> list[Path]:
    """``visualize.num_queries`` (or the ids in ``visualize.queries``) ranking figures into
    ``<output_dir>/visualize``; none by default."""
    vis = cfg.get("visualize") or {}
    ids = list(vis.get("queries") or range(min(int(vis.get("num_queries", 0)), len(query))))
    if not ids:
        return []
    face_input = datamodule.face_input
    grid = rerank.grid or feats["query"].grid_shape
    q_pos, g_pos = feats["query"].index, feats["gallery" if "gallery" in feats else "query"].index
    g_faces = datamodule.query if datamodule.same_images else datamodule.gallery
    paths = save_figures(
        Path(cfg.paths.output_dir) / "visualize",
        ids,
        query,
        gallery,
        ranking,
        rerank,
        grid,
        lambda q: _input_image(datamodule.query, int(q_pos[q]), face_input),
        lambda g: _input_image(g_faces, int(g_pos[g]), face_input),
        top=int(vis.get("top", 5)),
    )
    log.info("wrote %d ranking figures to %s", len(paths), paths[0].parent)
    return paths


def log_figures(loggers: list, figures: list[Path]) -> None:
    """Send the figures to every logger that takes images (W&B)."""
    for lg in loggers:
        if figures and hasattr(lg, "log_image"):
            lg.log_image(key="visualize", images=[str(p) for p in figures], step=0)


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


def skipped_images(feats: dict[str, ExtractedFeatures], sets: dict) -> dict[str, list[str]]:
    """Names of the images each set skipped: those that could not be made into the set (no
    face found for an alignment or an overlay: ``"<source image>: <reason>"``) and those
    unreadable at extraction (positions without a feature row)."""
    out = {}
    for name, f in feats.items():
        faces = sets[name]
        missing = sorted(set(range(len(faces))) - set(f.index.tolist()))
        files = getattr(faces, "files", None)
        out[name] = [rel for rel, _ in getattr(faces, "skip_list", [])]
        out[name] += [files[i] if files is not None else f"#{i}" for i in missing]
    return out


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
        same = datamodule.same_images
        query = feats["query"].to_bank(rerank.grid)
        gallery = query if same else feats["gallery"].to_bank(rerank.grid)
        ranking = pair_scores = None
        if isinstance(datamodule, VerificationDataModule):
            scores = ScoreCache(cache, feats, rerank)
            results, pair_scores, used = verify(feats["query"], query, datamodule, rerank, scores)
        else:
            # every process ranks its block of queries (one block without a process group)
            r_counts_query = bool((cfg.get("metrics") or {}).get("r_counts_query", False))
            share = (cfg.get("cache") or {}).get("sweep_weightings", True)
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
        skipped = {k: v for k, v in skipped_images(feats, sets).items() if v}
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


def optimized_metric(cfg: DictConfig, results: dict[str, float]) -> str:
    """The metric returned to sweepers: ``optimized_metric``, else the job's headline metric
    (stage-2 accuracy for verification, stage-2 P@1 for identification)."""
    chosen = cfg.get("optimized_metric")
    if chosen:
        return chosen
    return "stage2/accuracy" if "stage2/accuracy" in results else "stage2/p_at_1"


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["first", "second", "same", "fold", "cosine", "emd", "stage2"])
        for i, (a, b) in enumerate(used["positions"].tolist()):
            emd = "" if pair_scores.emd is None else f"{float(pair_scores.emd[i]):.6f}"
            out.writerow([
                files[a] if files else a, files[b] if files else b,
                int(used["same"][i]), int(used["fold"][i]),
                f"{float(pair_scores.cosine[i]):.6f}", emd, f"{float(pair_scores.stage2[i]):.6f}",
            ])  # fmt: skip
    os.replace(tmp, path)


def _optional(what: str, step, *args):
    """Run a step that comes after the metrics were saved; a failure only warns."""
    try:
        return step(*args)
    except Exception as err:  # noqa: BLE001 - the results are saved; say what was not done
        log.warning("%s failed (%s: %s); the metrics are saved", what, type(err).__name__, err)
        return None
