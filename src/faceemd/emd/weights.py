"""Patch weightings for the EMD marginals (paper Sec. 2.5, Eq. 6-8), what each needs from the
query (:func:`weight_probe`) and grid pooling.

Every weighting returns ``(u, v)``: ``u (B, K, R)`` weights of the query patches and
``v (B, K, R)`` weights of the candidate patches, non-negative and summing to 1 per problem.
A weight vector that is all zero (e.g. APC when every correlation is negative) falls back to
uniform, with one warning, so the transport problem stays well posed.

Shapes: query grid ``q (B, R, C)``, candidate grids ``g (B, K, R, C)``, patch cosine matrix
``sim (B, K, R, R)`` (from :func:`faceemd.emd.cost.patch_cosine`). What a weighting may read
of each side is one typed object, :class:`QueryInputs` and :class:`CandidateInputs`: a
weighting that needs a new per-image input adds a field there, fills it where the stage-2
batches are gathered (:func:`faceemd.emd.stage2.stage2_scores_for`) and reads it here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "WEIGHTINGS",
    "CandidateInputs",
    "QueryInputs",
    "compute_weights",
    "grid_to_patches",
    "landmark_density",
    "normalise_weights",
    "pool_patches",
    "weight_probe",
]

# Public-code forms under the short names (the paper's tables were made with them); the
# printed equations under explicit names (see compute_weights).
WEIGHTINGS = ("uniform", "apc", "apc_dot", "cc", "cc_dot", "sc", "sc_eq8", "lmk")


@dataclass(frozen=True)
class QueryInputs:
    """What the weightings may read of a batch of ``B`` queries.

    patches: ``(B, R, C)`` float grids. embedding: ``(B, D)`` final embeddings (CC).
    lmk: ``(B, R)`` landmark densities (:func:`landmark_density`; LMK)."""

    patches: Tensor
    embedding: Tensor | None = None
    lmk: Tensor | None = None


@dataclass(frozen=True)
class CandidateInputs:
    """What the weightings may read of each query's ``K`` candidates.

    patches: ``(B, K, R', C)`` float grids, or int8 codes (:func:`faceemd.emd.cost.quantize_patches`)
    with their ``scales (B, K, R')``. embedding: ``(B, K, D)`` (CC). lmk: ``(B, K, R')`` (LMK).
    norms ``(B, K, R')`` and pooled ``(B, K, C)``: optional per-gallery precomputations (patch
    L2 norms, patch means) that spare passes over the candidates; int8 candidates need them
    for APC (and the norms for CC)."""

    patches: Tensor
    embedding: Tensor | None = None
    lmk: Tensor | None = None
    norms: Tensor | None = None
    pooled: Tensor | None = None
    scales: Tensor | None = None


def normalise_weights(w: Tensor) -> Tensor:
    """Clamp at 0 and scale each vector ``(..., R)`` to sum 1; all-zero rows become uniform."""
    w = w.float().clamp_min(0.0)
    total = w.sum(-1, keepdim=True)
    empty = total <= 0
    if bool(empty.any()):
        warnings.warn(
            f"{int(empty.sum())} patch-weight vector(s) were all zero; using uniform weights "
            "for them (check the features or the weighting method)",
            RuntimeWarning,
            stacklevel=2,
        )
        w = torch.where(empty, 1.0, w)
        total = torch.where(empty, float(w.shape[-1]), total)
    return w.div_(total)


def grid_to_patches(grid: Tensor) -> Tensor:
    """Turn a feature map ``(N, C, H, W)`` into patches ``(N, H*W, C)``, row-major: patch ``r``
    sits at row ``r // W``, column ``r % W``."""
    if grid.dim() != 4:
        raise ValueError(f"expected a feature map (N, C, H, W), got shape {tuple(grid.shape)}")
    return grid.flatten(2).transpose(1, 2)


def pool_patches(
    patches: Tensor, grid_shape: tuple[int, int], pool_to: tuple[int, int], chunk: int = 4096
) -> Tensor:
    """Adaptive-average-pool row-major patches ``(N, gh*gw, C)`` to ``(N, H'*W', C)`` (paper
    Sec. 3.1: 8x8 -> 4x4).

    Works through ``chunk`` rows at a time, so a memory-mapped input is read once and only the
    pooled result is held in memory. Keeps the input dtype.
    """
    gh, gw = grid_shape
    n, r, c = patches.shape
    if r != gh * gw:
        raise ValueError(f"patches have {r} rows per image, grid {gh}x{gw} needs {gh * gw}")
    if tuple(pool_to) == (gh, gw):
        return patches
    out = []
    for i in range(0, n, chunk):
        x = patches[i : i + chunk].float().reshape(-1, gh, gw, c).permute(0, 3, 1, 2)
        x = F.adaptive_avg_pool2d(x, tuple(pool_to))
        out.append(x.flatten(2).transpose(1, 2).to(patches.dtype))
    if not out:
        return patches.new_empty(0, pool_to[0] * pool_to[1], c)
    return torch.cat(out)


def landmark_density(
    landmarks: Tensor, image_size: tuple[int, int], grid_size: tuple[int, int]
) -> Tensor:
    """LMK weights: the share of facial landmarks falling in each grid cell (paper Sec. 2.5).

    landmarks: ``(N, L, 2)`` as (x, y) pixels in an image of ``image_size = (H, W)``;
    points outside the image, or NaN, are ignored. Returns ``(N, gh*gw)`` normalised weights
    (uniform for an image with no usable landmark).
    """
    if landmarks.dim() != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks must be (N, L, 2), got {tuple(landmarks.shape)}")
    h, w = image_size
    gh, gw = grid_size
    x, y = landmarks[..., 0].float(), landmarks[..., 1].float()
    ok = torch.isfinite(x) & torch.isfinite(y) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
    col = (x.nan_to_num(0) * gw / w).floor().long().clamp(0, gw - 1)
    row = (y.nan_to_num(0) * gh / h).floor().long().clamp(0, gh - 1)
    cell = row * gw + col
    counts = torch.zeros(landmarks.shape[0], gh * gw, device=landmarks.device)
    counts.scatter_add_(1, cell, ok.float())
    return normalise_weights(counts)


def weight_probe(method: str, query: QueryInputs) -> Tensor | None:
    """The query-side vector ``(B, 1, C)`` whose products with every candidate patch the APC or
    CC weights need (the query's mean patch, or its embedding when its size is C). It rides
    along as one more row of the patch-cosine product (:func:`faceemd.emd.cost.patch_cosine`)
    instead of a separate pass over the candidates; its cosines with the candidate patches are
    :func:`compute_weights`' ``candidate_probe``."""
    if method in ("apc", "apc_dot"):
        return query.patches.float().mean(1, keepdim=True)
    embedding = query.embedding
    if (
        method in ("cc", "cc_dot")
        and embedding is not None
        and embedding.shape[-1] == query.patches.shape[-1]
    ):
        return embedding.float().unsqueeze(1)
    return None


def _correlation(patches: Tensor, other: Tensor, cosine: bool, eq: str) -> Tensor:
    """``<x_i, p>`` (dot form) or ``cos(x_i, p)`` (public-code form) by einsum ``eq``."""
    if cosine:
        patches, other = F.normalize(patches.float(), dim=-1), F.normalize(other.float(), dim=-1)
    return torch.einsum(eq, patches.float(), other.float())


def compute_weights(
    method: str,
    sim: Tensor,
    query: QueryInputs,
    candidates: CandidateInputs,
    candidate_probe: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Patch weights ``(u (B, K, R), v (B, K, R'))`` for one weighting ``method``.

    Which source each follows (the paper's printed equations, or the public DeepFace-EMD code
    ``anguyen8/deepface-emd`` ``utils/emd.py`` + ``utils/extract_features.py``, which produced
    the paper's tables):

    - ``uniform`` (Eq. 6, both): ``1 / R``.
    - ``apc`` (public code): ``u_i = max(0, cos(q_i, mean_j g_j))``,
      ``v_j = max(0, cos(g_j, mean_i q_i))``: patches and the other image's average-pooled
      vector are L2-normalised before they are correlated.
    - ``apc_dot`` (Eq. 7 as printed): ``u_i = max(0, <q_i, mean_j g_j>)``, likewise ``v``:
      the same up to a factor ``|q_i|`` per patch.
    - ``cc`` / ``cc_dot``: as ``apc`` / ``apc_dot`` with the other image's final embedding
      ``(B, D)`` / ``(B, K, D)`` in place of its pooled vector (needs D = C).
    - ``sc`` (public code): ``u_i = sum_j (1 - cos(q_i, g_j))``, column sums for ``v``: sums of
      cosine *distances*, more weight on patches unlike the other image (occluded ones), as
      the paper's own discussion of SC describes.
    - ``sc_eq8`` (Eq. 8 as printed): ``u_i = max(0, sum_j cos(q_i, g_j))``: sums of cosine
      *similarities*, which order patches the opposite way.
    - ``lmk``: precomputed per-image landmark densities ``query.lmk (B, R)``,
      ``candidates.lmk (B, K, R)`` (see :func:`landmark_density`).

    candidate_probe: optional ``(B, K, R')`` cosines ``cos(g_j, p)`` with ``p`` the query's
    :func:`weight_probe`; with it (and ``candidates.norms`` for the dot forms) and
    ``candidates.pooled`` the candidate patches are not read (they may be int8 codes).
    """
    b, k, r, _ = sim.shape
    query_embedding, candidate_embedding = query.embedding, candidates.embedding
    candidate_norms, candidate_pooled = candidates.norms, candidates.pooled
    q_patches, c_patches = query.patches, candidates.patches
    if method == "uniform":
        u = sim.new_full((b, k, r), 1.0 / r)
        v = sim.new_full((b, k, sim.shape[-1]), 1.0 / sim.shape[-1])
        return u, v
    cosine = method in ("apc", "cc")
    if method in ("apc", "apc_dot", "cc", "cc_dot"):
        if method.startswith("apc"):
            q_other = q_patches.float().mean(1)  # (B, C): the query's pooled vector
            g_other = c_patches.float().mean(2) if candidate_pooled is None else candidate_pooled
        else:
            if query_embedding is None or candidate_embedding is None:
                raise ValueError(f"weighting {method!r} needs the query and candidate embeddings")
            if query_embedding.shape[-1] != q_patches.shape[-1]:
                raise ValueError(
                    f"weighting {method!r} correlates patches (C={q_patches.shape[-1]}) with "
                    f"embeddings (D={query_embedding.shape[-1]}); it needs D = C: choose "
                    "'apc' for this backbone"
                )
            q_other, g_other = query_embedding, candidate_embedding
        u = _correlation(q_patches, g_other, cosine, "brc,bkc->bkr")
        if candidate_probe is None:
            v = _correlation(c_patches, q_other, cosine, "bkrc,bc->bkr")
        elif cosine:
            v = candidate_probe
        else:
            if candidate_norms is None:
                raise ValueError(f"{method!r} from probe cosines needs candidate_norms")
            v = candidate_probe * candidate_norms.float()
    elif method == "sc":
        u, v = (1.0 - sim).sum(-1), (1.0 - sim).sum(-2)
    elif method == "sc_eq8":
        u, v = sim.sum(-1), sim.sum(-2)
    elif method == "lmk":
        if query.lmk is None or candidates.lmk is None:
            raise ValueError(
                "weighting 'lmk' needs landmarks for query and gallery images "
                "(configure a landmark source for the dataset)"
            )
        u = query.lmk.float().unsqueeze(1).expand(b, k, r)
        v = candidates.lmk.float()
    else:
        raise ValueError(f"unknown weighting {method!r}; choose one of {', '.join(WEIGHTINGS)}")
    return normalise_weights(u), normalise_weights(v)
