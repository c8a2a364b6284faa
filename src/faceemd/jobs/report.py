"""Collect a sweep's results into one table and the paper's alpha curve.

``python -m faceemd.jobs.report <run or multirun dir> [--wandb]`` reads every ``metrics.json`` below
the folder (one per job), writes ``report.csv`` (one row per job: its settings and every
metric), ``report.md`` (the paper's layout: a row per dataset / backbone / weighting / grid /
alpha / k / blend / patch dimension / candidates solved, columns P@1, RP, M@R for stage 1 and stage 2 in percent; accuracy, AUC, EER for
verification jobs; jobs of the sweep that wrote no ``metrics.json`` are listed after the table
with their overrides, and in the CSV with status ``failed``) and, when the jobs span more than one alpha, ``alpha_curve.png`` (stage-2
P@1, or accuracy for verification data, against alpha, one line per dataset, as Fig. 4). ``--wandb`` also logs the table and the curve to a W&B run (offline unless
``WANDB_MODE`` says otherwise).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

__all__ = ["collect", "failed_jobs", "main", "plot_alpha_curve", "to_markdown", "write_report"]

SETTINGS = (
    "data", "backbone", "weighting", "grid", "alpha", "top_k", "blend", "patch_dim", "refine_top",
)  # fmt: skip
METRICS = ("p_at_1", "r_precision", "map_at_r")
VERIFICATION_METRICS = ("accuracy", "auc", "eer")
HEADERS = {
    "p_at_1": "P@1",
    "r_precision": "RP",
    "map_at_r": "M@R",
    "accuracy": "Acc",
    "auc": "AUC",
    "eer": "EER",
}


def _headline(row: dict) -> float | None:
    """A job's stage-2 headline metric: P@1 (identification) or accuracy (verification)."""
    value = row.get("stage2/p_at_1", row.get("stage2/accuracy"))
    return None if value is None else float(value)


def _settings(config: dict) -> dict:
    rerank = config.get("rerank", {})
    grid = rerank.get("grid")
    return {
        "data": config.get("data_name", ""),
        "backbone": config.get("backbone", {}).get("name", ""),
        "weighting": rerank.get("weighting", ""),
        "grid": "native" if grid is None else "x".join(str(g) for g in grid),
        "alpha": rerank.get("alpha", ""),
        "top_k": rerank.get("top_k", ""),
        "blend": rerank.get("blend", ""),
        "patch_dim": "full" if rerank.get("patch_dim") is None else rerank["patch_dim"],
        "refine_top": "all" if rerank.get("refine_top") is None else rerank["refine_top"],
    }


def collect(folder: str | Path) -> list[dict]:
    """One flat row per ``metrics.json`` under ``folder`` (settings + metrics + job folder),
    sorted by settings. Raises ``FileNotFoundError`` when there is none."""
    folder = Path(folder)
    files = sorted(folder.rglob("metrics.json"))
    if not files:
        raise FileNotFoundError(f"no metrics.json under {folder}: is it a run or multirun folder?")
    rows = []
    for f in files:
        try:
            payload = json.loads(f.read_text())
            if not isinstance(payload, dict):
                raise ValueError(f"a JSON {type(payload).__name__}, not an object")
            config, metrics = payload.get("config", {}), payload.get("metrics")
            if not isinstance(config, dict) or not isinstance(metrics, dict):
                raise ValueError("no 'metrics' and 'config' objects")
            row = _settings(config)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as err:
            print(f"skipping unreadable {f}: {err}", file=sys.stderr)
            continue
        row.update(metrics)
        row["job"] = str(f.parent.relative_to(folder)) if f.parent != folder else "."
        rows.append(row)
    rows.sort(key=lambda r: tuple(str(r[k]) for k in SETTINGS))
    return rows


def failed_jobs(folder: str | Path) -> list[dict]:
    """Jobs under ``folder`` that Hydra started (their ``.hydra/overrides.yaml`` exists) but
    that wrote no ``metrics.json``: ``{"job", "overrides"}`` each, in job order."""
    folder = Path(folder)
    out = []
    for overrides in sorted(folder.rglob(".hydra/overrides.yaml")):
        job = overrides.parent.parent
        if (job / "metrics.json").is_file():
            continue
        lines = [ln[2:].strip() for ln in overrides.read_text().splitlines() if ln.startswith("- ")]
        rel = str(job.relative_to(folder)) if job != folder else "."
        out.append({"job": rel, "overrides": " ".join(lines)})
    return sorted(out, key=lambda r: (len(r["job"]), r["job"]))


def to_markdown(rows: list[dict], failed: list[dict] = ()) -> str:
    """The paper's table layout, metrics in percent with two decimals (identification columns,
    and verification columns when a job has them)."""
    metrics = [m for m in METRICS if any(f"stage1/{m}" in r for r in rows)]
    metrics += [m for m in VERIFICATION_METRICS if any(f"stage1/{m}" in r for r in rows)]
    head = list(SETTINGS) + [f"{s} {HEADERS[m]}" for s in ("S1", "S2") for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in SETTINGS]
        for stage in ("stage1", "stage2"):
            for m in metrics:
                v = r.get(f"{stage}/{m}")
                cells.append("" if v is None else f"{100 * float(v):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", f"Failed jobs (no metrics.json; see each job's log): {len(failed)}", ""]
        lines += [f"- job {f['job']}: `{f['overrides']}`" for f in failed]
    return "\n".join(lines) + "\n"


def plot_alpha_curve(rows: list[dict], path: str | Path) -> Path | None:
    """Stage-2 P@1 (or accuracy for verification data, %) against alpha, one line per dataset
    (other settings averaged over); None when the rows hold fewer than two alphas."""
    alphas = sorted({float(r["alpha"]) for r in rows if r["alpha"] != ""})
    if len(alphas) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for data in sorted({r["data"] for r in rows}):
        xs, ys = [], []
        for a in alphas:
            vals = [
                _headline(r)
                for r in rows
                if r["data"] == data
                and r["alpha"] != ""
                and float(r["alpha"]) == a
                and _headline(r) is not None
            ]
            if vals:
                xs.append(a)
                ys.append(100 * sum(vals) / len(vals))
        ax.plot(xs, ys, marker="o", label=data)
    ax.set_xlabel("alpha (weight of the EMD score)")
    ax.set_ylabel("stage-2 P@1 or accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(folder: str | Path, use_wandb: bool = False) -> dict[str, Path]:
    """Write report.csv, report.md and (if alphas vary) alpha_curve.png into ``folder``."""
    folder = Path(folder)
    rows = collect(folder)
    failed = failed_jobs(folder)
    if failed:
        print(f"{len(failed)} job(s) wrote no metrics.json (failed): "
              + ", ".join(f"{f['job']} ({f['overrides']})" for f in failed), file=sys.stderr)  # fmt: skip
    table = [{"status": "ok", **r} for r in rows]
    table += [{"status": "failed", "job": f["job"], "overrides": f["overrides"]} for f in failed]
    columns = list(dict.fromkeys(k for r in table for k in r))
    out = {"csv": folder / "report.csv", "markdown": folder / "report.md"}
    with open(out["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    out["markdown"].write_text(to_markdown(rows, failed))
    curve = plot_alpha_curve(rows, folder / "alpha_curve.png")
    if curve is not None:
        out["alpha_curve"] = curve
    if use_wandb:
        _log_wandb(folder, rows, columns, curve)
    return out


def _log_wandb(folder: Path, rows: list[dict], columns: list[str], curve: Path | None) -> None:
    import wandb

    run = wandb.init(
        project="faceemd", name=f"report-{folder.name}", dir=str(folder), job_type="report"
    )
    try:
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        payload = {"report": table}
        if curve is not None:
            payload["alpha_curve"] = wandb.Image(str(curve))
        run.log(payload)
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m faceemd.jobs.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folder", help="a run or multirun output folder")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.folder, args.wandb)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(Path(out["markdown"]).read_text())
    for name, path in out.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
