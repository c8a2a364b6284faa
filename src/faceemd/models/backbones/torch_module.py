"""Any PyTorch ``nn.Module`` as a backbone: the patch grid read from a named submodule by a
forward hook, the embedding from the module's output or from another named submodule.

A user's own network needs no subclass: ``backbone=torch`` with ``net.module._target_`` set to
its class (Hydra instantiates it), ``net.grid_layer`` the dotted name of the submodule whose
output is the ``(N, C, H, W)`` last conv map, and optionally ``net.embedding_layer`` and
``net.weights`` (a state dict of the module, loaded strictly with ``weights_only=True``).
"""

from __future__ import annotations

import functools
import logging

from torch import Tensor, nn

from faceemd.models.backbones.base import FaceBackbone
from faceemd.models.checkpoint import load_backbone_weights

__all__ = ["TorchBackbone"]

log = logging.getLogger(__name__)


class TorchBackbone(FaceBackbone):
    """module: the network; grid_layer: dotted name of the submodule giving the grid;
    embedding_layer: dotted name of the submodule giving the embedding (None: the module's own
    output, a tensor ``(N, D)``); weights: optional state dict file for ``module``;
    ignore_keys: key prefixes of that file to leave out."""

    def __init__(
        self,
        module: nn.Module,
        grid_layer: str,
        embedding_layer: str | None = None,
        weights: str | None = None,
        ignore_keys: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = module
        names = dict(module.named_modules())
        for role, name in (("grid_layer", grid_layer), ("embedding_layer", embedding_layer)):
            if name is not None and (name == "" or name not in names):
                available = ", ".join(n for n in names if n)
                raise ValueError(
                    f"{type(module).__name__} has no submodule {name!r} (backbone.net.{role}); "
                    f"its submodules are: {available}"
                )
        self.grid_layer, self.embedding_layer = grid_layer, embedding_layer
        if weights:
            load_backbone_weights(module, weights, ignore_keys=list(ignore_keys or []))
        else:
            log.warning(
                "backbone=torch without net.weights: %s is used as its constructor left it",
                type(module).__name__,
            )
        names[grid_layer].register_forward_hook(functools.partial(_keep_output, "grid"))
        if embedding_layer is not None:
            names[embedding_layer].register_forward_hook(
                functools.partial(_keep_output, "embedding")
            )

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        grid_module = self.model.get_submodule(self.grid_layer)
        emb_module = None
        if self.embedding_layer is not None:
            emb_module = self.model.get_submodule(self.embedding_layer)
        try:
            out = self.model(x)
            grid = getattr(grid_module, _KEPT, {}).get("grid")
            emb = out if emb_module is None else getattr(emb_module, _KEPT, {}).get("embedding")
        finally:  # no tensor left on the module: it must stay deep-copyable
            for module in (grid_module, emb_module):
                if module is not None and _KEPT in module.__dict__:
                    del module.__dict__[_KEPT]
        if not isinstance(grid, Tensor) or grid.dim() != 4:
            got = None if grid is None else getattr(grid, "shape", type(grid).__name__)
            raise ValueError(
                f"submodule {self.grid_layer!r} gave {got}; a (N, C, H, W) tensor is needed"
            )
        if not isinstance(emb, Tensor):
            raise ValueError(
                f"the embedding source gave a {type(emb).__name__}, not a tensor: set "
                "backbone.net.embedding_layer to the submodule whose output is the embedding"
            )
        return grid, emb.reshape(len(x), -1)


# The hooked submodule keeps its last output under this attribute during one forward. It is on
# the submodule, not in a closure over the backbone, so a deep copy's hooks (the inference
# copies of faceemd.models.inference) write into the copy.
_KEPT = "_faceemd_kept_output"


def _keep_output(role: str, module: nn.Module, _inputs, output) -> None:
    module.__dict__.setdefault(_KEPT, {})[role] = output
