"""Same-host payload buffers: a router and a shard that see the same /dev/shm exchange rows through memory.

gloo over loopback is still TCP, so each leg of an exchange would be copied user -> kernel -> user. Between
members in one shm domain (same kernel, same /dev/shm mount) the payload instead lies in one file per
router-shard pair, mapped by both: the router writes rows and ids into it, the shard computes from views of
it and writes its outputs back into it. The group still carries the small header and acknowledgement, so it
stays the synchronisation and every exchange keeps the group's timeout.

Lifetime: the router creates a file when a pair first needs one or needs a bigger one; the shard unlinks it
as soon as it has mapped it, so between exchanges nothing is left in /dev/shm (the mappings live on until
both sides drop them). If the shard never maps it (dead, stalled), the router unlinks it itself.

File layout (bytes; each region 64-byte aligned): rows [C, D] (model dtype) | out [C, D] | ids int64 [C],
with C the capacity in rows. Shape legend: C capacity rows, D hidden.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch

SHM_DIR = "/dev/shm"
FILE_PREFIX = "moe-serve-"
MIN_ROWS = 64
MAX_BYTES = 1 << 30  # per router-shard pair; an exchange that needs more goes over the group instead


def shm_domain() -> str:
    """Equal (non-empty) for two processes that can share a /dev/shm file: same boot, same tmpfs mount.

    Hostnames or machine ids are not enough: containers on one host often have their own /dev/shm.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat(SHM_DIR).st_dev}"
    except OSError:
        return ""  # no /dev/shm (or not Linux): payloads always go over the group


def new_prefix() -> str:
    return f"{FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def buffer_path(prefix: str, rank: int, capacity: int) -> str:
    return os.path.join(SHM_DIR, f"{prefix}-r{rank}-c{capacity}")


def capacity_for(n: int) -> int:
    """Rows to allocate for ``n``: the next power of two, so a growing batch resizes O(log n) times."""
    return max(MIN_ROWS, 1 << (n - 1).bit_length())


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


def _nbytes(capacity: int, hidden: int, dtype: torch.dtype) -> tuple[int, int]:
    rows = _align(capacity * hidden * dtype.itemsize)
    return rows, 2 * rows + capacity * 8


@dataclass(frozen=True)
class PayloadBuffer:
    """One pair's mapped file: rows in, outputs back, local expert ids."""

    capacity: int
    rows_CD: torch.Tensor
    out_CD: torch.Tensor
    ids_C: torch.Tensor

    @staticmethod
    def fits(capacity: int, hidden: int, dtype: torch.dtype) -> bool:
        return _nbytes(capacity, hidden, dtype)[1] <= MAX_BYTES

    @classmethod
    def create(cls, path: str, capacity: int, hidden: int, dtype: torch.dtype) -> "PayloadBuffer":
        """The router's side. Raises OSError when /dev/shm cannot hold it (then nothing is left behind)."""
        total = _nbytes(capacity, hidden, dtype)[1]
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the pages now: a tmpfs that runs out while a mapping is written kills with SIGBUS.
            os.posix_fallocate(fd, 0, total)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls._map(path, capacity, hidden, dtype)

    @classmethod
    def open(cls, path: str, capacity: int, hidden: int, dtype: torch.dtype) -> "PayloadBuffer":
        """The shard's side: map the router's file, then unlink it (the mapping outlives the name)."""
        try:
            return cls._map(path, capacity, hidden, dtype)
        finally:
            unlink(path)

    @classmethod
    def _map(cls, path: str, capacity: int, hidden: int, dtype: torch.dtype) -> "PayloadBuffer":
        rows, total = _nbytes(capacity, hidden, dtype)
        raw = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        region = capacity * hidden * dtype.itemsize
        return cls(capacity, raw[:region].view(dtype).view(capacity, hidden),
                   raw[rows:rows + region].view(dtype).view(capacity, hidden),
                   raw[2 * rows:].view(torch.int64))


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
