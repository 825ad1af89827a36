"""Capacity planner: a Llama 4 ``config.json`` and a GPU inventory -> routers, expert shards, memory, traffic.

Everything is arithmetic on the config (parameter counts come from the model built on the ``meta`` device),
so Scout, Maverick and Behemoth-class deployments can be reasoned about on paper. Assumptions are stated in
``ASSUMPTIONS`` and printed with every plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from models.config import parse_config
from models.param_count import text_param_counts, vision_param_count
from models.seam import expert_param_count
from router.kv_blocks import cache_bytes

GIB = 1 << 30
GPU_GIB = {"H100": 80, "H200": 141, "A100-80": 80, "A100-40": 40, "L40S": 48, "B200": 180, "MI300X": 192}
USABLE_FRACTION = 0.92  # the rest goes to the CUDA context, NCCL buffers and allocator fragmentation
HEADROOM_FRACTION = 0.10  # of GPU memory, for allocator slack and transient peaks the buffers miss
ROUTER_BUFFERS = 8  # live [step_tokens, hidden] tensors in a router step: residual, norm, q/k/v/o, MoE in/out
ACT_BYTES = 2  # activations, KV cache and exchanged rows stay bf16 whatever the weight dtype
WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
EXPERT_ID_BYTES = 8  # int64 expert index sent with each dispatched row
TP_WIDTHS = (1, 2, 4, 8)

ASSUMPTIONS = (
    f"usable GPU memory = {USABLE_FRACTION:.0%} of nominal",
    "--dtype applies to the text weights; fp8 per-channel scales (~0.1%) are ignored",
    "the vision tower, when the config has one, is counted in bf16 on every router even with --dtype fp8",
    "KV cache in bf16; chunked-attention layers keep at most attention_chunk_size tokens per sequence",
    f"router headroom = step_tokens x hidden x {ROUTER_BUFFERS} buffers x {ACT_BYTES} B "
    f"+ {HEADROOM_FRACTION:.0%} of GPU memory",
    f"expert headroom = step_tokens x top_k x (2 hidden + 3 ffn) x {ACT_BYTES} B (rows in/out, gate_up, act) "
    f"+ {HEADROOM_FRACTION:.0%} of GPU memory",
    "tensor parallelism splits dense weights and KV heads evenly; a TP group stays inside one node",
    "traffic counts token rows only (bf16) plus an 8-byte expert id per row, not the per-step count exchange",
)


class PlanError(ValueError):
    """Inputs the planner cannot work with; the message says which and why."""


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * USABLE_FRACTION)


def parse_gpu(spec: str | float) -> Gpu:
    """A known GPU name (case-insensitive) or a memory size in GiB such as ``96``."""
    by_name = {name.lower(): name for name in GPU_GIB}
    key = str(spec).strip().lower()
    if key in by_name:
        return Gpu(by_name[key], GPU_GIB[by_name[key]] * GIB)
    try:
        gib = float(key)
    except ValueError:
        raise PlanError(f"unknown GPU {spec!r}; known: {', '.join(GPU_GIB)}, or a memory size in GiB") from None
    if not math.isfinite(gib) or gib <= 0:
        raise PlanError(f"GPU memory must be a positive number of GiB, got {spec!r}")
    return Gpu(f"{gib:g} GiB GPU", int(gib * GIB))


@dataclass(frozen=True)
class PlanInput:
    gpu: str
    gpus_per_node: int
    nodes: int | None = None  # None: plan as many as needed
    dtype: str = "bf16"
    context: int = 131072
    concurrency: int = 32
    routers: int | None = None  # None: enough to hold `concurrency` sequences of `context` tokens
    step_tokens: int = 8192  # most tokens one router step processes (prefill chunk + decodes)

    def __post_init__(self) -> None:
        parse_gpu(self.gpu)
        for name in ("gpus_per_node", "context", "concurrency", "step_tokens"):
            _positive(name, getattr(self, name))
        for name in ("nodes", "routers"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.dtype not in WEIGHT_BYTES:
            raise PlanError(f"dtype must be one of {', '.join(WEIGHT_BYTES)}, got {self.dtype!r}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class GpuMemory:
    expert_weights_bytes: int = 0
    dense_weights_bytes: int = 0
    kv_cache_bytes: int = 0
    activation_headroom_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(dataclasses.astuple(self))


@dataclass(frozen=True)
class Plan:
    model_name: str
    gpu_name: str
    gpu_memory_bytes: int
    gpu_usable_bytes: int
    gpus_per_node: int
    dtype: str
    context_tokens: int
    concurrency_sequences: int
    # model
    total_params: int
    active_params: int
    vision_params: int
    layers: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    global_layers: int
    chunked_layers: int
    attention_chunk_tokens: int | None
    # weights
    expert_bytes: int  # one routed expert of one layer
    routed_experts_bytes: int  # all of them
    dense_bytes: int  # everything a router holds: attention, dense FFN, shared experts, gates, embeddings, head
    # KV cache, bf16, all layers (a router's TP ranks split it by KV head)
    kv_per_token_bytes: int  # while a sequence is shorter than the chunk: every layer grows
    kv_per_token_past_chunk_bytes: int  # past the chunk only the global layers grow
    kv_per_sequence_bytes: int  # one sequence of context_tokens, chunk-bounded
    kv_per_sequence_unbounded_bytes: int  # the same if every layer kept every token
    # routers
    router_tp: int
    routers: int
    sequences_per_router: int
    router_capacity_sequences: int
    router_capacity_tokens: int
    # experts
    expert_gpus: int
    expert_pairs: int  # (layer, expert) pairs to place
    experts_per_gpu_max: int
    experts_per_gpu_per_layer_max: int
    experts_per_gpu_capacity: int
    router_gpu: GpuMemory
    expert_gpu: GpuMemory
    # cluster
    router_gpus: int
    total_gpus: int
    nodes: int
    # traffic between routers and expert shards
    dispatch_bytes_per_token_per_layer: int
    combine_bytes_per_token_per_layer: int
    exchange_bytes_per_token: int  # dispatch + combine over every MoE layer
    exchange_bytes_per_decode_step: int  # one token for each of concurrency_sequences
    feasible: bool
    shortages: tuple[str, ...]
    assumptions: tuple[str, ...] = ASSUMPTIONS

    def to_dict(self) -> dict:
        return _with_gib(dataclasses.asdict(self) | {
            "router_gpu": _with_gib(dataclasses.asdict(self.router_gpu) | {"total_bytes": self.router_gpu.total_bytes}),
            "expert_gpu": _with_gib(dataclasses.asdict(self.expert_gpu) | {"total_bytes": self.expert_gpu.total_bytes}),
            "shortages": list(self.shortages), "assumptions": list(self.assumptions)})


def _with_gib(d: dict) -> dict:
    """Every ``*_bytes`` figure also in GiB, so a person reading the JSON need not divide."""
    out = {}
    for key, value in d.items():
        out[key] = value
        if key.endswith("_bytes"):
            out[key[:-len("_bytes")] + "_gib"] = round(value / GIB, 3)
    return out


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _gib(b: int) -> str:
    return f"{b / GIB:.1f} GiB"


def _kv_per_rank(kv_seq: int, kv_heads: int, tp: int) -> int:
    # KV heads split across TP ranks; with more ranks than heads each rank keeps a replicated head.
    return _ceil(kv_seq * _ceil(kv_heads, tp), kv_heads)


def _size_router(dense: int, headroom: int, kv_seq: int, kv_heads: int, inputs: PlanInput,
                 usable: int) -> tuple[int, int, int, list[str]]:
    """(TP width, KV bytes per sequence per rank, sequences one router holds, shortages).

    The smallest TP width at which each GPU holds its slice of the dense part, the headroom and the KV of the
    router's minimum load: one sequence, or its share of --concurrency when --routers is fixed.
    """
    seqs = _ceil(inputs.concurrency, inputs.routers) if inputs.routers else 1
    widths = [w for w in TP_WIDTHS if w <= inputs.gpus_per_node]
    need = {w: _ceil(dense, w) + headroom + seqs * _kv_per_rank(kv_seq, kv_heads, w) for w in widths}
    tp = next((w for w in widths if need[w] <= usable), widths[-1])
    short = [] if need[tp] <= usable else [
        f"router GPU memory: need {_gib(need[tp])} per GPU at TP={tp} for {seqs} sequence(s) of {inputs.context} "
        f"tokens, have {_gib(usable)} (short by {_gib(need[tp] - usable)})"]
    kv_rank = _kv_per_rank(kv_seq, kv_heads, tp)
    return tp, kv_rank, max(0, (usable - _ceil(dense, tp) - headroom) // kv_rank), short


def _expert_spread(pairs: int, num_experts: int, per_gpu: int) -> tuple[int, int, int]:
    """(shards, most experts on one shard, most of one layer on one shard) for an even, expert-major spread.

    Walking the pairs expert-major ((e, layer) order) and cutting the walk into equal runs gives every shard
    ceil(pairs / shards) experts at most and each layer's experts over as many shards as possible, so every
    MoE layer's tokens still reach many shards at once.
    """
    shards = _ceil(pairs, per_gpu)
    if shards == 0:  # a config without MoE layers: nothing to place
        return 0, 0, 0
    return shards, _ceil(pairs, shards), _ceil(num_experts, shards)


def _nodes(routers: int, tp: int, expert_gpus: int, per_node: int) -> int:
    # TP groups do not cross nodes; expert shards fill whatever GPUs the router nodes leave free.
    router_nodes = _ceil(routers, per_node // tp)
    spare = router_nodes * per_node - routers * tp
    return router_nodes + _ceil(max(0, expert_gpus - spare), per_node)


def make_plan(raw: dict, inputs: PlanInput, model_name: str = "model") -> Plan:
    cfg = parse_config(raw)
    if inputs.context > cfg.max_position_embeddings:
        raise PlanError(f"context {inputs.context} is past the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    gpu, wb, shortages = parse_gpu(inputs.gpu), WEIGHT_BYTES[inputs.dtype], []
    text_total, text_active = text_param_counts(cfg)
    vision = vision_param_count(raw)
    n_moe, E, K, D = len(cfg.moe_layers), cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size
    expert_bytes = expert_param_count(cfg) * wb
    routed_bytes = n_moe * E * expert_bytes
    dense_bytes = (text_total - n_moe * E * expert_param_count(cfg)) * wb + vision * ACT_BYTES

    n_chunked = sum(cfg.is_chunked_layer(i) for i in range(cfg.num_hidden_layers))
    n_global = cfg.num_hidden_layers - n_chunked
    kv_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * ACT_BYTES  # K and V of one token, one layer
    # block_size 1 makes the paged-cache bound exact: n_global * L + n_chunked * min(L, chunk) token slots
    kv_seq, kv_full = cache_bytes(inputs.context, 1, n_global, n_chunked, cfg.attention_chunk_size,
                                  cfg.num_key_value_heads, cfg.head_dim, ACT_BYTES)

    frac_headroom = int(gpu.memory_bytes * HEADROOM_FRACTION)
    router_headroom = inputs.step_tokens * D * ROUTER_BUFFERS * ACT_BYTES + frac_headroom
    tp, kv_rank, capacity, short = _size_router(dense_bytes, router_headroom, kv_seq, cfg.num_key_value_heads,
                                                inputs, gpu.usable_bytes)
    shortages += short
    routers = inputs.routers or _ceil(inputs.concurrency, max(capacity, 1))
    per_router = _ceil(inputs.concurrency, routers)

    # Expert shards: whole experts per GPU, as many as fit beside the activation headroom.
    expert_headroom = inputs.step_tokens * K * (2 * D + 3 * cfg.intermediate_size) * ACT_BYTES + frac_headroom
    per_gpu = max(0, (gpu.usable_bytes - expert_headroom) // expert_bytes)
    if per_gpu == 0:
        short = expert_bytes + expert_headroom - gpu.usable_bytes
        shortages.append(f"expert GPU memory: one expert needs {_gib(expert_bytes)} plus {_gib(expert_headroom)} "
                         f"headroom, have {_gib(gpu.usable_bytes)} (short by {_gib(short)})")
    shards, most, most_layer = _expert_spread(n_moe * E, E, max(per_gpu, 1))

    total_gpus = routers * tp + shards
    nodes = _nodes(routers, tp, shards, inputs.gpus_per_node)
    if inputs.nodes is not None:
        have = inputs.nodes * inputs.gpus_per_node
        if total_gpus > have:
            shortages.append(f"GPUs: need {total_gpus}, have {have} (short by {total_gpus - have})")
        elif nodes > inputs.nodes:
            shortages.append(f"nodes: need {nodes} (TP groups of {tp} GPUs stay inside a node), "
                             f"have {inputs.nodes} (short by {nodes - inputs.nodes})")

    dispatch = K * (D * ACT_BYTES + EXPERT_ID_BYTES)
    combine = K * D * ACT_BYTES
    return Plan(
        model_name=model_name, gpu_name=gpu.name, gpu_memory_bytes=gpu.memory_bytes,
        gpu_usable_bytes=gpu.usable_bytes, gpus_per_node=inputs.gpus_per_node, dtype=inputs.dtype,
        context_tokens=inputs.context, concurrency_sequences=inputs.concurrency,
        total_params=text_total + vision, active_params=text_active, vision_params=vision,
        layers=cfg.num_hidden_layers, moe_layers=n_moe, experts_per_layer=E, top_k=K,
        global_layers=n_global, chunked_layers=n_chunked, attention_chunk_tokens=cfg.attention_chunk_size,
        expert_bytes=expert_bytes, routed_experts_bytes=routed_bytes, dense_bytes=dense_bytes,
        kv_per_token_bytes=cfg.num_hidden_layers * kv_token_layer,
        kv_per_token_past_chunk_bytes=n_global * kv_token_layer,
        kv_per_sequence_bytes=kv_seq, kv_per_sequence_unbounded_bytes=kv_full,
        router_tp=tp, routers=routers, sequences_per_router=per_router, router_capacity_sequences=capacity,
        router_capacity_tokens=capacity * inputs.context,
        expert_gpus=shards, expert_pairs=n_moe * E, experts_per_gpu_max=most,
        experts_per_gpu_per_layer_max=most_layer, experts_per_gpu_capacity=per_gpu,
        router_gpu=GpuMemory(dense_weights_bytes=_ceil(dense_bytes, tp), kv_cache_bytes=per_router * kv_rank,
                             activation_headroom_bytes=router_headroom),
        expert_gpu=GpuMemory(expert_weights_bytes=most * expert_bytes, activation_headroom_bytes=expert_headroom),
        router_gpus=routers * tp, total_gpus=total_gpus, nodes=nodes,
        dispatch_bytes_per_token_per_layer=dispatch, combine_bytes_per_token_per_layer=combine,
        exchange_bytes_per_token=n_moe * (dispatch + combine),
        exchange_bytes_per_decode_step=n_moe * (dispatch + combine) * inputs.concurrency,
        feasible=not shortages, shortages=tuple(shortages))


def _memory_line(m: GpuMemory, usable: int) -> str:
    parts = [("experts", m.expert_weights_bytes), ("dense", m.dense_weights_bytes), ("KV", m.kv_cache_bytes),
             ("headroom", m.activation_headroom_bytes)]
    shown = " + ".join(f"{label} {b / GIB:.1f}" for label, b in parts if b)
    return f"{shown} = {_gib(m.total_bytes)} of {_gib(usable)}"


def render_text(p: Plan) -> str:
    kib = 1 << 10
    ratio = p.kv_per_sequence_unbounded_bytes / p.kv_per_sequence_bytes
    lines = [
        f"{p.model_name}: {p.layers} layers ({p.moe_layers} MoE x {p.experts_per_layer} experts, top-{p.top_k}) "
        f"on {p.gpu_name} ({_gib(p.gpu_memory_bytes)}, {_gib(p.gpu_usable_bytes)} usable), "
        f"{p.gpus_per_node} per node, {p.dtype} weights",
        f"parameters   {p.total_params / 1e9:.1f} B total, {p.active_params / 1e9:.2f} B active per token "
        f"(vision {p.vision_params / 1e9:.2f} B)",
        f"weights      one expert {p.expert_bytes / GIB:.3f} GiB, all routed experts {_gib(p.routed_experts_bytes)}, "
        f"router dense part {_gib(p.dense_bytes)}",
        f"KV cache     {p.kv_per_token_bytes / kib:.0f} KiB/token, "
        f"{p.kv_per_token_past_chunk_bytes / kib:.0f} KiB/token past the {p.attention_chunk_tokens}-token chunk "
        f"({p.global_layers} global, {p.chunked_layers} chunked layers); one {p.context_tokens}-token sequence "
        f"{_gib(p.kv_per_sequence_bytes)} ({ratio:.1f}x less than an unbounded cache)",
        f"routers      {p.routers} x TP={p.router_tp}, {p.sequences_per_router} sequence(s) each "
        f"(capacity {p.router_capacity_sequences} = {p.router_capacity_tokens} tokens)",
        f"expert GPUs  {p.expert_gpus} for {p.expert_pairs} (layer, expert) pairs: up to {p.experts_per_gpu_max} "
        f"each ({p.experts_per_gpu_per_layer_max} of one layer), room for {p.experts_per_gpu_capacity}",
        f"router GPU   {_memory_line(p.router_gpu, p.gpu_usable_bytes)}",
        f"expert GPU   {_memory_line(p.expert_gpu, p.gpu_usable_bytes)}",
        f"cluster      {p.total_gpus} GPUs ({p.router_gpus} router + {p.expert_gpus} expert) on {p.nodes} "
        f"node(s) of {p.gpus_per_node}",
        f"traffic      per token per MoE layer: dispatch {p.dispatch_bytes_per_token_per_layer} B, combine "
        f"{p.combine_bytes_per_token_per_layer} B; per token, all layers {p.exchange_bytes_per_token / kib:.0f} KiB; "
        f"per decode step of {p.concurrency_sequences} sequences "
        f"{p.exchange_bytes_per_decode_step / (1 << 20):.1f} MiB",
        "assumptions  " + "\n             ".join(p.assumptions),
        "FEASIBLE" if p.feasible else "INFEASIBLE:\n" + "\n".join(f"  {s}" for s in p.shortages),
    ]
    return "\n".join(lines)


def behemoth_class_config() -> dict:
    """A text-only Behemoth-class config matching Meta's published figures: 16 experts, ~2T total, ~288B active.

    Scout's layout scaled up: every layer MoE (16 routed experts, top-1, plus a shared expert), iRoPE with
    8192-token chunks. hidden 18432 (144 heads x 128, 8 KV heads), 72 layers, expert ffn 28672 give
    1999.7B total and 287.4B active (both within 0.2%).
    """
    text = dict(model_type="llama4_text", hidden_size=18432, num_hidden_layers=72, num_attention_heads=144,
                num_key_value_heads=8, head_dim=128, intermediate_size=28672, intermediate_size_mlp=57344,
                num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, vocab_size=202048,
                attention_chunk_size=8192, max_position_embeddings=1048576, use_qk_norm=True,
                rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
                torch_dtype="bfloat16")
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text}


def load_raw_config(spec: str | Path) -> tuple[dict, str]:
    """(config dict, model name) from a config.json path, a checkpoint directory, or the word ``behemoth``."""
    if str(spec).lower() == "behemoth":
        return behemoth_class_config(), "behemoth-class"
    path = Path(spec)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file} (give a path, or the word 'behemoth')")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{file} is not valid JSON: {e}") from None
    return raw, (path.name if path.is_dir() else file.name.removesuffix(".json").removesuffix(".config"))
