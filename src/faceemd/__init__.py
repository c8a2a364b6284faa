"""faceemd: DeepFace-EMD two-stage face identification."""

import os

from omegaconf import OmegaConf

# ``${pid:}`` in run folder names (conf/hydra/default.yaml): jobs launched in the same second
# by separate processes get separate folders.
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()))
