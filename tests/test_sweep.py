"""What a job learns of its sweep: the swept values of a key, command line over config, and
nothing where its siblings would not run after it in this process."""

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from faceemd.jobs.sweep import swept_values


@pytest.fixture
def as_sweep_job(compose_evaluate, tmp_path):
    """Make this process look like a job of a multirun launched with ``arguments``."""

    def set_up(arguments, params=None, launcher="BasicLauncher"):
        cfg = compose_evaluate([])
        hydra = cfg.hydra
        with read_write(hydra), open_dict(hydra):
            hydra.mode = RunMode.MULTIRUN
            hydra.sweep.dir = str(tmp_path / "sweep")
            hydra.sweeper.params = params or {}
            hydra.launcher._target_ = f"hydra._internal.core_plugins.x.{launcher}"
        (tmp_path / "sweep").mkdir(exist_ok=True)
        saved = OmegaConf.create({"hydra": {"overrides": {"task": arguments}}})
        OmegaConf.save(saved, tmp_path / "sweep" / "multirun.yaml")
        HydraConfig.instance().set_config(cfg)

    yield set_up
    HydraConfig.instance().cfg = None


def test_swept_values_of_the_command_line_and_config(as_sweep_job):
    as_sweep_job(["rerank.alpha=0,0.5", "rerank.weighting=uniform,apc,sc"])
    assert swept_values("rerank.weighting") == ["uniform", "apc", "sc"]
    assert swept_values("rerank.alpha") == ["0", "0.5"]
    assert swept_values("rerank.top_k") == []
    # a config-defined sweep (sweep=...), overridden key by key from the command line
    as_sweep_job(
        ["rerank.alpha=1"], params={"rerank.weighting": "uniform,lmk", "rerank.alpha": "0,1"}
    )
    assert swept_values("rerank.weighting") == ["uniform", "lmk"]
    assert swept_values("rerank.alpha") == []  # fixed by the command line


def test_no_values_outside_a_sequential_sweep(as_sweep_job):
    HydraConfig.instance().cfg = None
    assert swept_values("rerank.weighting") == []  # not a Hydra job at all
    as_sweep_job(["rerank.weighting=uniform,apc"], launcher="JoblibLauncher")
    assert swept_values("rerank.weighting") == []  # parallel jobs would all do the shared work
    as_sweep_job(["rerank.weighting=uniform,apc,"])  # unparsable: the job does its own work
    assert swept_values("rerank.weighting") == []
