"""Every config under conf/ composes and instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from faceemd.callbacks import RerankEvaluation
from faceemd.evaluation import build_loggers, finish_loggers, rerank_config
from faceemd.models.build import build_backbone, build_face_input

from .conftest import ROOT

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    for group in ("data", "backbone", "rerank", "cache", "logger", "trainer")
}
# Options whose instantiation needs files outside the repo or user-supplied paths.
NEEDS_FILES = {("data", "lfw_folder"), ("data", "image_list"), ("backbone", "mobilefacenet")}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts]
)
def test_every_option_composes(compose_evaluate, group, option):
    cfg = compose_evaluate([f"{group}={option}"])
    assert cfg[group] is not None or group == "logger"
    if (group, option) in NEEDS_FILES:
        return
    if group == "data":
        dm = instantiate(cfg.data, face_input=build_face_input(cfg.backbone))
        dm.setup("test")
        assert len(dm.test_dataloader()) in (1, 2)
    elif group == "backbone":
        build_backbone(cfg.backbone)
        build_face_input(cfg.backbone)
    elif group == "rerank":
        RerankEvaluation(rerank_config(cfg.rerank))
    elif group == "logger":
        loggers = build_loggers(cfg.logger)
        assert len(loggers) == {"default": 2, "wandb": 1, "csv": 1, "none": 0}[option]
        finish_loggers()
    elif group == "cache":
        assert cfg.cache.enabled == (option == "disk")
    elif group == "trainer":
        if option in ("cpu",):
            instantiate(cfg.trainer, logger=False)


def test_experiment_files_compose(compose_evaluate):
    for path in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        cfg = compose_evaluate([f"experiment={path.stem}"])
        assert cfg.rerank is not None


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
PLUGINS = {"optuna_alpha": "hydra_plugins.hydra_optuna_sweeper", "joblib":
           "hydra_plugins.hydra_joblib_launcher", "slurm": "hydra_plugins.hydra_submitit_launcher"}
SWEEP_SPACES = {
    "alpha": {"rerank.alpha": "0,0.3,0.5,0.7,1"},
    "top_k": {"rerank.top_k": "100,200,300"},
    "weighting": {"rerank.weighting": "uniform,apc,sc,cc,lmk"},
    "grid": {"rerank.grid": "[8,8],[4,4]"},
    "alpha_weighting": {"rerank.alpha": "0,0.3,0.5,0.7,1", "rerank.weighting": "uniform,apc,sc,cc"},
}


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in ("sweep", "launcher") for p in sorted((ROOT / "conf" / g).glob("*.yaml"))],
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
