"""A router replica: the dense model (attention, gating, shared experts) bound to the expert fleet.

The Ray Serve deployment wraps this; tests and ``moe-serve generate --shards`` run it as a plain actor.
"""

from __future__ import annotations

import ray
import torch

from models.generate import greedy_generate
from models.loading import load_model
from models.config import load_config
from router.fleet_client import connect_experts


class RouterReplica:
    def __init__(self, checkpoint: str, fleet_name: str, namespace: str | None = None, dtype: str = "float32",
                 timeout_s: float = 30.0):
        cfg = load_config(checkpoint)
        fleet = ray.get_actor(fleet_name, namespace=namespace)
        self.experts = connect_experts(fleet, cfg.hidden_size, getattr(torch, dtype), timeout_s=timeout_s)
        self.model = load_model(checkpoint, dtype=getattr(torch, dtype), experts=self.experts)

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        return greedy_generate(self.model, torch.tensor(prompt_ids), max_tokens).tolist()

    @torch.inference_mode()
    def logits(self, prompt_ids: list[list[int]]) -> torch.Tensor:
        return self.model(torch.tensor(prompt_ids))

    def close(self) -> None:
        self.experts.close()
