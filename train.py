"""Finetuning: ``python train.py [group=option ...]`` (masked-augmentation ArcFace, Sec. 4.3).

Composes ``conf/train.yaml``; all logic lives in :mod:`faceemd.jobs.train`. Writes checkpoints
(best and last) and ``export/backbone.pt``, which ``evaluate.py backbone.weights=...`` loads.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from faceemd.jobs.train import train_job  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train_job(cfg)


if __name__ == "__main__":
    main()
