"""Any PyTorch ``nn.Module`` as a backbone: the patch grid read from a named submodule by a
forward hook, the embedding from the module's output or from another named submodule.

A user's own network needs no subclass: ``backbone=torch`` with ``net.module._target_`` set to
its class (Hydra instantiates it), ``net.grid_layer`` the dotted name of the submodule whose
output is the ``(N, C, H, W)`` last conv map, and optionally ``net.embedding_layer`` and
``net.weights`` (a state dict of the module, loaded strictly with ``weights_only=True``).
"""

from __future__ import annotations

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
        self._seen: dict[str, Tensor] = {}
        names[grid_layer].register_forward_hook(self._keep("grid"))
        if embedding_layer is not None:
            names[embedding_layer].register_forward_hook(self._keep("embedding"))

    def _keep(self, role: str):
        def hook(_module, _inputs, output):
            self._seen[role] = output

        return hook

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._seen.clear()
        out = self.model(x)
        grid = self._seen.get("grid")
        if not isinstance(grid, Tensor) or grid.dim() != 4:
            got = None if grid is None else getattr(grid, "shape", type(grid).__name__)
            raise ValueError(
                f"submodule {self.grid_layer!r} gave {got}; a (N, C, H, W) tensor is needed"
            )
        emb = self._seen.get("embedding") if self.embedding_layer is not None else out
        if not isinstance(emb, Tensor):
            raise ValueError(
                f"the embedding source gave a {type(emb).__name__}, not a tensor: set "
                "backbone.net.embedding_layer to the submodule whose output is the embedding"
            )
        self._seen.clear()
        return grid, emb.reshape(len(x), -1)
