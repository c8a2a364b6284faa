"""Feature collection and re-ranking evaluation as Lightning callbacks.

:class:`FeatureCollector` gathers, during a validation/test epoch, what the module's step returns
(:class:`faceemd.models.extractor.FaceFeatureExtractor`) for each dataloader, across processes,
and restores set order by index (a distributed sampler pads and interleaves, and ranks may skip
different numbers of bad images). ``evaluate.py`` uses it to fill the feature cache.
:class:`RerankEvaluation` additionally ranks and scores at the end of the epoch (dataloaders
``[query, gallery]``, or ``[query]`` when the query set is its own gallery), each process
ranking a block of the queries, and logs ``stage1/*`` and ``stage2/*``; finetuning validation
uses it. :class:`RandomStateCheckpoint` keeps the random generators' states in training
checkpoints, so that a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import lightning as L
import numpy as np
import torch
from torch import Tensor

from faceemd.emd import Ranking, RerankConfig
from faceemd.emd.projection import reduced_banks
from faceemd.features import ExtractedFeatures
from faceemd.ranking import evaluate_features

__all__ = ["FeatureCollector", "RandomStateCheckpoint", "RerankEvaluation"]

_ROW_KEYS = ("embedding", "patches", "landmarks", "label", "index")


class RandomStateCheckpoint(L.Callback):
    """The states of torch's, numpy's and Python's global generators, saved with every
    checkpoint and restored on resume (Lightning keeps none of them): dropout and anything
    else drawn from them after a resume continues the uninterrupted run's sequence. Stored as
    tensors and plain numbers, so the checkpoint still loads with ``weights_only=True``."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": pos,
                "has_gauss": has_gauss,
                "gauss": gauss,
            },
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


class FeatureCollector(L.Callback):
    """Collect per-dataloader features during validation/test epochs.

    After each epoch (not the sanity check) ``self.features`` holds one
    :class:`ExtractedFeatures` per dataloader, in set order, with ``labels`` from the batches,
    identical on every rank; ``self.extract_seconds`` the epoch's wall time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features: list[ExtractedFeatures] = []
        self.extract_seconds = 0.0
        self._buffers: dict[int, dict[str, list]] = {}
        self._skipped: dict[int, int] = {}
        self._t0 = 0.0

    def _start(self, *_) -> None:
        self._buffers = defaultdict(lambda: defaultdict(list))
        self._skipped = defaultdict(int)
        self._t0 = time.perf_counter()

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._skipped[dataloader_idx] += int(outputs.get("skipped", 0))
        buf = self._buffers[dataloader_idx]
        if "embedding" not in outputs:
            return
        for key in _ROW_KEYS:
            buf[key].append(outputs[key].detach())
        buf["grid_shape"] = [tuple(outputs["grid_shape"])]
        buf["image_size"] = [tuple(outputs["image_size"])]

    on_validation_epoch_start = _start
    on_test_epoch_start = _start
    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    def _num_loaders(self, trainer: L.Trainer) -> int:
        counts = trainer.num_test_batches if trainer.testing else trainer.num_val_batches
        return len(counts) if isinstance(counts, list) else 1

    def _gather(self, trainer: L.Trainer, pl_module: L.LightningModule, idx: int):
        buf = self._buffers.get(idx, {})
        skipped = int(pl_module.all_gather(torch.tensor(self._skipped.get(idx, 0))).sum())
        parts = {k: torch.cat(buf[k]) if buf.get(k) else None for k in _ROW_KEYS}
        if trainer.world_size > 1:
            parts = _gather_rows(trainer, pl_module, parts)
        if parts["embedding"] is None or len(parts["embedding"]) == 0:
            raise ValueError(
                f"dataloader {idx} produced no features ({skipped} image(s) skipped as "
                "unreadable): check that the image set is not empty"
            )
        shapes = _gather_objects(trainer, (buf.get("grid_shape"), buf.get("image_size")))
        grid_shape, image_size = next((g[0], s[0]) for g, s in shapes if g)
        order = _first_occurrence_order(parts["index"])
        parts = {k: v[order].cpu() for k, v in parts.items()}
        return ExtractedFeatures(
            embeddings=parts["embedding"],
            patches=parts["patches"],
            index=parts["index"],
            landmarks=parts["landmarks"],
            grid_shape=grid_shape,
            image_size=image_size,
            skipped=skipped,
            labels=parts["label"],
        )

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.extract_seconds = time.perf_counter() - self._t0
        self.features = [
            self._gather(trainer, pl_module, i) for i in range(self._num_loaders(trainer))
        ]
        self._buffers = {}

    on_validation_epoch_end = _end
    on_test_epoch_end = _end


class RerankEvaluation(FeatureCollector):
    """Collect query/gallery features in an epoch, then rank, score and log them.

    rerank: the stage-2 settings (a :class:`RerankConfig` or a mapping of its fields).
    same_images: override of the datamodule's ``same_images`` (query set = gallery).
    The last metrics and ranking stay in ``self.results`` and ``self.ranking``.
    """

    def __init__(self, rerank: RerankConfig | dict | None = None, same_images: bool | None = None):
        super().__init__()
        if rerank is None:
            rerank = RerankConfig()
        self.cfg = rerank if isinstance(rerank, RerankConfig) else RerankConfig(**dict(rerank))
        self.same_images = same_images
        self.results: dict[str, float] = {}
        self.ranking: Ranking | None = None

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        super()._end(trainer, pl_module)
        same = self.same_images
        if same is None:
            same = bool(getattr(trainer.datamodule, "same_images", False))
        query = self.features[0]
        gallery = query if same else self.features[1]
        # every process ranks a block of queries; all end with the same gathered result
        banks = reduced_banks(
            query.to_bank(self.cfg.grid), gallery.to_bank(self.cfg.grid), self.cfg.screen_dim, same
        )
        results, self.ranking = evaluate_features(*banks, self.cfg, same)
        results["eval/extract_seconds"] = self.extract_seconds
        results["eval/skipped_images"] = query.skipped + (0 if same else gallery.skipped)
        self.results = results
        pl_module.log_dict({k: float(v) for k, v in results.items()}, sync_dist=False)

    on_validation_epoch_end = _end
    on_test_epoch_end = _end


def _gather_rows(trainer: L.Trainer, pl_module: L.LightningModule, parts: dict) -> dict:
    """All-gather row tensors whose length differs between ranks (pad to the longest, cut);
    a rank that read no image contributes zero rows of the width the others report."""
    meta = {k: (v.shape[0], tuple(v.shape[1:]), v.dtype) for k, v in parts.items() if v is not None}
    everyone = _gather_objects(trainer, meta)
    out = {}
    for key, value in parts.items():
        known = next((m[key] for m in everyone if key in m), None)
        if known is None:
            out[key] = None
            continue
        sizes = [m[key][0] if key in m else 0 for m in everyone]
        if value is None:
            value = torch.zeros(0, *known[1], dtype=known[2], device=pl_module.device)
        pad = max(sizes) - value.shape[0]
        if pad:
            value = torch.cat([value, value.new_zeros(pad, *value.shape[1:])])
        gathered = pl_module.all_gather(value)
        out[key] = torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))])
    return out


def _gather_objects(trainer: L.Trainer, obj):
    """Python objects from every rank (a list of one on a single process)."""
    if trainer.world_size == 1:
        return [obj]
    out = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _first_occurrence_order(index: Tensor) -> Tensor:
    """Rows that sort ``index`` ascending, keeping one row per index value (drops padding)."""
    order = torch.sort(index, stable=True).indices
    sorted_idx = index[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return order[keep]
