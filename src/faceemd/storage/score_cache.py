"""Stage-2 EMD similarities cached beside the features (:class:`ScoreCache`).

The similarities do not depend on alpha or the blend, so the jobs of an alpha sweep compute
them once; in a sweep over weightings the first job scores every swept weighting in one pass
(shared candidate gathering and patch products) and caches them for the others.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from faceemd.emd import FeatureBank, RerankConfig, prepare_gallery, stage2_scores_for
from faceemd.storage.feature_cache import FeatureCache, cache_key

__all__ = ["ScoreCache"]

log = logging.getLogger(__name__)


class ScoreCache:
    """Stage-2 EMD similarities cached per (query features, gallery features, stage-2 settings
    except alpha/blend, candidates): jobs of an alpha sweep compute them once. Candidates are
    the stage-1 top-k ``(Q, k)`` of a ranking, or the ``(N, 2)`` rows of verification pairs.

    others: further weightings to score whenever this job's own scores are missing (a ranking
    job given its ``banks``, the query and gallery :class:`FeatureBank`): they share its
    candidate gathering and patch products (:func:`faceemd.emd.stage2_scores_for`) and are
    cached for the later jobs of a sweep over weightings; those already cached, and those this
    data cannot give (e.g. ``lmk`` without landmarks), are left out."""

    # Bumped when the engine's numbers change beyond tol (v2: int8 cost, numba backend; v3:
    # apc/cc/sc follow the public code, the printed forms are apc_dot/cc_dot/sc_eq8).
    _ENGINE = 3

    def __init__(
        self,
        cache: FeatureCache | None,
        feats: dict,
        rerank: RerankConfig,
        banks: tuple[FeatureBank, FeatureBank] | None = None,
        others: list[str] | tuple[str, ...] = (),
    ) -> None:
        keys = [f.key for f in feats.values()]
        self.cache = cache if cache is not None and all(keys) else None
        self.rerank = rerank
        self.base = {"features": keys, **rerank.score_settings()}
        self.banks = banks
        self.others = [w for w in dict.fromkeys(others) if w != rerank.weighting]
        self.hit = False
        self.prefetched: list[str] = []
        self.stats: dict = {}

    def _key(self, candidates: torch.Tensor, weighting: str | None = None) -> str:
        digest = hashlib.sha256(candidates.long().contiguous().numpy().tobytes()).hexdigest()
        base = self.base if weighting is None else {**self.base, "weighting": weighting}
        return cache_key(kind="stage2_scores", engine=self._ENGINE, candidates=digest, **base)

    def lookup(self, candidates: torch.Tensor) -> torch.Tensor | None:
        """This job's cached scores of ``candidates``; on a miss with ``others`` to do, this
        job's scores computed with theirs (theirs cached now), else None."""
        if self.cache is None:
            return None
        found = self.cache.load_scores(self._key(candidates), candidates)
        self.hit = found is not None
        if found is None and self.banks is not None and self.others:
            return self._score_with_others(candidates)
        return found

    def store(self, candidates: torch.Tensor, emd: torch.Tensor | None) -> None:
        if self.cache is None or self.hit or emd is None:
            return
        self.cache.save_scores(self._key(candidates), candidates, emd)

    def _score_with_others(self, candidates: torch.Tensor) -> torch.Tensor | None:
        query, gallery = self.banks
        gallery = prepare_gallery(gallery, self.rerank)
        todo = [
            w
            for w in self.others
            if not self.cache.path(self._key(candidates, w)).is_file()
            and _scorable(query, gallery, candidates, self.rerank, w)
        ]
        if not todo:
            return None
        own = self.rerank.weighting
        log.info("stage 2: scoring %s with %s (for the sweep's later jobs)", own, ", ".join(todo))
        scores = stage2_scores_for(
            query, gallery, candidates, self.rerank, [own, *todo], self.stats
        )
        for w in todo:
            try:
                self.cache.save_scores(self._key(candidates, w), candidates, scores[w])
            except OSError as err:  # a full disk: the job's own scores are still returned
                log.warning("storing the %s stage-2 scores in the cache failed (%s)", w, err)
        self.prefetched = todo
        return scores[own]


def _scorable(query, gallery, candidates: torch.Tensor, rerank: RerankConfig, weighting) -> bool:
    """Whether ``weighting`` can score these features (one query's first candidate tried)."""
    if not len(query) or not candidates.shape[1]:
        return False
    one = FeatureBank(
        query.embeddings[:1],
        query.patches[:1],
        query.labels[:1],
        None if query.lmk is None else query.lmk[:1],
    )
    try:
        stage2_scores_for(one, gallery, candidates[:1, :1], rerank, [weighting])
    except ValueError as err:
        log.info("stage 2: not scoring %s for the sweep (%s)", weighting, err)
        return False
    return True
