"""A local Ray cluster of simulated nodes (each a real raylet), so expert shards cross "node" boundaries.

On one small machine: the head takes no work, every simulated node gets one logical CPU (actors ask for a
fraction), and a custom resource names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.cluster_utils import Cluster

from router.app_spec import FLEET_NAMESPACE


@dataclass
class LocalCluster:
    cluster: Cluster
    node_ids: list[str]

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


def start_local_cluster(num_nodes: int, cpus_per_node: float = 2,
                        node_resources: dict[str, float] | None = None) -> LocalCluster:
    """``node_resources`` are added to every simulated node (e.g. the worker-group markers of the k8s overlays)."""
    if num_nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {num_nodes}")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=cpus_per_node, resources={f"moe_node_{i}": 1, **(node_resources or {})})
             for i in range(num_nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=FLEET_NAMESPACE, logging_level="warning", log_to_driver=False)
    return LocalCluster(cluster, [n.node_id for n in nodes])
