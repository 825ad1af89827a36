"""The router replica as a Ray Serve deployment: model (dense part) + engine, joined to the expert fleet.

Health tells the truth: the replica reports healthy only after a real generation went through its experts
(every shard of the current epoch gets each layer's header, and rows), and stops being healthy if a step fails.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import ray
import torch

from models.config import load_config
from models.loading import load_model
from models.tokenizer import Tokenizer
from router.async_engine import AsyncEngine
from router.engine import Engine
from router.request import GenerationOutput, GenerationRequest
from router.sampling import SamplingParams
from router.settings import ServeSettings
from router.tracing import continue_trace, setup_tracing

log = logging.getLogger(__name__)
WARMUP_TOKENS = 4


class Router:
    def __init__(self, settings: dict):
        self.settings = s = ServeSettings(**settings)
        setup_tracing()
        cfg = load_config(s.checkpoint)
        dtype = getattr(torch, s.dtype)
        self.experts, self.epoch, self.num_shards = None, 0, 0
        if s.fleet_name:
            from router.fleet_client import connect_experts

            fleet = _fleet(s)
            self.experts = connect_experts(fleet, cfg.hidden_size, dtype, device=s.device,
                                           timeout_s=s.exchange_timeout_s)
            self.epoch, self.num_shards = self.experts.placement.epoch, self.experts.placement.num_shards
        self.tokenizer = Tokenizer.from_dir(s.checkpoint)
        model = load_model(s.checkpoint, dtype=dtype, device=s.device, experts=self.experts,
                           weight_dtype=s.resident_weight_dtype())
        engine = Engine(model, self.tokenizer, s.engine_config())
        self.cfg, self.max_model_len = cfg, engine.max_model_len
        self.warmup_error = _warm_up(engine)  # before the engine thread owns it: plain synchronous steps
        self.engine = AsyncEngine(engine)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        with continue_trace(dict(request.trace_context), "router.generate", request_id=request.request_id,
                            prompt_tokens=len(request.prompt_ids)) as span:
            async for out in self.engine.generate(request):
                if out.finished:
                    span.set_attribute("finish_reason", out.finish_reason)
                    span.set_attribute("completion_tokens", out.usage.completion_tokens)
                yield out

    def check_health(self) -> None:
        """Serve's health hook: a replica that never generated, or whose experts failed, is restarted."""
        if self.warmup_error:
            raise RuntimeError(f"router not ready: {self.warmup_error}")
        if self.engine.step_error:  # e.g. a shard died: a restarted replica rejoins the fleet's current epoch
            raise RuntimeError(f"router step failed: {self.engine.step_error}")

    def status(self) -> dict:
        e = self.engine.engine
        return {"ready": self.warmup_error is None, "error": self.warmup_error, "epoch": self.epoch,
                "num_shards": self.num_shards, "running": len(e.scheduler.running),
                "waiting": len(e.scheduler.waiting), "kv_blocks_free": e.blocks.num_free,
                "kv_blocks_total": e.blocks.num_blocks, "max_model_len": self.max_model_len}

    def record_autoscaling_stats(self) -> dict[str, float]:
        e = self.engine.engine
        return {"running_sequences": float(len(e.scheduler.running)),
                "waiting_sequences": float(len(e.scheduler.waiting))}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "experts", None) is not None:
            self.experts.close()


def _fleet(s: ServeSettings):
    try:
        return ray.get_actor(s.fleet_name, namespace=s.fleet_namespace)
    except ValueError:  # not running: start it (racing replicas end up sharing one)
        if not s.shards:
            raise RuntimeError(f"expert fleet {s.fleet_name!r} is not running and settings.shards is 0") from None
        from cluster.fleet import FleetSpec, start_fleet

        spec = FleetSpec(checkpoint=s.checkpoint, num_shards=s.shards, strategy=s.shard_strategy,
                         dtype=s.dtype, weight_dtype=s.weight_dtype, device=s.shard_device, shard_cpus=s.shard_cpus,
                         shard_resources=tuple(sorted((s.shard_resources or {}).items())))
        return start_fleet(spec, name=s.fleet_name, namespace=s.fleet_namespace)


def _warm_up(engine: Engine) -> str | None:
    """One real greedy generation through every layer (and so every expert shard); None when it worked."""
    prompt = tuple(range(3, min(35, engine.model.cfg.vocab_size)))
    try:
        engine.add_request(GenerationRequest("warm-up", prompt, SamplingParams(temperature=0.0,
                                                                              max_tokens=WARMUP_TOKENS,
                                                                              ignore_eos=True)))
        produced = 0
        while engine.has_work():
            produced += sum(len(o.token_ids) for o in engine.step())
        return None if produced == WARMUP_TOKENS else f"warm-up produced {produced} tokens"
    except Exception as e:  # reported through health, not crashed on
        log.exception("warm-up generation failed")
        return f"warm-up generation failed: {type(e).__name__}: {e}"
