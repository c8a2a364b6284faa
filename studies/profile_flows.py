"""Where the EMD moves a query's mass: flows between queries and their best same-person
gallery face, on profile (CFP) and masked (LFW) queries.

Usage: python studies/profile_flows.py [--experiment real_cfp_mobilefacenet]
       [--data cfp_profile] [--queries 300] [--weighting apc]

For each of the first ``--queries`` queries it takes the gallery face of the same person with
the highest embedding cosine, solves the exact EMD between the two patch grids (POT, the
weighting's marginals, the backbone's native grid) and prints, averaged over the queries: the
mass that stays in its own grid cell, the mass-weighted mean displacement in rows and columns
(in cells), the mass that goes to the horizontally mirrored cell on the other side of the face,
and the EMD similarity with
the true match against the best impostor's (the highest-cosine face of another person), and
how often each of the EMD similarity and the embedding cosine ranks the true match above that
impostor. A
frontal match moves little mass; a profile one should move it sideways if the patches of the
visible half find their counterparts. Features come from the project's feature cache
(extracted on first use, ../shared needed). All figures come from this run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rerank_throughput import real_features  # noqa: E402

from faceemd.emd import RerankConfig  # noqa: E402
from faceemd.visualize import match_flow  # noqa: E402


def flow_statistics(flow: np.ndarray, grid: tuple[int, int]) -> dict[str, float]:
    """Summary of one ``(R, R)`` flow on a ``grid`` (rows, cols) of cells (row-major)."""
    rows, cols = grid
    r = np.arange(rows * cols) // cols
    c = np.arange(rows * cols) % cols
    mass = flow / flow.sum()
    # to the other side's cell: the mirror of a cell that is not its own mirror (the middle
    # column of an odd-width grid is)
    mirrored = (c[None, :] == (cols - 1 - c[:, None])) & (c[:, None] != cols - 1 - c[:, None])
    same_row = r[:, None] == r[None, :]
    return {
        "own_cell": float(np.trace(mass)),
        "rows_moved": float((mass * np.abs(r[:, None] - r[None, :])).sum()),
        "cols_moved": float((mass * np.abs(c[:, None] - c[None, :])).sum()),
        "to_mirror_cell": float((mass * (mirrored & same_row)).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="real_cfp_mobilefacenet")
    ap.add_argument("--data", default="cfp_profile")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--weighting", default="apc")
    args = ap.parse_args()
    query, gallery, same = real_features(args.experiment, args.data, args.queries)
    cfg = replace(RerankConfig(), weighting=args.weighting)
    n = query.patches.shape[1]  # rows >= cols: the face inputs are square or portrait
    grid = next((h, n // h) for h in range(1, n + 1) if n % h == 0 and h * h >= n)
    cos = (
        torch.nn.functional.normalize(query.embeddings, dim=1)
        @ torch.nn.functional.normalize(gallery.embeddings, dim=1).T
    )
    stats, true_sims, impostor_sims, cosine_wins = [], [], [], []
    for q in range(len(query)):
        row = cos[q].clone()
        if same:
            row[q] = -2.0
        match = gallery.labels == query.labels[q]
        if same:
            match[q] = False
        if not bool(match.any()):
            continue
        g_true = int(torch.where(match, row, torch.full_like(row, -2.0)).argmax())
        g_imp = int(torch.where(~match, row, torch.full_like(row, -2.0)).argmax())
        cosine_wins.append(bool(row[g_true] > row[g_imp]))
        flow, _, _ = match_flow(q, g_true, query, gallery, cfg)
        stats.append(flow_statistics(flow, grid))
        true_sims.append(float((flow * (1.0 - _cost(query, gallery, q, g_true))).sum()))
        imp_flow, _, _ = match_flow(q, g_imp, query, gallery, cfg)
        impostor_sims.append(float((imp_flow * (1.0 - _cost(query, gallery, q, g_imp))).sum()))
    mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
    true_sims, impostor_sims = np.array(true_sims), np.array(impostor_sims)
    print(f"{args.experiment} {args.data}: {len(stats)} queries, grid {grid[0]}x{grid[1]}, "
          f"{args.weighting} weights, exact EMD")  # fmt: skip
    print("own cell {own_cell:.3f}, rows moved {rows_moved:.2f}, cols moved {cols_moved:.2f}, "
          "to the mirrored cell {to_mirror_cell:.3f}".format(**mean))  # fmt: skip
    print(
        f"EMD similarity: true match {true_sims.mean():.4f}, best impostor "
        f"{impostor_sims.mean():.4f}; true above impostor for "
        f"{100 * float((true_sims > impostor_sims).mean()):.1f}% of the queries (by the "
        f"embedding cosine: {100 * float(np.mean(cosine_wins)):.1f}%)"
    )


def _cost(query, gallery, q: int, g: int) -> np.ndarray:
    """``(R, R)`` cosine distance between the patches of query ``q`` and gallery item ``g``."""
    a = torch.nn.functional.normalize(query.patches[q].float(), dim=-1)
    b = torch.nn.functional.normalize(gallery.patches[g].float(), dim=-1)
    return (1.0 - a @ b.T).numpy()


if __name__ == "__main__":
    main()
