"""Ranking figures of an evaluation job (``visualize.*``): drawn by :mod:`faceemd.visualize`,
written into the run folder and sent to the loggers that take images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from faceemd.visualize import save_figures

__all__ = ["log_figures", "render_figures"]

log = logging.getLogger(__name__)


def _input_image(faces, position: int, face_input) -> np.ndarray:
    """Set item ``position`` as the network sees it (in its frame and size), uint8."""
    return face_input.frame_image(faces[position][0])[0]


def render_figures(cfg, datamodule, feats, query, gallery, ranking, rerank) -> list[Path]:
    """``visualize.num_queries`` (or the ids in ``visualize.queries``) ranking figures into
    ``<output_dir>/visualize``; none by default."""
    vis = cfg.get("visualize") or {}
    ids = list(vis.get("queries") or range(min(int(vis.get("num_queries", 0)), len(query))))
    if not ids:
        return []
    face_input = datamodule.face_input
    grid = rerank.grid or feats["query"].grid_shape
    q_pos, g_pos = feats["query"].index, feats["gallery" if "gallery" in feats else "query"].index
    g_faces = datamodule.query if datamodule.same_images else datamodule.gallery
    paths = save_figures(
        Path(cfg.paths.output_dir) / "visualize",
        ids,
        query,
        gallery,
        ranking,
        rerank,
        grid,
        lambda q: _input_image(datamodule.query, int(q_pos[q]), face_input),
        lambda g: _input_image(g_faces, int(g_pos[g]), face_input),
        top=int(vis.get("top", 5)),
    )
    log.info("wrote %d ranking figures to %s", len(paths), paths[0].parent)
    return paths


def log_figures(loggers: list, figures: list[Path]) -> None:
    """Send the figures to every logger that takes images (W&B)."""
    for lg in loggers:
        if figures and hasattr(lg, "log_image"):
            lg.log_image(key="visualize", images=[str(p) for p in figures], step=0)
