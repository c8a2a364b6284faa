"""Pictures of what two-stage ranking did for a query (paper Fig. 1, 3 and 5).

One PNG per query, three rows of tiles at the network-input size:
1. the query, then the stage-1 top-``n`` gallery faces;
2. the query, then the stage-2 top-``n`` (correct identity outlined green, wrong red);
3. the flow picture: the query rebuilt patch by patch from the stage-2 top-1 gallery face,
   each query cell showing the gallery cell that receives most of its mass, darker where that
   share is small; then the query with its patch weights ``u`` as a heatmap and the gallery
   face with its weights ``v`` (hot = heavy).
Flows come from the exact EMD (POT) between the query and that gallery face with the run's
weighting, so the picture shows the optimal transport, not a Sinkhorn approximation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from faceemd.emd import (
    CandidateInputs,
    FeatureBank,
    QueryInputs,
    Ranking,
    RerankConfig,
    pairwise_emd,
)

__all__ = [
    "cell_bounds",
    "flow_picture",
    "match_flow",
    "query_figure",
    "save_figures",
    "weight_heatmap",
]

_BORDER = 3
_GREEN, _RED, _GREY = (40, 200, 40), (220, 40, 40), (128, 128, 128)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def cell_bounds(size: tuple[int, int], grid: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Pixel box ``(y0, y1, x0, x1)`` of every grid cell, row-major (the patch order)."""
    (h, w), (gh, gw) = size, grid
    ys = np.linspace(0, h, gh + 1).round().astype(int)
    xs = np.linspace(0, w, gw + 1).round().astype(int)
    return [(ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(gh) for c in range(gw)]


def flow_picture(
    query: np.ndarray, gallery: np.ndarray, flow: np.ndarray, u: np.ndarray, grid: tuple[int, int]
) -> np.ndarray:
    """Rebuild ``query`` from ``gallery`` cells by the flow ``(R, R)`` (rows: query patches).

    Cell ``i`` shows gallery cell ``argmax_j flow[i, j]``, scaled by ``flow[i, j] / u[i]`` (the
    share of the query patch's mass it receives). Images: same size, uint8 (a grey and a colour
    image are both drawn in colour).
    """
    if query.ndim != gallery.ndim:
        query, gallery = _rgb(query), _rgb(gallery)
    out = np.zeros_like(query)
    cells = cell_bounds(query.shape[:2], grid)
    for i, (y0, y1, x0, x1) in enumerate(cells):
        j = int(np.argmax(flow[i]))
        share = float(flow[i, j] / u[i]) if u[i] > 0 else 0.0
        gy0, gy1, gx0, gx1 = cells[j]
        patch = gallery[gy0:gy1, gx0:gx1]
        if patch.shape[:2] != (y1 - y0, x1 - x0):
            patch = cv2.resize(patch, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        out[y0:y1, x0:x1] = np.clip(patch.astype(np.float32) * min(share, 1.0), 0, 255)
    return out


def weight_heatmap(image: np.ndarray, weights: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``image`` (uint8) blended with a JET heatmap of patch ``weights`` ``(R,)``; RGB."""
    w = weights.reshape(grid).astype(np.float32)
    w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
    h, wd = image.shape[:2]
    heat = cv2.resize((w * 255).astype(np.uint8), (wd, h), interpolation=cv2.INTER_NEAREST)
    heat = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(_rgb(image), 0.5, heat, 0.5, 0)


def _tile(image: np.ndarray, colour, label: str = "") -> np.ndarray:
    tile = cv2.copyMakeBorder(_rgb(image), *(_BORDER,) * 4, cv2.BORDER_CONSTANT, value=colour)
    if label:
        cv2.putText(tile, label, (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 0), 1)
    return tile


def match_flow(
    q: int, g: int, query: FeatureBank, gallery: FeatureBank, cfg: RerankConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact EMD flow ``(R, R)`` between query ``q`` and gallery item ``g`` under ``cfg``'s
    weighting, with the two weight vectors ``u (R,)`` and ``v (R,)``."""
    one = torch.tensor([[g]])
    result, u, v = pairwise_emd(
        QueryInputs(
            query.patches[q : q + 1].float(),
            query.embeddings[q : q + 1],
            None if query.lmk is None else query.lmk[q : q + 1],
        ),
        CandidateInputs(
            gallery.patches[one].float(),
            gallery.embeddings[one],
            None if gallery.lmk is None else gallery.lmk[one],
        ),
        replace(cfg, solver="exact"),
        return_flow=True,
    )
    return result.flow[0, 0].numpy(), u[0, 0].numpy(), v[0, 0].numpy()


def query_figure(
    q: int,
    query: FeatureBank,
    gallery: FeatureBank,
    ranking: Ranking,
    cfg: RerankConfig,
    grid: tuple[int, int],
    query_image: np.ndarray,
    gallery_image,
    top: int = 5,
) -> np.ndarray:
    """The three-row figure of query ``q`` (RGB uint8).

    query_image: the query at network-input size; gallery_image(i): gallery item ``i`` likewise.
    Figure size: ``3 * (h + 6)`` by ``(top + 1) * (w + 6)`` pixels.
    """
    label = int(query.labels[q])
    rows = []
    for stage, index in (("S1", ranking.stage1_index), ("S2", ranking.stage2_index)):
        tiles = [_tile(query_image, _GREY, f"query {stage}")]
        for rank, g in enumerate(index[q, :top].tolist()):
            ok = int(gallery.labels[g]) == label
            tiles.append(_tile(gallery_image(g), _GREEN if ok else _RED, f"{rank + 1}"))
        rows.append(np.hstack(tiles))
    best = int(ranking.stage2_index[q, 0])
    flow, u0, v0 = match_flow(q, best, query, gallery, cfg)
    g_img = gallery_image(best)
    third = [
        _tile(flow_picture(query_image, g_img, flow, u0, grid), _GREY, "flow"),
        _tile(weight_heatmap(query_image, u0, grid), _GREY, "u"),
        _tile(weight_heatmap(g_img, v0, grid), _GREY, "v"),
    ]
    blank = np.zeros_like(third[0])
    third += [blank] * (top + 1 - len(third))
    rows.append(np.hstack(third[: top + 1]))
    return np.vstack(rows)


def save_figures(
    folder: str | Path,
    queries: list[int],
    query: FeatureBank,
    gallery: FeatureBank,
    ranking: Ranking,
    cfg: RerankConfig,
    grid: tuple[int, int],
    query_image,
    gallery_image,
    top: int = 5,
) -> list[Path]:
    """Write ``query_<q>.png`` for each query id into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for q in queries:
        fig = query_figure(
            q, query, gallery, ranking, cfg, grid, query_image(q), gallery_image, top
        )
        path = folder / f"query_{q:05d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(fig, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths
