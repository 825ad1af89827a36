"""CPU kernels, A vs B in one process, interleaved: for kernel changes worth a few percent.

This VM's memory bandwidth moves 10-20% between minutes, so two runs of ``bench/kernels.py`` cannot judge a
change of 5-10%. Here both sides run in turns in the same process on the same packed weights (A B, B A, ...),
``--turns`` times per workload; the result is the ratio of the medians and how many turns B won.

Two comparisons:
- ``--base COMMIT`` (default HEAD): A = that commit's ``models/csrc`` built into a temporary library with the
  same compiler flags, B = the working tree's library. Same weights, same memory.
- ``--pages``: A and B both the working tree's library; A's weights on 4 KiB pages (``MADV_NOHUGEPAGE``), B's on
  huge pages (``models/huge_pages.py``), same values.

Workloads (``--workloads``), weights of the ``small`` preset's shapes, too many to stay in cache:
- dense: every matrix product of a decode step (q|k|v, o_proj, the dense FFN's gate|up and down x 8 layers, the
  shared expert's x 4) at M rows;
- experts: the routed experts of 4 MoE layers (16 experts each, gate|up and down, ``grouped_packed_linear``), M
  rows routed uniformly at random (seeded);
- attention: ``paged_decode_attention`` for M sequences of ``--keys`` cached keys (12 query / 4 KV heads of 64,
  blocks shuffled over the cache); A and B must give the same output. GB/s counts the K and V bytes read.

    python bench/kernel_ab.py --base HEAD~1 --weights bf16 --rows 1,8,32
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import cpu_kernels, huge_pages  # noqa: E402

D, F_DENSE, F_EXPERT, E = 768, 2048, 1024, 16
DENSE = [(1280, D), (D, D), (2 * F_DENSE, D), (D, F_DENSE)] * 4 + [(1280, D), (D, D), (2 * F_EXPERT, D),
                                                                  (D, F_EXPERT)] * 4  # [N, K]


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.packed_linear.argtypes = [ptr, i64, i64, ptr, i32, i64, ptr, i32]
    lib.grouped_packed_linear.argtypes = [ptr, i64, ptr, i64, ptr, i32, i64, ptr, i32]
    lib.paged_decode_attention.argtypes = cpu_kernels.library().paged_decode_attention.argtypes
    return lib


def build_commit(commit: str, out_dir: Path) -> Path:
    srcs = []
    for src in cpu_kernels._SOURCES:
        rel = src.relative_to(ROOT).as_posix()
        text = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=ROOT, capture_output=True, check=True).stdout
        (out_dir / src.name).write_bytes(text)
        srcs.append(str(out_dir / src.name))
    so = out_dir / "base.so"
    subprocess.run(["cc", *cpu_kernels.CFLAGS, "-o", str(so), *srcs, "-lm"], check=True)
    return so


def on_small_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on memory advised away from huge pages (what ordinary allocations get)."""
    raw = huge_pages.new_mapping(t.numel() * t.element_size(), huge=False)
    return raw.view(t.dtype)[:t.numel()].view(t.shape).copy_(t)


def interleave(run_a, run_b, turns: int) -> tuple[float, float, int]:
    a, b = [], []
    for r in range(turns):
        if r % 2:
            a.append(run_a()), b.append(run_b())
        else:
            b.append(run_b()), a.append(run_a())
    return statistics.median(a), statistics.median(b), sum(y < x for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="A = this commit's kernels (default HEAD)")
    p.add_argument("--pages", action="store_true", help="A = weights on 4 KiB pages, B = on huge pages")
    p.add_argument("--weights", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rows", default="1,8,32", help="comma-separated M values")
    p.add_argument("--workloads", default="dense,experts", help="any of dense,experts,attention")
    p.add_argument("--keys", type=int, default=1024, help="attention: cached keys per sequence (M sequences)")
    p.add_argument("--turns", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if cpu_kernels.library() is None:
        sys.exit("the CPU kernels are not available here")
    wdtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    dense = [cpu_kernels.pack(torch.randn(n, k, generator=g).to(wdtype)) for n, k in DENSE]
    experts = [(cpu_kernels.pack(torch.randn(E, 2 * F_EXPERT, D, generator=g).to(wdtype)),
                cpu_kernels.pack(torch.randn(E, D, F_EXPERT, generator=g).to(wdtype))) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.pages:
            lib_a = lib_b = cpu_kernels.library()
            what = "A = weights on 4 KiB pages, B = the same weights on huge pages; the working tree's kernels"
            dense_a = [on_small_pages(w) for w in dense]
            experts_a = [(on_small_pages(a), on_small_pages(b)) for a, b in experts]
            huge = all(huge_pages.huge_page_bytes(w) > 0 for w in dense[:1])
            what += "" if huge else " (note: this kernel gave B no huge pages)"
        else:
            lib_a, lib_b = load(build_commit(args.base, Path(tmp))), cpu_kernels.library()
            what = f"A = the kernels of {args.base}, B = the working tree's; the same weights (huge pages)"
            dense_a, experts_a = dense, experts
        print("command:", " ".join([sys.executable, *sys.argv]))
        print(f"{what}; {args.weights} weights, {args.threads} threads, {args.turns} interleaved turns each")
        print()
        print("| workload | M | A ms | B ms | A GB/s | B GB/s | B GFLOP/s | speed-up B/A | turns B faster |")
        print("|---|---|---|---|---|---|---|---|---|")
        bf16 = int(wdtype == torch.bfloat16)
        for M in (int(m) for m in args.rows.split(",")):
            xs = {k: torch.randn(M, k, generator=g) for k in (D, F_DENSE, F_EXPERT)}
            if "dense" in args.workloads:
                ys = [torch.empty(M, n) for n, _ in DENSE]

                def dense_run(lib, ws):
                    def run():
                        t0 = time.perf_counter()
                        for (n, k), w, y in zip(DENSE, ws, ys):
                            lib.packed_linear(xs[k].data_ptr(), M, k, w.data_ptr(), bf16, n, y.data_ptr(),
                                              args.threads)
                        return time.perf_counter() - t0
                    return run

                ta, tb, wins = interleave(dense_run(lib_a, dense_a), dense_run(lib_b, dense), args.turns)
                nbytes = sum(w.numel() * w.element_size() for w in dense)
                flops = sum(2 * M * n * k for n, k in DENSE)
                print(f"| dense | {M} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {nbytes / ta / 1e9:.1f} | "
                      f"{nbytes / tb / 1e9:.1f} | {flops / tb / 1e9:.0f} | {ta / tb:.3f}x | {wins}/{args.turns} |",
                      flush=True)
            if "experts" in args.workloads:
                counts = torch.bincount(torch.randint(0, E, (M,), generator=g), minlength=E).tolist()
                offs = (ctypes.c_int64 * (E + 1))()
                for e, n in enumerate(counts):
                    offs[e + 1] = offs[e] + n
                h, y1, y2 = torch.randn(M, F_EXPERT, generator=g), torch.empty(M, 2 * F_EXPERT), torch.empty(M, D)

                def experts_run(lib, layers):
                    def run():
                        t0 = time.perf_counter()
                        for gu, dn in layers:
                            lib.grouped_packed_linear(xs[D].data_ptr(), D, offs, E, gu.data_ptr(), bf16, 2 * F_EXPERT,
                                                      y1.data_ptr(), args.threads)
                            lib.grouped_packed_linear(h.data_ptr(), F_EXPERT, offs, E, dn.data_ptr(), bf16, D,
                                                      y2.data_ptr(), args.threads)
                        return time.perf_counter() - t0
                    return run

                ta, tb, wins = interleave(experts_run(lib_a, experts_a), experts_run(lib_b, experts), args.turns)
                used = sum(c > 0 for c in counts)
                nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in experts) * used / E
                flops = 4 * 2 * M * 3 * D * F_EXPERT
                print(f"| experts ({used} of {E} hit) | {M} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | "
                      f"{nbytes / ta / 1e9:.1f} | {nbytes / tb / 1e9:.1f} | {flops / tb / 1e9:.0f} | {ta / tb:.3f}x | "
                      f"{wins}/{args.turns} |", flush=True)
            if "attention" in args.workloads:
                ta, tb, wins, nbytes, flops = attention_ab(lib_a, lib_b, M, args.keys, args.turns, args.threads, g)
                print(f"| attention ({args.keys} keys) | {M} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | "
                      f"{nbytes / ta / 1e9:.1f} | {nbytes / tb / 1e9:.1f} | {flops / tb / 1e9:.0f} | {ta / tb:.3f}x | "
                      f"{wins}/{args.turns} |", flush=True)


def attention_ab(lib_a, lib_b, S: int, L: int, turns: int, threads: int, g: torch.Generator):
    """Decode attention of S sequences over L cached keys each (the small preset's 12 query / 4 KV heads of 64,
    blocks of 16 shuffled over the cache), A vs B; the two must give the same output, bit for bit."""
    H, Hkv, Dh, bs = 12, 4, 64, 16
    width = -(-L // bs)
    k_cache, v_cache = torch.randn(2, S * width * bs, Hkv, Dh, generator=g)
    blocks = torch.randperm(S * width, generator=g).view(S, width).contiguous()
    first, length = torch.zeros(S, dtype=torch.long), torch.full((S,), L, dtype=torch.long)
    q = torch.randn(S, H * Dh, generator=g)
    scratch, per_thread, _ = cpu_kernels.attention_scratch(H, Dh, L)
    outs = {}

    def run(lib, side):
        out = outs.setdefault(side, torch.empty(S, H, Dh))

        def once():
            t0 = time.perf_counter()
            lib.paged_decode_attention(q.data_ptr(), q.stride(0), None, None, 0, k_cache.data_ptr(), v_cache.data_ptr(),
                                       blocks.data_ptr(), width, first.data_ptr(), length.data_ptr(), S, H, Hkv, Dh,
                                       bs, Dh ** -0.5, out.data_ptr(), scratch.data_ptr(), per_thread, threads)
            return time.perf_counter() - t0
        return once

    ta, tb, wins = interleave(run(lib_a, "a"), run(lib_b, "b"), turns)
    if not torch.equal(outs["a"], outs["b"]):
        raise SystemExit("attention: A and B give different outputs")
    return ta, tb, wins, 2 * S * L * Hkv * Dh * 4, 4 * S * L * H * Dh


if __name__ == "__main__":
    main()
