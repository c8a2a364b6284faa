"""Stage-2 solver trade-off: entropic blur (eps) against P@1, closeness to the exact EMD and
queries/second, in one run.

Usage: python benchmarks/solver_tradeoff.py [--queries 1000] [--exact-queries 40]
       [--experiment real_lfw_mobilefacenet] [--data lfw_mask]

On real features (the protocol's first ``--queries`` queries against its whole gallery, native
grid, APC, alpha 0.7, top-100; extracted once through the feature cache, skipped without
../shared) each solver setting gets: stage-2 P@1, mean and max |EMD similarity - exact EMD
similarity| over the first ``--exact-queries`` queries' candidates (POT's network simplex),
mean Sinkhorn iterations and stage-2 queries/second (best of 2). The same settings then run on
the synthetic 8x8 grids of ``rerank_throughput.py`` (256 queries, 2,000 gallery items) for
queries/second at 8x8. Settings: eps 0.05 (one stage) and eps-scaling from about 0.04 down
to 0.02, 0.01, 0.005 and 0.002; the exact LP only for accuracy (it is ~100x slower).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rerank_throughput import make_features, real_features

from faceemd.emd import RerankConfig, prepare_gallery, stage1_topk, stage2_scores
from faceemd.emd.sinkhorn import eps_schedule
from faceemd.emd.stage2 import blend_stage2

SETTINGS = [
    {"eps": 0.05, "eps_start": None},
    {"eps": 0.02, "eps_start": 0.04},
    {"eps": 0.01, "eps_start": 0.04},
    {"eps": 0.005, "eps_start": 0.04},
    {"eps": 0.002, "eps_start": 0.04},
]


def label(cfg: RerankConfig) -> str:
    """The stages that run (eps-scaling halves eps from the power-of-two multiple of eps
    nearest eps_start, :func:`eps_schedule`), e.g. ``eps-scaling 0.032 -> 0.002``."""
    stages = eps_schedule(cfg.sinkhorn_settings())
    if len(stages) == 1:
        return f"sinkhorn eps {stages[0]:g}"
    return f"eps-scaling {stages[0]:g} -> {stages[-1]:g}"


def speed(query, gallery, cand, cfg, repeats: int = 2) -> tuple[float, dict]:
    best, stats = 0.0, {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        stage2_scores(query, gallery, cand, cfg, stats)
        best = max(best, len(query) / (time.perf_counter() - t0))
    return best, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="real_lfw_mobilefacenet")
    parser.add_argument("--data", default="lfw_mask")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (Path(__file__).resolve().parents[2] / "shared").is_dir():
        print("skipped: needs ../shared (real LFW and MobileFaceNet weights)")
        return
    query, gallery, same = real_features(args.experiment, args.data, args.queries)
    if same:
        parser.error("use a protocol with a separate gallery (e.g. lfw_mask)")
    k = 100
    s1, i1 = stage1_topk(query.embeddings, gallery.embeddings, k)
    gallery = prepare_gallery(gallery, RerankConfig())
    p1_stage1 = float((gallery.labels[i1[:, 0]] == query.labels).float().mean())
    ne = min(args.exact_queries, len(query))
    sub = type(query)(query.embeddings[:ne], query.patches[:ne], query.labels[:ne])
    exact = stage2_scores(sub, gallery, i1[:ne], RerankConfig(solver="exact"))
    synth_q, synth_g = make_features(256, 2000, 8, 512)
    synth_g = prepare_gallery(synth_g, RerankConfig())
    synth_i = stage1_topk(synth_q.embeddings, synth_g.embeddings, k)[1]
    speed(synth_q, synth_g, synth_i, RerankConfig())  # warm-up (numba kernel)
    print(
        f"{args.experiment}/{args.data}: {len(query)} queries, gallery {len(gallery)}, grid "
        f"R={query.patches.shape[1]}, APC, k={k}, alpha 0.7; stage-1 P@1 {100 * p1_stage1:.2f}"
    )
    print(
        "| solver | stage-2 P@1 | mean / max abs diff vs exact | mean iterations | real q/s "
        "| 8x8 synthetic q/s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for extra in SETTINGS:
        cfg = RerankConfig(alpha=0.7, **extra)
        qps, stats = speed(query, gallery, i1, cfg)
        emd = stage2_scores(query, gallery, i1, cfg)
        _, i2 = blend_stage2(s1, i1, emd, cfg.alpha)
        p1 = float((gallery.labels[i2[:, 0]] == query.labels).float().mean())
        diff = (emd[:ne] - exact).abs()
        synth_qps, _ = speed(synth_q, synth_g, synth_i, cfg)
        print(
            f"| {label(cfg)} | {100 * p1:.2f} | {float(diff.mean()):.1e} / {float(diff.max()):.1e} | "
            f"{stats['mean_iterations']:.1f} | {qps:.1f} | {synth_qps:.1f} |",
            flush=True,
        )
    _, i2 = blend_stage2(s1[:ne], i1[:ne], exact, 0.7)
    p1_exact = float((gallery.labels[i2[:, 0]] == query.labels[:ne]).float().mean())
    line = f"exact LP on the first {ne} queries: stage-2 P@1 {100 * p1_exact:.2f}; on the same"
    for extra in SETTINGS[:2]:
        cfg = RerankConfig(alpha=0.7, **extra)
        emd = stage2_scores(sub, gallery, i1[:ne], cfg)
        _, i2 = blend_stage2(s1[:ne], i1[:ne], emd, 0.7)
        p1 = float((gallery.labels[i2[:, 0]] == query.labels[:ne]).float().mean())
        line += f" | {label(cfg)}: {100 * p1:.2f}"
    print(line)


if __name__ == "__main__":
    main()
