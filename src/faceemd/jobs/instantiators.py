"""Building the configured parts that both jobs use (``evaluate.py`` and ``train.py``): loggers,
extra Lightning callbacks, the rerank settings and the feature cache; and closing W&B."""

from __future__ import annotations

import sys

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from faceemd.emd import RerankConfig
from faceemd.storage.feature_cache import FeatureCache

__all__ = ["build_cache", "build_callbacks", "build_loggers", "finish_loggers", "rerank_config"]


def build_loggers(cfg: DictConfig | None) -> list:
    """Instantiate every logger under ``cfg.logger`` (none when it is null)."""
    if not cfg:
        return []
    return [instantiate(lg) for lg in cfg.values() if lg is not None and "_target_" in lg]


def build_callbacks(cfg: DictConfig | None) -> list:
    """Instantiate the extra Lightning callbacks named under ``cfg`` (``{name: {_target_}}``)."""
    return [instantiate(c) for c in (cfg or {}).values() if c]


def finish_loggers() -> None:
    """Close the W&B run if one is open. A job whose loggers never imported wandb has no run
    (and need not have wandb installed: CSV-only runs)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def rerank_config(cfg: DictConfig) -> RerankConfig:
    """RerankConfig from the ``rerank`` group."""
    return RerankConfig(**OmegaConf.to_container(cfg, resolve=True))


def build_cache(cfg: DictConfig | None) -> FeatureCache | None:
    """The feature cache of the ``cache`` group, or None when disabled."""
    if not cfg or not cfg.get("enabled", False):
        return None
    return FeatureCache(
        cfg.dir,
        dtype=cfg.dtype,
        mmap=cfg.mmap,
        verify=cfg.verify,
        memo_mb=int(cfg.get("memo_mb", 0) or 0),
    )
