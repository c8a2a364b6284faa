"""Approximate stage 1 for very large galleries: a faiss inverted-file index (``IndexIVFFlat``,
inner product of L2-normalised embeddings = cosine).

Exhaustive stage 1 reads every gallery embedding for every block of queries, a cost that grows
with the gallery while stage 2's does not (at 1M items on 2 cores: 11.5 ms per query against
stage 2's 12-16 ms, ``benchmarks/large_gallery.py``). The inverted
file clusters the gallery into ``nlist`` cells (k-means on a sample) and compares a query only
with the items of its ``nprobe`` nearest cells. It keeps full vectors, so the scores it returns
are the exact cosines of the items it finds; what it can miss are true top-k items in cells it
did not probe (recall measured by the benchmark against the exhaustive top-k). Optional:
``pip install faiss-cpu`` (the ``ann`` extra).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from faceemd.emd.stage1 import stage1_topk

__all__ = ["ivf_topk"]


def _normalised(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(torch.nn.functional.normalize(x.float(), dim=1).numpy())


def ivf_topk(
    query: Tensor,
    gallery: Tensor,
    depth: int,
    exclude: Tensor | None = None,
    nlist: int | None = None,
    nprobe: int = 32,
    chunk_size: int = 65536,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Approximate top-``depth`` gallery items by cosine, like :func:`stage1_topk`.

    query ``(Q, D)``, gallery ``(G, D)`` (CPU; may be memory-mapped: added ``chunk_size`` rows
    at a time). exclude: optional ``(Q,)`` gallery row to leave out per query (-1 for none).
    nlist: cells (default ``sqrt(G)``, at most G / 39 so each has k-means training points);
    nprobe: cells searched per query. Returns ``(scores, index)`` ``(Q, depth)``, best first;
    queries whose probed cells hold fewer than ``depth`` items are answered exhaustively.
    The index is built on every call (k-means on ``64 * nlist`` sampled items, then every item
    assigned to its cell): it pays off when a call has many queries.
    Memory: the index holds a float32 copy of the normalised gallery (``4 * G * D`` bytes).
    """
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "rerank.stage1_index=ivf needs faiss: pip install faiss-cpu (or the project's "
            "'ann' extra)"
        ) from err
    g, d = gallery.shape
    if query.device.type != "cpu" or gallery.device.type != "cpu":
        raise ValueError("rerank.stage1_index=ivf runs on CPU tensors (faiss-cpu)")
    nlist = nlist or max(1, min(int(math.sqrt(g)), g // 39))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(g, size=min(g, 64 * nlist), replace=False))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(_normalised(gallery[torch.from_numpy(sample)]))
    for a in range(0, g, chunk_size):
        index.add(_normalised(gallery[a : a + chunk_size]))
    index.nprobe = min(nprobe, nlist)
    extra = 1 if exclude is not None else 0
    scores, found = index.search(_normalised(query), depth + extra)
    scores, found = torch.from_numpy(scores), torch.from_numpy(found)
    if exclude is not None:  # drop each query's own row; keep the first depth of the rest
        own = found == exclude[:, None]
        own[:, -1] |= ~own.any(1)  # none dropped: drop the last instead
        keep = ~own
        scores = scores[keep].view(len(query), depth)
        found = found[keep].view(len(query), depth)
    short = (found < 0).any(1)  # fewer than depth items in the probed cells
    if bool(short.any()):
        rows = short.nonzero().squeeze(1)
        s, i = stage1_topk(query[rows], gallery, depth, None if exclude is None else exclude[rows])
        scores[rows], found[rows] = s, i
    return scores, found.long()
