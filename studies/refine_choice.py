"""How well ``rerank.refine_top`` chooses the candidates it solves (docs/patch-space.md).

For the first ``--queries`` queries of a real protocol: the full-dimension stage-2 winner
(alpha 0.7) of each query, and how often it is among the ``m`` candidates a screen chooses,
for a relaxed-EMD screen and a Sinkhorn screen in the ``d``-dimensional space, each choosing
alternately by its own order and the cosine's (:func:`faceemd.emd.stage2.refined_columns`) or
by its own order alone.

    python studies/refine_choice.py [--experiment real_lfw_mobilefacenet] [--data lfw_mask]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rerank_throughput import real_features  # noqa: E402

from faceemd.emd import RerankConfig, stage1_topk, stage2_scores  # noqa: E402
from faceemd.emd.projection import reduced_banks  # noqa: E402
from faceemd.emd.stage2 import refined_columns  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="real_lfw_mobilefacenet")
    parser.add_argument("--data", default="lfw_mask")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--m", type=int, nargs="+", default=[10, 20])
    args = parser.parse_args()
    torch.set_num_threads(2)
    query, gallery, same = real_features(args.experiment, args.data, args.queries)
    exclude = torch.arange(len(query)) if same else None
    cosine, cand = stage1_topk(query.embeddings, gallery.embeddings, 100, exclude)
    full = stage2_scores(query, gallery, cand, RerankConfig())
    winner = (0.7 * full + 0.3 * cosine).argmax(1, keepdim=True)
    print(f"{args.experiment} / {args.data}, {len(query)} queries: share of queries whose "
          "full-dimension winner is among the chosen")  # fmt: skip
    print("| d | screen | choice | " + " | ".join(f"m = {m}" for m in args.m) + " |")
    print("|---|---|---|" + "---:|" * len(args.m))
    for d in args.dims:
        q_d, g_d = reduced_banks(query, gallery, d, False)
        for solver in ("relaxed", "sinkhorn"):
            screened = stage2_scores(q_d, g_d, cand, RerankConfig(solver=solver))
            for choice in ("alternate", "screen only"):
                shares = []
                for m in args.m:
                    cols = refined_columns(screened, m) if choice == "alternate" else (
                        screened.topk(m, 1).indices)  # fmt: skip
                    shares.append(float((cols == winner).any(1).float().mean()))
                print(f"| {d} | {solver} | {choice} | "
                      + " | ".join(f"{100 * s:.2f}%" for s in shares) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
