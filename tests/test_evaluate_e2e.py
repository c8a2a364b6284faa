"""evaluate.py as a user runs it: a single job and a 2-job multirun on tiny synthetic data."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

TINY = [
    "data.query.num_identities=8",
    "data.query.images_per_identity=1",
    "data.gallery.images_per_identity=2",
    "data.batch_size=16",
    "rerank.top_k=5",
    "trainer.enable_progress_bar=false",
]


def _run(args, tmp_path, log_dir=True):
    """evaluate.py with outputs under tmp_path (log_dir=False: the default relative
    ``outputs`` folder, launched from tmp_path)."""
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    extra = [f"paths.log_dir={tmp_path}"] if log_dir else []
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args, *extra, *TINY],
        cwd=ROOT if log_dir else tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_single_run_writes_metrics_and_logs(tmp_path):
    out = _run(["logger=default", "visualize.num_queries=2"], tmp_path)
    files = list(tmp_path.glob("evaluate/runs/*/metrics.json"))
    assert len(files) == 1
    payload = json.loads(files[0].read_text())
    metrics = payload["metrics"]
    # the embedded default is a real trained model (SFace) on faces in its ArcFace frame
    assert payload["config"]["backbone"]["name"] == "sface"
    assert payload["config"]["data"]["frame"] == "arcface_112"
    assert metrics["stage1/p_at_1"] >= 0.5  # chance: 1/8
    assert metrics["eval/num_queries"] == 8
    assert metrics["eval/gallery_size"] == 16
    for key in ("stage1/p_at_1", "stage2/p_at_1", "stage2/map_at_r", "stage1/max_precision_at_k"):
        assert 0.0 <= metrics[key] <= 1.0
    run_dir = files[0].parent
    assert list(run_dir.glob("wandb/offline-run-*")), "W&B offline run missing"
    assert list(run_dir.glob("csv/*/metrics.csv")), "CSV log missing"
    assert "stage2" in out.stdout
    figures = sorted(run_dir.glob("visualize/query_*.png"))
    assert [f.name for f in figures] == ["query_00000.png", "query_00001.png"]
    import cv2

    # 3 rows x (query + top 5) tiles of the 112x112 SFace input with 3 px borders
    assert cv2.imread(str(figures[0])).shape == (3 * 118, 6 * 118, 3)
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/visualize_*.png"))
    # a quiet console: none of the libraries' noise, the results and where they went
    console = out.stdout + out.stderr
    for noise in ("Seed set to", "GPU available", "TPU available", "Tip:", "LeafSpec",
                  "anonymous setting", "not writable", "safetensors"):  # fmt: skip
        assert noise not in console, noise
    assert "metrics written to" in console


def test_verbose_brings_the_detail_back(tmp_path):
    out = _run(["logger=none", "hydra.verbose=true"], tmp_path)
    console = out.stdout + out.stderr
    assert "GPU available" in console and "feature cache: wrote" in console


def test_multirun_over_alpha(tmp_path):
    _run(["-m", "rerank.alpha=0,1", "logger=csv"], tmp_path, log_dir=False)
    files = sorted(tmp_path.glob("outputs/evaluate/multiruns/*/*/metrics.json"))
    assert len(files) == 2
    runs = [json.loads(f.read_text()) for f in files]
    alphas = sorted(r["config"]["rerank"]["alpha"] for r in runs)
    assert alphas == [0.0, 1.0]
    alpha0 = next(r for r in runs if r["config"]["rerank"]["alpha"] == 0.0)["metrics"]
    # alpha = 0 re-ranks by cosine only, so stage 2 equals stage 1
    assert alpha0["stage2/p_at_1"] == alpha0["stage1/p_at_1"]
    assert alpha0["stage2/map_at_r"] == alpha0["stage1/map_at_r"]


@pytest.mark.slow
def test_twelve_job_sweep_extracts_once_and_reports_twelve_rows(tmp_path):
    _run(
        [
            "-m",
            "logger=none",
            "rerank.alpha=0,0.5,1",
            "rerank.weighting=uniform,apc",
            "rerank.grid=null,[4,4]",
        ],
        tmp_path,
    )
    (sweep_dir,) = tmp_path.glob("evaluate/multiruns/*")
    runs = [json.loads(f.read_text()) for f in sweep_dir.glob("*/metrics.json")]
    assert len(runs) == 12
    # query and gallery are extracted by the first job only; the other 11 read the cache
    assert sum(r["metrics"]["eval/extracted_sets"] for r in runs) == 2
    assert sum(r["metrics"]["eval/cached_sets"] for r in runs) == 22
    # EMD scores depend on weighting x grid, not alpha, and a sweep over weightings scores
    # them all in one pass: per grid, the first job with alpha > 0 (alpha = 0 skips stage 2),
    # uniform, scores apc too; the other 3 jobs with alpha > 0 read the cache
    assert sum(r["metrics"]["eval/prefetched_weightings"] for r in runs) == 2
    assert sum(r["metrics"]["eval/cached_stage2"] for r in runs) == 6
    # the 4x4 jobs pooled the cached 8x8 grids: same stage 1, and alpha=0 equal to stage 1
    assert len({r["metrics"]["stage1/p_at_1"] for r in runs}) == 1
    report = subprocess.run(
        [sys.executable, "-m", "faceemd.jobs.report", str(sweep_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    rows = (sweep_dir / "report.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 12
    table = (sweep_dir / "report.md").read_text().strip().splitlines()
    assert len(table) == 2 + 12 and "S2 P@1" in table[0]
    assert (sweep_dir / "alpha_curve.png").stat().st_size > 1000


def test_cache_off_extracts_every_time(tmp_path):
    for _ in range(2):
        _run(["cache=off", "logger=none"], tmp_path)
    runs = [json.loads(f.read_text()) for f in tmp_path.glob("evaluate/runs/*/metrics.json")]
    assert [r["metrics"]["eval/extracted_sets"] for r in runs] == [2, 2]
    assert not (tmp_path / "cache").exists()


def test_cached_stage2_scores_give_the_same_metrics(tmp_path):
    for _ in range(2):
        _run(["logger=none", "rerank.alpha=0.7"], tmp_path)
    runs = sorted(tmp_path.glob("evaluate/runs/*/metrics.json"))
    first, second = (json.loads(f.read_text())["metrics"] for f in runs)
    assert (first["eval/cached_stage2"], second["eval/cached_stage2"]) == (0, 1)
    for key in ("stage2/p_at_1", "stage2/r_precision", "stage2/map_at_r"):
        assert first[key] == second[key]


def test_raw_photo_folder_is_detected_aligned_and_ranked(tmp_path):
    """data=raw_folder on unaligned generated photos plus one photo of noise: every face is
    found and aligned once, the noise photo is listed as skipped, a second run reuses all."""
    import cv2
    import numpy as np

    from faceemd.data.synthetic import SyntheticFaces

    photos = tmp_path / "photos"
    faces = SyntheticFaces(num_identities=4, images_per_identity=3, seed=5)
    for i in range(len(faces)):
        image, name, _ = faces[i]
        path = photos / name / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        big = cv2.copyMakeBorder(image, 40, 60, 30, 50, cv2.BORDER_REPLICATE)  # off-centre
        assert cv2.imwrite(str(path), big if big.ndim == 2 else big[..., ::-1])
    noise = np.random.default_rng(0).integers(0, 255, (150, 150, 3), np.uint8)
    assert cv2.imwrite(str(photos / faces[0][1] / "noise.jpg"), noise)
    (photos / faces[1][1] / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")  # undecodable
    assert cv2.imwrite(str(photos / faces[2][1] / "huge.png"), np.zeros((400, 400), np.uint8))
    args = [
        "data=raw_folder",
        f"data.query.source.root={photos}",
        "+data.query.source.max_pixels=100000",  # the photos are ~40,000 pixels, huge.png 160,000
        "data.num_workers=0",
        "rerank.top_k=5",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    outs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, str(ROOT / "evaluate.py"), *args, f"paths.log_dir={tmp_path}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        outs.append(out.stdout + out.stderr)
    assert "12 images (12 new, 0 reused), 3 skipped" in outs[0]
    assert "12 images (0 new, 12 reused), 3 skipped" in outs[1]
    # each reason counted apart (all three used to be counted as "no face")
    summary = " ".join(outs[1].split())  # the console wraps long lines
    assert "skipped images 3 (no face 1, unreadable 1, over the pixel limit 1)" in summary
    runs = sorted(tmp_path.glob("evaluate/runs/*/metrics.json"))
    metrics = json.loads(runs[0].read_text())["metrics"]
    assert metrics["eval/num_queries"] == 12 and metrics["eval/unusable_images"] == 3
    assert [metrics[f"eval/unusable_{c}"] for c in ("no_face", "unreadable", "too_large")] == [
        1, 1, 1,
    ]  # fmt: skip
    assert metrics["stage1/p_at_1"] >= 0.5  # chance: 2/11
    skipped = json.loads((runs[0].parent / "skipped_images.json").read_text())
    assert sorted(skipped["query"]) == sorted(
        f"{faces[k][1]}/{name}"
        for k, name in ((0, "noise.jpg"), (1, "broken.jpg"), (2, "huge.png"))
    )


def test_report_names_a_failed_job_of_the_sweep(tmp_path):
    """rerank.alpha=0.3,1.5,0.7: the 1.5 job fails its settings check; the report used to list
    the two others and say nothing of it."""
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "-m", "rerank.alpha=0.3,1.5,0.7",
         "logger=none", f"paths.log_dir={tmp_path}", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (sweep,) = list(tmp_path.glob("evaluate/multiruns/*"))
    report = subprocess.run(
        [sys.executable, "-m", "faceemd.jobs.report", str(sweep)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "1 job(s) wrote no metrics.json" in report.stderr and "rerank.alpha=1.5" in report.stderr
    md = (sweep / "report.md").read_text()
    assert "Failed jobs" in md and "rerank.alpha=1.5" in md
    import csv

    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
