"""Single-process decode speed at batch 1: our plain-torch model vs transformers' Llama 4, same checkpoint.

A first figure only (the engine issue is where speed is won). Both sides: fp32 weights, greedy, KV cache on,
the same prompt, the same number of new tokens, one process, ``torch.set_num_threads`` as given.

    python bench/single_process.py --checkpoint ~/.cache/moe-serve/small --new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.generate import greedy_generate  # noqa: E402
from models.loading import load_model  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="e.g. one made by `moe-serve make-checkpoint DIR --preset small`")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    ours = load_model(args.checkpoint)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                                 attn_implementation="sdpa").eval()
    cfg = ours.cfg
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    hf.generation_config.eos_token_id = None  # neither side stops early: both generate exactly --new-tokens
    gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=None,
                                            pad_token_id=cfg.pad_token_id, use_cache=True)

    def run_ours():
        return greedy_generate(ours, prompt, args.new_tokens)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg)

    same = torch.equal(run_ours()[0], run_hf()[0, args.prompt_tokens:])
    t_ours, t_hf = _time(run_ours, args.repeats), _time(run_hf, args.repeats)
    params = sum(p.numel() for p in ours.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}, transformers {transformers.__version__}")
    print(f"checkpoint: {args.checkpoint} ({params / 1e6:.0f}M params, {cfg.num_local_experts} experts, "
          f"MoE layers {list(cfg.moe_layers)}), fp32, batch 1, prompt {args.prompt_tokens}, new {args.new_tokens}")
    print(f"greedy outputs identical: {same}")
    print(f"ours:         {args.new_tokens / t_ours:8.1f} tok/s  (prefill+decode {t_ours:.3f} s, best of {args.repeats})")
    print(f"transformers: {args.new_tokens / t_hf:8.1f} tok/s  (prefill+decode {t_hf:.3f} s)")
    print(f"ratio ours/transformers: {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
