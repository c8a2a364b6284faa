"""Operating-system memory handling for stage 2: how many queries one step may take, copying
candidate rows quickly, and releasing the pages of a memory-mapped gallery.

Pages of a gallery mapped from the feature cache (``cache.mmap=true``): it stays on disk and
stage 2 reads only its queries' candidate rows, but every row read stays mapped into the
process, and this kernel maps page-cache folios larger than a row, so a 200K-image gallery's
resident size grew by ~3 GB over a run (``benchmarks/large_gallery.py``: 4,168 MiB peak RSS at
200K, 1,928 MiB with this). Stage 2 calls :func:`release` every few hundred rows it copies; it
drops the mapping's pages from the process (``madvise(MADV_DONTNEED)``): they stay in the page
cache, and a later read maps them again. Only file-backed *shared* mappings qualify (what
``numpy.memmap`` in modes ``r``/``r+`` makes): there a dropped page is reread from the file
unchanged. Private or anonymous memory is never touched (dropping it would lose its contents).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import Tensor

__all__ = ["release", "shared_file_mapping", "stage2_query_batch", "take_rows"]

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


# Bytes of patch cosines and Sinkhorn kernels (float32) one stage-2 step may hold on a CPU, and
# the most queries per step. Larger steps spread the per-step overhead over more queries: on
# real 7x6 grids, 8-16 queries per step ran 1.25-1.3x faster than the 2 a 4 MiB budget gave
# (README, performance); the cap bounds the gathered candidates (k * R * C floats per query).
_KERNEL_BUDGET = 16 << 20
_MAX_CPU_QUERIES = 16
# On a GPU a step should instead fill the device: hundreds of queries' problems per launch.
_GPU_KERNEL_BUDGET = 1 << 30
# Rows read from a memory-mapped gallery between releases of its pages (~1 MB mapped per row).
_MAPPED_ROWS = 128


def stage2_query_batch(device: torch.device, k: int, r: int, r2: int) -> int:
    """Queries per stage-2 step: their cosines and kernels (``8 * k * r * r2`` bytes each)
    within ~16 MiB and at most 16 queries on a CPU, ~1 GiB on a GPU (enough problems per
    launch)."""
    if device.type == "cpu":
        return max(1, min(_MAX_CPU_QUERIES, _KERNEL_BUDGET // (8 * max(1, k) * r * r2)))
    return max(1, _GPU_KERNEL_BUDGET // (8 * max(1, k) * r * r2))


def take_rows(
    rows: Tensor, index: Tensor, out: Tensor, mapped: tuple[int, int] | None = None
) -> Tensor:
    """``rows[index]`` into ``out`` (both ``(N, ...)``, contiguous). Rows whose size is a
    multiple of 8 bytes are copied as int64 words: ``index_select`` then moves 8 bytes per
    element instead of 1 (int8 codes) or 4, about twice as fast for these multi-KB rows.

    mapped: the shared file mapping holding ``rows`` (:func:`shared_file_mapping`); its pages
    are released after every ``_MAPPED_ROWS`` rows, because reading one row maps a whole
    page-cache folio (~1 MB here) into the process.
    """
    size = rows.element_size()
    row_bytes = rows[0].numel() * size if rows.shape[0] else 0
    aligned = (rows.storage_offset() * size) % 8 == 0 and (out.storage_offset() * size) % 8 == 0
    if rows.is_contiguous() and row_bytes and row_bytes % 8 == 0 and aligned:
        src = rows.view(rows.shape[0], -1).view(torch.int64)
        dst = out.view(out.shape[0], -1).view(torch.int64)
    else:
        src, dst = rows, out
    step = _MAPPED_ROWS if mapped is not None else max(1, index.shape[0])
    for i in range(0, index.shape[0], step):
        torch.index_select(src, 0, index[i : i + step], out=dst[i : i + step])
        if mapped is not None:
            release(mapped)
    return out
