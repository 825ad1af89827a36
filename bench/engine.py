"""Engine throughput (continuous batching, paged KV) vs transformers' Llama 4, same checkpoint, same prompts.

One run, four parts, all on the same checkpoint and the same seeded random prompts, arithmetic in fp32 on both
sides. transformers holds the weights in fp32; ours are held as the server holds them (``--weights auto``: a bf16
checkpoint keeps bf16 matrices, widened exactly in the CPU kernels, so the results equal fp32-held weights;
``--weights float32`` holds them in fp32 like transformers):

1. For each batch size B: prefill and decode tokens/s of ``router.engine.Engine`` (B greedy requests of
   ``--prompt-tokens`` P tokens and ``--new-tokens`` N new tokens, ignore_eos, stepped until done) and of
   transformers (``AutoModelForImageTextToText``, sdpa): prefill = one forward over [B, P] with the KV cache
   on and logits of the last position only (what ``generate`` runs first); decode = ``generate`` of B x N
   greedy minus that prefill time. Ours: prefill = the steps until every request has its first token (all
   B*P prompt tokens fit one step), decode = the rest. Decode tokens = (N-1)*B. Best of ``--repeats`` after a
   warm-up, each side. The greedy tokens of every request are compared between the two ("identical").
2. The decode ratio split into an algorithmic factor (transformers' Llama 4 MoE runs every routed expert on
   every token; FLOPs per token from the config: attention projections, dense FFNs, router, shared experts,
   routed experts (top-k vs all E), LM head; attention scores ignored) and the rest = ratio / factor.
3. The routed-expert FFN alone in the decode regime: B rows routed top-1 uniformly at random over the E experts
   of one MoE layer of the loaded model, ``grouped_swiglu`` timed (``route_layout``/``gather_scaled_rows``
   outside the timing); the last-level cache is flushed before every timed call, as in real decode where the
   other layers' weights pass through the cache between two visits of a layer. Bytes = distinct experts
   touched x 3*D*F x bytes per weight as held; compared with this machine's memcpy bandwidth (``dst.copy_(src)`` of 256 MB fp32,
   counted as bytes read + bytes written, the STREAM "copy" convention).
4. KV memory of one 32k-token sequence with a 1k attention chunk (block size 16) with the chunk bound vs a
   full cache, from ``router.kv_blocks.cache_bytes``.

    python bench/engine.py --checkpoint ~/.cache/moe-serve/small
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.expert_math import grouped_swiglu  # noqa: E402
from models import cpu_kernels  # noqa: E402
from models.loading import load_model, resident_weight_dtype  # noqa: E402
from models.param_count import text_param_counts  # noqa: E402
from models.seam import gather_scaled_rows, route_layout  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from router.engine import Engine, EngineConfig  # noqa: E402
from router.kv_blocks import block_bytes, cache_bytes  # noqa: E402
from router.request import GenerationRequest  # noqa: E402
from router.sampling import SamplingParams  # noqa: E402

BLOCK_SIZE = 16


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(cfg, routed_experts_per_token: int) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one token through one forward, by part; attention scores left out."""
    D, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.num_hidden_layers - n_moe
    expert = 3 * D * cfg.intermediate_size
    return {
        "attention projections": 2.0 * cfg.num_hidden_layers * D * (q + 2 * kv + q),
        "dense FFN": 2.0 * n_dense * 3 * D * cfg.intermediate_size_mlp,
        "router": 2.0 * n_moe * D * cfg.num_local_experts,
        "shared experts": 2.0 * n_moe * expert,
        "routed experts": 2.0 * n_moe * routed_experts_per_token * expert,
        "LM head": 2.0 * D * cfg.vocab_size,
    }


# ----------------------------------------------------------------------------- our engine


def engine_config(B: int, P: int, N: int, cfg) -> EngineConfig:
    per_seq_blocks = math.ceil((P + N) / BLOCK_SIZE) + 1
    kv = 2 * B * per_seq_blocks * cfg.num_hidden_layers * block_bytes(BLOCK_SIZE, cfg.num_key_value_heads,
                                                                      cfg.head_dim, 4)
    return EngineConfig(kv_cache_bytes=max(kv, 64 << 20), block_size=BLOCK_SIZE, max_num_seqs=max(64, B),
                        max_tokens_per_step=max(512, B * P), max_waiting=max(256, B))


def run_ours(engine: Engine, prompts: torch.Tensor, N: int, tag: str) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds, decode seconds, tokens per request) for one batch through the engine."""
    B = prompts.shape[0]
    ids = [f"{tag}-{i}" for i in range(B)]
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    for rid, p in zip(ids, prompts.tolist()):
        engine.add_request(GenerationRequest(rid, tuple(p), params))
    out = {rid: [] for rid in ids}
    finished, t_first = 0, None
    t0 = time.perf_counter()
    while engine.has_work():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
            finished += o.finished
        if t_first is None and all(out[rid] for rid in ids):
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    if finished != B or t_first is None:
        raise RuntimeError(f"engine finished {finished} of {B} requests")
    return t_first - t0, t_end - t_first, [out[rid] for rid in ids]


def random_prompts(cfg, tokenizer: Tokenizer, B: int, P: int, seed: int = 0) -> torch.Tensor:
    """[B, P] seeded random token ids; the first rows do not depend on B (bench/llama_cpp.py uses the same)."""
    gen = torch.Generator().manual_seed(seed)
    lo = 3  # skip the lowest ids (specials in small vocabularies); stay below vocab
    return torch.randint(lo, min(cfg.vocab_size, tokenizer.vocab_size), (B, P), generator=gen)


def measure_ours(model, tokenizer: Tokenizer, prompts: torch.Tensor, N: int, repeats: int
                 ) -> tuple[float, float, list[list[int]]]:
    """(prefill tokens/s, decode tokens/s, greedy tokens per request) of one batch: a fresh engine, a warm-up,
    best of ``repeats``. Prefill tokens = B*P, decode tokens = (N-1)*B."""
    B, P = prompts.shape
    engine = Engine(model, tokenizer, engine_config(B, P, N, model.cfg))
    run_ours(engine, prompts[:, :min(P, 8)], 2, f"warm{B}")
    pf, dc, tokens = float("inf"), float("inf"), None
    for r in range(repeats):
        t_p, t_d, toks = run_ours(engine, prompts, N, f"b{B}r{r}")
        pf, dc = min(pf, t_p), min(dc, t_d)
        if tokens is None:
            tokens = toks
        elif toks != tokens:
            print(f"  note: B={B} engine repeat {r} gave different tokens than repeat 0")
    return B * P / pf, (N - 1) * B / dc, tokens


# ----------------------------------------------------------------------------- transformers


def hf_prefill(hf, prompts: torch.Tensor) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(input_ids=prompts, attention_mask=torch.ones_like(prompts), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


def hf_generate(hf, prompts: torch.Tensor, gen_cfg) -> tuple[float, list[list[int]]]:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=gen_cfg)
        dt = time.perf_counter() - t0
    return dt, out[:, prompts.shape[1]:].tolist()


# ----------------------------------------------------------------------------- expert FFN, memcpy


def memcpy_gbps(repeats: int = 7) -> tuple[float, float]:
    """(GB/s counting read + write, best seconds) of dst.copy_(src) on 256 MB fp32."""
    n = (256 << 20) // 4
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9, best


def expert_ffn(model, layer: int, B: int, iters: int, flush: torch.Tensor) -> dict:
    cfg = model.cfg
    E, D, F = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(1000 + B)
    x_TD = torch.randn(B, D, generator=g)
    ids_TK = torch.randint(0, E, (B, 1), generator=g)
    scores_TK = torch.sigmoid(torch.randn(B, 1, generator=g))
    gate_up, down = model.experts.gate_up_EDF2[str(layer)], model.experts.down_EFD[str(layer)]
    with torch.inference_mode():
        layout = route_layout(ids_TK, E)
        rows_SD = gather_scaled_rows(x_TD, scores_TK, layout)
        grouped_swiglu(rows_SD, layout.counts_E, gate_up, down)  # warm-up
        best = float("inf")
        for _ in range(iters):
            flush.add_(1.0)  # evict the experts from the last-level cache (decode visits a layer cold)
            t0 = time.perf_counter()
            grouped_swiglu(rows_SD, layout.counts_E, gate_up, down)
            best = min(best, time.perf_counter() - t0)
    distinct = sum(1 for c in layout.counts_E if c)
    nbytes = distinct * 3 * D * F * gate_up.element_size()
    return {"B": B, "distinct": distinct, "bytes": nbytes, "seconds": best, "gbps": nbytes / best / 1e9}


# ----------------------------------------------------------------------------- main


def _fmt(x: float) -> str:
    return f"{x:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("~/.cache/moe-serve/small").expanduser(),
                   help="checkpoint dir (default ~/.cache/moe-serve/small; make it with "
                        "`moe-serve make-checkpoint DIR --preset small`)")
    p.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes (default 1,8,32,64)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per request, >= 2")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the best is kept")
    p.add_argument("--skip-transformers", action="store_true", help="only our engine (no ratios, no check)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--weights", choices=("auto", "float32"), default="auto",
                   help="how our side holds the matrices: as the server does (auto) or inflated to fp32")
    p.add_argument("--expert-iters", type=int, default=10, help="timed calls per batch in the expert FFN part")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    P, N = args.prompt_tokens, args.new_tokens
    if N < 2 or P < 1 or not batches or min(batches) < 1 or args.repeats < 1:
        p.error("need --new-tokens >= 2, --prompt-tokens >= 1, batch sizes >= 1, --repeats >= 1")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()

    print("command:", shlex.join([sys.executable, *sys.argv]))
    weight_dtype = (resident_weight_dtype(args.checkpoint, torch.float32) if args.weights == "auto"
                    else torch.float32)
    model = load_model(args.checkpoint, weight_dtype=weight_dtype)  # fp32 arithmetic
    tokenizer = Tokenizer.from_dir(args.checkpoint)
    cfg = model.cfg
    tf_version = "not loaded"
    if not args.skip_transformers:
        import transformers

        tf_version = transformers.__version__
    n_params = text_param_counts(model.cfg)[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, transformers {tf_version}")
    print(f"checkpoint: {args.checkpoint} ({n_params / 1e6:.0f}M params, {cfg.num_local_experts} experts "
          f"top-{cfg.num_experts_per_tok}, MoE layers {list(cfg.moe_layers)}, hidden {cfg.hidden_size}, "
          f"expert ffn {cfg.intermediate_size}); fp32 arithmetic, our matrices held in "
          f"{str(weight_dtype).removeprefix('torch.')}, transformers' in fp32; CPU kernels "
          f"{'on' if cpu_kernels.library() else 'off'}")
    print(f"workload: batches {batches}, prompt {P} random tokens (seeded), {N} greedy new tokens, ignore_eos; "
          f"best of {args.repeats} after a warm-up (other processes may share the machine; 1-min load average "
          f"at start {os.getloadavg()[0]:.2f})")

    hf = gen_cfg = None
    if not args.skip_transformers:
        hf = transformers.AutoModelForImageTextToText.from_pretrained(
            args.checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
        hf.generation_config.eos_token_id = None  # both sides generate exactly N tokens
        gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=N, eos_token_id=None,
                                                pad_token_id=cfg.pad_token_id, use_cache=True)

    # ---- 1. throughput per batch size
    all_prompts = random_prompts(cfg, tokenizer, max(batches), P)
    rows = []
    all_identical = True
    for B in batches:
        prompts = all_prompts[:B].contiguous()
        ours_prefill, ours_decode, ours_tokens = measure_ours(model, tokenizer, prompts, N, args.repeats)
        row = {"B": B, "ours_prefill": ours_prefill, "ours_decode": ours_decode}
        if hf is not None:
            hf_prefill(hf, prompts[:, :min(P, 8)])  # warm-up
            hp = min(hf_prefill(hf, prompts) for _ in range(args.repeats))
            hg, hf_tokens = float("inf"), None
            for _ in range(args.repeats):
                t, toks = hf_generate(hf, prompts, gen_cfg)
                hg, hf_tokens = min(hg, t), hf_tokens or toks
            same = [a == b for a, b in zip(ours_tokens, hf_tokens)]
            row.update(hf_prefill=B * P / hp, hf_decode=(N - 1) * B / max(hg - hp, 1e-9), identical=all(same),
                       n_same=sum(same))
            all_identical &= all(same)
            if not all(same):
                first_bad = same.index(False)
                a, b = ours_tokens[first_bad], hf_tokens[first_bad]
                pos = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                print(f"  MISMATCH B={B}: {B - sum(same)} of {B} requests differ; request {first_bad} first "
                      f"differs at new token {pos}: ours {a[pos]} vs transformers {b[pos]}")
        rows.append(row)
        print(f"  B={B:3d} done ({time.perf_counter() - t_start:.0f} s elapsed, load average "
              f"{os.getloadavg()[0]:.2f})", flush=True)

    print()
    print("### Throughput (tokens/s; prefill = B*P prompt tokens, decode = (N-1)*B tokens)")
    print()
    if hf is not None:
        print("| B | prefill ours | prefill transformers | ratio | decode ours | decode transformers | ratio "
              "| identical |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['B']} | {_fmt(r['ours_prefill'])} | {_fmt(r['hf_prefill'])} | "
                  f"{r['ours_prefill'] / r['hf_prefill']:.2f}x | {_fmt(r['ours_decode'])} | {_fmt(r['hf_decode'])} "
                  f"| {r['ours_decode'] / r['hf_decode']:.2f}x | {r['identical']} ({r['n_same']}/{r['B']}) |")
        print()
        print(f"identical: {all_identical}")
    else:
        print("| B | prefill ours | decode ours |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['B']} | {_fmt(r['ours_prefill'])} | {_fmt(r['ours_decode'])} |")

    # ---- 2. algorithmic factor
    ours_f = flops_per_token(cfg, cfg.num_experts_per_tok)
    hf_f = flops_per_token(cfg, cfg.num_local_experts)
    factor = sum(hf_f.values()) / sum(ours_f.values())
    print()
    print("### FLOPs per token of one forward (attention scores ignored)")
    print()
    print("| part | ours (top-%d) | transformers (all %d experts) |" % (cfg.num_experts_per_tok, cfg.num_local_experts))
    print("|---|---|---|")
    for k in ours_f:
        print(f"| {k} | {ours_f[k] / 1e6:.1f} M | {hf_f[k] / 1e6:.1f} M |")
    print(f"| total | {sum(ours_f.values()) / 1e6:.1f} M | {sum(hf_f.values()) / 1e6:.1f} M |")
    print()
    print(f"algorithmic factor (FLOPs transformers / FLOPs ours): {factor:.2f}x")
    if hf is not None:
        print()
        print("| B | decode ratio | algorithmic factor | the rest (ratio / factor) |")
        print("|---|---|---|---|")
        for r in rows:
            ratio = r["ours_decode"] / r["hf_decode"]
            print(f"| {r['B']} | {ratio:.2f}x | {factor:.2f}x | {ratio / factor:.2f}x |")

    # ---- 3. expert FFN vs memcpy
    mc_gbps, mc_t = memcpy_gbps()
    flush = torch.zeros((64 << 20) // 4)  # 64 MB > the last-level cache of the usual CPU
    layer = cfg.moe_layers[0]
    print()
    print(f"### Routed-expert FFN alone, decode regime (layer {layer}, top-1 uniform random routing, "
          f"cache flushed before each call, best of {args.expert_iters})")
    print()
    print(f"memcpy: {mc_gbps:.1f} GB/s (dst.copy_(src), 256 MB fp32, (read + written bytes) / time, "
          f"best {mc_t * 1e3:.1f} ms of 7)")
    print()
    print("| B rows | distinct experts | expert bytes read | time | achieved GB/s | % of memcpy |")
    print("|---|---|---|---|---|---|")
    for B in batches:
        r = expert_ffn(model, layer, B, args.expert_iters, flush)
        print(f"| {B} | {r['distinct']} | {r['bytes'] / 1e6:.1f} MB | {r['seconds'] * 1e3:.2f} ms | "
              f"{r['gbps']:.1f} | {100 * r['gbps'] / mc_gbps:.0f}% |")

    # ---- 4. KV memory
    n_chunked = sum(1 for i in range(cfg.num_hidden_layers) if cfg.uses_rope(i))
    n_global = cfg.num_hidden_layers - n_chunked
    print()
    print(f"### KV cache of one 32k-token sequence (block size {BLOCK_SIZE}; {n_global} global + "
          f"{n_chunked} chunked layers, {cfg.num_key_value_heads} KV heads x {cfg.head_dim})")
    print()
    print("| dtype | chunk | with chunk bound | full cache | saved |")
    print("|---|---|---|---|---|")
    for dtype_bytes, name in ((4, "fp32"), (2, "bf16")):
        for chunk in (1024, cfg.attention_chunk_size):
            if chunk is None:
                continue
            bounded, full = cache_bytes(32768, BLOCK_SIZE, n_global, n_chunked, chunk, cfg.num_key_value_heads,
                                        cfg.head_dim, dtype_bytes)
            note = " (brief)" if chunk == 1024 else " (config)"
            print(f"| {name} | {chunk}{note} | {bounded / 2**20:.1f} MiB | {full / 2**20:.1f} MiB | "
                  f"{(full - bounded) / 2**20:.1f} MiB ({100 * (full - bounded) / full:.0f}%) |")
    print()
    print(f"total time: {time.perf_counter() - t_start:.0f} s (1-min load average at the end "
          f"{os.getloadavg()[0]:.2f}; on {os.cpu_count()} cores, above ~{torch.get_num_threads()} means contention)")


if __name__ == "__main__":
    main()
