"""The expert fleet: a named, long-lived actor that owns the placement and the expert-shard actors.

It starts each shard where the placement asks (spread over the given nodes with node affinity; one GPU each on
GPU nodes), and gives each router the current placement under its epoch plus the shard handles to rendezvous
with. It is the control plane: nothing here is on the per-token path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.placement import Placement, balanced_placement
from expert_workers.actor import remote_class
from models.config import load_config
from router.app_spec import FLEET_NAME


@dataclass(frozen=True)
class FleetSpec:
    checkpoint: str
    num_shards: int
    strategy: str = "contiguous"  # or "round_robin"
    replicas: tuple[tuple[int, int, int], ...] = ()  # (layer, expert, total copies) for hot experts
    node_ids: tuple[str, ...] = ()  # spread shards over these nodes (round robin); empty: anywhere
    dtype: str = "float32"  # the rows' (the arithmetic's)
    weight_dtype: str = "auto"  # the experts as held (models.loading.resident_weight_dtype)
    device: str = "cpu"  # "cuda": one GPU per shard
    shard_cpus: float = 0.1
    # Custom resources each shard asks for, e.g. {"moe_expert": 1}: keeps GPU shards on the expert nodes.
    shard_resources: tuple[tuple[str, float], ...] = ()


class ExpertFleet:
    def __init__(self, spec: FleetSpec):
        self.spec = spec
        cfg = load_config(spec.checkpoint)
        replicas = {(layer, e): r for layer, e, r in spec.replicas}
        self.placement = balanced_placement(cfg.moe_layers, cfg.num_local_experts, spec.num_shards,
                                            strategy=spec.strategy, replicas=replicas, epoch=1)
        self.shards = [self._start_shard(s) for s in range(spec.num_shards)]
        t0 = time.perf_counter()
        self.shard_info = ray.get([s.info.remote() for s in self.shards])  # waits for every shard to load
        self.start_seconds = time.perf_counter() - t0

    def _start_shard(self, shard_id: int):
        spec = self.spec
        options = {}
        if spec.node_ids:
            node = spec.node_ids[shard_id % len(spec.node_ids)]
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        actor_cls = remote_class(num_cpus=spec.shard_cpus, num_gpus=1 if spec.device == "cuda" else 0)
        if spec.shard_resources:
            options["resources"] = dict(spec.shard_resources)
        experts = {layer: list(ids) for layer, ids in self.placement.experts_of(shard_id).items()}
        return actor_cls.options(**options).remote(shard_id, spec.checkpoint, experts, spec.dtype, spec.device,
                                                  spec.weight_dtype)

    def router_view(self) -> tuple[dict, list]:
        """(placement of the current epoch, shard handles in shard-id order) for a router to connect."""
        return self.placement.to_dict(), self.shards

    def info(self) -> dict:
        return {"epoch": self.placement.epoch, "num_shards": len(self.shards), "shards": self.shard_info,
                "start_seconds": self.start_seconds}

    def dead_shards(self, timeout_s: float = 5.0) -> list[int]:
        """Shards that do not answer a ping within ``timeout_s`` (dead or hung)."""
        refs = [s.groups.remote() for s in self.shards]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        dead = []
        for shard_id, ref in enumerate(refs):
            try:
                if ref not in ready:
                    raise TimeoutError
                ray.get(ref)
            except Exception:
                dead.append(shard_id)
        return dead

    def stats(self) -> list[dict]:
        return ray.get([s.stats.remote() for s in self.shards])


def start_fleet(spec: FleetSpec, name: str = FLEET_NAME, namespace: str | None = None):
    """Create the named fleet actor (or take the running one of that name) and wait until its shards loaded.

    ``get_if_exists`` makes this safe to race: several router replicas starting at once share one fleet.
    """
    actor = ray.remote(num_cpus=0)(ExpertFleet).options(name=name, namespace=namespace, lifetime="detached",
                                                        get_if_exists=True).remote(spec)
    ray.get(actor.info.remote())
    return actor


def placement_of(view: tuple[dict, list]) -> tuple[Placement, list]:
    placement_dict, shards = view
    return Placement.from_dict(placement_dict), shards


def stop_fleet(fleet) -> None:
    """Kill the shards and the (detached) fleet actor."""
    _, shards = ray.get(fleet.router_view.remote())
    for shard in shards:
        ray.kill(shard)
    ray.kill(fleet)
