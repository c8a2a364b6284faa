"""The finetuning job behind ``train.py``.

Builds the datamodule (training faces with masked augmentation + a held-out identification set),
the :class:`faceemd.models.recognizer.FaceRecognizer`, the Lightning callbacks of the
``callbacks`` config group (``conf/callbacks/train.yaml``: best and last checkpoints,
:class:`SaveOnInterrupt`, learning-rate monitor) plus the re-ranking evaluation, and a
Lightning Trainer; fits (resuming from ``ckpt_path`` when set) and exports the best backbone as
a plain state dict, ``<output_dir>/export/backbone.pt``. W&B is always finished; SIGTERM exits
with status 143 after saving ``last.ckpt``.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from faceemd.callbacks import RerankEvaluation
from faceemd.console import quiet_console
from faceemd.jobs.instantiators import build_loggers, finish_loggers, rerank_config
from faceemd.models.build import build_face_input
from faceemd.models.recognizer import FaceRecognizer
from faceemd.storage.checkpoint_io import AtomicCheckpointIO

__all__ = [
    "SaveOnInterrupt",
    "check_resume_checkpoint",
    "export_backbone",
    "run_training",
    "train_job",
]

log = logging.getLogger(__name__)


class SaveOnInterrupt(L.Callback):
    """Write ``last.ckpt`` when fitting stops on an exception (Ctrl+C, OOM, a crash).

    Lightning's ``OnExceptionCheckpoint`` would do the same but also makes every later
    ``fit(ckpt_path=None)`` resume from "last", which a fresh run must not do.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        trainer.save_checkpoint(self.path)
        log.warning("%s stopped the run: saved %s", type(exception).__name__, self.path)


def check_resume_checkpoint(path: str | Path, hparams: dict | None = None) -> str:
    """``ckpt_path`` must be a Lightning checkpoint written by train.py (read with
    ``weights_only=True``); anything else gets a message saying what it is and what to do.
    With ``hparams`` (the new run's model hyper-parameters), a checkpoint of another backbone,
    head (class or settings), class count or optimizer is refused in one sentence naming both
    values, before any training step (so a refused resume writes no checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {path} not found (a train.py last.ckpt resumes a run)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"ckpt_path {path} cannot be read as a checkpoint: {err}") from err
    if not isinstance(obj, dict) or "pytorch-lightning_version" not in obj:
        raise ValueError(
            f"ckpt_path {path} is not a Lightning training checkpoint (a plain state dict?). "
            "To start from backbone weights use backbone.weights=<file>; ckpt_path resumes a "
            "train.py run from its checkpoints/last.ckpt"
        )
    if hparams is not None:
        saved = obj.get("hyper_parameters") or {}
        for what, key in _RESUME_MUST_MATCH:
            was, now = _pick(saved, key), _pick(hparams, key)
            if was != now:
                raise ValueError(
                    f"ckpt_path {path} holds a run with {what} {was!r}, but this run asks for "
                    f"{now!r}: resume with the checkpoint's settings, or start a new run from its "
                    "weights (export them: faceemd.jobs.train.export_backbone, then "
                    "backbone.weights=<file>)"
                )
    return str(path)


# What a resumed run must share with its checkpoint: (what to call it, hyper-parameter path).
_RESUME_MUST_MATCH = (
    ("backbone", ("backbone", "net")),
    ("head", ("head",)),
    ("number of training classes", ("num_classes",)),
    ("optimizer", ("optimizer", "_target_")),
)


def _pick(tree: dict, key: tuple[str, ...]):
    for part in key:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def export_backbone(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the backbone weights of a training checkpoint as a plain state dict."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ValueError(f"{checkpoint} holds no backbone.* weights: not a train.py checkpoint")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone, out)
    return out


def train_job(cfg: DictConfig) -> float | None:
    """What ``train.py`` and ``faceemd train`` run: the fit, returning ``optimized_metric``
    (when set and logged) to Hydra sweepers."""
    metrics = run_training(cfg)
    metric = cfg.get("optimized_metric")
    return None if metric is None or metric not in metrics else float(metrics[metric])


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Fit, export, return the last logged metrics (floats)."""
    quiet_console()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.train_data, face_input=build_face_input(cfg.backbone))
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    model = FaceRecognizer(
        backbone=container["backbone"],
        head=container["head"],
        num_classes=datamodule.num_classes,
        optimizer=container["optimizer"],
        scheduler=container.get("scheduler") or None,
        loss=cfg.loss,
        focal_gamma=cfg.focal_gamma,
        head_init=cfg.get("head_init", "random"),
    )
    out_dir = Path(cfg.paths.output_dir)
    has_val = datamodule.val is not None
    loggers = build_loggers(cfg.get("logger"))
    try:
        named = dict(cfg.get("callbacks") or {})
        if not has_val and named.get("best_checkpoint"):  # nothing to monitor: keep the latest
            named["best_checkpoint"] = OmegaConf.merge(named["best_checkpoint"], {"monitor": None})
        if not loggers:  # the learning-rate monitor needs a logger to write to
            named.pop("lr_monitor", None)
        built = {name: instantiate(c) for name, c in named.items() if c}
        checkpoint = built.get("best_checkpoint") or built.get("last_checkpoint")
        callbacks = list(built.values())
        if has_val:
            callbacks.append(RerankEvaluation(rerank_config(cfg.rerank)))
        # checkpoints written beside their final name and renamed (a full disk keeps the last)
        io = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **io)
        for lg in loggers:
            lg.log_hyperparams(container)
        resume = (
            {"ckpt_path": check_resume_checkpoint(cfg.ckpt_path, dict(model.hparams))}
            if cfg.get("ckpt_path")
            else {}
        )
        try:
            trainer.fit(model, datamodule=datamodule, **resume)
        except SIGTERMException as err:  # a SystemExit with status 0 otherwise
            # last.ckpt is saved (SaveOnInterrupt); a scheduler must not see a success
            log.warning("stopped by SIGTERM: last.ckpt holds the state; exit status 143")
            raise SystemExit(128 + signal.SIGTERM) from err
    finally:
        finish_loggers()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        best = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint else None
        exported = export_backbone(best, out_dir / "export" / "backbone.pt") if best else None
        summary = {
            "metrics": metrics,
            "best_checkpoint": best,
            "exported_backbone": str(exported) if exported else None,
            "global_step": trainer.global_step,
        }
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if exported:
            log.info("best checkpoint %s; backbone exported to %s", best, exported)
        else:
            log.info("no checkpoint was written (e.g. fast_dev_run): nothing exported")
    return metrics
