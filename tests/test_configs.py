"""Every config under conf/ composes and instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from faceemd.callbacks import RerankEvaluation
from faceemd.data.transforms import FaceInput
from faceemd.jobs.instantiators import build_loggers, finish_loggers, rerank_config
from faceemd.models.build import build_backbone, build_face_input

from .conftest import ROOT

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    for group in ("data", "backbone", "rerank", "cache", "logger", "trainer")
}
# Options whose instantiation needs files outside the repo or user-supplied paths.
# (data protocols are instantiated on generated trees in test_protocols_on_generated_trees)
NEEDS_FILES = {("data", o) for o in GROUP_OPTIONS["data"] if o != "synthetic"} | {
    ("backbone", "mobilefacenet"),
    ("backbone", "onnx"),  # a user's file: tests/test_backbones.py exports one
}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts]
)
def test_every_option_composes(compose_evaluate, tmp_path, group, option):
    cfg = compose_evaluate([f"{group}={option}"])
    assert cfg[group] is not None or group == "logger"
    if (group, option) in NEEDS_FILES:
        return
    import dataclasses

    import torch

    if group == "data":
        dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
        dm.setup("test")
        assert len(dm.test_dataloader()) in (1, 2)
    elif group == "backbone":
        net = build_backbone(cfg.backbone)
        spec = build_face_input(cfg.backbone)
        out = net(torch.zeros(2, spec.channels, *spec.size))
        assert out.embedding.shape[0] == 2 and out.grid.dim() == 4
    elif group == "rerank":  # the settings rank: stage 2 re-orders only with emd
        from faceemd.emd import FeatureBank, two_stage_rank

        g = torch.Generator().manual_seed(0)
        bank = FeatureBank(torch.randn(12, 8, generator=g), torch.rand(12, 4, 8, generator=g),
                           torch.arange(12) % 4)  # fmt: skip
        settings = dataclasses.replace(rerank_config(cfg.rerank), top_k=min(cfg.rerank.top_k, 5))
        RerankEvaluation(settings)
        rk = two_stage_rank(bank, bank, settings, torch.arange(12), depth=5)
        assert (rk.emd_similarity is None) == (option == "none")
    elif group == "logger":
        loggers = build_loggers(cfg.logger)
        assert len(loggers) == {"default": 2, "wandb": 1, "csv": 1, "none": 0}[option]
        finish_loggers()
    elif group == "cache":  # disk: entries written and read back; off: nothing cached
        from faceemd.jobs.instantiators import build_cache

        if option == "disk":
            cfg.cache.dir = str(tmp_path / "cache")
        cache = build_cache(cfg.cache)
        assert (cache is None) == (option == "off")
        if cache is not None:
            cache.save_scores("k", torch.arange(6).view(2, 3), torch.ones(2, 3))
            assert cache.load_scores("k", torch.arange(6).view(2, 3)).shape == (2, 3)
    elif group == "trainer":
        assert cfg.trainer._target_ == "lightning.Trainer"
        if option == "cpu":  # gpu/ddp need devices this machine may not have
            trainer = instantiate(cfg.trainer, logger=False)
            assert trainer.num_devices == 1


def _is_train_experiment(name: str) -> bool:
    """Experiments of train.py (they choose the training data); the others are evaluate.py's."""
    return "override /train_data" in (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()


def test_experiment_files_compose(compose_evaluate, compose_train):
    for path in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        if _is_train_experiment(path.stem):
            cfg = compose_train([f"experiment={path.stem}"])
            assert cfg.train_data.exclude_identities is not None and list(cfg.tags)
            continue
        cfg = compose_evaluate([f"experiment={path.stem}"])
        assert cfg.rerank is not None
        # the paper's tables: embeddings of the image alone, RP/MAP@R with the public R
        assert not cfg.backbone.flip_test
        assert cfg.metrics.r_counts_query == path.stem.startswith("paper_")
        assert list(cfg.tags), "the experiment's tags win over the root's empty list"
        if cfg.hydra.sweeper.params:  # a sweep runs as a multirun without -m
            assert str(cfg.hydra.mode).endswith("MULTIRUN")


def test_rerank_yaml_and_dataclass_share_their_defaults(compose_evaluate):
    """Command-line and Python users solve with the same settings (one source of defaults)."""
    import dataclasses

    from faceemd.emd import RerankConfig

    cfg = compose_evaluate([])
    defaults = {f.name: f.default for f in dataclasses.fields(RerankConfig)}
    assert set(cfg.rerank) == set(defaults)
    for name, value in cfg.rerank.items():
        assert value == defaults[name], name


@pytest.mark.parametrize(
    "group, settings",
    [
        ("cache", "faceemd.storage.feature_cache.CacheSettings"),
        ("extraction", "faceemd.models.inference.ExtractionSettings"),
    ],
)
def test_settings_yaml_and_dataclass_share_their_defaults(compose_evaluate, group, settings):
    """The cache and extraction groups list exactly their dataclass's fields and defaults."""
    import dataclasses

    from hydra.utils import get_class

    cfg = compose_evaluate([])
    defaults = {f.name: f.default for f in dataclasses.fields(get_class(settings))}
    values = OmegaConf.to_container(cfg[group], resolve=True)
    assert values == defaults


def test_config_tree_has_expected_groups():
    assert {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()} >= {
        "data",
        "backbone",
        "rerank",
        "logger",
        "trainer",
        "paths",
        "hydra",
        "experiment",
    }
    assert Path(ROOT / "conf" / "evaluate.yaml").is_file()


# Hydra plugin each sweep/launcher option needs (None: only the core).
PLUGINS = {
    "optuna_alpha": "hydra_plugins.hydra_optuna_sweeper",
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
}
SWEEP_SPACES = {
    "alpha": {"rerank.alpha": "0,0.3,0.5,0.7,1"},
    "top_k": {"rerank.top_k": "100,200,300"},
    "weighting": {"rerank.weighting": "uniform,apc,sc,lmk"},
    "grid": {"rerank.grid": "[8,8],[4,4]"},
    "alpha_weighting": {
        "rerank.alpha": "0,0.3,0.5,0.7,1",
        "rerank.weighting": "uniform,apc,sc,lmk",
    },
}


@pytest.mark.parametrize(
    "group,option",
    [
        (g, p.stem)
        for g in ("sweep", "launcher")
        for p in sorted((ROOT / "conf" / g).glob("*.yaml"))
    ],
)
def test_sweep_and_launcher_options_compose(compose_evaluate, group, option):
    if option in PLUGINS:
        pytest.importorskip(PLUGINS[option])
    cfg = compose_evaluate([f"{group}={option}"])
    if group == "sweep" and option in SWEEP_SPACES:
        assert dict(cfg.hydra.sweeper.params) == SWEEP_SPACES[option]
    if option == "joblib":
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    if option == "slurm":
        assert "SlurmLauncher" in cfg.hydra.launcher._target_


def _write_faces(folder, names, layout, with_landmarks=True):
    """Synthetic faces written in a dataset layout; returns nothing, fills ``folder``."""
    import cv2

    from faceemd.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(len(names), 3, seed=0)
    rows = []
    for i in range(len(faces)):
        image, _, lmk = faces[i]
        who, k = names[i // 3], i % 3 + 1
        rel = {
            "lfw": f"{who}/{who}_{k:04d}.jpg",
            "flat": f"{who}_{k:04d}.jpg",
            "agedb": f"{i}_{who}_{30 + k}_m.jpg",
            "cfp": f"Data/Images/{i // 3 + 1:03d}/{'profile' if k == 3 else 'frontal'}/{k:02d}.jpg",
        }[layout]
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / rel), image)
        rows.append("\t".join([rel, *(f"{v:.2f}" for v in lmk.reshape(-1))]))
    if with_landmarks:
        (folder / "landmarks68.tsv").write_text("\n".join(rows) + "\n")


PROTOCOL_SIZES = {  # data option -> (queries, gallery or None for self-gallery)
    "lfw": (12, None),
    "lfw_crop": (12, 12),
    "lfw_mask": (12, 12),
    "lfw_sunglass": (12, 12),
    "calfw_mask": (12, 12),
    "calfw_sunglass": (12, 12),
    "calfw_crop": (12, 12),
    "agedb_mask": (12, 12),
    "agedb_sunglass": (12, 12),
    "agedb_crop": (12, 12),
    "cfp_profile": (3, 8),  # YuNet scores generated profile 003 at 0.47 < 0.6: skipped
    "mlfw": (12, 12),
    "talfw": (12, 12),
}


def test_protocols_on_generated_trees(compose_evaluate, tmp_path):
    names = ["Ann_Lee", "Bob_Hope", "Cy_Twombly", "Di_Fox"]
    _write_faces(tmp_path / "lfw", names, "lfw")
    _write_faces(tmp_path / "calfw", names, "flat")
    _write_faces(tmp_path / "agedb", names, "agedb")
    _write_faces(tmp_path / "cfp", names, "cfp")
    _write_faces(tmp_path / "mlfw", names, "flat", with_landmarks=False)
    _write_faces(tmp_path / "talfw", names, "flat", with_landmarks=False)
    paths = [
        f"paths.{d}_dir={tmp_path / d}" for d in ("lfw", "calfw", "agedb", "cfp", "mlfw", "talfw")
    ]
    # synthetic, image_list, pairs, raw_folder, lfw_adv: tests of their own; cfp_ff, cfp_fp: below
    others = {"synthetic", "image_list", "pairs", "raw_folder", "lfw_adv", "cfp_ff", "cfp_fp"}
    assert set(PROTOCOL_SIZES) | others == set(GROUP_OPTIONS["data"])
    for option, (nq, ng) in PROTOCOL_SIZES.items():
        cfg = compose_evaluate([f"data={option}", f"paths.occluded_dir={tmp_path / 'occ'}", *paths])
        dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
        dm.setup("test")
        assert len(dm.query) == nq, option
        assert dm.same_images == (ng is None), option
        if ng is not None:
            assert len(dm.gallery) == ng, option
            # every query identity has a relevant gallery image
            assert set(dm.query.label_names()) <= set(dm.gallery.label_names()), option
    # CFP verification on the same tree: frontal 1,2 and profile 3 of 4 people (1-based ids)
    proto = tmp_path / "cfp" / "Protocol"
    frontal = [f"../Data/Images/{p:03d}/frontal/{k:02d}.jpg" for p in (1, 2, 3, 4) for k in (1, 2)]
    profile = [f"../Data/Images/{p:03d}/profile/03.jpg" for p in (1, 2, 3, 4)]
    for name, paths_ in (("Pair_list_F.txt", frontal), ("Pair_list_P.txt", profile)):
        proto.mkdir(parents=True, exist_ok=True)
        (proto / name).write_text("".join(f"{i} {q}\n" for i, q in enumerate(paths_, 1)))
    for prot, same, diff in (
        ("FF", ["1,2", "3,4"], ["1,3", "5,7"]),
        ("FP", ["1,1", "3,2"], ["1,2", "5,4"]),
    ):
        for fold in (0, 1):
            folder = proto / "Split" / prot / f"{fold + 1:02d}"
            folder.mkdir(parents=True)
            (folder / "same.txt").write_text(same[fold] + "\n")
            (folder / "diff.txt").write_text(diff[fold] + "\n")
    for option, images in (("cfp_ff", 6), ("cfp_fp", 6)):
        cfg = compose_evaluate([f"data={option}", f"paths.aligned_dir={tmp_path / 'al'}", *paths])
        dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
        dm.setup("test")
        assert len(dm.query) == images and len(dm.pairs) == 4, option
        assert dm.pairs.same.tolist() == [True, False, True, False], option


EXPERIMENTS = sorted(
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("*.yaml")
    if not _is_train_experiment(p.stem)  # train.py's: tests/test_training.py
)
TINY_SYNTHETIC = [
    "data=synthetic",
    "data.query.num_identities=4",
    "data.query.images_per_identity=1",
    "data.gallery.images_per_identity=2",
    "rerank.top_k=3",
    "backbone.weights=null",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def test_paper_experiments_are_all_there():
    assert set(EXPERIMENTS) >= {
        "paper_table1",
        "paper_fig4_alpha",
        "paper_table2",
        "paper_table3",
        "paper_table4",
        "real_lfw_mobilefacenet",
        "real_lfw_sface",
    }


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_on_tiny_data(compose_evaluate, tmp_path, name):
    """The experiment's settings, with its data swapped for a tiny synthetic set and its
    checkpoint for random weights (the real ones are downloads)."""
    from faceemd.jobs.evaluate import run_evaluation

    cfg = compose_evaluate([f"experiment={name}", f"paths.log_dir={tmp_path}", *TINY_SYNTHETIC])
    assert cfg.hydra.sweeper.params, "an experiment defines its sweep"
    results = run_evaluation(cfg)
    assert results["eval/num_queries"] == 4
    assert 0.0 <= results["stage2/p_at_1"] <= 1.0


TRAIN_GROUPS = {
    group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    for group in ("train_data", "head", "optimizer", "scheduler")
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in TRAIN_GROUPS.items() for o in opts])
def test_every_train_option_composes_and_builds(compose_train, group, option):
    import torch
    from omegaconf import OmegaConf

    from faceemd.models.recognizer import FaceRecognizer

    cfg = compose_train([f"{group}={option}"])
    if group == "train_data":
        if option != "synthetic":  # needs the CASIA-WebFace download
            assert cfg.train_data.val.query.source.root == cfg.train_data.val.gallery.root
            return
        dm = instantiate(cfg.train_data, face_input=build_face_input(cfg.backbone))
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape[1:] == (1, 64, 64) and batch["label"].dtype == torch.long
        return
    c = OmegaConf.to_container(cfg, resolve=True)
    model = FaceRecognizer(c["backbone"], c["head"], 5, c["optimizer"], c.get("scheduler") or None)
    opt = model.configure_optimizers()
    assert opt is not None
    logits = model.head(model(torch.zeros(2, 1, 64, 64)), torch.tensor([0, 1]))
    assert logits.shape == (2, 5)


def test_limit_queries_takes_a_quick_subset_with_its_own_cache_key(compose_evaluate, tmp_path):
    names = ["Ann_Lee", "Bob_Hope", "Cy_Twombly", "Di_Fox"]
    _write_faces(tmp_path / "lfw", names, "lfw")
    base = [
        "data=lfw_crop",
        f"paths.lfw_dir={tmp_path / 'lfw'}",
        f"paths.occluded_dir={tmp_path / 'occ'}",
    ]
    full = instantiate(compose_evaluate(base).data, face_input=FaceInput((64, 64), 1, 127.5, 127.5))
    full.setup("test")
    cfg = compose_evaluate([*base, "+data.limit_queries=5"])
    dm = instantiate(cfg.data, face_input=FaceInput((64, 64), 1, 127.5, 127.5))
    dm.setup("test")
    assert len(dm.query) == 5 and len(dm.gallery) == 12 and len(full.query) == 12
    assert dm.query.files == full.query.files[:5]
    assert dm.query.fingerprint() != full.query.fingerprint()
    with pytest.raises(ValueError, match="needs a separate gallery"):
        lfw = compose_evaluate(
            ["data=lfw", f"paths.lfw_dir={tmp_path / 'lfw'}", "+data.limit_queries=3"]
        )
        instantiate(lfw.data, face_input=FaceInput((64, 64), 1, 127.5, 127.5)).setup("test")


def test_paths_shared_points_every_protocol_at_the_real_data(compose_evaluate):
    for data in ("lfw", "lfw_mask", "lfw_crop", "lfw_sunglass", "lfw_adv"):
        cfg = compose_evaluate(["paths=shared", f"data={data}"])
        assert cfg.paths.lfw_dir.endswith("shared/data/lfw/align-112x96")
        assert cfg.data.frame == "sphereface_112x96", data
    cfg = compose_evaluate(["paths=shared", "data=cfp_profile"])
    assert cfg.paths.cfp_dir.endswith("shared/data/cfp")
