"""Files written atomically: a temporary file beside the target, renamed into place.

A killed job or a full disk leaves the previous file or none, never a partial one; the
temporary file is removed when the write fails. Every file the project writes for later use
goes through :func:`atomic_write` (feature and score cache entries, metrics, pair scores,
materialised images, checkpoints).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TEMPORARY_MARK", "atomic_write", "atomic_write_text", "write_json"]

# Temporary files are named ``.<target name>.tmp-<pid>[<target suffix>]``: hidden, beside the
# target (one file system, so the rename is atomic), and traceable to their writer's process.
TEMPORARY_MARK = ".tmp-"


@contextmanager
def atomic_write(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; on leaving the block without
    an error it is renamed onto ``path`` (folders made as needed), otherwise removed.

    keep_suffix: end the temporary name with the target's suffix too (writers that choose
    the format by the extension, e.g. ``cv2.imwrite``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if keep_suffix else ""
    tmp = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2))
