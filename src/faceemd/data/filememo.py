"""Text files parsed once per process while they stay the same file.

Every job of a sweep run by Hydra's basic launcher builds its data sets anew in the same
process: the landmark tables and the manifests of materialised sets (8,790 lines each for LFW)
were parsed again by each job, about a second per set. :func:`parsed` keeps what a parser made
of a file while the file keeps its size, modification time and inode (an append, an edit or an
atomic replace changes one of them), for the few most recently used files.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["parsed"]

T = TypeVar("T")

_KEPT = 16  # files; a landmark table or manifest of 10K images is a few MB parsed
_PARSED: OrderedDict[tuple[str, str], tuple[tuple[int, int, int], object]] = OrderedDict()


def parsed(path: Path, parse: Callable[[Path], T]) -> T:
    """``parse(path)``, or what it returned for this file earlier in the process if the file
    has not changed since. The result is shared between callers: treat it as read-only."""
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    slot = (str(path.resolve()), f"{parse.__module__}.{parse.__qualname__}")
    kept = _PARSED.get(slot)
    if kept is not None and kept[0] == stamp:
        _PARSED.move_to_end(slot)
        return kept[1]
    value = parse(path)
    _PARSED[slot] = (stamp, value)
    _PARSED.move_to_end(slot)
    while len(_PARSED) > _KEPT:
        _PARSED.popitem(last=False)
    return value
