"""Configuration of the serving app (router replicas and ingress), validated where it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from router.app_spec import FLEET_NAMESPACE


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: str
    model_name: str = ""  # what clients name in requests; defaults to the checkpoint folder's name
    fleet_name: str | None = None  # the expert fleet actor; None: every expert inside the router
    fleet_namespace: str = FLEET_NAMESPACE
    # When the fleet is not running yet, the first router replica starts it with these (on KubeRay: the
    # expert worker group's nodes; "cuda" gives each shard one GPU).
    shards: int = 0
    shard_strategy: str = "contiguous"
    shard_device: str = "cpu"
    shard_cpus: float = 0.1
    shard_resources: dict[str, float] | None = None  # e.g. {"moe_expert": 1}: shards only on expert nodes
    device: str = "cpu"  # the router's dense part: "cuda" on GPU router nodes
    dtype: str = "float32"  # activations and arithmetic
    # matrices as held in memory; "auto": a bf16 checkpoint stays bf16 on CPU with fp32 arithmetic (see
    # models.loading.resident_weight_dtype), else ``dtype``
    weight_dtype: str = "auto"
    kv_cache_bytes: int = 256 << 20
    max_num_seqs: int = 64
    max_tokens_per_step: int = 512
    max_waiting: int = 64  # queued beyond this per router -> RESOURCE_EXHAUSTED / HTTP 429
    exchange_timeout_s: float = 30.0
    max_request_bytes: int = 4 << 20

    def __post_init__(self):
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise ValueError(f"checkpoint={self.checkpoint!r}: no config.json there")
        if not self.model_name:
            object.__setattr__(self, "model_name", Path(self.checkpoint).resolve().name)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected cpu or cuda")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: expected float32, bfloat16 or float16")
        if self.weight_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"weight_dtype={self.weight_dtype!r}: expected auto, float32, bfloat16 or float16")
        for name in ("kv_cache_bytes", "max_num_seqs", "max_tokens_per_step", "max_waiting", "max_request_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be positive")

    def resident_weight_dtype(self):
        import torch

        from models.loading import resident_weight_dtype

        return resident_weight_dtype(self.checkpoint, getattr(torch, self.dtype), self.device, self.weight_dtype)

    def engine_config(self):
        from router.engine import EngineConfig

        return EngineConfig(kv_cache_bytes=self.kv_cache_bytes, max_num_seqs=self.max_num_seqs,
                            max_tokens_per_step=self.max_tokens_per_step, max_waiting=self.max_waiting)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
