"""Reduced patch grids (``rerank.patch_dim``) cached beside the features they come from.

The gallery's basis (:func:`faceemd.emd.projection.fit_patch_basis`) and its grids in it are
one entry, keyed by the gallery's feature-cache key, the grid they were pooled to, the
dimension and the fit's sample size and seed: what determines the basis. A query set's grids
are keyed by its own features and the SHA-256 of the basis bytes, so they are rebuilt whenever
the basis changes (another dimension, or a re-extracted gallery). Grids are stored in the
cache's dtype and read (or mapped, ``cache.mmap``) like the features: a job ranking in the
reduced space reads ``d / C`` of the full grids' bytes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from faceemd.emd.projection import BASIS_SAMPLE
from faceemd.storage.feature_cache import FeatureCache, cache_key

__all__ = ["PatchSpaceStore"]

log = logging.getLogger(__name__)

_VERSION = 1  # bumped when the fit or the projection changes


class PatchSpaceStore:
    """Reduced grids of one query set and one gallery in a feature cache.

    cache: the job's :class:`FeatureCache`; query_key, gallery_key: the sets' feature-cache
    keys; grid: the ``(H', W')`` the grids were pooled to (None: native). Passed to
    :func:`faceemd.emd.projection.reduced_banks`, which calls :meth:`gallery` and
    :meth:`query`.
    """

    def __init__(
        self,
        cache: FeatureCache,
        query_key: str,
        gallery_key: str,
        grid: tuple[int, int] | None,
    ) -> None:
        self.cache = cache
        self.query_key, self.gallery_key = query_key, gallery_key
        self.grid = None if grid is None else list(grid)
        self.dtype = getattr(torch, cache.dtype)

    def gallery(self, dim: int, make: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """``(basis (C, dim), grids (N, R, dim))`` of the gallery, stored or made by ``make``."""
        key = cache_key(kind="patch_space", version=_VERSION, features=self.gallery_key,
                        grid=self.grid, dim=dim, sample=BASIS_SAMPLE, seed=0)  # fmt: skip
        found = self.cache.load_tensors(key, ("basis", "patches"))
        if found is not None:
            log.debug("patch space: hit %s", self.cache.path(key))
            return found["basis"], found["patches"]
        basis, grids = make()
        grids = grids.to(self.dtype)
        self._save(key, {"basis": basis, "patches": grids})
        return basis, grids

    def query(self, basis: Tensor, make: Callable[[], Tensor]) -> Tensor:
        """``(N, R, d)`` grids of the query set in ``basis``, stored or made by ``make``."""
        digest = hashlib.sha256(basis.float().contiguous().numpy().tobytes()).hexdigest()
        key = cache_key(kind="reduced_patches", version=_VERSION, features=self.query_key,
                        grid=self.grid, basis=digest)  # fmt: skip
        found = self.cache.load_tensors(key, ("patches",))
        if found is not None:
            return found["patches"]
        grids = make().to(self.dtype)
        self._save(key, {"patches": grids})
        return grids

    def _save(self, key: str, tensors: dict[str, Tensor]) -> None:
        try:
            self.cache.save_tensors(key, tensors)
        except OSError as err:  # a full disk: this job goes on with what it made
            log.warning("storing the reduced patch grids in the cache failed (%s)", err)
