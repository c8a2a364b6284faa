"""The compressed patch space's accuracy table (docs/patch-space.md) from the sweeps' folders.

Each folder holds one multirun over ``rerank.patch_dim`` (and optionally ``rerank.refine_top``)
of one protocol and model; this prints one markdown row per (protocol, model) with stage-2
P@1 / RP / MAP@R (identification) or accuracy / TAR@FAR 1e-3 (verification) per setting, in
percent, and the P@1 (accuracy) change of each setting against the full dimension.

    python studies/patch_space_table.py outputs/pd_table/*/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _setting(rerank: dict) -> str:
    d = rerank.get("patch_dim")
    m = rerank.get("refine_top")
    return ("full" if d is None else f"d={d}") + ("" if m is None else f", m={m}")


def rows_of(folder: Path) -> dict[str, dict]:
    """``{setting: metrics}`` of the jobs below ``folder``, with the protocol and model."""
    out = {}
    for f in sorted(folder.rglob("metrics.json")):
        payload = json.loads(f.read_text())
        cfg, metrics = payload["config"], payload["metrics"]
        metrics["_name"] = f"{cfg['data_name']}, {cfg['backbone']['name']}"
        out[_setting(cfg["rerank"])] = metrics
    return out


def cell(m: dict, full: dict | None) -> str:
    if "stage2/p_at_1" in m:
        keys, head = ("p_at_1", "r_precision", "map_at_r"), "stage2/p_at_1"
    else:
        keys, head = ("accuracy", "tar_at_far_0.001"), "stage2/accuracy"
    text = " / ".join(f"{100 * m[f'stage2/{k}']:.2f}" for k in keys)
    if full is not None and head in full:
        text += f" ({100 * (m[head] - full[head]):+.2f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument(
        "--settings", nargs="+",
        default=["full", "d=256", "d=128", "d=64", "d=32", "d=16", "d=64, m=20", "d=64, m=10",
                 "d=32, m=20", "d=32, m=10"],
    )  # fmt: skip
    args = parser.parse_args()
    merged: dict[str, dict] = {}
    for folder in args.folders:
        for setting, metrics in rows_of(folder).items():
            merged.setdefault(metrics["_name"], {})[setting] = metrics
    print("| protocol, model | stage 1 | " + " | ".join(args.settings) + " |")
    print("|---|---|" + "---|" * len(args.settings))
    for name in sorted(merged):
        jobs = merged[name]
        full = jobs.get("full")
        any_job = next(iter(jobs.values()))
        stage1 = {k.replace("stage1/", "stage2/"): v for k, v in any_job.items()
                  if k.startswith("stage1/")}  # fmt: skip
        cells = [cell(jobs[s], full) if s in jobs else "" for s in args.settings]
        print(f"| {name} | {cell(stage1, None)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
