"""Face-recognition training module: any configured backbone plus a margin head (paper Sec. 4.3).

:class:`FaceRecognizer` trains the backbone's embedding through a classification head
(:mod:`faceemd.models.heads`) and validates it as the paper evaluates it: its validation step
returns features that :class:`faceemd.callbacks.RerankEvaluation` ranks (masked queries vs a
clean gallery), logging ``stage1/*`` and ``stage2/*``. Every constructor argument is a plain
mapping saved as hyperparameters, so ``FaceRecognizer.load_from_checkpoint(path)`` needs no
extra argument; the classes its saved hyper-parameters name (Hydra ``_target_``) must come from
an allow-list (:data:`ALLOWED_TARGETS`, extendable per call), so a crafted checkpoint cannot
make loading call arbitrary functions. Pretrained backbone weights (``backbone.weights``) are loaded in ``setup`` of a
fit, before Lightning restores a resumed checkpoint, and never on ``load_from_checkpoint``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from faceemd.models.checkpoint import load_backbone_weights
from faceemd.models.extractor import extract_batch
from faceemd.models.heads import focal_loss

__all__ = ["ALLOWED_TARGETS", "FaceRecognizer", "check_targets"]

# Where the classes named in a training checkpoint's hyper-parameters may come from.
ALLOWED_TARGETS = ("faceemd.models.backbones.", "faceemd.models.heads.", "torch.optim.")


def check_targets(node, allowed: tuple[str, ...], where: str = "hyper_parameters") -> None:
    """Raise ``ValueError`` unless every ``_target_`` in ``node`` (nested mappings and lists)
    names a class under one of the ``allowed`` module prefixes."""
    from hydra.utils import get_class

    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            ok = isinstance(target, str) and target.startswith(tuple(allowed))
            if ok:
                try:
                    get_class(target)
                except Exception:  # a function, or nothing importable: not a class
                    ok = False
            if not ok:
                raise ValueError(
                    f"{where}._target_ = {target!r} is not an allowed class (allowed: classes "
                    f"under {', '.join(allowed)}); pass allowed_targets=(...) to "
                    "load_from_checkpoint for a checkpoint you trust"
                )
        for key, value in node.items():
            check_targets(value, allowed, f"{where}.{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            check_targets(value, allowed, f"{where}[{i}]")


class FaceRecognizer(L.LightningModule):
    """backbone: the ``conf/backbone`` mapping (``net``, ``weights``, ``ignore_keys``, ``input``,
    ``flip_test``); head: a ``_target_`` mapping of a head class (its ``embedding_dim`` and
    ``num_classes`` are filled in); num_classes: training identities; optimizer / scheduler:
    ``_target_`` mappings (``_partial_`` is implied); loss: ``ce`` or ``focal``;
    head_init: ``random`` or ``class_means``: when a fit starts (not when it resumes), each
    class weight of a cosine head is set to the normalised mean embedding of that class's
    training faces (weight imprinting, Qi et al. 2018), so that finetuning a pretrained
    backbone starts from a head that already agrees with it instead of a random one."""

    def __init__(
        self,
        backbone: dict,
        head: dict,
        num_classes: int,
        optimizer: dict,
        scheduler: dict | None = None,
        loss: str = "ce",
        focal_gamma: float = 2.0,
        head_init: str = "random",
    ) -> None:
        super().__init__()
        if loss not in ("ce", "focal"):
            raise ValueError(f"loss must be 'ce' or 'focal', got {loss!r}")
        if head_init not in ("random", "class_means"):
            raise ValueError(f"head_init must be 'random' or 'class_means', got {head_init!r}")
        self.save_hyperparameters()
        self.backbone = instantiate(backbone["net"])
        if not any(p.requires_grad for p in self.backbone.parameters()):
            raise ValueError(
                f"backbone={backbone.get('name')} has no trainable parameters (an ONNX graph "
                "runs in onnxruntime, outside autograd): finetune a PyTorch backbone "
                "(backbone=mobilefacenet, backbone=torch, ...) and evaluate the export"
            )
        h, w = backbone["input"]["size"]
        with torch.no_grad():
            self.backbone.eval()
            dim = self.backbone(torch.zeros(2, backbone["input"]["channels"], h, w)).embedding
        self.backbone.train()
        self.head = instantiate(head, embedding_dim=dim.shape[1], num_classes=num_classes)
        if head_init == "class_means" and not isinstance(
            getattr(self.head, "weight", None), torch.nn.Parameter
        ):
            raise ValueError(f"head_init=class_means needs a cosine head, not {head['_target_']}")
        self.flip_val = bool(backbone.get("flip_test", False))

    def setup(self, stage: str) -> None:
        weights = self.hparams.backbone.get("weights")
        if stage == "fit" and weights:
            load_backbone_weights(
                self.backbone,
                weights,
                ignore_keys=list(self.hparams.backbone.get("ignore_keys") or []),
            )

    def on_fit_start(self) -> None:
        if self.hparams.head_init == "class_means" and self.trainer.ckpt_path is None:
            self.imprint_head(self.trainer.datamodule.imprint_dataloader())

    @torch.no_grad()
    def imprint_head(self, loader) -> None:
        """Set each class weight to the normalised mean of its faces' normalised embeddings
        (classes without a face keep theirs); ``loader`` yields ``image`` and ``label``."""
        was_training = self.backbone.training
        self.backbone.eval()
        weight = self.head.weight
        sums = torch.zeros_like(weight, dtype=torch.float32)
        counts = torch.zeros(weight.shape[0], device=weight.device)
        for batch in loader:
            if "image" not in batch:
                continue
            emb = F.normalize(self(batch["image"].to(self.device)).float(), dim=1)
            labels = batch["label"].to(self.device)
            sums.index_add_(0, labels, emb)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        seen = counts > 0
        weight[seen] = F.normalize(sums[seen], dim=1).to(weight.dtype)
        self.backbone.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)`` of images ``(B, C, h, w)``."""
        return self.backbone(x).embedding

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.head(self(batch["image"]), batch["label"])
        if self.hparams.loss == "focal":
            loss = focal_loss(logits, batch["label"], self.hparams.focal_gamma)
        else:
            loss = F.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/acc", acc, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return extract_batch(self.backbone, batch, self.flip_val)

    test_step = validation_step

    def configure_optimizers(self):
        opt_cfg = OmegaConf.create(dict(self.hparams.optimizer))
        optimizer = instantiate(opt_cfg, params=self.parameters(), _partial_=False)
        if not self.hparams.scheduler:
            return optimizer
        sched_cfg = dict(self.hparams.scheduler)
        interval = sched_cfg.pop("interval", "epoch")
        scheduler = instantiate(OmegaConf.create(sched_cfg), optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, allowed_targets=(), **kwargs):
        """Lightning's loader (``weights_only=True`` by default) after checking the classes
        the checkpoint's hyper-parameters name against :data:`ALLOWED_TARGETS` +
        ``allowed_targets`` (e.g. ``("mypackage.nets.",)`` for a ``backbone=torch`` run)."""
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        check_targets(ckpt.get("hyper_parameters", {}), ALLOWED_TARGETS + tuple(allowed_targets))
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
