"""A shard's loop for one router group: receive a layer's rows, run the experts, send the outputs back.

One loop per router, each on its own thread, so a slow router never stalls the others. Rows come over the
group, or, from a router in the same shm domain, lie in the pair's shared buffer (see ``expert_workers.wire``).
Shape legend: n rows, D hidden.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import torch

from cluster.comm import ROUTER_RANK, Group
from cluster.shm import PayloadBuffer, buffer_path
from expert_workers.shard import ExpertShard
from expert_workers.wire import OP_CLOSE, OP_EXPERTS, OP_EXPERTS_SHM, ack, empty_header

log = logging.getLogger(__name__)


class ProtocolError(RuntimeError):
    pass


def serve_group(shard: ExpertShard, group: Group, hidden: int, dtype: torch.dtype, rows_served: Counter,
                stop: threading.Event, device: torch.device | str = "cpu") -> None:
    """Serve ``group`` until the router closes it, dies, or ``stop`` is set."""
    header = empty_header(device)
    shared = group.shares_memory_with(ROUTER_RANK)
    buffer: PayloadBuffer | None = None
    try:
        while not stop.is_set():
            group.recv(header, ROUTER_RANK).wait()
            op, layer, n, capacity = header.tolist()  # device-to-host sync
            if op == OP_CLOSE:
                return
            if op not in (OP_EXPERTS, OP_EXPERTS_SHM) or layer not in shard.experts or (
                    op == OP_EXPERTS_SHM and not (shared and n <= capacity)):
                raise ProtocolError(f"group {group.rendezvous.group_id}: unexpected header {(op, layer, n, capacity)}")
            if n == 0:
                continue  # the router had no rows for us in this layer; the header kept us in step
            if op == OP_EXPERTS_SHM:
                if buffer is None or buffer.capacity != capacity:  # the router made a bigger one
                    buffer = PayloadBuffer.open(buffer_path(group.rendezvous.shm_prefix, group.rank, capacity),
                                                capacity, hidden, dtype)
                shard.forward(layer, buffer.rows_CD[:n], buffer.ids_C[:n], out_nD=buffer.out_CD[:n])
                rows_served[layer] += n  # before the answer, so a router that has it also sees the count
                group.send(ack(n), ROUTER_RANK).wait()
            else:
                rows_nD = torch.empty(n, hidden, dtype=dtype, device=device)
                ids_n = torch.empty(n, dtype=torch.int64, device=device)
                group.recv(rows_nD, ROUTER_RANK).wait()
                group.recv(ids_n, ROUTER_RANK).wait()
                out_nD = shard.forward(layer, rows_nD, ids_n)
                rows_served[layer] += n
                group.send(out_nD, ROUTER_RANK).wait()
    except Exception as e:  # router gone or timed out: drop this group only, keep serving the others
        log.warning("leaving group %s: %s", group.rendezvous.group_id, e)
    finally:
        group.close()
