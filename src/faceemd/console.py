"""What the console shows by default: progress bars, warnings about the user's data, the
results table and where the results went. Everything else is silenced at its source or by a
narrow filter, and comes back with ``-v`` (``hydra.verbose=true``).

Silenced by default: Lightning's informational lines (``GPU available ...``, ``TPU
available ...``, the litlogger/litmodels tips, all ``rank_zero_info``), and Lightning's own
deprecation warning about ``isinstance(treespec, LeafSpec)`` (raised inside Lightning by
torch's pytree API, nothing a user can act on). The seed line is turned off where the seed is
set (``seed_everything(..., verbose=False)``), W&B's "anonymous setting" warning where the
logger is made (:class:`faceemd.loggers.WandbLogger`).
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar
from tqdm.auto import tqdm

__all__ = [
    "BriefFormatter",
    "LabelledProgressBar",
    "is_verbose",
    "quiet_console",
    "stage_progress",
]

# Lightning's rank_zero_info goes through these loggers.
_LIGHTNING_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def is_verbose() -> bool:
    """Whether the running Hydra job asked for detail (``-v`` / ``hydra.verbose``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def quiet_console(verbose: bool | None = None) -> None:
    """Silence the noise listed in the module docstring unless ``verbose`` (default: the Hydra
    job's ``hydra.verbose``)."""
    if verbose is None:
        verbose = is_verbose()
    level = logging.INFO if verbose else logging.WARNING
    for name in _LIGHTNING_INFO:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated"
        )


def stage_progress(total: int, label: str, unit: str = "query"):
    """A progress bar for a long step outside Lightning's loops (``stage 2``, ``making ...``);
    hidden for work of fewer than 2 units, removed from the screen when done."""
    return tqdm(
        total=total, desc=label, unit=unit, leave=False, disable=total < 2, dynamic_ncols=True
    )


class BriefFormatter(logging.Formatter):
    """Console lines: the message alone for information, ``warning: <message>`` (``error: ...``)
    above it; the job's log file keeps Hydra's full format with time and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


class LabelledProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the label of what the test loop does (``extracting
    query faces``) instead of ``Testing``; set :attr:`label` before each ``trainer.test``."""

    def __init__(self, label: str = "extracting faces") -> None:
        super().__init__(leave=True)
        self.label = label

    @property
    def test_description(self) -> str:
        return self.label
