"""The ``faceemd`` command: ``faceemd evaluate|train|identify|align|report ...``.

``evaluate``, ``train`` and ``identify`` are Hydra jobs and take the same overrides as
``evaluate.py`` and ``train.py`` (``group=option``, ``key=value``, ``-m`` for sweeps); their
``--help`` lists the config groups. ``-v`` anywhere is ``hydra.verbose=true`` (the detail the
console leaves out by default). ``identify`` takes its photos and ``--gallery DIR`` first:
``faceemd identify photo.jpg more/ --gallery people/ [overrides]``. ``align`` and ``report``
are ``python -m faceemd.data.align`` and ``python -m faceemd.jobs.report``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["CONF_DIR", "main"]

# The project's configs (conf/ beside src/ in the checkout the package is installed from).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

_USAGE = """usage: faceemd COMMAND [ARGS...]

commands:
  evaluate   two-stage evaluation (Hydra overrides as evaluate.py; --help lists the groups)
  train      masked-face finetuning (Hydra overrides as train.py)
  identify   faceemd identify PHOTO... --gallery DIR [overrides]: who is in these photos
  align      faceemd align SRC DST [--template ...]: 5-point alignment of a folder
  report     faceemd report RUN_OR_MULTIRUN_DIR: CSV/Markdown table and alpha curve
-v: show the detail (Lightning, cache and solver information) the console leaves out."""


def _quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _identify_overrides(args: list[str]) -> list[str]:
    """Split ``PHOTO... --gallery DIR [overrides]`` into Hydra overrides (``queries=[...]``,
    ``gallery=...``); Hydra's own flags (``--help``, ``-m``, ...) pass through."""
    photos, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--gallery" and i + 1 < len(args):
            rest.append(f"gallery={_quoted(args[i + 1])}")
            i += 2
            continue
        if arg.startswith("--gallery="):
            rest.append(f"gallery={_quoted(arg.split('=', 1)[1])}")
        elif arg.startswith("-") or "=" in arg:
            rest.append(arg)
        else:
            photos.append(arg)
        i += 1
    if photos:
        rest.insert(0, "queries=[" + ",".join(_quoted(p) for p in photos) + "]")
    return rest


def _hydra(command: str, job, args: list[str]) -> None:
    """Run ``job`` as the Hydra app of ``conf/<command>.yaml`` with ``args`` as its arguments."""
    import hydra

    sys.argv = [f"faceemd {command}", *args]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=command)(job)()


def _job(command: str):
    """The job function of a Hydra command, imported only when that command runs."""
    if command == "evaluate":
        from faceemd.jobs.evaluate import evaluate_job

        return evaluate_job
    if command == "train":
        from faceemd.jobs.train import train_job

        return train_job
    from faceemd.jobs.identify import identify

    return identify


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    rest = ["hydra.verbose=true" if a == "-v" else a for a in rest]
    if command == "align":
        from faceemd.data.align import main as align_main

        return align_main(rest)
    if command == "report":
        from faceemd.jobs.report import main as report_main

        return report_main(rest)
    if command not in ("evaluate", "train", "identify"):
        print(f"faceemd: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    if command == "identify":
        rest = _identify_overrides(rest)
    _hydra(command, _job(command), rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
