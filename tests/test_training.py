"""Finetuning: margin heads against hand-computed logits, train.py runs, resume, interrupt."""

import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from faceemd.models.build import build_face_input
from faceemd.models.heads import ArcFaceHead, CosFaceHead, SoftmaxHead, SphereFaceHead, focal_loss

from .conftest import ROOT

TINY_TRAIN = [
    "train_data.train.num_identities=12",
    "train_data.train.images_per_identity=6",
    "train_data.val.query.num_identities=10",
    "train_data.batch_size=24",
    "rerank.top_k=5",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def _two_class(head, theta):
    """Unit embedding at angle ``theta`` from class 0's weight (class 1 at pi/2)."""
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[math.cos(theta), math.sin(theta)]])
    return head(x, torch.tensor([0]))[0]


def test_arcface_logits_by_hand():
    head = ArcFaceHead(2, 2, s=30.0, m=0.5)
    # theta_0 = 1 rad: target cos(1.5); other class at pi/2 - 1 rad
    torch.testing.assert_close(
        _two_class(head, 1.0), torch.tensor([30 * math.cos(1.5), 30 * math.cos(math.pi / 2 - 1.0)])
    )
    # theta_0 = 3 rad > pi - m: fallback cos(theta) - m * sin(m) (= sin(pi - m) * m)
    fallback = math.cos(3.0) - math.sin(0.5) * 0.5
    torch.testing.assert_close(_two_class(head, 3.0)[0], torch.tensor(30 * fallback))
    easy = ArcFaceHead(2, 2, s=30.0, m=0.5, easy_margin=True)
    torch.testing.assert_close(_two_class(easy, 3.0)[0], torch.tensor(30 * math.cos(3.0)))


def test_cosface_logits_by_hand():
    head = CosFaceHead(2, 2, s=30.0, m=0.35)
    torch.testing.assert_close(
        _two_class(head, 1.0),
        torch.tensor([30 * (math.cos(1.0) - 0.35), 30 * math.cos(math.pi / 2 - 1.0)]),
    )


def test_sphereface_logits_by_hand():
    head = SphereFaceHead(2, 2, m=4, base=0.0, lambda_min=0.0)  # lambda = 0: pure A-Softmax
    # theta = 1 rad: k = floor(4 / pi) = 1, psi = (-1)^1 cos(4) - 2
    torch.testing.assert_close(
        _two_class(head, 1.0), torch.tensor([-math.cos(4.0) - 2.0, math.cos(math.pi / 2 - 1.0)])
    )
    annealed = SphereFaceHead(2, 2, m=4, base=1000.0, lambda_min=5.0)
    lam = 1000.0
    expected = (lam * math.cos(1.0) + (-math.cos(4.0) - 2.0)) / (1 + lam)
    torch.testing.assert_close(_two_class(annealed, 1.0)[0], torch.tensor(expected))


def test_softmax_and_focal_loss():
    head = SoftmaxHead(2, 2)
    assert head(torch.randn(3, 2)).shape == (3, 2)
    logits = torch.tensor([[2.0, 0.0]])
    p = math.exp(2) / (math.exp(2) + 1)
    torch.testing.assert_close(
        focal_loss(logits, torch.tensor([0])), torch.tensor(-((1 - p) ** 2) * math.log(p))
    )


@pytest.mark.parametrize("head", ["arcface", "cosface", "sphereface", "softmax"])
def test_fast_dev_run_per_head(compose_train, head):
    from faceemd.jobs.train import run_training

    cfg = compose_train([f"head={head}", "++trainer.fast_dev_run=true", *TINY_TRAIN])
    metrics = run_training(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["stage1/p_at_1"] <= 1.0


def test_mixed_precision_accumulation_and_no_logger(compose_train):
    """The README's Trainer flags, with logging off (no learning-rate monitor then)."""
    from faceemd.jobs.train import run_training

    cfg = compose_train(
        [
            "++trainer.fast_dev_run=true",
            "trainer.precision=bf16-mixed",
            "trainer.accumulate_grad_batches=2",
            *[a for a in TINY_TRAIN if not a.startswith("logger")],
            "logger=none",
        ]
    )
    assert not cfg.logger
    metrics = run_training(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["stage1/p_at_1"] <= 1.0


def _validate_p_at_1(cfg, model, datamodule):
    from faceemd.callbacks import RerankEvaluation
    from faceemd.jobs.instantiators import rerank_config

    evaluation = RerankEvaluation(rerank_config(cfg.rerank))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[evaluation],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return evaluation.results["stage1/p_at_1"]


def test_short_run_lowers_loss_and_beats_the_untrained_model(compose_train, tmp_path):
    import csv

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from faceemd.jobs.train import run_training
    from faceemd.models.build import build_face_input
    from faceemd.models.recognizer import FaceRecognizer

    # Validation is open-set (identities never trained on): 12 training identities and 10 queries
    # left the gain inside the noise (0.3 -> 0.3 here, 0.3 -> 0.2 on CI). 40 identities, AdamW and
    # 30 queries gained 0.20-0.37 over seeds 0-3 (see the margin below).
    cfg = compose_train(
        [
            "trainer.max_epochs=4",
            *TINY_TRAIN,
            "train_data.train.num_identities=40",
            "train_data.train.images_per_identity=8",
            "train_data.batch_size=40",
            "train_data.val.query.num_identities=30",
            "optimizer=adamw",
        ]
    )
    L.seed_everything(cfg.seed)
    dm = instantiate(cfg.train_data, face_input=build_face_input(cfg.backbone))
    c = OmegaConf.to_container(cfg, resolve=True)
    untrained = FaceRecognizer(c["backbone"], c["head"], dm.num_classes, c["optimizer"])
    before = _validate_p_at_1(cfg, untrained, dm)
    metrics = run_training(cfg)
    assert metrics["stage1/p_at_1"] >= before + 0.1  # at least 3 more of the 30 queries right
    (log,) = tmp_path.glob("csv/*/metrics.csv")
    epoch_loss = [
        float(r["train/loss_epoch"]) for r in csv.DictReader(open(log)) if r.get("train/loss_epoch")
    ]
    assert len(epoch_loss) == 4 and epoch_loss[-1] < epoch_loss[0]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    exported = torch.load(summary["exported_backbone"], weights_only=True)
    assert set(exported) == set(untrained.backbone.state_dict())
    # evaluate.py's loader (strict) takes the export as backbone.weights
    from faceemd.models.build import build_backbone

    net = build_backbone(OmegaConf.merge(cfg.backbone, {"weights": summary["exported_backbone"]}))
    torch.testing.assert_close(net.state_dict()["fc.weight"], exported["fc.weight"])


def test_resume_restores_step_count_and_optimizer_state(compose_train, tmp_path):
    from faceemd.jobs.train import run_training

    first = compose_train(["trainer.max_epochs=1", *TINY_TRAIN], output_dir=tmp_path / "a")
    run_training(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    steps_per_epoch = saved["global_step"]
    assert steps_per_epoch > 0

    from .helpers import RecordTrainStart

    second = compose_train(
        ["trainer.max_epochs=2", f"ckpt_path={last}", *TINY_TRAIN,
         "+callbacks.record._target_=tests.helpers.RecordTrainStart"],
        output_dir=tmp_path / "b",
    )  # fmt: skip
    run_training(second)
    seen = RecordTrainStart.seen
    assert seen["step"] == steps_per_epoch
    state = seen["optimizer"]["state"]
    saved_state = saved["optimizer_states"][0]["state"]
    assert state.keys() == saved_state.keys() and state
    for k in saved_state:
        torch.testing.assert_close(state[k]["momentum_buffer"], saved_state[k]["momentum_buffer"])
    final = json.loads((tmp_path / "b" / "train_summary.json").read_text())
    assert final["global_step"] == 2 * steps_per_epoch


@pytest.mark.slow
def test_keyboard_interrupt_leaves_last_checkpoint_and_finished_wandb(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"paths.log_dir={tmp_path}",
            "logger=default",
            "+callbacks.stop._target_=tests.helpers.InterruptAt",
            "+callbacks.stop.batch=2",
            *[a for a in TINY_TRAIN if not a.startswith("logger")],
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    (run_dir,) = tmp_path.glob("train/runs/*")
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2
    from faceemd.models.recognizer import FaceRecognizer

    model = FaceRecognizer.load_from_checkpoint(last, weights_only=True)
    assert model.backbone(torch.zeros(2, 1, 64, 64)).embedding.shape == (2, 128)
    (wandb_run,) = run_dir.glob("wandb/offline-run-*")
    # wandb.finish() ran (offline runs record it in their debug log)
    assert "finishing run" in (wandb_run / "logs" / "debug.log").read_text()


def test_onnx_backbone_is_refused_for_finetuning(compose_train):
    """SFace runs in onnxruntime: train.py must say so instead of training only the head."""
    from omegaconf import OmegaConf

    from faceemd.models.recognizer import FaceRecognizer

    cfg = OmegaConf.to_container(compose_train(["backbone=sface"]), resolve=True)
    with pytest.raises(ValueError, match="backbone=sface has no trainable parameters"):
        FaceRecognizer(cfg["backbone"], cfg["head"], 3, cfg["optimizer"])


def _train(args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path}", *TINY_TRAIN, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_exits_non_zero(tmp_path):
    out = _train(["+callbacks.term._target_=tests.helpers.SigtermAt", "+callbacks.term.batch=2"],
                 tmp_path)  # fmt: skip
    assert out.returncode == 143, out.stdout[-2000:] + out.stderr[-2000:]
    (run_dir,) = tmp_path.glob("train/runs/*")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= 2


def test_last_checkpoint_is_the_latest_epoch_even_without_validation(compose_train, tmp_path):
    """last.ckpt follows every epoch, not the improvements of the monitored metric (here
    validation never runs, so the best checkpoint is never written)."""
    from faceemd.jobs.train import run_training

    cfg = compose_train(
        ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=5", *TINY_TRAIN],
        output_dir=tmp_path,
    )
    run_training(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1  # the second (last) epoch, counted from 0


def test_crafted_checkpoint_targets_are_refused(tmp_path):
    """A checkpoint that passes weights_only=True can still name functions in its saved
    hyper-parameters; loading must not call them."""
    from faceemd.models.recognizer import FaceRecognizer

    marker = tmp_path / "pwned.txt"
    ckpt = {
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {},
        "hyper_parameters": {
            "backbone": {
                "net": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
                "input": {"size": [64, 64], "channels": 1},
            },  # fmt: skip
            "head": {"_target_": "faceemd.models.heads.ArcFaceHead"},
            "num_classes": 2,
            "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
        },
    }
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="builtins.open' is not an allowed class"):
        FaceRecognizer.load_from_checkpoint(tmp_path / "evil.ckpt")
    ckpt["hyper_parameters"]["backbone"]["net"] = {
        "_target_": "faceemd.models.checkpoint.read_state_dict",
        "path": str(marker),
    }  # an allowed package, but a function, not a class
    torch.save(ckpt, tmp_path / "evil2.ckpt")
    with pytest.raises(ValueError, match="not an allowed class"):
        FaceRecognizer.load_from_checkpoint(tmp_path / "evil2.ckpt")
    assert not marker.exists()


def test_checkpoint_mixups_get_messages_that_say_what_to_do(tmp_path):
    from faceemd.jobs.train import check_resume_checkpoint
    from faceemd.models.backbones import TinyFaceNet
    from faceemd.models.checkpoint import load_backbone_weights

    state = TinyFaceNet().state_dict()
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a Lightning training checkpoint.*backbone.weights"):
        check_resume_checkpoint(tmp_path / "plain.pt")
    lightning_like = {f"backbone.{k}": v for k, v in state.items()}
    lightning_like["head.weight"] = torch.zeros(3, 128)
    torch.save({"state_dict": lightning_like}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="train.py checkpoint.*export/backbone.pt"):
        load_backbone_weights(TinyFaceNet(), tmp_path / "last.ckpt")
    torch.save({f"model.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pt")
    with pytest.raises(ValueError, match=r"strip_prefixes=\[model.\]"):
        load_backbone_weights(TinyFaceNet(), tmp_path / "prefixed.pt")
    load_backbone_weights(TinyFaceNet(), tmp_path / "prefixed.pt", strip_prefixes=["model."])


def _write_faces(root, items):
    """Write ``(relpath, (image, name, landmarks))`` items under ``root`` with landmarks68.tsv."""
    import cv2

    rows = []
    for rel, (image, _, lmk) in items:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / rel), image if image.ndim == 2 else image[..., ::-1])
        rows.append(rel + "\t" + "\t".join(f"{v:.2f}" for v in lmk.reshape(-1)))
    (root / "landmarks68.tsv").write_text("\n".join(rows) + "\n")


def _synthetic_cfp_and_lfw(root):
    """A CFP tree of raw (unaligned) generated faces with landmarks68.tsv and list_name.txt,
    and an LFW tree of aligned 112x96 generated faces; person 'Shared_Person' is in both, and
    CFP person 005 has a single photo."""
    from faceemd.data.synthetic import SyntheticFaces

    cfp, lfw = root / "cfp", root / "lfw"
    raw = SyntheticFaces(num_identities=5, images_per_identity=4, seed=3)
    names = ["Ann_A", "Bob_B", "Cid_C", "Shared_Person", "Dee_D"]
    kept = range(17)  # 4 photos of persons 001-004, 1 of person 005
    _write_faces(cfp, [
        (f"Data/Images/{i // 4 + 1:03d}/" + (f"frontal/{i % 4 + 1:02d}" if i % 4 < 3 else "profile/01")
         + ".jpg", raw[i])
        for i in kept
    ])  # fmt: skip
    (cfp / "Data" / "list_name.txt").write_text("\n".join(n.replace("_", " ") for n in names))
    aligned = SyntheticFaces(
        num_identities=4, images_per_identity=3, seed=1000, template="sphereface_112x96"
    )
    lfw_names = ["Eve_E", "Fay_F", "Gus_G", "Shared_Person"]
    _write_faces(lfw, [
        (f"{lfw_names[i // 3]}/{lfw_names[i // 3]}_{i % 3 + 1:04d}.png", aligned[i])
        for i in range(len(aligned))
    ])  # fmt: skip
    return cfp, lfw


@pytest.mark.slow
def test_real_finetune_pipeline_short_version(tmp_path):
    """experiment=real_finetune_mobilefacenet on generated CFP and LFW trees, one epoch, then
    the exported backbone in evaluate.py; and the refusal when training and validation share a
    person."""
    cfp, lfw = _synthetic_cfp_and_lfw(tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    common = [
        f"paths.cfp_dir={cfp}",
        f"paths.lfw_dir={lfw}",
        f"paths.log_dir={tmp_path / 'out'}",
        "backbone.weights=null",  # no ../shared in CI; the real run starts from the CASIA net
        "train_data.train.landmark_model=null",  # the generated CFP tree has its landmarks
        "train_data.batch_size=8",
        "train_data.num_workers=0",
        "train_data.val.num_workers=0",
        "rerank.top_k=5",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]

    def run(script, args):
        return subprocess.run(
            [sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    out = run("train.py", ["experiment=real_finetune_mobilefacenet", *common])
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "1 identities with fewer than 2 images skipped (1 images)" in log
    assert (
        "1 identities removed because the excluded set has them too (4 images): Shared_Person"
        in log
    )
    (run_dir,) = (tmp_path / "out" / "train" / "runs").iterdir()
    export = run_dir / "export" / "backbone.pt"
    assert export.is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list(run_dir.glob("checkpoints/best-*.ckpt"))
    assert list(run_dir.glob("wandb/offline-run-*")) and list(run_dir.glob("csv/*/metrics.csv"))
    metrics = (next(run_dir.glob("csv/*/metrics.csv"))).read_text()
    assert "stage1/p_at_1" in metrics and "stage2/p_at_1" in metrics
    # the finetuned backbone in the evaluation of the README's table (LFW mask protocol)
    ev = run("evaluate.py", [
        "experiment=real_lfw_mobilefacenet", "data=lfw_mask", "hydra.mode=RUN",
        f"backbone.weights={export}", *common[1:3], "rerank.top_k=5",
        "trainer.enable_progress_bar=false", "data.num_workers=0",
    ])  # fmt: skip
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    (result,) = (tmp_path / "out" / "evaluate" / "runs").glob("*/metrics.json")
    assert json.loads(result.read_text())["metrics"]["eval/num_queries"] == 12
    # without the exclusion the shared person would be trained on: refused, named
    out = run("train.py", [
        "experiment=real_finetune_mobilefacenet", "train_data.exclude_identities=null", *common
    ])  # fmt: skip
    assert out.returncode != 0
    assert "1 identities are both training and validation identities: Shared_Person" in (
        out.stdout + out.stderr
    )


def test_class_mean_head_imprinting(compose_train):
    """Each class weight becomes the normalised mean of that class's normalised embeddings
    (computed here directly from the backbone); a class without faces keeps its weight."""
    from omegaconf import OmegaConf

    from faceemd.models.recognizer import FaceRecognizer

    cfg = OmegaConf.to_container(compose_train([]), resolve=False)
    model = FaceRecognizer(
        cfg["backbone"], cfg["head"], 4, cfg["optimizer"], head_init="class_means"
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 1, 64, 64, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 0, 1, 1, 0])
    untouched = model.head.weight[3].clone()
    loader = [
        {"image": images[:6], "label": labels[:6]},
        {"image": images[6:], "label": labels[6:]},
    ]
    model.imprint_head(loader)
    assert model.backbone.training  # restored
    model.backbone.eval()
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.backbone(images).embedding, dim=1)
    for c in range(3):
        expected = torch.nn.functional.normalize(emb[labels == c].mean(0), dim=0)
        torch.testing.assert_close(model.head.weight[c], expected, atol=1e-5, rtol=0)
    assert torch.equal(model.head.weight[3], untouched)
    cfg["head"] = {"_target_": "faceemd.models.heads.SoftmaxHead"}
    with pytest.raises(ValueError, match="head_init=class_means needs a cosine head"):
        FaceRecognizer(cfg["backbone"], cfg["head"], 4, cfg["optimizer"], head_init="class_means")


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """A write that fails part-way (ENOSPC) must leave the last good checkpoint loadable and
    no temporary file; Lightning's own IO committed by copying onto the final name."""
    import errno

    from faceemd.storage.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_train_uses_the_atomic_checkpoint_io(compose_train, tmp_path):
    from faceemd.jobs.train import run_training
    from faceemd.storage.checkpoint_io import AtomicCheckpointIO

    cfg = compose_train(["trainer.max_epochs=1", "logger=none", "+trainer.limit_train_batches=1",
                         "+trainer.limit_val_batches=1"])  # fmt: skip
    seen = {}
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        seen[str(path)] = True
        return real(self, checkpoint, path, storage_options)

    import unittest.mock

    with unittest.mock.patch.object(AtomicCheckpointIO, "save_checkpoint", spy):
        run_training(cfg)
    assert any(p.endswith("last.ckpt") for p in seen), seen


@pytest.mark.parametrize(
    "override, what",
    [("head=cosface", "head"), ("optimizer=adamw", "optimizer"), ("backbone=arcface_r18", "backbone"),
     ("train_data.train.num_identities=13", "number of training classes")],
)  # fmt: skip
def test_resume_with_another_config_is_refused_naming_both(compose_train, tmp_path, override, what):
    """head=cosface on an ArcFace checkpoint was accepted silently, optimizer=adamw died with
    KeyError 'step' inside torch, another class count with a raw size mismatch."""
    from faceemd.jobs.train import run_training

    first = compose_train(["trainer.max_epochs=1", *TINY_TRAIN], output_dir=tmp_path / "a")
    run_training(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = compose_train(
        ["trainer.max_epochs=2", f"ckpt_path={last}", *TINY_TRAIN, override],
        output_dir=tmp_path / "b",
    )
    with pytest.raises(ValueError, match=f"holds a run with {what} .* but this run asks for"):
        run_training(second)
    assert not list((tmp_path / "b").rglob("*.ckpt"))  # a refused resume writes no checkpoint


def _outcome(run_dir):
    """The final metrics (timings left out) and exported backbone weights of a train.py run."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    metrics = {k: v for k, v in summary["metrics"].items() if not k.endswith("_seconds")}
    weights = torch.load(run_dir / "export" / "backbone.pt", weights_only=True)
    return summary["global_step"], metrics, weights.get("state_dict", weights)


def _assert_same_outcome(a, b, exact=True):
    """Every metric and weight bitwise equal; or (``exact=False``, a resumed run) the ranking
    metrics equal, losses within 1e-4 relative and weights within 1e-4 absolute (drift from
    last-bit differences, see docs/finetuning.md)."""
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys() and a[2].keys() == b[2].keys()
    for name, value in a[1].items():
        if exact or not name.startswith("train/"):
            assert value == b[1][name], name
        else:
            assert value == pytest.approx(b[1][name], rel=1e-4, abs=1e-6), name
    for name in a[2]:
        if exact:
            assert torch.equal(a[2][name], b[2][name]), name
        else:
            torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-3, atol=1e-4)


def _train_process(args, run_dir):
    """train.py in a fresh process (as a user runs it), into ``run_dir``."""
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_TRAIN, *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _finish(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def test_training_is_reproducible_and_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path,
):
    """Same seed, same machine, two processes: every metric and weight bitwise equal (data
    order, augmentation and dropout draws are functions of the seed and epoch). Stopping after
    epoch 1 and resuming from last.ckpt (the generators' states travel in it) ends with the
    uninterrupted run's ranking metrics; losses and weights agree to float32 drift."""
    a = _train_process(["trainer.max_epochs=3"], tmp_path / "a")
    b = _train_process(["trainer.max_epochs=3"], tmp_path / "b")
    _finish(a), _finish(b)
    first = _train_process(["trainer.max_epochs=1"], tmp_path / "first")
    _finish(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _finish(_train_process(["trainer.max_epochs=3", f"ckpt_path={last}"], tmp_path / "resumed"))
    full = _outcome(tmp_path / "a")
    _assert_same_outcome(full, _outcome(tmp_path / "b"))
    _assert_same_outcome(full, _outcome(tmp_path / "resumed"), exact=False)
    assert _outcome(tmp_path / "first")[1] != full[1]  # the comparison can tell runs apart


def test_training_images_do_not_depend_on_the_number_of_workers(compose_train):
    """An epoch's batches are the same with 0 and 2 loader workers (each item's augmentation
    draws from its own seed), and differ between epochs."""
    cfg = compose_train(TINY_TRAIN)
    batches = {}
    for workers in (0, 2):
        dm = instantiate(cfg.train_data, face_input=build_face_input(cfg.backbone),
                         num_workers=workers)  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            batches[workers, epoch] = next(iter(loader))
    for epoch in (0, 1):
        assert torch.equal(batches[0, epoch]["index"], batches[2, epoch]["index"])
        assert torch.equal(batches[0, epoch]["image"], batches[2, epoch]["image"])
    assert not torch.equal(batches[0, 0]["index"], batches[0, 1]["index"])


@pytest.mark.slow
def test_kill_9_and_resume_ends_at_the_uninterrupted_metrics(tmp_path):
    """A run killed with SIGKILL after its first last.ckpt, resumed from it, ends with the
    uninterrupted run's ranking metrics (losses and weights to float32 drift)."""
    import signal
    import time

    full = _train_process(["trainer.max_epochs=3"], tmp_path / "full")
    _finish(full)
    proc = _train_process(["trainer.max_epochs=3"], tmp_path / "killed")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(last, weights_only=True)["epoch"] < 2, "killed before the run's end"
    _finish(_train_process(["trainer.max_epochs=3", f"ckpt_path={last}"], tmp_path / "resumed"))
    _assert_same_outcome(_outcome(tmp_path / "full"), _outcome(tmp_path / "resumed"), exact=False)
