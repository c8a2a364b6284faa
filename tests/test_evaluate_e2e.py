"""evaluate.py as a user runs it: a single job and a 2-job multirun on tiny synthetic data."""

import json
import os
import subprocess
import sys

from .conftest import ROOT

TINY = [
    "data.query.num_identities=8",
    "data.query.images_per_identity=1",
    "data.gallery.images_per_identity=2",
    "data.batch_size=16",
    "rerank.top_k=5",
    "trainer.enable_progress_bar=false",
]


def _run(args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args, f"paths.log_dir={tmp_path}", *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_single_run_writes_metrics_and_logs(tmp_path):
    out = _run(["logger=default"], tmp_path)
    files = list(tmp_path.glob("evaluate/runs/*/metrics.json"))
    assert len(files) == 1
    metrics = json.loads(files[0].read_text())["metrics"]
    assert metrics["eval/num_queries"] == 8
    assert metrics["eval/gallery_size"] == 16
    for key in ("stage1/p_at_1", "stage2/p_at_1", "stage2/map_at_r", "stage1/max_precision_at_k"):
        assert 0.0 <= metrics[key] <= 1.0
    run_dir = files[0].parent
    assert list(run_dir.glob("wandb/offline-run-*")), "W&B offline run missing"
    assert list(run_dir.glob("csv/*/metrics.csv")), "CSV log missing"
    assert "stage2" in out.stdout


def test_multirun_over_alpha(tmp_path):
    _run(["-m", "rerank.alpha=0,1", "logger=csv"], tmp_path)
    files = sorted(tmp_path.glob("evaluate/multiruns/*/*/metrics.json"))
    assert len(files) == 2
    runs = [json.loads(f.read_text()) for f in files]
    alphas = sorted(r["config"]["rerank"]["alpha"] for r in runs)
    assert alphas == [0.0, 1.0]
    alpha0 = next(r for r in runs if r["config"]["rerank"]["alpha"] == 0.0)["metrics"]
    # alpha = 0 re-ranks by cosine only, so stage 2 equals stage 1
    assert alpha0["stage2/p_at_1"] == alpha0["stage1/p_at_1"]
    assert alpha0["stage2/map_at_r"] == alpha0["stage1/map_at_r"]
