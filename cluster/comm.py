"""Communication groups between one router and its expert shards, made at runtime.

Routers and shards come and go, so there is no global ``init_process_group`` that everyone joins once: each
router replica owns one torch.distributed process group with the shards it talks to (rank 0 = the router,
ranks 1..N = shards), built directly from a store, torn down when the router leaves or the placement epoch
changes. A shard process holds one group object per router. gloo on CPU, NCCL on CUDA, chosen at construction.
Every operation has a timeout: a peer that stops answering becomes an error, never a hang. Members also
tell each other their shm domain, so a router and a shard on one host can move payloads through shared
memory (``cluster.shm``) while the group carries only headers.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from cluster.shm import shm_domain

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
    shm_prefix: str = ""  # names the pair buffers of same-host members; "": every payload over the group

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


def new_rendezvous(group_id: str, world_size: int, backend: str, timeout_s: float, host: str,
                   shm_prefix: str = "") -> Rendezvous:
    return Rendezvous(group_id, host, free_port(host), world_size, backend, timeout_s, shm_prefix)


@dataclass
class Group:
    """One member's handle on a group: the process group and the store that keeps it reachable."""

    rendezvous: Rendezvous
    rank: int
    store: dist.Store
    pg: dist.ProcessGroup
    domains: tuple[str, ...]  # each rank's shm domain ("": none)

    def shares_memory_with(self, rank: int) -> bool:
        """Whether payloads to ``rank`` go through a shared-memory buffer (both sides agree on this)."""
        mine = self.domains[self.rank]
        return bool(self.rendezvous.shm_prefix and mine) and self.domains[rank] == mine

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
    prefixed.set(f"shm_domain/{rank}", shm_domain())
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
    # Each member set its key before forming its process group (a get waits for one not there yet).
    domains = tuple(prefixed.get(f"shm_domain/{r}").decode() for r in range(rdv.world_size))
    return Group(rdv, rank, store, pg, domains)
