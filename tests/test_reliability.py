"""Scale and reliability: DDP (gloo, 2 processes) equals 1 process, kill-and-resume of
extraction, NaN features named, out-of-memory in stage 2 halves the batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from faceemd.emd import FeatureBank, RerankConfig, stage1_topk, stage2, stage2_rerank
from faceemd.features import ExtractedFeatures
from faceemd.jobs.extraction import check_features

from .conftest import ROOT

SMALL = [
    "data.query.num_identities=9",
    "data.query.images_per_identity=1",
    "data.gallery.images_per_identity=2",
    "data.batch_size=4",
    "rerank.top_k=5",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def _evaluate(args, log_dir, expect=0):
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"paths.log_dir={log_dir}", *SMALL, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    files = sorted(log_dir.glob("evaluate/runs/*/metrics.json"))
    return json.loads(files[-1].read_text())["metrics"] if files and expect == 0 else None


METRICS = [f"stage{s}/{m}" for s in (1, 2) for m in ("p_at_1", "r_precision", "map_at_r")]


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one_process(tmp_path):
    """9 queries over 2 ranks: the distributed sampler pads one, ranks rank a block each."""
    single = _evaluate(["cache=off"], tmp_path / "single")
    ddp = _evaluate(
        ["cache=off", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
        tmp_path / "ddp",
    )
    assert ddp["eval/num_queries"] == single["eval/num_queries"] == 9
    assert ddp["eval/gallery_size"] == single["eval/gallery_size"] == 18
    for key in METRICS:
        assert ddp[key] == pytest.approx(single[key], abs=1e-9), key


@pytest.mark.slow
def test_killed_extraction_resumes_from_cached_parts(tmp_path):
    parts = ["cache.chunk_images=8"]  # query: 1 part of 9 -> 2 parts; gallery 18 -> 3 parts
    killed = ["+callbacks.kill._target_=tests.helpers.KillAtTestRun", "+callbacks.kill.run=3"]
    _evaluate(parts + killed, tmp_path / "a", expect=9)
    assert len(list((tmp_path / "a" / "cache").rglob("*.safetensors"))) == 3
    resumed = _evaluate(parts, tmp_path / "a")
    assert resumed["eval/cached_parts"] == 3 and resumed["eval/extracted_parts"] == 2
    reference = _evaluate(["cache=off"], tmp_path / "b")
    for key in METRICS:
        assert resumed[key] == reference[key], key
    # The same parts, mapped: each set is merged once into one mapped entry (not concatenated
    # in memory), with the same metrics.
    mapped = _evaluate([*parts, "cache.mmap=true"], tmp_path / "a")
    assert mapped["eval/cached_parts"] == 5
    assert len(list((tmp_path / "a" / "cache").rglob("*.safetensors"))) == 5 + 2 + 1  # + scores
    for key in METRICS:
        assert mapped[key] == reference[key], key


def test_nan_features_are_reported_with_image_names():
    class Faces:
        files = ["Ann/Ann_0001.jpg", "Bob/Bob_0001.jpg", "Cy/Cy_0001.jpg"]

    emb = torch.randn(3, 4)
    emb[2, 1] = float("nan")
    patches = torch.randn(3, 4, 2)
    patches[0, 3, 0] = float("inf")
    feats = ExtractedFeatures(emb, patches, torch.arange(3), torch.zeros(3, 68, 2), (2, 2), (8, 8))
    with pytest.raises(ValueError, match=r"2 image\(s\).*Ann/Ann_0001.jpg, Cy/Cy_0001.jpg"):
        check_features("gallery", feats, Faces())


def test_out_of_memory_in_stage2_halves_the_query_batch(monkeypatch):
    torch.manual_seed(0)
    q = FeatureBank(torch.randn(7, 8), torch.randn(7, 4, 8), torch.arange(7) % 3)
    g = FeatureBank(torch.randn(12, 8), torch.randn(12, 4, 8), torch.arange(12) % 3)
    s1, i1 = stage1_topk(q.embeddings, g.embeddings, 5)
    reference = stage2_rerank(q, g, s1, i1, RerankConfig(top_k=5, query_batch=1))
    real = stage2.emd_problems
    sizes = []

    def small_memory(query, *args, **kwargs):
        sizes.append(query.patches.shape[0])
        if query.patches.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return real(query, *args, **kwargs)

    monkeypatch.setattr(stage2, "emd_problems", small_memory)
    with pytest.warns(RuntimeWarning, match="query_batch=2"):
        got = stage2_rerank(q, g, s1, i1, RerankConfig(top_k=5, query_batch=8))
    assert sizes[:3] == [7, 4, 2]  # 8 (7 left) -> 4 -> 2, then 2 at a time
    assert torch.equal(got[1], reference[1])
    torch.testing.assert_close(got[0], reference[0])


def test_finishing_a_job_without_wandb_logger_does_not_import_wandb(monkeypatch):
    import sys

    from faceemd.jobs.instantiators import finish_loggers

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    finish_loggers()  # a CSV-only job: must neither need nor load wandb
    assert "wandb" not in sys.modules


# --- no result lost, nothing wrong used silently (reliability issue) ---


@pytest.mark.slow
def test_jobs_started_together_get_their_own_run_folders(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"paths.log_dir={tmp_path}", "cache=off",
           "backbone=tiny_cnn", *SMALL]  # fmt: skip
    jobs = [subprocess.Popen([*cmd, f"seed={s}"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for s in (1, 2)]  # fmt: skip
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read().decode()[-2000:]
    files = sorted(tmp_path.glob("evaluate/runs/*/metrics.json"))
    assert len(files) == 2 and files[0].parent != files[1].parent
    assert sorted(json.loads(f.read_text())["config"]["seed"] for f in files) == [1, 2]


def _compose_small(compose_evaluate, tmp_path, *extra):
    return compose_evaluate(
        [f"paths.log_dir={tmp_path}", "backbone=tiny_cnn", *SMALL, *extra], output_dir=tmp_path
    )


def test_bad_settings_are_refused_before_any_work(compose_evaluate, tmp_path):
    from faceemd.jobs.evaluate import run_evaluation

    for extra, message in (
        (["visualize.queries=[99999]"], r"visualize.queries \[99999\] are not query ids"),
        (["optimized_metric=stage2/accuracy"], "optimized_metric 'stage2/accuracy'"),
        (["rerank.alpha=high"], "rerank.alpha must be a number, got 'high'"),
        (["rerank.tol=-1"], "rerank.tol must be >= 0"),
    ):
        cfg = _compose_small(compose_evaluate, tmp_path, *extra)
        with pytest.raises(ValueError, match=message):
            run_evaluation(cfg)
    assert not list(tmp_path.glob("cache/*/*.safetensors")), "nothing was extracted"


def test_metrics_survive_a_failing_score_cache_and_top_k_is_capped(
    compose_evaluate, tmp_path, monkeypatch, caplog
):
    """A full disk when the stage-2 scores are cached (after the ranking) only warns; a top_k
    deeper than the 18-image gallery is capped before the extraction."""
    from faceemd.jobs.evaluate import run_evaluation
    from faceemd.storage.feature_cache import FeatureCache

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureCache, "save_scores", full_disk)
    cfg = _compose_small(compose_evaluate, tmp_path, "rerank.top_k=100")
    with caplog.at_level("WARNING"):
        results = run_evaluation(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["stage2/p_at_1"] == results["stage2/p_at_1"]
    assert "storing the stage-2 scores in the cache failed" in caplog.text
    assert "rerank.top_k=100 is deeper than the 18 gallery items" in caplog.text


def test_skipped_images_are_named_in_the_run_folder(compose_evaluate, tmp_path):
    import cv2

    from faceemd.data.synthetic import SyntheticFaces
    from faceemd.jobs.evaluate import run_evaluation

    faces = SyntheticFaces(4, 3, seed=2)
    root = tmp_path / "faces"
    for i in range(len(faces)):
        image, name, _ = faces[i]
        (root / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name / f"{name}_{i % 3:04d}.jpg"), image)
    (root / "synth2_0001" / "synth2_0001_0001.jpg").write_bytes(b"not an image")
    cfg = compose_evaluate(
        [f"paths.log_dir={tmp_path}", "backbone=tiny_cnn", "data=lfw", f"paths.lfw_dir={root}",
         "data.query.on_bad_image=skip", "data.num_workers=0", "rerank.top_k=3", "logger=none",
         "trainer.enable_progress_bar=false"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    results = run_evaluation(cfg)
    assert results["eval/skipped_images"] == 1
    listed = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert listed == {"query": ["synth2_0001/synth2_0001_0001.jpg"]}


def test_report_skips_a_malformed_metrics_file(tmp_path, capsys):
    from faceemd.jobs.report import collect

    good = {"metrics": {"stage1/p_at_1": 0.5}, "config": {"rerank": {"alpha": 0.7}}}
    for job, text in (("0", json.dumps(good)), ("1", "[]"), ("2", '{"config": 3}'), ("3", "{")):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text(text)
    rows = collect(tmp_path)
    assert [r["job"] for r in rows] == ["0"]
    assert capsys.readouterr().err.count("skipping unreadable") == 3
