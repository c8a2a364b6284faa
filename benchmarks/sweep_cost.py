"""What a sweep costs compared with one job: the feature cache and the stage-2 score cache.

Runs, each from an empty output folder (so both pay for extraction):
  (1) one job:  evaluate.py experiment=real_lfw_mobilefacenet data=<data>
  (2) a sweep:  the same with -m over 5 alphas x 4 weightings (20 jobs; CC is left out by
                default because MobileFaceNet's 128-d embedding cannot weight 512-d patches)
and prints the wall times and their ratio (issue 7's target: under 1.5). Jobs of the sweep
share one extraction (feature cache) and, across alphas, one EMD computation per weighting
(score cache).

    python benchmarks/sweep_cost.py                 # real LFW in ../shared, masked queries
    python benchmarks/sweep_cost.py --data lfw --weightings uniform apc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], log_dir: Path) -> float:
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, str(ROOT / "evaluate.py"), *args, f"paths.log_dir={log_dir}",
           "logger=none", "trainer.enable_progress_bar=false"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="real_lfw_mobilefacenet")
    parser.add_argument("--data", default="lfw_mask")
    parser.add_argument("--alphas", nargs="+", default=["0", "0.3", "0.5", "0.7", "1"])
    parser.add_argument("--weightings", nargs="+", default=["uniform", "apc", "sc", "lmk"])
    args = parser.parse_args()
    base = [f"experiment={args.experiment}", f"data={args.data}"]
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as tmp:
        single = run(base, Path(tmp) / "single")
        grid = [
            f"rerank.alpha={','.join(args.alphas)}",
            f"rerank.weighting={','.join(args.weightings)}",
        ]
        sweep = run(["-m", *base, *grid], Path(tmp) / "sweep")
        jobs = list((Path(tmp) / "sweep").glob("evaluate/multiruns/*/*/metrics.json"))
        cached = sum(json.loads(f.read_text())["metrics"]["eval/cached_stage2"] for f in jobs)
    print(
        f"single job: {single:.0f} s; {len(jobs)}-job sweep: {sweep:.0f} s "
        f"({cached} jobs reused cached EMD scores); sweep / single = {sweep / single:.2f}"
    )


if __name__ == "__main__":
    main()
