"""The console tables of an evaluation job: stage 1 vs stage 2 with the job's counts."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from faceemd.data.errors import SKIP_CAUSES

__all__ = ["print_results", "print_verification", "skipped_summary"]


def skipped_summary(results: dict) -> str:
    """The images a job left out, in total and by reason: those its made sets (alignment,
    overlays) skipped, by cause, and those unreadable when features were extracted, e.g.
    ``6 (no face 4, unreadable 1, over the pixel limit 1)``."""
    counts = {
        name: int(results.get(f"eval/unusable_{cause}", 0)) for cause, name in SKIP_CAUSES.items()
    }
    counts["unreadable"] += int(results.get("eval/skipped_images", 0))
    total = sum(counts.values())
    parts = [f"{name} {n}" for name, n in counts.items() if n]
    return f"{total} ({', '.join(parts)})" if parts else "0"


def print_results(results: dict[str, float], title: str) -> None:
    """Stage 1 vs stage 2 table on the console."""
    if "stage1/accuracy" in results:
        return print_verification(results, title)
    table = Table(title=title)
    table.add_column("stage")
    for col in ("P@1", "RP", "MAP@R", "max P@k"):
        table.add_column(col, justify="right")
    for stage in ("stage1", "stage2"):
        row = [results.get(f"{stage}/{k}") for k in ("p_at_1", "r_precision", "map_at_r")]
        maxp = results.get(f"{stage}/max_precision_at_k")
        table.add_row(
            stage, *[f"{100 * v:.2f}" for v in row], "" if maxp is None else f"{100 * maxp:.2f}"
        )
    console = Console()
    console.print(table)
    console.print(
        f"queries {results['eval/num_queries']} (excluded, R=0: "
        f"{results['eval/num_excluded_queries']}), gallery {results['eval/gallery_size']}, "
        f"skipped images {skipped_summary(results)}; seconds: extract "
        f"{results['eval/extract_seconds']:.1f}, stage 1 {results['eval/stage1_seconds']:.2f}, "
        f"stage 2 {results['eval/stage2_seconds']:.2f}"
    )
    if "query/attack_linf_max" in results:
        console.print(
            f"adversarial queries: L-inf max {results['query/attack_linf_max']:.0f} / "
            f"{results['query/attack_eps_levels']:.0f} levels, L2 mean "
            f"{results['query/attack_l2_mean']:.1f} levels, surrogate cosine to the clean face "
            f"{results['query/attack_surrogate_cos_mean']:.3f}"
        )


def print_verification(results: dict[str, float], title: str) -> None:
    """Stage 1 vs stage 2 verification table on the console."""
    table = Table(title=title)
    tar = next((k.split("/", 1)[1] for k in results if k.startswith("stage1/tar_at_far_")), None)
    table.add_column("stage")
    for col in ("accuracy", "AUC", "EER", "TAR@FAR=" + tar[len("tar_at_far_") :] if tar else ""):
        table.add_column(col, justify="right")
    for stage in ("stage1", "stage2"):
        acc, std = results[f"{stage}/accuracy"], results[f"{stage}/accuracy_std"]
        table.add_row(
            stage,
            f"{100 * acc:.2f} +- {100 * std:.2f}",
            f"{100 * results[f'{stage}/auc']:.2f}",
            f"{100 * results[f'{stage}/eer']:.2f}",
            f"{100 * results[f'{stage}/{tar}']:.2f}" if tar else "",
        )
    console = Console()
    console.print(table)
    console.print(
        f"pairs {results['eval/num_pairs']} ({results['eval/num_same_pairs']} same, "
        f"{results['eval/num_folds']} folds; dropped: {results['eval/dropped_pairs']}), images "
        f"{results['eval/num_images']}, skipped images {skipped_summary(results)}; "
        f"seconds: extract {results['eval/extract_seconds']:.1f}, stage 1 "
        f"{results['eval/stage1_seconds']:.2f}, stage 2 {results['eval/stage2_seconds']:.2f}"
    )
