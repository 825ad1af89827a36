"""The expert-shard Ray actor: holds its experts, and serves every router group it belongs to."""

from __future__ import annotations

import os
import threading
from collections import Counter

import ray
import torch

from cluster.comm import Rendezvous, join
from expert_workers.serve_loop import serve_group
from expert_workers.shard import ExpertShard
from models.loading import resident_weight_dtype

# A shard waits for its router's next layer as long as the router lives; the router bounds every exchange.
SHARD_IDLE_TIMEOUT_S = 24 * 3600.0


class ExpertShardActor:
    def __init__(self, shard_id: int, checkpoint: str, experts: dict[int, list[int]], dtype: str = "float32",
                 device: str = "cpu", weight_dtype: str = "auto"):
        self.shard_id, self.dtype = shard_id, getattr(torch, dtype)
        self.device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
        # Rows arrive in ``dtype``; the weights are held as ``weight_dtype`` says ("auto": as the checkpoint
        # holds them, where the CPU kernels allow).
        self.shard, self.report = ExpertShard.load(
            checkpoint, {int(k): v for k, v in experts.items()}, self.dtype, self.device,
            weight_dtype=resident_weight_dtype(checkpoint, self.dtype, self.device, weight_dtype))
        self.hidden = self.shard.hidden
        self.rows_served: Counter = Counter()
        self._groups: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def info(self) -> dict:
        return {"shard_id": self.shard_id, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "bytes_read": self.report.bytes_read, "load_seconds": self.report.seconds,
                "num_experts": self.report.num_experts, "experts": self.shard.experts}

    def join_group(self, rdv: dict, rank: int) -> None:
        """Start serving a router's group on its own thread (returns at once; the router completes the join)."""
        rendezvous = Rendezvous.from_dict(rdv)
        stop = threading.Event()

        def run():
            group = join(rendezvous, rank, ray.util.get_node_ip_address(), timeout_s=SHARD_IDLE_TIMEOUT_S)
            serve_group(self.shard, group, self.hidden, self.dtype, self.rows_served, stop, self.device)

        thread = threading.Thread(target=run, name=f"group-{rendezvous.group_id}", daemon=True)
        self._groups[rendezvous.group_id] = (thread, stop)
        thread.start()

    def groups(self) -> list[str]:
        """Ids of the router groups this shard is serving now."""
        return [gid for gid, (thread, _) in self._groups.items() if thread.is_alive()]

    def stats(self) -> dict:
        return {"rows_served": dict(self.rows_served), "groups": self.groups()}


def remote_class(num_cpus: float = 0.1, num_gpus: float = 0):
    """The Ray actor class; CPU shards take a fraction of a core (a 2-core machine runs several)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=8)(ExpertShardActor)
