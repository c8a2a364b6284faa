"""docs/models.md's worked example, as written: its files are written from the page into a
folder outside the repository and its commands run as a user would (the `faceemd` command)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

PAGE = ROOT / "docs" / "models.md"


def _example() -> tuple[dict[str, str], list[str]]:
    """``{relative file: text}`` and the bash command lines of the worked example."""
    text = PAGE.read_text().split("## A worked example", 1)[1]
    files = {
        m.group(1): m.group(2)
        for m in re.finditer(r"File `\$MYPROJECT/([^`]+)`.*?```\w+\n(.*?)```", text, re.S)
    }
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [line for line in block.splitlines() if line.strip()]
    return files, commands


def test_the_worked_example_runs_as_written(tmp_path):
    files, commands = _example()
    assert set(files) == {"mypackage/nets.py", "myconf/backbone/mynet.yaml", "export_onnx.py"}
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    env = {**os.environ, "MYPROJECT": str(tmp_path), "WANDB_MODE": "offline",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    script = "set -e\n" + "\n".join(commands)
    run = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = sorted((tmp_path / "outputs" / "evaluate" / "runs").glob("*/metrics.json"))
    assert len(results) == 2  # the PyTorch module, then its ONNX export
    torch_run, onnx_run = (json.loads(p.read_text()) for p in results)
    assert torch_run["config"]["backbone"]["name"] == "mynet"
    assert onnx_run["config"]["backbone"]["name"] == "onnx"
    for payload in (torch_run, onnx_run):
        assert payload["metrics"]["eval/num_queries"] == 100
        assert 0 <= payload["metrics"]["stage2/p_at_1"] <= 1
    assert "used as its constructor left it" in run.stderr + run.stdout
