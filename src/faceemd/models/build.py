"""Build a backbone from its config group (``conf/backbone/*.yaml``)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from faceemd.data.transforms import FaceInput
from faceemd.models.checkpoint import load_backbone_weights

__all__ = ["build_backbone", "build_face_input"]


def build_backbone(cfg: DictConfig):
    """Instantiate ``cfg.net`` and, when ``cfg.weights`` is set, load it strictly. ``cfg.net``
    may also be the module Hydra already made from it (a backbone config nested in another
    instantiated node, e.g. an adversarial set's surrogate)."""
    net = cfg.net if isinstance(cfg.net, nn.Module) else instantiate(cfg.net)
    if cfg.get("weights"):
        load_backbone_weights(
            net,
            cfg.weights,
            ignore_keys=list(cfg.get("ignore_keys") or []),
            strip_prefixes=list(cfg.get("strip_prefixes") or ["module."]),
        )
    return net.eval()


def build_face_input(cfg: DictConfig) -> FaceInput:
    """The input spec (size, channels, normalisation, colour order, alignment template)
    declared in the backbone config."""
    return FaceInput.from_config(cfg.input)
