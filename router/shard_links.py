"""How a router's rows reach one shard and come back: over the group, or through a shared buffer.

Picked per shard when the router joins (``Group.shares_memory_with``): a shard in the router's shm domain gets
a ``ShmLink``, any other a ``GroupLink``. Both speak ``expert_workers.wire``; the group carries every header
and acknowledgement either way, so each exchange is bounded by the group's timeout.

One layer is in flight at a time (dispatch, then its combine, as the model runs): a ``ShmLink`` reuses its
buffer for the next layer, just as a ``GroupLink`` expects the next message in the stream to be this layer's.
Shape legend: S rows of the layer, n rows for this shard, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.comm import Group
from cluster.shm import MIN_ROWS, PayloadBuffer, buffer_path, capacity_for, unlink
from expert_workers.wire import OP_EXPERTS, OP_EXPERTS_SHM, empty_ack, header


@dataclass(frozen=True)
class Pending:
    """One shard's part of a layer in flight."""

    shard: int
    index_n: torch.Tensor  # int64: its rows' positions in the layer's expert-major rows
    out_nD: torch.Tensor  # where its outputs arrive: a fresh tensor, or a view of the shared buffer
    works: tuple  # sends and the receive of outputs or ack (the works keep their tensors alive)
    ack_1: torch.Tensor | None  # shm: the row count the shard reports once its outputs are in the buffer


class GroupLink:
    """Rows, ids and outputs as messages of the group (another host, or the shared path turned off)."""

    path = "group"

    def __init__(self, group: Group, shard: int, hidden: int, dtype: torch.dtype, device: torch.device | str):
        self.group, self.shard, self.rank = group, shard, shard + 1
        self.hidden, self.dtype, self.device = hidden, dtype, device

    @property
    def capacity(self) -> int:
        return 0

    def post(self, layer: int, rows_SD: torch.Tensor, local_S: torch.Tensor, index_n: torch.Tensor) -> Pending:
        n = index_n.numel()
        works = [self.group.send(header(OP_EXPERTS, layer, n, device=self.device), self.rank)]  # even when n == 0
        out_nD = torch.empty(n, self.hidden, dtype=self.dtype, device=self.device)
        if n:
            works.append(self.group.send(rows_SD.index_select(0, index_n), self.rank))
            works.append(self.group.send(local_S.index_select(0, index_n), self.rank))
            works.append(self.group.recv(out_nD, self.rank))
        return Pending(self.shard, index_n, out_nD, tuple(works), None)

    def release(self) -> None:
        pass


class ShmLink(GroupLink):
    """Rows, ids and outputs in the pair's shared buffer; the group carries only the header and the ack.

    The buffer grows (a new file, announced by its capacity in the header) when a layer needs more rows; a
    layer that would need more than ``cluster.shm.MAX_BYTES``, or more than /dev/shm can hold, goes over
    the group instead. Layers with no rows for this shard send the plain zero-row header.
    """

    path = "shm"

    def __init__(self, group: Group, shard: int, hidden: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__(group, shard, hidden, dtype, device)
        self.buffer: PayloadBuffer | None = None
        self.created: str | None = None  # our newest file; the shard unlinks it once mapped, we if it never does
        self.max_capacity = MIN_ROWS
        while PayloadBuffer.fits(2 * self.max_capacity, hidden, dtype):
            self.max_capacity *= 2

    @property
    def capacity(self) -> int:
        return self.buffer.capacity if self.buffer is not None else 0

    def post(self, layer: int, rows_SD: torch.Tensor, local_S: torch.Tensor, index_n: torch.Tensor) -> Pending:
        n = index_n.numel()
        buf = self._buffer_for(n) if n else None
        if buf is None:
            return super().post(layer, rows_SD, local_S, index_n)
        # Gathered straight into the shared buffer: the shard computes from views of it, no transport copy.
        torch.index_select(rows_SD, 0, index_n, out=buf.rows_CD[:n])
        torch.index_select(local_S, 0, index_n, out=buf.ids_C[:n])
        ack_1 = empty_ack()
        works = (self.group.send(header(OP_EXPERTS_SHM, layer, n, buf.capacity), self.rank),
                 self.group.recv(ack_1, self.rank))
        return Pending(self.shard, index_n, buf.out_CD[:n], works, ack_1)

    def _buffer_for(self, n: int) -> PayloadBuffer | None:
        if self.buffer is not None and n <= self.buffer.capacity:
            return self.buffer
        capacity = capacity_for(n)
        if capacity > self.max_capacity:
            return None
        path = buffer_path(self.group.rendezvous.shm_prefix, self.rank, capacity)
        try:
            buffer = PayloadBuffer.create(path, capacity, self.hidden, self.dtype)
        except OSError:  # /dev/shm full: this size and larger go over the group from now on
            self.max_capacity = capacity // 2
            return None
        self.release()  # every earlier layer was answered, so the shard has mapped (and unlinked) the old file
        self.buffer, self.created = buffer, path
        return buffer

    def release(self) -> None:
        """Unlink our newest file if the shard never did (it died or stalled before mapping it)."""
        if self.created is not None:
            unlink(self.created)
            self.created = None
