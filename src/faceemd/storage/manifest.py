"""Resumable per-image work in a folder: an append-only JSON-lines manifest and atomic writes.

Used where a command turns a set of images into files (occluded query sets, aligned faces):
each finished image gets one line, ``{"rel": ..., "status": "ok" | "skipped", ...}``, flushed at
once, and its file is written to a temporary name and renamed into place. A killed run leaves at
most a half line (ignored) and no half image, so a rerun redoes only what is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from faceemd.storage.atomic import atomic_write
from faceemd.storage.filememo import kept

__all__ = ["Manifest", "landmark_list", "write_image"]


def write_image(target: Path, image: np.ndarray) -> None:
    """Write a uint8 gray or RGB image to ``target`` atomically (temporary file + rename)."""
    bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    with atomic_write(target, keep_suffix=True) as tmp:
        if not cv2.imwrite(str(tmp), bgr):
            raise OSError(f"cannot write {target}")


def landmark_list(points: np.ndarray) -> list[float]:
    """``(L, 2)`` points as a flat list with 2 decimals (the landmarks68.tsv precision)."""
    return np.round(np.asarray(points, np.float64), 2).reshape(-1).tolist()


def _read_entries(path: Path) -> list[dict]:
    """The manifest's entries in file order (read-only: shared by the jobs of a process)."""
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run
            continue
    return entries


class Manifest:
    """``root/name`` as a dict of finished entries by relative path, appended to as work ends.

    An ``ok`` entry counts as finished only while its file exists under ``root``; ``match``
    keeps only entries with those field values (e.g. the alignment template they were made
    with). Use as a context manager around :meth:`record`.
    """

    def __init__(self, root: Path, name: str = "manifest.jsonl", match: dict | None = None):
        self.root = Path(root)
        self.path = self.root / name
        self.match = match or {}
        self.done: dict[str, dict] = {}
        if self.path.is_file():
            root = str(self.root)
            for entry in kept(self.path, _read_entries, "manifest entries"):
                if any(entry.get(k) != v for k, v in self.match.items()):
                    continue
                skipped = entry.get("status") == "skipped"
                if skipped or os.path.isfile(os.path.join(root, entry["rel"])):
                    self.done[entry["rel"]] = entry
        self._handle = None

    def __enter__(self) -> Manifest:
        self._handle = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()
        self._handle = None

    def record(self, entry: dict) -> None:
        """Append ``entry`` (with the ``match`` fields) and flush it."""
        entry = {**self.match, **entry}
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()
        self.done[entry["rel"]] = entry
