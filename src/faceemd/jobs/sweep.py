"""What the Hydra sweep a job belongs to varies, so that the job can do work its later siblings
reuse.

A multirun's jobs see only their own overrides (``hydra.overrides.task``); the sweep's own
arguments (``rerank.weighting=uniform,apc,sc``) are in ``multirun.yaml``, which Hydra writes
into the sweep folder before the first job, and in ``hydra.sweeper.params`` (sweeps defined in
a config such as ``sweep=alpha_weighting``). Work is shared only where the jobs run one after
another in one process (basic sweeper and launcher): jobs launched in parallel would all do
it at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from faceemd.storage.filememo import kept

__all__ = ["swept_values"]

log = logging.getLogger(__name__)


def swept_values(key: str) -> list[str]:
    """The values this job's multirun sweeps ``key`` over (e.g. ``['uniform', 'apc']`` for
    ``rerank.weighting=uniform,apc``), command line over config as Hydra applies them; ``[]``
    outside a multirun, where ``key`` is not swept, or where the sweeper or launcher is not
    Hydra's basic one (sequential jobs in this process)."""
    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return []
    basic = ("BasicSweeper", "BasicLauncher")
    if not all(
        str(part.get("_target_", "")).endswith(name)
        for part, name in zip((hydra.sweeper, hydra.launcher), basic, strict=True)
    ):
        return []
    arguments = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items()]
    saved = Path(hydra.sweep.dir) / "multirun.yaml"
    try:
        arguments += kept(saved, _sweep_arguments, "sweep arguments")
    except Exception as err:  # noqa: BLE001 - without it the job just does its own work
        log.debug("cannot read the sweep's arguments from %s (%s)", saved, err)
    found: list[str] = []
    try:
        for override in OverridesParser.create().parse_overrides(arguments):
            if override.key_or_group != key or override.is_delete():
                continue
            if override.is_sweep_override():
                found = [str(v) for v in override.sweep_string_iterator()]
            else:
                found = [str(override.value())]
    except Exception as err:  # noqa: BLE001 - an argument this parser cannot read: no sharing
        log.debug("cannot parse the sweep's arguments %s (%s)", arguments, err)
        return []
    return found if len(found) > 1 else []


def _sweep_arguments(path: Path) -> list[str]:
    """The command-line overrides saved in a sweep's ``multirun.yaml``."""
    return list(OmegaConf.load(path).hydra.overrides.task)
