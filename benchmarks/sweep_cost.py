"""What a sweep costs compared with one job: the feature cache and the stage-2 score cache.

Runs, each from an empty output folder (so both pay for extraction):
  (1) one job:  evaluate.py experiment=real_lfw_mobilefacenet data=<data>
  (2) a sweep:  the same with -m over 5 alphas x 4 weightings (20 jobs; CC is left out by
                default because MobileFaceNet's 128-d embedding cannot weight 512-d patches)
and prints the wall times and their ratio (issue 18's target: at most 1.2). Jobs of the sweep
share one extraction (feature cache), and the first job that runs stage 2 scores every swept
weighting in one pass (shared candidate gathering and patch products) for the others to read
from the score cache. ``--without-sharing`` also runs
  (3) the sweep with ``cache.sweep_weightings=false`` (one stage-2 pass per weighting)
from an empty output folder, for the effect of that pass in the same run.

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
    parser.add_argument("--without-sharing", action="store_true", help="also run (3)")
    args = parser.parse_args()
    base = [f"experiment={args.experiment}", f"data={args.data}"]
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as tmp:
        single = run(base, Path(tmp) / "single")
        grid = [
            f"rerank.alpha={','.join(args.alphas)}",
            f"rerank.weighting={','.join(args.weightings)}",
        ]
        runs = {"sweep": []}
        if args.without_sharing:
            runs["sweep, one stage-2 pass per weighting"] = ["cache.sweep_weightings=false"]
        lines = [f"single job: {single:.1f} s"]
        for name, extra in runs.items():
            folder = Path(tmp) / name.split(",")[0] / str(len(extra))
            wall = run(["-m", *base, *grid, *extra], folder)
            jobs = list(folder.glob("evaluate/multiruns/*/*/metrics.json"))
            metrics = [json.loads(f.read_text())["metrics"] for f in jobs]
            cached = sum(m["eval/cached_stage2"] for m in metrics)
            shared = sum(m.get("eval/prefetched_weightings", 0) for m in metrics)
            stage2 = sum(m["eval/stage2_seconds"] for m in metrics)
            lines.append(
                f"{name}: {len(jobs)} jobs, {wall:.1f} s ({cached} jobs read cached EMD scores, "
                f"{shared} weightings scored alongside another, stage 2 {stage2:.0f} s in all); "
                f"/ single = {wall / single:.3f}"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
