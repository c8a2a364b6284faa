"""Two-stage face identification (paper Sec. 2.3, Fig. 2, Eq. 9).

Stage 1 ranks the gallery by cosine similarity of image embeddings and keeps the top ``depth``
items per query, streaming the gallery in chunks so memory is ``O(query_batch * chunk_size)``,
never ``Q x G``. Stage 2 re-scores the first ``top_k`` of them by patch-wise EMD similarity and
blends ``alpha * emd_similarity + (1 - alpha) * cosine``; positions past ``top_k`` keep their
stage-1 order. ``depth >= top_k`` is kept so that R-Precision and MAP@R, which look R items deep,
can be computed from the returned rankings alone.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from faceemd.emd.cost import patch_cosine, quantize_patches
from faceemd.emd.exact import exact_emd
from faceemd.emd.mapping import release, shared_file_mapping
from faceemd.emd.sinkhorn import EMDResult, SinkhornSettings, solve
from faceemd.emd.weights import WEIGHTINGS, compute_weights, weight_probe

__all__ = [
    "FeatureBank",
    "Ranking",
    "RerankConfig",
    "check_finite",
    "nonfinite_rows",
    "pairwise_emd",
    "patch_summaries",
    "stage1_topk",
    "blend_stage2",
    "stage2_rerank",
    "stage2_scores",
    "two_stage_rank",
]

# Bytes of patch cosines and Sinkhorn kernels (float32) one stage-2 step may hold: about the L2
# cache of a 2-core CPU, so the passes over them read cache rather than memory.
_KERNEL_BUDGET = 4 << 20
# On a GPU a step should instead fill the device: hundreds of queries' problems per launch.
_GPU_KERNEL_BUDGET = 1 << 30
# Rows read from a memory-mapped gallery between releases of its pages (~1 MB mapped per row).
_MAPPED_ROWS = 128
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RerankConfig:
    """Stage-2 settings (``conf/rerank/emd.yaml`` mirrors these fields).

    top_k: candidates re-ranked per query (paper: 100); 0 disables stage 2.
    alpha: blend weight of the EMD similarity in [0, 1] (paper: 0.7) for ``blend='linear'``.
    blend: ``'linear'`` (Eq. 9) or ``'sum'`` (the public code's ``alpha < 0`` mode: EMD + cosine).
    weighting: one of :data:`faceemd.emd.weights.WEIGHTINGS`.
    solver: ``'sinkhorn'`` or ``'exact'`` (POT network simplex, slow, for checks).
    eps, max_iter, tol, check_every, log_domain, backend: Sinkhorn settings (see
    :class:`faceemd.emd.sinkhorn.SinkhornSettings`).
    cost_dtype: precision of the patch-cosine matrix product: ``'float32'``, ``'bfloat16'``
    (fast only where the CPU or GPU has bf16 matrix units) or ``'int8'`` (codes of the
    normalised gallery patches made once per gallery, integer dot products; see
    :mod:`faceemd.emd.cost`).
    query_batch: queries re-ranked per step (memory ~ query_batch * top_k * R * (R + C) floats);
    None picks it so that one step's cosines and kernels (``8 * top_k * R * R'`` bytes per
    query) stay within ~4 MiB on a CPU (its L2 caches) and ~1 GiB on a GPU (enough problems per
    launch to fill it).
    chunk_size: gallery items per stage-1 step.
    grid: optional ``(H', W')`` the patch grids are pooled to before ranking (paper: 8x8 or 4x4);
    None keeps the backbone's native grid.
    """

    top_k: int = 100
    alpha: float = 0.7
    blend: str = "linear"
    weighting: str = "apc"
    solver: str = "sinkhorn"
    eps: float = 0.05
    max_iter: int = 200
    tol: float = 1e-4
    check_every: int = 10
    log_domain: bool = False
    backend: str = "auto"
    cost_dtype: str = "float32"
    query_batch: int | None = None
    chunk_size: int = 16384
    grid: tuple[int, int] | None = None

    def sinkhorn_settings(self) -> SinkhornSettings:
        return SinkhornSettings(
            self.eps, self.max_iter, self.tol, self.check_every, self.log_domain, self.backend
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
        if self.solver not in ("sinkhorn", "exact"):
            raise ValueError(f"solver must be 'sinkhorn' or 'exact', got {self.solver!r}")
        if self.cost_dtype not in (*_DTYPES, "int8"):
            raise ValueError(
                f"cost_dtype must be one of {[*_DTYPES, 'int8']}, got {self.cost_dtype!r}"
            )
        if (self.query_batch is not None and self.query_batch < 1) or self.chunk_size < 1:
            raise ValueError("query_batch and chunk_size must be >= 1")


@dataclass
class FeatureBank:
    """Features of one image set, as the ranking needs them.

    embeddings: ``(N, D)`` final embeddings (stage 1, CC weighting).
    patches: ``(N, R, C)`` patch embeddings of the last conv grid (stage 2), any float dtype;
    may be a memory-mapped tensor, rows are gathered per query batch.
    labels: ``(N,)`` integer identity labels.
    lmk: optional ``(N, R)`` landmark-density weights (LMK weighting).
    summaries: optional ``(norms (N, R), means (N, C))`` of the patches, float32, as the feature
    cache stores them; with them (and ``verified``) stage 2 reads only the candidates' rows, so
    a memory-mapped gallery is never read in full.
    verified: the features are known to be finite (checked when they were cached).
    quantized: optional int8 codes ``(N, R, C)`` and scales ``(N, R)`` of the normalised
    patches (:func:`faceemd.emd.cost.quantize_patches`) for ``cost_dtype='int8'``.
    """

    embeddings: Tensor
    patches: Tensor
    labels: Tensor
    lmk: Tensor | None = None
    summaries: tuple[Tensor, Tensor] | None = None
    verified: bool = False
    quantized: tuple[Tensor, Tensor] | None = None

    def __post_init__(self) -> None:
        n = self.embeddings.shape[0]
        if self.embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (N, D), got {tuple(self.embeddings.shape)}")
        if self.patches.dim() != 3 or self.patches.shape[0] != n:
            raise ValueError(
                f"patches must be (N, R, C) with N={n} rows, got {tuple(self.patches.shape)}"
            )
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got {tuple(self.labels.shape)}")
        if self.lmk is not None and self.lmk.shape != self.patches.shape[:2]:
            raise ValueError(
                f"lmk weights must be (N, R) = {tuple(self.patches.shape[:2])}, "
                f"got {tuple(self.lmk.shape)}"
            )
        if self.summaries is not None and (
            self.summaries[0].shape != self.patches.shape[:2]
            or self.summaries[1].shape != (n, self.patches.shape[2])
        ):
            raise ValueError("summaries must be patch norms (N, R) and patch means (N, C)")
        if self.quantized is not None and (
            self.quantized[0].shape != self.patches.shape
            or self.quantized[0].dtype != torch.int8
            or self.quantized[1].shape != self.patches.shape[:2]
        ):
            raise ValueError(
                "quantized must be int8 codes (N, R, C) and scales (N, R) of these patches "
                "(see faceemd.emd.quantize_patches)"
            )

    def __len__(self) -> int:
        return self.embeddings.shape[0]


@dataclass
class Ranking:
    """Rankings of the gallery per query, ``depth`` items deep.

    stage1_index / stage2_index: ``(Q, depth)`` gallery row indices, best first.
    stage1_score / stage2_score: ``(Q, depth)`` the scores they were sorted by (stage 2 holds
    blended scores in its first ``top_k`` columns and cosine after).
    stage1_seconds / stage2_seconds: wall time of each stage.
    emd_similarity: ``(Q, top_k)`` EMD similarities of the stage-1 candidates (None when
    stage 2 was skipped).
    """

    stage1_index: Tensor
    stage1_score: Tensor
    stage2_index: Tensor
    stage2_score: Tensor
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0
    emd_similarity: Tensor | None = None


def nonfinite_rows(x: Tensor) -> list[int]:
    """Rows of ``x`` (first dim) holding NaN or Inf, reading ~16 MB at a time so that a
    memory-mapped gallery is streamed, not copied."""
    per_row = max(1, x[0].numel()) if x.shape[0] else 1
    step = max(1, (1 << 22) // per_row)
    rows: list[int] = []
    for i in range(0, x.shape[0], step):
        bad = ~torch.isfinite(x[i : i + step].reshape(-1, per_row)).all(1)
        rows += (bad.nonzero().flatten() + i).tolist()
    return rows


def check_finite(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` naming the rows of ``x`` (first dim) holding NaN or Inf."""
    bad_rows = nonfinite_rows(x)
    if bad_rows:
        shown = ", ".join(map(str, bad_rows[:10])) + (" ..." if len(bad_rows) > 10 else "")
        raise ValueError(
            f"{name} has NaN/Inf values in {len(bad_rows)} row(s): {shown}; re-extract those "
            "images or drop them (a backbone in half precision can overflow: try fp32)"
        )


def stage1_topk(
    query: Tensor,
    gallery: Tensor,
    depth: int,
    exclude: Tensor | None = None,
    chunk_size: int = 16384,
    query_batch: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Top-``depth`` gallery items by cosine similarity, streamed over gallery chunks.

    query: ``(Q, D)``; gallery: ``(G, D)``; exclude: optional ``(Q,)`` gallery row to leave out of
    each query's ranking (its own image), -1 for none. Returns ``(scores, index)``, both
    ``(Q, depth)``, best first. Peak extra memory ``query_batch * (chunk_size + depth)`` floats.
    """
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"embeddings must be (Q, D) and (G, D) with equal D, got {tuple(query.shape)} and "
            f"{tuple(gallery.shape)}"
        )
    available = gallery.shape[0] - (1 if exclude is not None and bool((exclude >= 0).any()) else 0)
    if depth > available:
        raise ValueError(
            f"ranking depth {depth} exceeds the {available} gallery items a query can be "
            "compared with; lower rerank.top_k or use a larger gallery"
        )
    scores_out, index_out = [], []
    for q0 in range(0, query.shape[0], query_batch):
        qn = torch.nn.functional.normalize(query[q0 : q0 + query_batch].float(), dim=1)
        best_s = qn.new_empty(qn.shape[0], 0)
        best_i = torch.empty(qn.shape[0], 0, dtype=torch.long, device=qn.device)
        for g0 in range(0, gallery.shape[0], chunk_size):
            gn = torch.nn.functional.normalize(gallery[g0 : g0 + chunk_size].float(), dim=1)
            s = qn @ gn.T
            idx = torch.arange(g0, g0 + gn.shape[0], device=qn.device).expand_as(s)
            if exclude is not None:
                s = s.masked_fill(idx == exclude[q0 : q0 + query_batch, None], float("-inf"))
            s = torch.cat([best_s, s], 1)
            idx = torch.cat([best_i, idx], 1)
            top = torch.topk(s, min(depth, s.shape[1]), dim=1)
            best_s, best_i = top.values, idx.gather(1, top.indices)
        scores_out.append(best_s)
        index_out.append(best_i)
    return torch.cat(scores_out), torch.cat(index_out)


def pairwise_emd(
    query_patches: Tensor,
    candidate_patches: Tensor,
    cfg: RerankConfig,
    query_embedding: Tensor | None = None,
    candidate_embedding: Tensor | None = None,
    query_lmk: Tensor | None = None,
    candidate_lmk: Tensor | None = None,
    return_flow: bool = False,
) -> tuple[EMDResult, Tensor, Tensor]:
    """EMD between each query ``(B, R, C)`` and its candidates ``(B, K, R, C)`` (float grids;
    arguments as in :func:`emd_problems`). Returns ``(result, u, v)``: the :class:`EMDResult`
    over ``(B, K)`` and the weights used, ``u, v (B, K, R)``.
    """
    sim, u, v = emd_problems(
        query_patches,
        candidate_patches,
        cfg,
        query_embedding,
        candidate_embedding,
        query_lmk,
        candidate_lmk,
    )
    if cfg.solver == "exact":
        return exact_emd(torch.rsub(sim, 1.0), u, v, return_flow=return_flow), u, v
    b, k, r, r2 = sim.shape
    flat = (sim.reshape(b * k, r, r2), u.reshape(b * k, r), v.reshape(b * k, r2))
    out = solve(*flat, cfg.sinkhorn_settings(), return_flow, sim_bound=1.0)
    result = EMDResult(
        out.distance.view(b, k),
        out.similarity.view(b, k),
        None if out.flow is None else out.flow.view(b, k, r, r2),
        out.iterations.view(b, k),
        out.marginal_error.view(b, k),
    )
    return result, u, v


def emd_problems(
    query_patches: Tensor,
    candidate_patches: Tensor,
    cfg: RerankConfig,
    query_embedding: Tensor | None = None,
    candidate_embedding: Tensor | None = None,
    query_lmk: Tensor | None = None,
    candidate_lmk: Tensor | None = None,
    candidate_norms: Tensor | None = None,
    candidate_pooled: Tensor | None = None,
    candidate_scales: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The EMD problems between each query ``(B, R, C)`` and its candidates ``(B, K, R', C)``:
    patch cosines ``sim (B, K, R, R')`` in [-1, 1] (the cost is ``1 - sim``) and the weights
    ``u (B, K, R)``, ``v (B, K, R')`` of ``cfg.weighting``.

    candidate_norms ``(B, K, R')`` and candidate_pooled ``(B, K, C)``: optional per-gallery
    precomputations (patch L2 norms, patch means) that spare passes over the candidates.
    Candidates may be int8 codes (see :func:`faceemd.emd.cost.quantize_patches`) with their
    ``candidate_scales (B, K, R')``; APC then needs the norms and pooled means, CC the norms
    and candidate embeddings. Float candidates with ``cfg.cost_dtype='int8'`` are quantised
    here.
    """
    if query_patches.dim() != 3 or candidate_patches.dim() != 4:
        raise ValueError(
            f"expected query patches (B, R, C) and candidates (B, K, R, C), got "
            f"{tuple(query_patches.shape)} and {tuple(candidate_patches.shape)}"
        )
    if (
        query_patches.shape[0] != candidate_patches.shape[0]
        or query_patches.shape[2] != candidate_patches.shape[3]
    ):
        raise ValueError(
            f"query patches {tuple(query_patches.shape)} and candidates "
            f"{tuple(candidate_patches.shape)} disagree on batch size or channels"
        )
    codes = candidate_patches
    if cfg.cost_dtype == "int8" and candidate_patches.dtype != torch.int8:
        b, k, r2, c = candidate_patches.shape
        if candidate_norms is None:
            candidate_norms = torch.linalg.vector_norm(candidate_patches.float(), dim=-1)
        codes, candidate_scales = quantize_patches(candidate_patches.reshape(b * k, r2, c))
        codes, candidate_scales = codes.view(b, k, r2, c), candidate_scales.view(b, k, r2)
    probe = weight_probe(cfg.weighting, query_patches, query_embedding)
    if probe is not None and candidate_norms is None:
        probe = None  # without the norms the cosines cannot give <g_j, p>; weights read g
    dtype = _DTYPES.get(cfg.cost_dtype)
    sim = patch_cosine(query_patches, codes, dtype, candidate_norms, candidate_scales, probe)
    candidate_probe = None
    if probe is not None:
        sim, probe_cos = sim
        candidate_probe = probe_cos[:, :, 0]
    u, v = compute_weights(
        cfg.weighting,
        sim,
        query_patches,
        candidate_patches,
        query_embedding,
        candidate_embedding,
        query_lmk,
        candidate_lmk,
        candidate_pooled,
        candidate_probe,
        candidate_norms,
    )
    return sim.clamp_(-1.0, 1.0), u, v


def stage2_scores(
    query: FeatureBank, gallery: FeatureBank, candidates: Tensor, cfg: RerankConfig
) -> Tensor:
    """EMD similarity ``(Q, k)`` between each query and its candidates ``(Q, k)`` (gallery
    rows). Independent of alpha and blend, so it can be computed once per sweep.

    Queries go ``cfg.query_batch`` at a time (None: see :class:`RerankConfig`); an
    out-of-memory error halves that batch and retries. The gallery's per-item summaries (and
    int8 codes for ``cost_dtype='int8'``) are computed on first use and kept on ``gallery``.
    """
    if candidates.dim() != 2 or candidates.shape[0] != len(query):
        raise ValueError(
            f"candidates must be (Q, k) with Q = {len(query)} queries, got {tuple(candidates.shape)}"
        )
    if gallery.summaries is None:
        gallery.summaries = patch_summaries(gallery.patches, cfg.chunk_size)
    if cfg.cost_dtype == "int8" and gallery.quantized is None:
        gallery.quantized = quantize_patches(gallery.patches)
    norms, pooled = gallery.summaries
    rows, scales = gallery.quantized if cfg.cost_dtype == "int8" else (gallery.patches, None)
    q, k = candidates.shape
    r, r2 = query.patches.shape[1], gallery.patches.shape[1]
    budget = _KERNEL_BUDGET if query.patches.device.type == "cpu" else _GPU_KERNEL_BUDGET
    batch = cfg.query_batch or max(1, budget // (8 * max(1, k) * r * r2))
    out = torch.zeros(q, k, device=query.patches.device)
    mapped = shared_file_mapping(rows)  # a gallery mapped from disk: release what was read
    gathered = None  # reused between batches: fresh multi-MB buffers cost page faults each time
    q0 = 0
    while q0 < q and k:
        q1 = min(q0 + batch, q)
        cand = candidates[q0:q1]
        try:
            if gathered is None or gathered.shape[0] < cand.numel():
                gathered = rows.new_empty((batch * k, *rows.shape[1:]))
            part = _take_rows(rows, cand.reshape(-1), gathered[: cand.numel()], mapped)
            sim, u, v = emd_problems(
                query.patches[q0:q1],
                part.view(*cand.shape, *rows.shape[1:]),
                cfg,
                query.embeddings[q0:q1],
                gallery.embeddings[cand],
                None if query.lmk is None else query.lmk[q0:q1],
                None if gallery.lmk is None else gallery.lmk[cand],
                candidate_norms=norms[cand],
                candidate_pooled=pooled[cand],
                candidate_scales=None if scales is None else scales[cand],
            )
            if cfg.solver == "exact":
                result = exact_emd(torch.rsub(sim, 1.0), u, v)
            else:
                flat = (sim.reshape(-1, r, r2), u.reshape(-1, r), v.reshape(-1, r2))
                result = solve(*flat, cfg.sinkhorn_settings(), sim_bound=1.0)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)
            gathered = None
            warnings.warn(
                f"out of memory in stage 2: retrying with query_batch={batch}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        out[q0:q1] = result.similarity.view(q1 - q0, k)
        q0 = q1
    return out


def _take_rows(
    rows: Tensor, index: Tensor, out: Tensor, mapped: tuple[int, int] | None = None
) -> Tensor:
    """``rows[index]`` into ``out`` (both ``(N, ...)``, contiguous). Rows whose size is a
    multiple of 8 bytes are copied as int64 words: ``index_select`` then moves 8 bytes per
    element instead of 1 (int8 codes) or 4, about twice as fast for these multi-KB rows.

    mapped: the shared file mapping holding ``rows`` (:func:`shared_file_mapping`); its pages
    are released after every ``_MAPPED_ROWS`` rows, because reading one row maps a whole
    page-cache folio (~1 MB here) into the process.
    """
    size = rows.element_size()
    row_bytes = rows[0].numel() * size if rows.shape[0] else 0
    aligned = (rows.storage_offset() * size) % 8 == 0 and (out.storage_offset() * size) % 8 == 0
    if rows.is_contiguous() and row_bytes and row_bytes % 8 == 0 and aligned:
        src = rows.view(rows.shape[0], -1).view(torch.int64)
        dst = out.view(out.shape[0], -1).view(torch.int64)
    else:
        src, dst = rows, out
    step = _MAPPED_ROWS if mapped is not None else max(1, index.shape[0])
    for i in range(0, index.shape[0], step):
        torch.index_select(src, 0, index[i : i + step], out=dst[i : i + step])
        if mapped is not None:
            release(mapped)
    return out


def blend_stage2(
    stage1_score: Tensor, stage1_index: Tensor, emd_similarity: Tensor, cfg: RerankConfig
) -> tuple[Tensor, Tensor]:
    """Eq. 9 on the first ``k = emd_similarity.shape[1]`` columns of a stage-1 ranking:
    ``alpha * emd + (1 - alpha) * cos`` (or ``emd + cos`` for ``blend='sum'``), re-sorted;
    columns from ``k`` on keep their stage-1 order."""
    k = emd_similarity.shape[1]
    cos, cand = stage1_score[:, :k], stage1_index[:, :k]
    if cfg.blend == "linear":
        blended = cfg.alpha * emd_similarity + (1.0 - cfg.alpha) * cos
    else:
        blended = emd_similarity + cos
    order = torch.sort(blended, dim=1, descending=True, stable=True).indices
    return (
        torch.cat([blended.gather(1, order), stage1_score[:, k:]], 1),
        torch.cat([cand.gather(1, order), stage1_index[:, k:]], 1),
    )


def stage2_rerank(
    query: FeatureBank,
    gallery: FeatureBank,
    stage1_score: Tensor,
    stage1_index: Tensor,
    cfg: RerankConfig,
    emd_similarity: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Re-rank the first ``cfg.top_k`` columns of a stage-1 ranking by Eq. 9.

    stage1_score, stage1_index: ``(Q, depth)`` from :func:`stage1_topk`; emd_similarity:
    optional precomputed :func:`stage2_scores` of those candidates. Returns ``(score, index)``
    of the same shape; columns from ``top_k`` on are unchanged.
    """
    k = _stage2_depth(cfg, stage1_index.shape[1])
    if k == 0:
        return stage1_score.clone(), stage1_index.clone()
    if emd_similarity is None:
        emd_similarity = stage2_scores(query, gallery, stage1_index[:, :k], cfg)
    return blend_stage2(stage1_score, stage1_index, emd_similarity, cfg)


def _stage2_depth(cfg: RerankConfig, depth: int) -> int:
    """Candidates stage 2 re-ranks: 0 when it cannot change the order (k <= 1, or alpha = 0
    with the linear blend)."""
    k = min(cfg.top_k, depth)
    return 0 if k <= 1 or (cfg.blend == "linear" and cfg.alpha == 0.0) else k


def patch_summaries(patches: Tensor, chunk_size: int = 16384) -> tuple[Tensor, Tensor]:
    """Per-gallery-item patch norms ``(G, R)`` and patch means ``(G, C)``, computed once (each
    gallery item is a candidate of many queries), ~16 MB of patches at a time so that a
    memory-mapped float16 gallery is streamed, not copied. The outputs are allocated up front:
    small results kept between large temporaries would fragment the heap (glibc then keeps
    every freed temporary, ~G * R * C * 4 bytes in all)."""
    g, r, c = patches.shape
    rows = max(1, min(chunk_size, (1 << 22) // max(1, r * c)))
    norms = torch.empty(g, r, device=patches.device)
    means = torch.empty(g, c, device=patches.device)
    for g0 in range(0, g, rows):
        chunk = patches[g0 : g0 + rows].float()
        torch.linalg.vector_norm(chunk, dim=-1, out=norms[g0 : g0 + rows])
        torch.mean(chunk, 1, out=means[g0 : g0 + rows])
    return norms, means


def two_stage_rank(
    query: FeatureBank,
    gallery: FeatureBank,
    cfg: RerankConfig,
    exclude: Tensor | None = None,
    depth: int | None = None,
    emd_scores=None,
) -> Ranking:
    """Stage 1 then stage 2 for every query (paper Fig. 2).

    exclude: optional ``(Q,)`` gallery row of each query's own image (-1 for none), for
    protocols where query and gallery share images. depth: ranking length to keep, at least
    ``cfg.top_k`` (default ``cfg.top_k``); metrics need it >= the largest R.
    emd_scores: optional ``callable(candidates (Q, k)) -> (Q, k) EMD similarities or None``
    (a cache lookup); computed with :func:`stage2_scores` when it returns None.
    """
    for name, bank in (("query", query), ("gallery", gallery)):
        if not bank.verified:
            check_finite(f"{name} embeddings", bank.embeddings)
            if cfg.top_k > 0:
                check_finite(f"{name} patches", bank.patches)
    if cfg.top_k > 0:
        if query.patches.shape[1:] != gallery.patches.shape[1:]:
            raise ValueError(
                f"query patches {tuple(query.patches.shape[1:])} and gallery patches "
                f"{tuple(gallery.patches.shape[1:])} differ: extract both with one backbone/grid"
            )
    depth = max(cfg.top_k, depth or 0, 1)
    t0 = time.perf_counter()
    s1, i1 = stage1_topk(
        query.embeddings, gallery.embeddings, depth, exclude, chunk_size=cfg.chunk_size
    )
    t1 = time.perf_counter()
    k = _stage2_depth(cfg, i1.shape[1])
    emd = None
    if k:
        emd = emd_scores(i1[:, :k]) if emd_scores is not None else None
        if emd is None:
            emd = stage2_scores(query, gallery, i1[:, :k], cfg)
    s2, i2 = stage2_rerank(query, gallery, s1, i1, cfg, emd)
    return Ranking(i1, s1, i2, s2, t1 - t0, time.perf_counter() - t1, emd)
