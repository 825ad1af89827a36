"""CPU matrix products: torch's ``F.linear`` (the BLAS in the torch wheel) vs ``models.cpu_kernels`` on packed weights.

For each row count M (decode: a few rows; prefill: hundreds), the product of M fp32 rows with a set of weight
matrices of the ``small`` preset's shapes ([2048, 768] by default), too many to stay in cache (``--mats``), so the
weights stream from memory as in a real step. Three ways: torch with fp32 weights, the kernel with fp32 weights,
the kernel with bf16 weights (what a bf16 checkpoint is held as; widened to fp32 in registers). Prints time,
weight bytes streamed per second vs this machine's memcpy (bytes read + written per second, the STREAM "copy"
convention, as in bench/engine.py), GFLOP/s, and the kernel / torch speed ratio. Best of ``--repeats``, wall clock.

    python bench/kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.single_process import _time as best_time  # noqa: E402
from models import cpu_kernels  # noqa: E402


def memcpy_gbs(repeats: int) -> float:
    src = torch.randn(64 << 20)  # 256 MB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), repeats) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,4,8,16,32,64,256,1024", help="comma-separated M values")
    p.add_argument("--n", type=int, default=2048, help="output features N")
    p.add_argument("--k", type=int, default=768, help="input features K")
    p.add_argument("--mats", type=int, default=24, help="weight matrices per call (more than the caches hold)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        sys.exit("the CPU kernels are not available here (no AVX2/FMA, no C compiler, or MOE_SERVE_CPU_KERNELS=0)")
    N, K = args.n, args.k
    g = torch.Generator().manual_seed(0)
    W32 = [torch.randn(N, K, generator=g) for _ in range(args.mats)]
    P32 = [cpu_kernels.pack(w) for w in W32]
    P16 = [cpu_kernels.pack(w.bfloat16()) for w in W32]
    bw = memcpy_gbs(args.repeats)
    print(f"# {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} ({args.threads} threads), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# {args.mats} weight matrices [{N}, {K}] per call ({args.mats * N * K * 4 / 1e6:.0f} MB fp32); "
          f"memcpy {bw:.1f} GB/s (read + written)")
    print("| M | torch fp32 ms | kernel fp32 ms | kernel bf16 ms | torch GB/s (% memcpy) | kernel fp32 GB/s (%) "
          "| kernel bf16 GB/s (%) | torch GFLOP/s | kernel fp32 GFLOP/s | kernel bf16 GFLOP/s | fp32 ratio | bf16 ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for M in (int(m) for m in args.rows.split(",")):
        x = torch.randn(M, K, generator=g)
        t_torch = best_time(lambda: [F.linear(x, w) for w in W32], args.repeats)
        t32 = best_time(lambda: [cpu_kernels.packed_linear(x, p, N) for p in P32], args.repeats)
        t16 = best_time(lambda: [cpu_kernels.packed_linear(x, p, N) for p in P16], args.repeats)
        for a, b in ((F.linear(x, W32[0]), cpu_kernels.packed_linear(x, P32[0], N)),):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)
        nbytes32, flops = args.mats * N * K * 4, args.mats * 2.0 * M * N * K
        gbs = [nbytes32 / t_torch / 1e9, nbytes32 / t32 / 1e9, nbytes32 / 2 / t16 / 1e9]
        print(f"| {M} | {t_torch * 1e3:.2f} | {t32 * 1e3:.2f} | {t16 * 1e3:.2f} | "
              + " | ".join(f"{v:.1f} ({100 * v / bw:.0f}%)" for v in gbs) + " | "
              + " | ".join(f"{flops / t / 1e9:.1f}" for t in (t_torch, t32, t16))
              + f" | {t_torch / t32:.2f}x | {t_torch / t16:.2f}x |")


if __name__ == "__main__":
    main()
