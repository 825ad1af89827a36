"""The capacity planner on the published Scout/Maverick configs, a Behemoth-class config and small hand-checked
configs; figures are checked against independent arithmetic, not against the planner's own helpers."""

from __future__ import annotations

import json
import math

import pytest

from cluster.cli import main
from cluster.placement import Placement
from cluster.planner import (GIB, PlanError, PlanInput, behemoth_class_config, make_plan, parse_gpu,
                             render_text)

SCOUT, MAVERICK = "llama4-scout-17b-16e", "llama4-maverick-17b-128e"


def _raw(shared_models, name: str) -> dict:
    return json.loads((shared_models / f"{name}.config.json").read_text())


def _plan(raw: dict, **kw):
    return make_plan(raw, PlanInput(**{"gpu": "H100", "gpus_per_node": 8, **kw}))


def _small(**text) -> dict:
    """A text-only Llama4ForCausalLM config small enough to check by hand."""
    return {"model_type": "llama4_text", "hidden_size": 64, "intermediate_size": 32, "intermediate_size_mlp": 64,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "vocab_size": 256,
            "attention_chunk_size": 16, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
            **text}


@pytest.mark.parametrize("name,total_b", [(SCOUT, 109), (MAVERICK, 400)])
def test_published_totals_and_expert_bytes(shared_models, name, total_b):
    raw = _raw(shared_models, name)
    text = raw["text_config"]
    plan = _plan(raw)
    assert abs(plan.total_params / (total_b * 1e9) - 1) < 0.01, plan.total_params
    assert round(plan.active_params / 1e9) == 17  # 17.17-17.18B exactly (see test_param_count)
    assert plan.expert_bytes == 3 * text["hidden_size"] * text["intermediate_size"] * 2
    assert _plan(raw, dtype="fp8").expert_bytes == 3 * text["hidden_size"] * text["intermediate_size"]
    assert plan.routed_experts_bytes == len(range(text["interleave_moe_layer_step"] - 1, 48,
                                                  text["interleave_moe_layer_step"])) * text[
        "num_local_experts"] * plan.expert_bytes


def test_maverick_on_h100_fits_every_gpu(shared_models):
    plan = _plan(_raw(shared_models, MAVERICK))
    assert plan.feasible and plan.shortages == ()
    assert plan.router_tp == 1 and plan.nodes >= 1
    assert plan.total_gpus == plan.routers * plan.router_tp + plan.expert_gpus
    assert plan.nodes == math.ceil(plan.total_gpus / 8)
    assert plan.routers * plan.sequences_per_router >= plan.concurrency_sequences
    assert plan.sequences_per_router <= plan.router_capacity_sequences
    for gpu in (plan.router_gpu, plan.expert_gpu):
        assert gpu.total_bytes <= plan.gpu_usable_bytes
    # The spread the figures promise exists: walk the pairs expert-major, cut into equal runs.
    layers, E, S = tuple(range(1, 48, 2)), 128, plan.expert_gpus
    P = len(layers) * E
    table = [[[(e * len(layers) + i) * S // P] for e in range(E)] for i in range(len(layers))]
    placement = Placement(0, S, E, layers, table)
    held = [placement.experts_of(s) for s in range(S)]
    assert max(sum(map(len, h.values())) for h in held) == plan.experts_per_gpu_max
    assert max(len(es) for h in held for es in h.values()) == plan.experts_per_gpu_per_layer_max
    assert plan.experts_per_gpu_max * plan.expert_bytes == plan.expert_gpu.expert_weights_bytes
    assert plan.expert_gpus * plan.experts_per_gpu_max >= P
    # And one shard fewer would not hold them.
    assert math.ceil(P / (S - 1)) > plan.experts_per_gpu_capacity


def test_kv_cache_by_hand():
    # 8 layers: 3 of 4 chunked (chunk 16), every 4th global; 2 KV heads of 16, bf16.
    per_token_layer = 2 * 2 * 16 * 2  # K and V x kv_heads x head_dim x 2 bytes
    short, long = make_plan(_small(), PlanInput(gpu="H100", gpus_per_node=8, context=10)), \
        make_plan(_small(), PlanInput(gpu="H100", gpus_per_node=8, context=100))
    assert (short.global_layers, short.chunked_layers) == (2, 6)
    assert short.kv_per_sequence_bytes == 8 * 10 * per_token_layer == short.kv_per_sequence_unbounded_bytes
    assert long.kv_per_sequence_bytes == (2 * 100 + 6 * 16) * per_token_layer
    assert long.kv_per_sequence_unbounded_bytes == 8 * 100 * per_token_layer
    assert (long.kv_per_token_bytes, long.kv_per_token_past_chunk_bytes) == (8 * per_token_layer, 2 * per_token_layer)
    unchunked = make_plan(_small(attention_chunk_size=None), PlanInput(gpu="H100", gpus_per_node=8, context=100))
    assert unchunked.kv_per_sequence_bytes == unchunked.kv_per_sequence_unbounded_bytes == 8 * 100 * per_token_layer
    assert "0 chunked layers" in render_text(unchunked)


def test_chunked_bound_at_one_million_tokens(shared_models):
    L = 1 << 20
    plan = _plan(_raw(shared_models, MAVERICK), context=L, concurrency=1)
    per_token_layer = 2 * 8 * 128 * 2
    assert plan.kv_per_sequence_bytes == (12 * L + 36 * 8192) * per_token_layer  # ~49 GiB
    ratio = plan.kv_per_sequence_unbounded_bytes / plan.kv_per_sequence_bytes
    assert ratio == pytest.approx(48 * L / (12 * L + 36 * 8192))
    assert ratio > 3.9  # 196 GiB for a full cache, one H100 could not hold one sequence
    assert plan.feasible and plan.router_capacity_sequences >= 1


def test_exchange_bytes_by_hand(shared_models):
    plan = _plan(_raw(shared_models, MAVERICK))
    assert plan.dispatch_bytes_per_token_per_layer == 5120 * 2 + 8  # bf16 row + int64 expert id
    assert plan.combine_bytes_per_token_per_layer == 5120 * 2
    assert plan.exchange_bytes_per_token == 24 * (5120 * 2 + 8 + 5120 * 2)
    assert plan.exchange_bytes_per_decode_step == plan.exchange_bytes_per_token * 32
    top2 = make_plan(_small(num_experts_per_tok=2), PlanInput(gpu="H100", gpus_per_node=8, context=64))
    assert top2.dispatch_bytes_per_token_per_layer == 2 * (64 * 2 + 8)
    assert top2.exchange_bytes_per_token == 4 * 2 * (64 * 2 + 8 + 64 * 2)  # 4 MoE layers of 8


def test_behemoth_class():
    raw = behemoth_class_config()
    assert "vision_config" not in raw and raw["text_config"]["num_local_experts"] == 16
    plan = _plan(raw)
    assert abs(plan.total_params / 2e12 - 1) < 0.02, plan.total_params
    assert abs(plan.active_params / 288e9 - 1) < 0.02, plan.active_params
    assert plan.feasible and plan.router_tp > 1
    assert plan.dense_bytes / 4 > plan.gpu_usable_bytes  # why: even a 4-way split of ~320 GiB overflows an H100
    assert plan.router_gpu.total_bytes <= plan.gpu_usable_bytes


@pytest.mark.parametrize("kw,resource,amount", [
    ({"gpu": "L40S", "nodes": 1}, "GPUs: need", "have 8 (short by"),
    ({"gpu": "0.5"}, "expert GPU memory: one expert needs", "short by"),
])
def test_impossible_plans_name_the_shortage(shared_models, kw, resource, amount):
    plan = _plan(_raw(shared_models, MAVERICK), **kw)
    assert not plan.feasible
    assert any(s.startswith(resource) and amount in s for s in plan.shortages), plan.shortages
    assert "INFEASIBLE" in render_text(plan)


def test_dense_part_too_big_for_the_node():
    plan = _plan(behemoth_class_config(), gpu="L40S", gpus_per_node=4)
    short = [s for s in plan.shortages if s.startswith("router GPU memory")]
    assert plan.router_tp == 4 and len(short) == 1 and "at TP=4" in short[0] and "short by" in short[0]


def test_json_has_every_figure_with_units(shared_models):
    d = json.loads(json.dumps(_plan(_raw(shared_models, SCOUT)).to_dict()))
    for key in ("total_params", "active_params", "expert_bytes", "expert_gib", "dense_bytes", "dense_gib",
                "kv_per_token_bytes", "kv_per_sequence_gib", "router_capacity_tokens", "context_tokens",
                "router_tp", "routers", "expert_gpus", "experts_per_gpu_max", "total_gpus", "nodes",
                "dispatch_bytes_per_token_per_layer", "exchange_bytes_per_token", "feasible", "shortages"):
        assert key in d, key
    assert set(d["router_gpu"]) >= {"expert_weights_gib", "dense_weights_gib", "kv_cache_gib",
                                    "activation_headroom_gib", "total_bytes", "total_gib"}
    assert d["gpu_usable_gib"] == pytest.approx(80 * 0.92, abs=0.01)


def test_cli_exit_code_and_output(shared_models, capsys):
    maverick = str(shared_models / f"{MAVERICK}.config.json")
    assert main(["plan", "--config", maverick, "--gpu", "L40S", "--gpus-per-node", "8", "--nodes", "1"]) == 3
    out = capsys.readouterr().out
    assert "INFEASIBLE" in out and "GPUs: need" in out and "short by" in out
    assert main(["plan", "--config", "behemoth", "--gpu", "H100", "--gpus-per-node", "8", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["router_tp"] == 8
    assert main(["plan", "--config", maverick, "--gpu", "V100", "--gpus-per-node", "8"]) == 2
    assert "known: H100, H200" in capsys.readouterr().err


def test_gpu_names_and_input_checks(shared_models):
    assert parse_gpu("96").memory_bytes == 96 * GIB and parse_gpu("h200").name == "H200"
    with pytest.raises(PlanError, match="MI300X"):
        parse_gpu("TPU")
    with pytest.raises(PlanError, match="gpus_per_node"):
        PlanInput(gpu="H100", gpus_per_node=0)
    with pytest.raises(PlanError, match="max_position_embeddings"):
        _plan(_raw(shared_models, MAVERICK), context=2 << 20)
