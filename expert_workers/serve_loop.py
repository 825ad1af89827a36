"""A shard's loop for one router group: receive a layer's rows, run the experts, send the outputs back.

One loop per router, each on its own thread, so a slow router never stalls the others.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import torch

from cluster.comm import ROUTER_RANK, Group
from expert_workers.shard import ExpertShard
from expert_workers.wire import OP_CLOSE, OP_EXPERTS, empty_header

log = logging.getLogger(__name__)


class ProtocolError(RuntimeError):
    pass


def serve_group(shard: ExpertShard, group: Group, hidden: int, dtype: torch.dtype, rows_served: Counter,
                stop: threading.Event, device: torch.device | str = "cpu") -> None:
    """Serve ``group`` until the router closes it, dies, or ``stop`` is set."""
    header = empty_header(device)
    try:
        while not stop.is_set():
            group.recv(header, ROUTER_RANK).wait()
            op, layer, n = header.tolist()  # device-to-host sync
            if op == OP_CLOSE:
                return
            if op != OP_EXPERTS or layer not in shard.experts:
                raise ProtocolError(f"group {group.rendezvous.group_id}: unexpected header {(op, layer, n)}")
            if n == 0:
                continue  # the router had no rows for us in this layer; the header kept us in step
            rows_nD = torch.empty(n, hidden, dtype=dtype, device=device)
            ids_n = torch.empty(n, dtype=torch.int64, device=device)
            group.recv(rows_nD, ROUTER_RANK).wait()
            group.recv(ids_n, ROUTER_RANK).wait()
            group.send(shard.forward(layer, rows_nD, ids_n), ROUTER_RANK).wait()
            rows_served[layer] += n
    except Exception as e:  # router gone or timed out: drop this group only, keep serving the others
        log.warning("leaving group %s: %s", group.rendezvous.group_id, e)
    finally:
        group.close()
