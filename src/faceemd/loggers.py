"""Lightning's W&B logger without the ``anonymous`` argument that wandb no longer takes.

Lightning's ``WandbLogger`` always passes ``anonymous=None`` to ``wandb.init``, and wandb 0.31
warns "The anonymous setting has no effect" for any value it is given, on every run. This
subclass leaves the argument out unless it was set.
"""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger"]


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` minus an unset ``anonymous`` argument."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
