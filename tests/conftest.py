"""Shared fixtures: Hydra composition of the project's configs, paths to ../shared data."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist runs one process per core: one thread each avoids oversubscribing the cores
# (small batched matmuls slow down by 100x when OpenMP threads wait on descheduled peers).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILEFACENET = SHARED / "weights" / "mobilefacenet_casia_068.ckpt"
LFW_112 = SHARED / "data" / "lfw" / "align-112x96"


def _composer(config_name: str, tmp_path):
    """compose(overrides, output_dir=None) -> ``conf/<config_name>.yaml`` composed with Hydra's
    runtime fields set as a launched job has them (output dir, cwd, job number)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(overrides=(), output_dir=None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir or tmp_path)
            cfg.hydra.runtime.cwd = str(ROOT)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    return _compose


@pytest.fixture
def compose_evaluate(tmp_path):
    """The evaluate.py config (see :func:`_composer`)."""
    from hydra.core.global_hydra import GlobalHydra

    yield _composer("evaluate", tmp_path)
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_train(tmp_path):
    """The train.py config (see :func:`_composer`)."""
    from hydra.core.global_hydra import GlobalHydra

    yield _composer("train", tmp_path)
    GlobalHydra.instance().clear()


def write_noise_image(path, seed=0, shape=(24, 20)):
    """A small random grayscale JPEG at ``path`` (folders made as needed)."""
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 255, shape, np.uint8))


needs_shared_weights = pytest.mark.skipif(
    not (MOBILEFACENET.is_file() and LFW_112.is_dir()),
    reason="../shared (real LFW faces and MobileFaceNet weights) is not present",
)
