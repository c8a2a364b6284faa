"""The evaluation job behind ``evaluate.py``: extract, rank, score, report.

Composes the configured parts (data, backbone, rerank, logger, trainer), runs Lightning's test
loop with :class:`faceemd.callbacks.RerankEvaluation`, prints a stage-1 vs stage-2 table and
writes ``metrics.json`` into the run folder. W&B is always finished, also on errors, so that
each job of a multirun gets its own run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from faceemd.callbacks import RerankEvaluation
from faceemd.emd.rerank import RerankConfig
from faceemd.models.build import build_backbone, build_face_input
from faceemd.models.extractor import FaceFeatureExtractor

__all__ = ["build_loggers", "finish_loggers", "print_results", "rerank_config", "run_evaluation"]

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig | None) -> list:
    """Instantiate every logger under ``cfg.logger`` (none when it is null)."""
    if not cfg:
        return []
    return [instantiate(lg) for lg in cfg.values() if lg is not None and "_target_" in lg]


def finish_loggers() -> None:
    """Close the W&B run if one is open (no-op without W&B)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def print_results(results: dict[str, float], title: str) -> None:
    """Stage 1 vs stage 2 table on the console."""
    table = Table(title=title)
    table.add_column("stage")
    for col in ("P@1", "RP", "MAP@R", "max P@k"):
        table.add_column(col, justify="right")
    for stage in ("stage1", "stage2"):
        row = [results.get(f"{stage}/{k}") for k in ("p_at_1", "r_precision", "map_at_r")]
        maxp = results.get(f"{stage}/max_precision_at_k")
        table.add_row(stage, *[f"{100 * v:.2f}" for v in row], "" if maxp is None else f"{100 * maxp:.2f}")
    console = Console()
    console.print(table)
    console.print(
        f"queries {results['eval/num_queries']} (excluded, R=0: "
        f"{results['eval/num_excluded_queries']}), gallery {results['eval/gallery_size']}, "
        f"skipped images {results['eval/skipped_images']}; seconds: extract "
        f"{results['eval/extract_seconds']:.1f}, stage 1 {results['eval/stage1_seconds']:.2f}, "
        f"stage 2 {results['eval/stage2_seconds']:.2f}"
    )


def rerank_config(cfg: DictConfig) -> RerankConfig:
    """RerankConfig from the ``rerank`` group."""
    return RerankConfig(**OmegaConf.to_container(cfg, resolve=True))


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    """Run one evaluation job; returns the metrics dict (also written to metrics.json)."""
    L.seed_everything(cfg.seed, workers=True)
    rerank = rerank_config(cfg.rerank)
    backbone = build_backbone(cfg.backbone)
    datamodule = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
    extractor = FaceFeatureExtractor(backbone, grid=rerank.grid, flip=cfg.backbone.flip_test)
    evaluation = RerankEvaluation(rerank)
    loggers = build_loggers(cfg.get("logger"))
    try:
        trainer = instantiate(cfg.trainer, callbacks=[evaluation], logger=loggers or False)
        if loggers:
            for lg in loggers:
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.test(extractor, datamodule=datamodule, verbose=False)
    finally:
        finish_loggers()
    results = evaluation.results
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": results, "config": OmegaConf.to_container(cfg, resolve=True)}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    print_results(results, f"{cfg.task_name}: {cfg.data_name} / {cfg.backbone.name}")
    log.info("metrics written to %s", out_dir / "metrics.json")
    return results
