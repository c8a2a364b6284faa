"""Building the configured parts the jobs share: loggers, extra Lightning callbacks, the rerank,
cache and extraction settings and the feature cache; and closing W&B."""

from __future__ import annotations

import sys

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from faceemd.emd import RerankConfig
from faceemd.models.inference import ExtractionSettings
from faceemd.storage.feature_cache import CacheSettings, FeatureCache

__all__ = [
    "build_cache",
    "build_callbacks",
    "build_loggers",
    "cache_settings",
    "extraction_settings",
    "finish_loggers",
    "rerank_config",
]


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


def cache_settings(cfg: DictConfig | None) -> CacheSettings:
    """CacheSettings from the ``cache`` group; no group: the cache off."""
    if not cfg:
        return CacheSettings(enabled=False)
    return CacheSettings(**OmegaConf.to_container(cfg, resolve=True))


def extraction_settings(cfg: DictConfig | None) -> ExtractionSettings:
    """ExtractionSettings from the ``extraction`` group (its defaults when absent)."""
    return ExtractionSettings(**OmegaConf.to_container(cfg, resolve=True) if cfg else {})


def build_cache(cfg: DictConfig | None) -> FeatureCache | None:
    """The feature cache of the ``cache`` group, or None when disabled."""
    settings = cache_settings(cfg)
    return FeatureCache.from_settings(settings) if settings.enabled else None
