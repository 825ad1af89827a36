"""Memory on transparent huge pages for the packed weights that every decode step streams.

Why: a decode step reads every weight once, and on 4 KiB pages that is a TLB miss every 64 cache lines. On this
development machine the matrix kernels stream ~10% faster at batch 1 from 2 MiB pages (interleaved in one process,
BENCHMARKS.md). Linux backs private anonymous memory advised ``MADV_HUGEPAGE`` with huge pages (THP in its
"madvise" mode, the usual default); torch's allocator does so only behind an environment variable read once at
start, and then for every large allocation, activations included. Here only the packed weights ask: they live as
long as the model and are read far more often than written.

Where huge pages are not offered the memory is ordinary pages (same numbers, the old speed); where the mapping
itself fails, ``empty`` falls back to ``torch.empty``.
"""

from __future__ import annotations

import mmap
import threading

import torch

HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # one mapping serves many weights: a mapping per small matrix would waste most of a huge page
ALIGN = 64  # one cache line: the kernels' loads never straddle two for a weight's first row

_lock = threading.Lock()
_chunk: torch.Tensor | None = None  # uint8 view of the current mapping (it keeps the mapping alive)
_used = 0


def new_mapping(nbytes: int, huge: bool = True) -> torch.Tensor | None:
    """A fresh mapping of ``nbytes`` rounded up to huge pages, 2 MiB-aligned, as uint8; advised huge (or, with
    ``huge=False``, advised away from huge pages: what a comparison needs); None if mmap fails."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    try:
        mm = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return None
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        except OSError:  # THP off in this kernel: ordinary pages
            pass
    whole = torch.frombuffer(mm, dtype=torch.uint8)  # holds the mmap object: freed with the last tensor on it
    start = -whole.data_ptr() % HUGE_PAGE  # huge pages cover only 2 MiB-aligned ranges
    return whole[start:start + size]


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on huge-page-advised memory (contiguous; freed when no tensor uses it)."""
    global _chunk, _used
    numel = torch.Size(shape).numel()
    nbytes = max(1, numel) * dtype.itemsize
    with _lock:
        if nbytes > CHUNK // 2:  # a large weight gets a mapping of its own: the shared chunk keeps its space
            raw = new_mapping(nbytes)
        else:
            if _chunk is None or _used + nbytes > _chunk.numel():
                _chunk, _used = new_mapping(CHUNK), 0
            raw = None if _chunk is None else _chunk[_used:_used + nbytes]
            _used = -(-(_used + nbytes) // ALIGN) * ALIGN
        if raw is None:
            return torch.empty(shape, dtype=dtype)
    return raw.view(dtype)[:numel].view(shape)


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of the mapping holding ``t`` that the kernel backs with huge pages (``AnonHugePages`` in
    /proc/self/smaps); 0 where that cannot be read."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


__all__ = ["empty", "new_mapping", "huge_page_bytes", "HUGE_PAGE"]
