"""A visibility weighting for profile queries: each patch's mass is the share of its grid cell
that the detected face box covers in the aligned image, so background cells (beside a
profile, the side of the crop the face turned away from) carry almost none.

Usage: python studies/visibility_weighting.py [--experiment real_cfp_mobilefacenet]
       [--data cfp_profile] [--identity-half 0] [--alphas 0.3 0.5 0.7]

The box and 5 points YuNet found are in each aligned set's manifest; the box's corners are
mapped into the aligned frame with the alignment's own similarity
(:func:`faceemd.data.align.alignment_matrix`), filled, and averaged over each grid cell; a
floor of 1e-3 keeps every cell in the problem. Gallery faces get theirs the same way. The
weights ride in the banks' landmark-weight slot, so the engine's ``lmk`` branch
(``u = query weights``, ``v = candidate weights``) solves with them. Prints stage 1 and
stage 2 P@1 / RP / MAP@R with these weights and with APC at each alpha, on the queries of
``--identity-half``. All figures come from this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from extraction_throughput import compose_cfg  # noqa: E402

from faceemd.data.align import alignment_matrix  # noqa: E402
from faceemd.data.identity_split import half_positions  # noqa: E402
from faceemd.emd import RerankConfig, stage2_scores  # noqa: E402
from faceemd.jobs.extraction import load_or_extract  # noqa: E402
from faceemd.jobs.instantiators import build_cache  # noqa: E402
from faceemd.models.build import build_backbone, build_face_input  # noqa: E402
from faceemd.ranking import evaluate_features  # noqa: E402

FLOOR = 1e-3


def visibility(faces, feats, template: str) -> torch.Tensor:
    """``(N, R)`` box coverage of each feature row's grid cells (rows of ``feats``)."""
    entries = {}
    for line in Path(faces.manifest_path).read_text().splitlines():
        entry = json.loads(line)
        entries[entry["rel"]] = entry
    h, w = feats.image_size
    gh, gw = feats.grid_shape
    out = []
    for pos in feats.index.tolist():
        entry = entries[faces.files[pos]]
        m = alignment_matrix(np.reshape(entry["points5"], (5, 2)), template)
        x, y, bw, bh = entry["box"]
        corners = np.array([[x, y], [x + bw, y], [x + bw, y + bh], [x, y + bh]])
        mapped = corners @ m[:, :2].T + m[:, 2]
        mask = np.zeros((h, w), np.float32)
        cv2.fillPoly(mask, [np.round(mapped).astype(np.int32)], 1.0)
        cells = cv2.resize(mask, (gw, gh), interpolation=cv2.INTER_AREA)
        out.append(np.maximum(cells.reshape(-1), FLOOR))
    return torch.from_numpy(np.stack(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="real_cfp_mobilefacenet")
    ap.add_argument("--data", default="cfp_profile")
    ap.add_argument("--identity-half", type=int, default=0)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    args = ap.parse_args()
    cfg = compose_cfg(args.experiment, args.data, [], cache="disk")
    dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
    dm.setup("test")
    feats, _, _ = load_or_extract(cfg, build_backbone(cfg.backbone), dm, [], build_cache(cfg.cache))
    template = str(cfg.backbone.input.template)
    query, gallery_feats = feats["query"], feats["gallery"]
    if args.identity_half >= 0:
        rows = torch.from_numpy(half_positions(dm.query, args.identity_half)[query.index.numpy()])
        query = query.select(rows, "half")
    q = replace(query.to_bank(), lmk=visibility(dm.query, query, template))
    g = replace(gallery_feats.to_bank(), lmk=visibility(dm.gallery, gallery_feats, template))
    print(f"{args.experiment} {args.data}, identity half {args.identity_half}, {len(q)} queries; "
          f"mean query cell coverage {float(q.lmk.mean()):.3f}, gallery "
          f"{float(g.lmk.mean()):.3f}")  # fmt: skip
    print("alpha | weights | S1 P@1 | S1 RP | S1 MAP@R | S2 P@1 | S2 RP | S2 MAP@R")
    memo = {}
    for alpha in args.alphas:
        for weighting, label in (("lmk", "visibility"), ("apc", "apc")):
            cfg_a = replace(RerankConfig(), alpha=alpha, weighting=weighting)

            def lookup(candidates, cfg_a=cfg_a):  # EMD similarities do not depend on alpha
                key = (cfg_a.weighting, candidates.numpy().tobytes())
                if key not in memo:
                    memo[key] = stage2_scores(q, g, candidates, cfg_a)
                return memo[key]

            m, _ = evaluate_features(q, g, cfg_a, False, lookup)
            vals = [
                100 * m[f"stage{s}/{k}"]
                for s in (1, 2)
                for k in ("p_at_1", "r_precision", "map_at_r")
            ]
            print(f"{alpha} | {label} | " + " | ".join(f"{v:.2f}" for v in vals))


if __name__ == "__main__":
    main()
