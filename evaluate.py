"""DeepFace-EMD evaluation: ``python evaluate.py [group=option ...] [-m for sweeps]``.

Composes ``conf/evaluate.yaml``; all logic lives in :mod:`faceemd.jobs.evaluate`.
Returns the configured ``optimized_metric`` so Hydra sweepers can optimise it.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from faceemd.jobs.evaluate import evaluate_job  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return evaluate_job(cfg)


if __name__ == "__main__":
    main()
