"""Test-only Lightning callbacks, importable by train.py subprocesses (``+callbacks=...``)."""

import lightning as L


class InterruptAt(L.Callback):
    """Raise KeyboardInterrupt (what Ctrl+C raises) at training batch ``batch``."""

    def __init__(self, batch: int = 2) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.batch:
            raise KeyboardInterrupt
