"""Communication groups between one router and its expert shards, made at runtime.

Routers and shards come and go, so there is no global ``init_process_group`` that everyone joins once: each
router replica owns one torch.distributed process group with the shards it talks to (rank 0 = the router,
ranks 1..N = shards), built directly from a store, torn down when the router leaves or the placement epoch
changes. A shard process holds one group object per router. gloo on CPU, NCCL on CUDA, chosen at construction.
Every operation has a timeout: a peer that stops answering becomes an error, never a hang.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

ROUTER_RANK = 0


@dataclass(frozen=True)
class Rendezvous:
    """What every member needs to join one group; handed out over Ray (the control plane)."""

    group_id: str  # unique per router and epoch, e.g. "router-3/epoch-7"
    host: str  # where rank 0 (the router) serves the store
    port: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    timeout_s: float  # the router's bound on any exchange

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rendezvous":
        return cls(**d)


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def new_rendezvous(group_id: str, world_size: int, backend: str, timeout_s: float, host: str) -> Rendezvous:
    return Rendezvous(group_id, host, free_port(host), world_size, backend, timeout_s)


@dataclass
class Group:
    """One member's handle on a group: the process group and the store that keeps it reachable."""

    rendezvous: Rendezvous
    rank: int
    store: dist.Store
    pg: dist.ProcessGroup

    def send(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        return self.pg.send([tensor], dst, 0)

    def recv(self, tensor: torch.Tensor, src: int) -> dist.Work:
        return self.pg.recv([tensor], src, 0)

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # a group whose peer died may refuse a clean shutdown; dropping it is enough
            pass


def join(rdv: Rendezvous, rank: int, local_host: str, timeout_s: float | None = None) -> Group:
    """Join ``rdv`` as ``rank``; blocks until every member has joined (or the timeout passes).

    ``timeout_s`` overrides the rendezvous timeout for this member: a shard waits idle for its router's
    next layer indefinitely long, while the router bounds every exchange.
    """
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else rdv.timeout_s)
    store = dist.TCPStore(rdv.host, rdv.port, rdv.world_size, is_master=rank == ROUTER_RANK,
                          timeout=datetime.timedelta(seconds=max(rdv.timeout_s, 30)), wait_for_workers=False)
    prefixed = dist.PrefixStore(rdv.group_id + "/", store)
    if rdv.backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Bind to the interface of this member's own address (on one machine: loopback).
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        pg = dist.ProcessGroupGloo(prefixed, rank, rdv.world_size, opts)
    elif rdv.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, rdv.world_size, opts)
    else:
        raise ValueError(f"unknown backend {rdv.backend!r}; expected 'gloo' or 'nccl'")
    return Group(rdv, rank, store, pg)
