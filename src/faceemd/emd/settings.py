"""Settings of two-stage ranking, in three parts: the method's (:class:`MethodSettings`:
``top_k``, ``alpha``, ``blend``, ``weighting``, ``grid``), the solver's (``solver`` and
:class:`faceemd.emd.sinkhorn.SinkhornSettings`: ``eps``, ``max_iter``, ``tol``,
``check_every``, ``log_domain``, ``backend``, ``eps_start``) and the engine's (:class:`EngineSettings`:
``cost_dtype``, ``query_batch``, ``chunk_size``). :class:`RerankConfig` is the flat record
``conf/rerank/emd.yaml`` fills field by field; the functions below it take only their part.

The dataclasses hold the only defaults (the Sinkhorn ones are :class:`SinkhornSettings`'s):
the YAML file lists the same values (a test keeps them equal). Fields marked ``scores=False`` do not change stage-2 EMD similarities, so the
score cache key (:meth:`RerankConfig.score_settings`) is every other field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from faceemd.emd.cost import COST_DTYPES
from faceemd.emd.sinkhorn import SinkhornSettings
from faceemd.emd.weights import WEIGHTINGS

__all__ = ["SOLVERS", "EngineSettings", "MethodSettings", "RerankConfig"]

SOLVERS = ("sinkhorn", "exact", "relaxed")


@dataclass(frozen=True)
class MethodSettings:
    """The method's settings (paper Sec. 2.3-2.5): what is ranked and how scores combine."""

    top_k: int
    alpha: float
    blend: str
    weighting: str
    grid: tuple[int, int] | None


@dataclass(frozen=True)
class EngineSettings:
    """How the work is carried out; none of it changes the method's definition (``cost_dtype``
    changes scores only within the int8/bf16 rounding, see :mod:`faceemd.emd.cost`)."""

    cost_dtype: str
    query_batch: int | None
    chunk_size: int


def _no_score_effect(default):
    """A field that does not change the stage-2 EMD similarities (blend, batching)."""
    return field(default=default, metadata={"scores": False})


@dataclass
class RerankConfig:
    """Stage-2 settings (``conf/rerank/emd.yaml`` mirrors these fields).

    top_k: candidates re-ranked per query (paper: 100); 0 disables stage 2.
    alpha: blend weight of the EMD similarity in [0, 1] (paper: 0.7) for ``blend='linear'``.
    blend: ``'linear'`` (Eq. 9) or ``'sum'`` (the public code's ``alpha < 0`` mode: EMD + cosine).
    weighting: one of :data:`faceemd.emd.weights.WEIGHTINGS`.
    solver: ``'sinkhorn'``, ``'exact'`` (POT network simplex, slow, for checks) or
    ``'relaxed'`` (the relaxed EMD of :mod:`faceemd.emd.relaxed`: a bound, no solve).
    eps, max_iter, tol, check_every, log_domain, backend, eps_start: Sinkhorn settings (see
    :class:`faceemd.emd.sinkhorn.SinkhornSettings`; ``eps_start`` turns on eps-scaling from it
    down to ``eps``).
    cost_dtype: precision of the patch-cosine matrix product: ``'float32'``, ``'bfloat16'``
    (fast only where the CPU or GPU has bf16 matrix units) or ``'int8'`` (codes of the
    normalised gallery patches made once per gallery, integer dot products; see
    :mod:`faceemd.emd.cost`).
    query_batch: queries re-ranked per step (memory ~ query_batch * top_k * R * (R + C) floats);
    None picks it so that one step's cosines and kernels (``8 * top_k * R * R'`` bytes per
    query) stay within ~16 MiB (at most 16 queries) on a CPU and ~1 GiB on a GPU (enough problems per
    launch to fill it).
    chunk_size: gallery items per stage-1 step.
    stage1_index: ``'exact'`` (every gallery item) or ``'ivf'`` (approximate: faiss inverted
    file, for galleries of ~1M items; :mod:`faceemd.emd.ann`). ivf_nprobe: cells it searches
    per query (more: higher recall of the exact top-k, slower).
    grid: optional ``(H', W')`` the patch grids are pooled to before ranking (paper: 8x8 or 4x4);
    None keeps the backbone's native grid.
    patch_dim: stage 2 in a ``d``-dimensional patch space fitted on the gallery
    (:mod:`faceemd.emd.projection`; default 64, with ``refine_top`` 20: no real protocol lost
    more than 0.2 P@1 against full dimension, docs/patch-space.md); None keeps the full
    dimension, as does a ``d`` of at least the patches' channels.
    refine_top: screen each query's ``top_k`` candidates with the relaxed EMD (in the
    ``patch_dim`` space when set) and solve only the ``m`` most promising (taken alternately
    by the screen's similarity and by cosine) with ``solver`` at full dimension
    (:func:`faceemd.emd.stage2.stage2_scores_for`); None: every candidate is solved.
    """

    top_k: int = 100
    alpha: float = _no_score_effect(0.7)
    blend: str = _no_score_effect("linear")
    weighting: str = "apc"
    solver: str = "sinkhorn"
    eps: float = SinkhornSettings.eps
    max_iter: int = SinkhornSettings.max_iter
    tol: float = SinkhornSettings.tol
    check_every: int = SinkhornSettings.check_every
    log_domain: bool = SinkhornSettings.log_domain
    backend: str = SinkhornSettings.backend
    eps_start: float | None = SinkhornSettings.eps_start
    cost_dtype: str = "float32"
    query_batch: int | None = _no_score_effect(None)
    chunk_size: int = _no_score_effect(16384)
    stage1_index: str = _no_score_effect("exact")
    ivf_nprobe: int = _no_score_effect(32)
    grid: tuple[int, int] | None = None
    patch_dim: int | None = 64
    refine_top: int | None = 20

    @property
    def screen_dim(self) -> int | None:
        """The patch dimension stage 2 screens in: ``patch_dim``, or None (full) when
        ``refine_top`` solves every candidate anyway (e.g. a shallow validation top_k), so no
        job fits a basis it would not rank with."""
        if self.refine_top is not None and self.refine_top >= self.top_k:
            return None
        return self.patch_dim

    def score_settings(self) -> dict:
        """The fields stage-2 EMD similarities depend on (the score cache key); ``refine_top``
        and its screen only where it is set (so the keys of other settings stay as they were)."""
        settings = {
            f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("scores", True)
        }
        if self.refine_top is None:
            del settings["refine_top"]
        else:  # what screened the candidates (a Sinkhorn screen came first)
            settings["refine_screen"] = "relaxed"
        return settings

    @property
    def method(self) -> MethodSettings:
        return MethodSettings(self.top_k, self.alpha, self.blend, self.weighting, self.grid)

    @property
    def engine(self) -> EngineSettings:
        return EngineSettings(self.cost_dtype, self.query_batch, self.chunk_size)

    def sinkhorn_settings(self) -> SinkhornSettings:
        """The solver's settings (with :attr:`solver`, ``sinkhorn`` or ``exact``)."""
        return SinkhornSettings(
            self.eps,
            self.max_iter,
            self.tol,
            self.check_every,
            self.log_domain,
            self.backend,
            self.eps_start,
        )

    def __post_init__(self) -> None:
        for name, kind in (("alpha", float), ("eps", float), ("tol", float), ("top_k", int),
                           ("max_iter", int), ("check_every", int)):  # fmt: skip
            value = getattr(self, name)
            try:
                if isinstance(value, bool) or kind(value) != float(value):
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(
                    f"rerank.{name} must be {'a number' if kind is float else 'an integer'}, "
                    f"got {value!r}"
                ) from None
            setattr(self, name, kind(value))
        if self.tol < 0:
            raise ValueError(f"rerank.tol must be >= 0 (an L1 marginal error), got {self.tol}")
        self.sinkhorn_settings()  # validates eps, max_iter, check_every, backend
        if self.grid is not None:
            self.grid = tuple(int(g) for g in self.grid)
            if len(self.grid) != 2 or min(self.grid) < 1:
                raise ValueError(f"grid must be [H, W] with H, W >= 1, got {self.grid}")
        if self.patch_dim is not None and int(self.patch_dim) < 1:
            raise ValueError(f"patch_dim must be >= 1 (or null), got {self.patch_dim}")
        if self.refine_top is not None and int(self.refine_top) < 1:
            raise ValueError(f"refine_top must be >= 1 (or null), got {self.refine_top}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.blend not in ("linear", "sum"):
            raise ValueError(f"blend must be 'linear' or 'sum', got {self.blend!r}")
        if self.blend == "linear" and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1], got {self.alpha}; use blend='sum' for the public "
                "code's unweighted EMD + cosine score"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {WEIGHTINGS}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.cost_dtype not in (*COST_DTYPES, "int8"):
            raise ValueError(
                f"cost_dtype must be one of {[*COST_DTYPES, 'int8']}, got {self.cost_dtype!r}"
            )
        if self.stage1_index not in ("exact", "ivf"):
            raise ValueError(f"stage1_index must be 'exact' or 'ivf', got {self.stage1_index!r}")
        if int(self.ivf_nprobe) < 1:
            raise ValueError(f"ivf_nprobe must be >= 1, got {self.ivf_nprobe}")
        if (self.query_batch is not None and self.query_batch < 1) or self.chunk_size < 1:
            raise ValueError("query_batch and chunk_size must be >= 1")
