"""Pages of a memory-mapped gallery, released once stage 2 has copied the rows it needs.

A gallery mapped from the feature cache (``cache.mmap=true``) stays on disk; stage 2 reads only
its queries' candidate rows. But every row read stays mapped into the process, and this kernel
maps page-cache folios larger than a row, so a 200K-image gallery's resident size grew by ~3 GB
over a run (``benchmarks/large_gallery.py``: 4,168 MiB peak RSS at 200K, 1,928 MiB with this).
Stage 2 calls :func:`release` every few hundred rows it copies; it drops the mapping's pages
from the process (``madvise(MADV_DONTNEED)``): they stay in the page cache, and a later read
maps them again.

Only file-backed *shared* mappings qualify (what ``numpy.memmap`` in modes ``r``/``r+`` makes):
there a dropped page is reread from the file unchanged. Private or anonymous memory is never
touched (dropping it would lose its contents).
"""

from __future__ import annotations

import ctypes
import functools
import sys

from torch import Tensor

__all__ = ["release", "shared_file_mapping"]

_MADV_DONTNEED = 4


def shared_file_mapping(t: Tensor) -> tuple[int, int] | None:
    """``(start, length)`` of the file-backed shared mapping holding all of ``t``'s data, or None
    (not on Linux, not a CPU tensor, anonymous or private memory)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return None
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= begin < hi:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    shared = fields[1][3] == "s"
                    return (lo, hi - lo) if shared and path.startswith("/") and end <= hi else None
    except OSError:
        return None
    return None


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def release(span: tuple[int, int]) -> None:
    """Drop the pages of a mapping found by :func:`shared_file_mapping` from this process."""
    start, length = span
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED)
