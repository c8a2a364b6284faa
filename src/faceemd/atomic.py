"""Files written atomically: a temporary file beside the target, renamed into place.

A killed job or a full disk leaves the previous file or none, never a partial one; the
temporary file is removed when the write fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["atomic_write_text", "write_json"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (folders made as needed) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2))
