"""What ranking reads: a set's features (:class:`FeatureBank`), its rankings (:class:`Ranking`),
and the checks and per-item summaries made on them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["FeatureBank", "Ranking", "check_finite", "nonfinite_rows", "patch_summaries"]


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
    full: for patches projected into a smaller space (``rerank.patch_dim``,
    :mod:`faceemd.emd.projection`), the same set's full-dimension bank: ``rerank.refine_top``
    rescores a query's best candidates on it. basis: the ``(C, d)`` basis of that space (None
    at full dimension): embeddings of size C (what CC correlates patches with) are projected
    onto it (:meth:`patch_space_embeddings`).
    """

    embeddings: Tensor
    patches: Tensor
    labels: Tensor
    lmk: Tensor | None = None
    summaries: tuple[Tensor, Tensor] | None = None
    verified: bool = False
    quantized: tuple[Tensor, Tensor] | None = None
    full: FeatureBank | None = None
    basis: Tensor | None = None

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

    def patch_space_embeddings(self, rows) -> Tensor:
        """The embeddings of ``rows`` in the patches' space: as they are at full dimension (or
        when their size is not the patches' original C), else their coordinates in
        :attr:`basis` (CC then correlates projected patches with projected embeddings)."""
        embeddings = self.embeddings[rows]
        if self.basis is None or embeddings.shape[-1] != self.basis.shape[0]:
            return embeddings
        return embeddings.float() @ self.basis


@dataclass
class Ranking:
    """Rankings of the gallery per query, ``depth`` items deep.

    stage1_index / stage2_index: ``(Q, depth)`` gallery row indices, best first.
    stage1_score / stage2_score: ``(Q, depth)`` the scores they were sorted by (stage 2 holds
    blended scores in its first ``top_k`` columns and cosine after).
    stage1_seconds / stage2_seconds: wall time of each stage.
    emd_similarity: ``(Q, top_k)`` EMD similarities of the stage-1 candidates (None when
    stage 2 was skipped).
    solver_stats: the solver's iteration statistics (see :func:`faceemd.emd.stage2_scores`;
    empty when the scores came from a cache or stage 2 was skipped).
    """

    stage1_index: Tensor
    stage1_score: Tensor
    stage2_index: Tensor
    stage2_score: Tensor
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0
    emd_similarity: Tensor | None = None
    solver_stats: dict = field(default_factory=dict)


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
