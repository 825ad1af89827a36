"""The ``moe-serve`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = Path(os.environ.get("MOE_SERVE_HOME", Path.home() / ".cache" / "moe-serve")) / "tiny"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Serve Llama 4 MoE checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the Hugging Face layout")
    mk.add_argument("dir", type=Path)
    mk.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(run=_make_checkpoint)

    gen = sub.add_parser("generate", help="generate (greedy): single process, or through expert shards on Ray")
    gen.add_argument("--checkpoint", type=Path, default=None,
                     help=f"checkpoint directory (default: {DEFAULT_CHECKPOINT}, made if missing)")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="prompt text (a BOS token is prepended)")
    prompt.add_argument("--prompt-ids", default=None, help="comma-separated prompt token ids, e.g. 1,2,3")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": "..."}')
    gen.add_argument("--shards", type=int, default=0,
                     help="run the experts on N expert-shard actors of a local Ray cluster (0: in process)")
    gen.add_argument("--nodes", type=int, default=2, help="simulated Ray nodes the shards spread over")
    gen.add_argument("--endpoint", default=None, help="HOST:PORT of a running `moe-serve up`: be its gRPC client")
    gen.set_defaults(run=_generate)

    upp = sub.add_parser("up", help="start the service (gRPC + OpenAI HTTP) on a local or existing Ray cluster")
    upp.add_argument("--checkpoint", type=Path, default=None,
                     help=f"checkpoint directory (default: {DEFAULT_CHECKPOINT}, made if missing)")
    upp.add_argument("--routers", type=int, default=1, help="router replicas to start with")
    upp.add_argument("--max-routers", type=int, default=None, help="autoscaling ceiling for router replicas")
    upp.add_argument("--shards", type=int, default=2, help="expert-shard actors (0: experts inside the routers)")
    upp.add_argument("--nodes", type=int, default=2, help="simulated nodes of the embedded local Ray cluster")
    upp.add_argument("--address", default=None, help="deploy onto an existing Ray cluster instead")
    upp.add_argument("--host", default="127.0.0.1")
    upp.add_argument("--grpc-port", type=int, default=9000)
    upp.add_argument("--http-port", type=int, default=8000)
    upp.add_argument("--demo", default=None, metavar="PROMPT",
                     help="stream one answer to PROMPT over gRPC once serving, then shut down")
    upp.set_defaults(run=_up)

    params = sub.add_parser("params", help="total and active parameters of a config.json (meta device)")
    params.add_argument("config", type=Path)
    params.set_defaults(run=_params)

    plan = sub.add_parser("plan", help="routers, expert shards, memory per GPU, KV capacity and traffic on a fleet")
    plan.add_argument("--config", required=True, help="config.json (file or checkpoint directory), or 'behemoth'")
    plan.add_argument("--gpu", required=True, help="H100, H200, A100-80, A100-40, L40S, B200, MI300X, or GiB (e.g. 96)")
    plan.add_argument("--gpus-per-node", type=int, required=True)
    plan.add_argument("--nodes", type=int, default=None, help="nodes available (default: as many as the plan needs)")
    plan.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="weight dtype")
    plan.add_argument("--context", type=int, default=131072, help="tokens per sequence")
    plan.add_argument("--concurrency", type=int, default=32, help="sequences served at once")
    plan.add_argument("--routers", type=int, default=None, help="router replicas (default: enough for --concurrency)")
    plan.add_argument("--format", choices=("text", "json"), default="text")
    plan.add_argument("--emit-kustomize", type=Path, default=None, metavar="DIR",
                      help="also write a kustomize overlay of k8s/base sized by this plan into DIR")
    plan.set_defaults(run=_plan)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:  # our errors carry a message meant for a person
        print(f"moe-serve {args.command}: error: {e}", file=sys.stderr)
        return 2


def _make_checkpoint(args) -> int:
    from models.checkpoint_writer import make_checkpoint

    t0 = time.perf_counter()
    out = make_checkpoint(args.dir, preset=args.preset, seed=args.seed)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _generate(args) -> int:
    # Arguments are checked before torch is imported (seconds), so bad input fails fast.
    from models.config import load_config
    from models.tokenizer import Tokenizer

    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.endpoint:
        return _generate_remote(args)
    if args.shards < 0 or args.shards and args.nodes < 1:
        raise ValueError(f"--shards must be >= 0 and --nodes >= 1, got {args.shards} and {args.nodes}")
    checkpoint = args.checkpoint or _default_checkpoint()
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    cfg = load_config(checkpoint)
    tokenizer = Tokenizer.from_dir(checkpoint)
    if args.prompt_ids is not None:
        prompt_ids = _parse_ids(args.prompt_ids, cfg.vocab_size)
    else:
        prompt_ids = tokenizer.encode(args.prompt if args.prompt is not None else "Hello, world")
    limit = cfg.max_position_embeddings
    if len(prompt_ids) + args.max_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens ({args.max_tokens}) exceeds the "
                         f"model's context of {limit} tokens")

    import torch

    from models.generate import greedy_generate
    from models.loading import load_model, resident_weight_dtype

    def run(model) -> list[int]:
        return greedy_generate(model, torch.tensor([prompt_ids]), args.max_tokens, tokenizer.eos_token_ids)[0].tolist()

    new_ids = _with_shards(checkpoint, cfg, args.shards, args.nodes, run) if args.shards else run(load_model(
        checkpoint, weight_dtype=resident_weight_dtype(checkpoint, torch.float32)))
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"token_ids": new_ids, "text": text}))
    else:
        print(text)
    return 0


def _generate_remote(args) -> int:
    import grpc

    from cluster.grpc_client import stream_generate

    prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else (args.prompt or "Hello, world")
    try:
        stream_generate(args.endpoint, prompt, args.max_tokens, sys.stdout, as_json=args.json)
    except grpc.RpcError as e:  # the server's status and message, nothing more
        print(f"moe-serve generate: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def _up(args) -> int:
    from cluster.serve_up import up

    if args.routers < 1 or args.shards < 0 or args.nodes < 1:
        raise ValueError(f"need --routers >= 1, --shards >= 0, --nodes >= 1; got {args.routers}, {args.shards}, "
                         f"{args.nodes}")
    args.checkpoint = args.checkpoint or _default_checkpoint()
    return up(args)


def _with_shards(checkpoint: Path, cfg, num_shards: int, num_nodes: int, run):
    """Start a local Ray cluster of simulated nodes and an expert fleet, run ``run(model)``, tear all down."""
    import torch

    from cluster.fleet import FleetSpec, start_fleet, stop_fleet
    from cluster.local_cluster import start_local_cluster
    from models.loading import load_model
    from router.fleet_client import connect_experts

    num_expert_slots = cfg.num_local_experts * len(cfg.moe_layers)
    if num_shards > num_expert_slots:
        raise ValueError(f"--shards {num_shards} exceeds the {num_expert_slots} (layer, expert) pairs to place")
    print(f"starting a local Ray cluster of {num_nodes} simulated nodes and {num_shards} expert shards ...",
          file=sys.stderr)
    cluster = start_local_cluster(num_nodes)
    try:
        fleet = start_fleet(FleetSpec(checkpoint=str(checkpoint.resolve()), num_shards=num_shards,
                                      node_ids=tuple(cluster.node_ids), shard_cpus=0.05))
        experts = connect_experts(fleet, cfg.hidden_size, torch.float32)
        try:
            return run(load_model(checkpoint, experts=experts))
        finally:
            experts.close()
            stop_fleet(fleet)
    finally:
        cluster.shutdown()


def _params(args) -> int:
    from models.param_count import param_counts

    c = param_counts(args.config)
    print(f"total parameters:  {c.total / 1e9:8.2f} B  (text {c.text_total / 1e9:.2f} B, vision {c.vision / 1e9:.2f} B)")
    print(f"active per token:  {c.text_active / 1e9:8.2f} B  (text model; the vision tower runs only on images)")
    print(f"one routed expert: {c.expert / 1e6:8.1f} M")
    return 0


def _plan(args) -> int:
    from cluster.planner import PlanInput, load_raw_config, make_plan, render_text

    raw, name = load_raw_config(args.config)
    inputs = PlanInput(gpu=args.gpu, gpus_per_node=args.gpus_per_node, nodes=args.nodes, dtype=args.dtype,
                       context=args.context, concurrency=args.concurrency, routers=args.routers)
    plan = make_plan(raw, inputs, model_name=name)
    print(json.dumps(plan.to_dict(), indent=2) if args.format == "json" else render_text(plan))
    if args.emit_kustomize:
        from cluster.kustomize import write_overlay

        for path in write_overlay(plan, args.emit_kustomize):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if plan.feasible else 3  # 3: the plan is computed but the fleet is short (listed above)


def _parse_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if not ids or bad:
        raise ValueError(f"--prompt-ids needs at least one id, each in [0, {vocab_size}); bad: {bad}")
    return ids


def _default_checkpoint() -> Path:
    from models.checkpoint_writer import make_checkpoint

    if not (DEFAULT_CHECKPOINT / "config.json").exists():
        print(f"making the tiny default checkpoint at {DEFAULT_CHECKPOINT} ...", file=sys.stderr)
        make_checkpoint(DEFAULT_CHECKPOINT, preset="tiny", seed=0)
    return DEFAULT_CHECKPOINT


if __name__ == "__main__":
    sys.exit(main())
