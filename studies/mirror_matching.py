"""Mirror matching for profile queries: stage 2 scores each candidate against the query and
against its horizontal mirror and keeps the better EMD similarity.

Usage: python studies/mirror_matching.py [--experiment real_cfp_mobilefacenet]
       [--data cfp_profile] [--identity-half 0] [--weighting apc] [--alphas 0.3 0.7]

A profile shows one half of the face, and which half depends on the pose; the gallery is
frontal. Mirroring the query puts its visible half on the other side, so one of the two grids
lines up with the frontal face's matching half. Stage 1 is unchanged (the query's own
embedding); the mirrored query's features are extracted here (not cached). Prints stage 1 and
stage 2 P@1 / RP / MAP@R for plain and mirror-matched stage 2 at each alpha, on the queries of
``--identity-half`` (0 or 1, :mod:`faceemd.data.identity_split`; -1: all). All figures come
from this run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from extraction_throughput import compose_cfg  # noqa: E402

from faceemd.data.identity_split import half_positions  # noqa: E402
from faceemd.data.landmarks import MIRROR_68  # noqa: E402
from faceemd.emd import RerankConfig, stage2_scores  # noqa: E402
from faceemd.jobs.extraction import load_or_extract  # noqa: E402
from faceemd.jobs.instantiators import build_cache  # noqa: E402
from faceemd.models.build import build_backbone, build_face_input  # noqa: E402
from faceemd.ranking import evaluate_features  # noqa: E402


class MirroredFaces:
    """``faces`` flipped left to right (landmarks mirrored and re-indexed)."""

    def __init__(self, faces) -> None:
        self.faces = faces

    def __len__(self) -> int:
        return len(self.faces)

    def label_names(self) -> list[str]:
        return self.faces.label_names()

    def __getitem__(self, index: int):
        item = self.faces[index]
        if item is None:
            return None
        image, name, lmk = item
        lmk = np.asarray(lmk, np.float32).copy()
        lmk[:, 0] = image.shape[1] - 1 - lmk[:, 0]
        return np.ascontiguousarray(image[:, ::-1]), name, lmk[MIRROR_68]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="real_cfp_mobilefacenet")
    ap.add_argument("--data", default="cfp_profile")
    ap.add_argument("--identity-half", type=int, default=0)
    ap.add_argument("--weighting", default="apc")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    args = ap.parse_args()
    cfg = compose_cfg(args.experiment, args.data, [], cache="disk")
    backbone = build_backbone(cfg.backbone)
    dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
    dm.setup("test")
    feats, _, _ = load_or_extract(cfg, backbone, dm, [], build_cache(cfg.cache))
    mirror_dm = copy.copy(dm)
    mirror_dm.query = MirroredFaces(dm.query)
    mirrored, _, _ = load_or_extract(cfg, backbone, mirror_dm, [], build_cache(cfg.cache))
    query, flipped = feats["query"], mirrored["query"]
    assert torch.equal(query.index, flipped.index), "the two query sets lost different images"
    if args.identity_half >= 0:
        rows = torch.from_numpy(half_positions(dm.query, args.identity_half)[query.index.numpy()])
        query, flipped = query.select(rows, "half"), flipped.select(rows, "half")
    q, qm, gallery = query.to_bank(), flipped.to_bank(), feats["gallery"].to_bank()
    base = replace(RerankConfig(), weighting=args.weighting)
    memo = {}

    def scores(mirror: bool):
        def lookup(candidates):
            key = (mirror, candidates.numpy().tobytes())
            if key not in memo:
                emd = stage2_scores(q, gallery, candidates, base)
                if mirror:
                    emd = torch.maximum(emd, stage2_scores(qm, gallery, candidates, base))
                memo[key] = emd
            return memo[key]

        return lookup

    print(f"{args.experiment} {args.data}, identity half {args.identity_half}, "
          f"{len(q)} queries, {args.weighting} weights")  # fmt: skip
    print("alpha | matching | S1 P@1 | S1 RP | S1 MAP@R | S2 P@1 | S2 RP | S2 MAP@R")
    for alpha in args.alphas:
        for mirror in (False, True):
            cfg_a = replace(base, alpha=alpha)
            m, _ = evaluate_features(q, gallery, cfg_a, False, scores(mirror))
            vals = [
                100 * m[f"stage{s}/{k}"]
                for s in (1, 2)
                for k in ("p_at_1", "r_precision", "map_at_r")
            ]
            print(f"{alpha} | {'mirror' if mirror else 'plain'} | "
                  + " | ".join(f"{v:.2f}" for v in vals))  # fmt: skip


if __name__ == "__main__":
    main()
