"""Strict loading of public backbone checkpoints (``weights_only=True``, never pickled code).

Accepts a bare state dict or the usual containers (``state_dict``, ``net_state_dict``,
``model``), strips wrapper prefixes such as DataParallel's ``module.``, drops keys that are not
part of the feature extractor (``ignore_keys`` prefixes, e.g. FaceNet's ``logits.``) and then
requires an exact match of names and shapes, listing what is missing or unexpected otherwise.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_backbone_weights", "read_state_dict"]

_CONTAINER_KEYS = ("state_dict", "net_state_dict", "model", "model_state_dict")


def read_state_dict(path: str | Path, strip_prefixes: Sequence[str] = ("module.",)) -> dict:
    """Read a checkpoint file and return its flat ``{name: tensor}`` state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set backbone.weights to a file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(
            f"cannot read checkpoint {path}: {err.__class__.__name__}: {str(err)[:300]}. "
            "Expected a torch state dict (a full pickled model object is refused: re-save "
            "its .state_dict())"
        ) from err
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next(
            (obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], dict)), None
        )
        if inner is None:
            raise ValueError(
                f"checkpoint {path} holds no state dict: top-level keys {sorted(obj)[:10]}"
            )
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        for prefix in strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _advice(found: set[str], wanted: set[str]) -> str:
    """What to do about a key mismatch: a train.py checkpoint points to its export, a
    consistent extra prefix to ``strip_prefixes``, anything else to the config."""
    for prefix in sorted({k.split(".", 1)[0] + "." for k in found if "." in k}):
        stripped = {k[len(prefix) :] for k in found if k.startswith(prefix)}
        if wanted <= stripped:
            if prefix == "backbone.":
                return (
                    "this looks like a train.py checkpoint: evaluate its exported backbone, "
                    "<run folder>/export/backbone.pt (python -c 'from faceemd.jobs.train import "
                    'export_backbone; export_backbone("<ckpt>", "backbone.pt")\' writes one), '
                    "or set backbone.strip_prefixes=[backbone.] and "
                    "backbone.ignore_keys=[head.]"
                )
            return (
                f"the file's keys carry the prefix {prefix!r}: set "
                f"backbone.strip_prefixes=[{prefix}] (ignore_keys drops keys, it does not "
                "rename them)"
            )
    return (
        "check that backbone=... matches the checkpoint; list key prefixes to drop in "
        "backbone.ignore_keys, or prefixes to remove in backbone.strip_prefixes"
    )


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_backbone_weights(
    module: nn.Module,
    path: str | Path,
    ignore_keys: Sequence[str] = (),
    strip_prefixes: Sequence[str] = ("module.",),
) -> nn.Module:
    """Load ``path`` into ``module`` strictly; raise ``ValueError`` listing any mismatch."""
    state = read_state_dict(path, strip_prefixes)
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_keys)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {path} does not match {module.__class__.__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:6])}")
        parts.append(_advice(set(state), set(own)))
        raise ValueError("\n  ".join(parts))
    module.load_state_dict(state, strict=True)
    return module
