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
    for group in ("data", "backbone", "rerank", "logger", "trainer")
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
