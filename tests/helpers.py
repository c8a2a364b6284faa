"""Test-only Lightning callbacks, importable by train.py subprocesses (``+callbacks=...``), and
helpers that test subprocesses run."""

import lightning as L


class InterruptAt(L.Callback):
    """Raise KeyboardInterrupt (what Ctrl+C raises) at training batch ``batch``."""

    def __init__(self, batch: int = 2) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.batch:
            raise KeyboardInterrupt


class KillAtTestRun(L.Callback):
    """Kill the process (no cleanup, like SIGKILL) when test epoch number ``run`` starts
    (counted over every ``trainer.test`` call of this Trainer)."""

    def __init__(self, run: int = 2) -> None:
        self.run = run
        self.seen = 0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.seen += 1
        if self.seen > self.run:
            import os

            os._exit(9)


class SigtermAt(L.Callback):
    """Send SIGTERM to this process (what a scheduler does) at training batch ``batch``."""

    def __init__(self, batch: int = 2) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.batch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


class RecordTrainStart(L.Callback):
    """Keep the step count and optimizer state a fit starts from (``RecordTrainStart.seen``)."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        import copy

        RecordTrainStart.seen = {
            "step": trainer.global_step,
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        }


def make_slow_copies(source_root: str, out_root: str) -> None:
    """Copy the identity folder ``source_root`` into a made set under ``out_root``, 0.3 s per
    image (two processes started together overlap), and print the set's size."""
    import time

    from faceemd.data.layouts import ImageFolderFaces
    from faceemd.data.materialised import MaterialisedFaces

    class SlowCopies(MaterialisedFaces):
        def __init__(self, source, out):
            super().__init__(source, {"kind": "slow copy"}, out, "slow", "error")

        def make(self, index, image, lmk, rel):
            time.sleep(0.3)
            return image, None, {}

    print(len(SlowCopies(ImageFolderFaces(source_root), out_root)))
