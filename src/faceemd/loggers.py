"""Lightning's W&B logger, quiet on the console and without the argument wandb no longer takes.

Lightning's ``WandbLogger`` always passes ``anonymous=None`` to ``wandb.init``, and wandb 0.31
warns "The anonymous setting has no effect" for any value it is given, on every run; this
subclass leaves the argument out unless it was set. It also starts the run with wandb's
``silent`` setting (no banner, run summary or sync hint on the console; the run and its logs
are written as before) unless the job runs with ``-v`` or the caller passes ``settings``.
"""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from faceemd.console import is_verbose

__all__ = ["WandbLogger"]


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` minus an unset ``anonymous`` argument, silent
    on the console unless verbose."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        if "settings" not in self._wandb_init and not is_verbose():
            import wandb

            self._wandb_init["settings"] = wandb.Settings(silent=True)
