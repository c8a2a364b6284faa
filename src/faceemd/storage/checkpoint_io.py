"""Training checkpoints written beside their final name and renamed into place.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file
lies in the system's temporary folder; committing it to the checkpoint folder on another file
system is a copy onto the final name, so a full disk during that copy leaves a truncated
``last.ckpt`` and the last good resume point is gone. :class:`AtomicCheckpointIO` writes the
temporary file in the checkpoint's own folder and renames it
(:func:`faceemd.storage.atomic.atomic_write`, atomic on one file system): a failed write
leaves the previous checkpoint as it was and no temporary file.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from faceemd.storage.atomic import atomic_write

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` for local paths with a write-beside-then-rename save."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)
