"""What was loaded from a file, kept in this process while the file stays the same file.

The jobs of a sweep run by Hydra's basic launcher run one after another in one process, and
each builds its data sets and reads its features anew: the landmark tables and manifests of
the LFW sets (8,790 lines each) were parsed again by every job, and the feature sets (756 MB
each at float32) read and checksummed again. :func:`kept` returns what a loader made of a file
earlier in the process while the file keeps its size, modification time and inode (an append,
an edit or an atomic replace changes one of them). Least recently used values go first: beyond
:data:`_MAX_FILES` values, and, for values whose memory is counted (``nbytes``), beyond the
caller's byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["kept"]

T = TypeVar("T")

_MAX_FILES = 32
# (resolved path, tag) -> (file stamp, counted bytes, value), most recently used last.
_KEPT: OrderedDict[tuple[str, str], tuple[tuple[int, int, int], int, object]] = OrderedDict()


def kept(
    path: Path,
    load: Callable[[Path], T],
    tag: str,
    nbytes: Callable[[T], int] | None = None,
    budget: int | None = None,
) -> T:
    """``load(path)``, or what it returned for this file and ``tag`` (what was loaded, e.g.
    the parser's name) earlier in this process if the file has not changed since. The value is
    shared between callers: treat it as read-only. A None value is not kept. nbytes, budget:
    the value's memory and the most the counted values may hold together (0: keep nothing
    new); without them the value counts only against :data:`_MAX_FILES`. Raises ``OSError``
    when the file cannot be stat'ed."""
    st = Path(path).stat()
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    slot = (str(Path(path).resolve()), tag)
    found = _KEPT.get(slot)
    if found is not None and found[0] == stamp:
        _KEPT.move_to_end(slot)
        return found[2]
    _KEPT.pop(slot, None)
    value = load(path)
    size = 0 if nbytes is None or value is None else int(nbytes(value))
    if value is None or budget == 0 or (budget is not None and size > budget):
        return value
    if budget is not None:
        for other in [s for s, v in _KEPT.items() if v[1]]:  # counted values, oldest first
            if sum(v[1] for v in _KEPT.values()) + size <= budget:
                break
            del _KEPT[other]
    _KEPT[slot] = (stamp, size, value)
    while len(_KEPT) > _MAX_FILES:
        _KEPT.popitem(last=False)
    return value
