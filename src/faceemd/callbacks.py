"""Re-ranking evaluation as a Lightning callback, shared by evaluation and finetuning validation.

During a validation/test epoch whose dataloaders are ``[query, gallery]`` (or ``[query]`` when
the datamodule's query set is its own gallery, ``same_images``), the callback collects what the
module's step returns (:class:`faceemd.models.extractor.FaceFeatureExtractor`), gathers it across
processes, restores dataset order by index (a distributed sampler pads and interleaves), runs
two-stage ranking on rank 0, broadcasts the metrics and logs ``stage1/*`` and ``stage2/*`` once.
The last metrics and ranking stay in ``self.results`` and ``self.ranking``.
"""

from __future__ import annotations

import time
from collections import defaultdict

import lightning as L
import torch
from torch import Tensor

from faceemd.emd.rerank import FeatureBank, Ranking, RerankConfig, two_stage_rank
from faceemd.metrics import hits_from_ranking, identification_metrics, relevant_counts

__all__ = ["RerankEvaluation", "evaluate_features"]

_KEYS = ("embedding", "patches", "label", "index", "lmk")


def evaluate_features(
    query: FeatureBank, gallery: FeatureBank, cfg: RerankConfig, same_images: bool
) -> tuple[dict[str, float], Ranking]:
    """Two-stage ranking plus metrics for extracted features.

    same_images: query row i is gallery row i (excluded from its own ranking).
    Returns ``(metrics, ranking)``; metric keys ``stage{1,2}/{p_at_1,r_precision,map_at_r}``,
    ``stage1/max_precision_at_k`` and ``eval/*`` counts and seconds.
    """
    exclude = torch.arange(len(query)) if same_images else None
    r = relevant_counts(query.labels, gallery.labels, exclude)
    depth = max(int(r.max()) if len(r) else 1, cfg.top_k, 1)
    ranking = two_stage_rank(query, gallery, cfg, exclude, depth)
    hits1 = hits_from_ranking(ranking.stage1_index, query.labels, gallery.labels)
    hits2 = hits_from_ranking(ranking.stage2_index, query.labels, gallery.labels)
    m1 = identification_metrics(hits1, r, hits1, cfg.top_k)
    m2 = identification_metrics(hits2, r)
    out = {f"stage1/{k}": v for k, v in m1.items() if not k.startswith("num_")}
    out.update({f"stage2/{k}": v for k, v in m2.items() if not k.startswith("num_")})
    out["eval/num_queries"] = m1["num_queries"]
    out["eval/num_excluded_queries"] = m1["num_excluded"]
    out["eval/gallery_size"] = len(gallery)
    out["eval/stage1_seconds"] = ranking.stage1_seconds
    out["eval/stage2_seconds"] = ranking.stage2_seconds
    return out, ranking


class RerankEvaluation(L.Callback):
    """Collect query/gallery features in an epoch, then rank, score and log them.

    rerank: the stage-2 settings (a :class:`RerankConfig` or a mapping of its fields).
    same_images: override of the datamodule's ``same_images`` (query set = gallery).
    """

    def __init__(self, rerank: RerankConfig | dict | None = None, same_images: bool | None = None):
        super().__init__()
        if rerank is None:
            rerank = RerankConfig()
        self.cfg = rerank if isinstance(rerank, RerankConfig) else RerankConfig(**dict(rerank))
        self.same_images = same_images
        self.results: dict[str, float] = {}
        self.ranking: Ranking | None = None
        self._buffers: dict[int, dict[str, list[Tensor]]] = {}
        self._skipped = 0
        self._t0 = 0.0

    # --- collection -------------------------------------------------------------------------
    def _start(self, *_) -> None:
        self._buffers = defaultdict(lambda: defaultdict(list))
        self._skipped = 0
        self._t0 = time.perf_counter()

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._skipped += int(outputs.get("skipped", 0))
        if "embedding" not in outputs:
            return
        buf = self._buffers[dataloader_idx]
        for key in _KEYS:
            if key in outputs:
                buf[key].append(outputs[key].detach())
        if "lmk" not in outputs:
            buf["lmk_missing"].append(torch.ones(1))

    on_validation_epoch_start = _start
    on_test_epoch_start = _start
    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    # --- evaluation -------------------------------------------------------------------------
    def _bank(self, pl_module, loader_idx: int) -> FeatureBank:
        buf = self._buffers.get(loader_idx)
        if not buf or not buf["embedding"]:
            name = "query" if loader_idx == 0 else "gallery"
            raise ValueError(f"no {name} features were collected (is the {name} set empty?)")
        parts = {k: torch.cat(v) for k, v in buf.items() if k in _KEYS and v}
        has_lmk = "lmk" in parts and not buf.get("lmk_missing")
        if not has_lmk:
            parts.pop("lmk", None)
        if pl_module.trainer.world_size > 1:
            parts = {k: _flatten(pl_module.all_gather(v)) for k, v in parts.items()}
        order = _first_occurrence_order(parts["index"])
        parts = {k: v[order].cpu() for k, v in parts.items()}
        return FeatureBank(parts["embedding"], parts["patches"], parts["label"], parts.get("lmk"))

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        extract_seconds = time.perf_counter() - self._t0
        same = self.same_images
        if same is None:
            same = bool(getattr(trainer.datamodule, "same_images", False))
        query = self._bank(pl_module, 0)
        gallery = query if same else self._bank(pl_module, 1)
        skipped = int(pl_module.all_gather(torch.tensor(self._skipped)).sum())
        results: dict[str, float] = {}
        if trainer.is_global_zero:
            results, self.ranking = evaluate_features(query, gallery, self.cfg, same)
            results["eval/extract_seconds"] = extract_seconds
            results["eval/skipped_images"] = skipped
        results = trainer.strategy.broadcast(results, src=0)
        self.results = results
        self._buffers = {}
        pl_module.log_dict({k: float(v) for k, v in results.items()}, sync_dist=False)

    on_validation_epoch_end = _end
    on_test_epoch_end = _end


def _flatten(x: Tensor) -> Tensor:
    """``(world, N, ...)`` from all_gather to ``(world * N, ...)``."""
    return x.reshape(-1, *x.shape[2:])


def _first_occurrence_order(index: Tensor) -> Tensor:
    """Rows that sort ``index`` ascending, keeping one row per index value (drops padding)."""
    order = torch.sort(index, stable=True).indices
    sorted_idx = index[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return order[keep]
