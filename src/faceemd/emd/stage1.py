"""Stage 1 (paper Sec. 2.3): cosine similarity of image embeddings, top ``depth`` per query,
streamed over gallery chunks: memory ``O(query_batch * chunk_size)``, never ``Q x G``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stage1_topk"]


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
        rows = torch.arange(qn.shape[0], device=qn.device)
        best_s = best_i = None
        for g0 in range(0, gallery.shape[0], chunk_size):
            gn = torch.nn.functional.normalize(gallery[g0 : g0 + chunk_size].float(), dim=1)
            s = qn @ gn.T
            if exclude is not None:  # each query's own image, where it falls in this chunk
                own = exclude[q0 : q0 + query_batch] - g0
                inside = (own >= 0) & (own < gn.shape[0])
                s[rows[inside], own[inside]] = float("-inf")
            top = torch.topk(s, min(depth, s.shape[1]), dim=1)
            score, index = top.values, top.indices + g0
            if best_s is not None:  # merge with the earlier chunks' best (earlier first on ties)
                score, index = torch.cat([best_s, score], 1), torch.cat([best_i, index], 1)
                top = torch.topk(score, min(depth, score.shape[1]), dim=1)
                score, index = top.values, index.gather(1, top.indices)
            best_s, best_i = score, index
        scores_out.append(best_s)
        index_out.append(best_i)
    return torch.cat(scores_out), torch.cat(index_out)
