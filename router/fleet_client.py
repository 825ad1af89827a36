"""A router replica joins the expert fleet: fetch the placement, form its own group with every shard."""

from __future__ import annotations

import os
import uuid

import ray
import torch

from cluster.comm import ROUTER_RANK, backend_for, join, new_rendezvous
from cluster.fleet import placement_of
from cluster.shm import new_prefix
from router.distributed_experts import DistributedExperts

SHM_ENV = "MOE_SERVE_SHM"  # "0": every payload over the group, even to shards on this host


def connect_experts(fleet, hidden: int, dtype: torch.dtype, device: str = "cpu", timeout_s: float = 30.0,
                    router_id: str | None = None, shm: bool | None = None) -> DistributedExperts:
    """Control plane only (Ray calls here, none per layer): returns the seam the router's model uses.

    ``shm``: payloads to shards on this host through shared memory (CPU only); None: on unless
    ``MOE_SERVE_SHM=0`` (tests use that to run the network path between simulated nodes of one host).
    """
    placement, shards = placement_of(ray.get(fleet.router_view.remote()))
    host = ray.util.get_node_ip_address()
    router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
    if shm is None:
        shm = os.environ.get(SHM_ENV, "1") != "0"
    backend = backend_for(device)
    rdv = new_rendezvous(f"{router_id}/epoch-{placement.epoch}", 1 + len(shards), backend, timeout_s, host,
                         shm_prefix=new_prefix() if shm and backend == "gloo" else "")
    joined = [shard.join_group.remote(rdv.to_dict(), rank=i + 1) for i, shard in enumerate(shards)]
    group = join(rdv, ROUTER_RANK, host)  # returns once every shard has joined
    ray.get(joined)
    return DistributedExperts(placement, group, hidden, dtype, device)
