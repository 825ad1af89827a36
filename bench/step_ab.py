"""Engine decode-step time, this working tree vs another commit, interleaved: for changes worth a few percent.

This machine is a VM whose memory bandwidth moves by 10-20% from one minute to the next (BENCHMARKS.md), so two
benchmark runs minutes apart cannot tell a 5% change from the weather. Here both sides run in turns, each in a
fresh process, ``--rounds`` times: round r runs A then B (odd rounds B then A), every run the same workload
(B requests of ``--prompt-tokens`` seeded random tokens, prefilled, then ``--new-tokens`` greedy decode steps
timed one by one through ``router.engine.Engine``). Per run the median step; per side the median of its runs;
the ratio B/A of those (above 1: the working tree is faster), the median of the per-round ratios (robust to a
round that hiccups on one side) and how many rounds agree on the sign.

The other side is ``git worktree add`` of ``--base`` in a temporary folder (removed at the end), run with this
interpreter and its own kernel cache (so each side compiles its own C sources).

    python bench/step_ab.py --base HEAD~1 --checkpoint ~/.cache/moe-serve/small-llamacpp --weights float32
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the side's checkout (cwd); prints one JSON line: {batch: [step seconds...]}.
_CHILD = r"""
import json, sys, time, torch
from pathlib import Path
sys.path.insert(0, ".")
from models.loading import load_model, resident_weight_dtype
from models.tokenizer import Tokenizer
from router.engine import Engine, EngineConfig
from router.request import GenerationRequest
from router.sampling import SamplingParams
ckpt, batches, P, N, weights = Path(sys.argv[1]), [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
wd = resident_weight_dtype(ckpt, torch.float32) if weights == "auto" else torch.float32
model, tok = load_model(ckpt, weight_dtype=wd), Tokenizer.from_dir(ckpt)
out = {}
for B in batches:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, min(model.cfg.vocab_size, tok.vocab_size), (B, P), generator=gen).tolist()
    engine = Engine(model, tok, EngineConfig(kv_cache_bytes=256 << 20, block_size=16, max_num_seqs=max(64, B),
                                             max_tokens_per_step=max(512, B * P), max_waiting=max(256, B)))
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    for warm in range(2):
        for i, p in enumerate(prompts):
            engine.add_request(GenerationRequest(f"{warm}-{i}", tuple(p), params))
        engine.step()  # prefill
        steps = []
        while engine.has_work():
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
    out[B] = steps  # the second pass: warm
print(json.dumps(out))
"""


def _run(checkout: Path, kernel_cache: Path, args) -> dict[int, float]:
    env = {**os.environ, "MOE_SERVE_KERNEL_CACHE": str(kernel_cache)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(args.checkpoint), args.batches, str(args.prompt_tokens),
                           str(args.new_tokens), args.weights], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"run in {checkout} failed:\n{proc.stderr[-3000:]}")
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    return {int(b): statistics.median(s) for b, s in steps.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="the commit to compare the working tree with (default HEAD)")
    p.add_argument("--checkpoint", type=Path, default=Path("~/.cache/moe-serve/small").expanduser())
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--weights", choices=("auto", "float32"), default="auto")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    args.checkpoint = args.checkpoint.expanduser()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"A = {base_rev} (--base), B = the working tree ({'with' if dirty else 'no'} uncommitted changes); "
          f"checkpoint {args.checkpoint}, weights {args.weights}, batches {args.batches}, "
          f"{args.new_tokens} timed decode steps per run, {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="moe-serve-ab-") as tmp:
        base_dir = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_dir), base_rev], cwd=ROOT, check=True)
        try:
            sides = {"A": (base_dir, Path(tmp) / "kernels-a"), "B": (ROOT, Path(tmp) / "kernels-b")}
            medians: dict[str, list[dict[int, float]]] = {"A": [], "B": []}
            for r in range(args.rounds):
                for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    medians[side].append(_run(*sides[side], args))
                print(f"round {r + 1}: " + "  ".join(
                    f"B={b}: A {medians['A'][-1][b] * 1e3:.2f} ms, B {medians['B'][-1][b] * 1e3:.2f} ms"
                    for b in medians["A"][-1]))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=ROOT, check=False)
    print("\n| batch | A median step ms | B median step ms | speed-up B/A | median per-round B/A | rounds B faster |")
    print("|---|---|---|---|---|---|")
    for b in medians["A"][0]:
        a = statistics.median(m[b] for m in medians["A"])
        bb = statistics.median(m[b] for m in medians["B"])
        paired = statistics.median(ma[b] / mb[b] for ma, mb in zip(medians["A"], medians["B"]))
        wins = sum(mb[b] < ma[b] for ma, mb in zip(medians["A"], medians["B"]))
        print(f"| {b} | {a * 1e3:.2f} | {bb * 1e3:.2f} | {a / bb:.3f}x | {paired:.3f}x | {wins} of {args.rounds} |")


if __name__ == "__main__":
    main()
