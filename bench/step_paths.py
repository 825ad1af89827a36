"""Engine decode steps on three forward paths, in one process, interleaved: what driving the step from C buys.

The paths, all on the same model, engine and requests (their results are identical, bit for bit: tests):
- ``layers``: ``Llama4TextModel.forward_flat`` layer by layer (each layer's parts are one-call kernels, with
  Python between them);
- ``seam``: ``models/kernel_step.py`` with the seam not handing its experts over (as a remote seam would not): one
  kernel call per stretch of layers, and each MoE layer's experts through ``dispatch`` / ``combine``;
- ``stack``: the same with the experts held here: the whole step in one kernel call.

B requests of ``--prompt-tokens`` seeded random tokens are prefilled; then decode steps run in segments of
``--segment`` steps, the paths in turn (rotated each round), ``--rounds`` rounds. Per path the median step; the
ratio of each path to ``stack`` and how many rounds ``stack`` won. One process and one engine, so the VM's
bandwidth weather falls on every path alike.

    python bench/step_paths.py --checkpoint ~/.cache/moe-serve/small-llamacpp --batches 1,32
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.kernel_step import KernelStep  # noqa: E402
from models.loading import load_model, resident_weight_dtype  # noqa: E402
from models.seam import LocalExperts  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from router.engine import Engine, EngineConfig  # noqa: E402
from router.request import GenerationRequest  # noqa: E402
from router.sampling import SamplingParams  # noqa: E402

PATHS = ("layers", "seam", "stack")


def _paths(model) -> dict[str, KernelStep | None]:
    stack = model.kernel_step
    if stack is None:
        raise SystemExit("the CPU kernels do not apply to this model here (no AVX2, no compiler, or not fp32)")
    held = LocalExperts.packed_layer
    LocalExperts.packed_layer = lambda self, layer_idx: None  # what a remote seam says
    try:
        seam = KernelStep(model)
    finally:
        LocalExperts.packed_layer = held
    return {"layers": None, "seam": seam, "stack": stack}


def measure(model, tokenizer, B: int, args) -> dict[str, list[float]]:
    """Per path, the median step (seconds) of each round."""
    paths = _paths(model)
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_bytes=512 << 20, block_size=16, max_num_seqs=max(64, B),
                                                   max_tokens_per_step=max(512, B * args.prompt_tokens)))
    steps = len(PATHS) * args.segment * args.rounds + 4
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    vocab = min(model.cfg.vocab_size, tokenizer.vocab_size)
    for i, p in enumerate(torch.randint(3, vocab, (B, args.prompt_tokens), generator=gen).tolist()):
        engine.add_request(GenerationRequest(f"r{i}", tuple(p), params))
    engine.step()  # prefill
    for _ in range(4):
        engine.step()  # warm
    medians: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(args.rounds):
        for name in PATHS[r % 3:] + PATHS[:r % 3]:
            model.kernel_step = paths[name]
            times = []
            for _ in range(args.segment):
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            medians[name].append(statistics.median(times))
    model.kernel_step = paths["stack"]
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("~/.cache/moe-serve/small-llamacpp"))
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--segment", type=int, default=8, help="decode steps per path per round")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--weights", choices=("auto", "float32"), default="float32")
    args = p.parse_args()
    ckpt = args.checkpoint.expanduser()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    wd = resident_weight_dtype(ckpt, torch.float32) if args.weights == "auto" else torch.float32
    model, tokenizer = load_model(ckpt, weight_dtype=wd), Tokenizer.from_dir(ckpt)
    print(f"checkpoint {ckpt}, weights {wd}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds of {args.segment} decode steps per path after a {args.prompt_tokens}-token prefill")
    print("\n| batch | layers ms | seam ms | stack ms | layers/stack | seam/stack | rounds stack beat layers | "
          "rounds stack beat seam |")
    print("|---|---|---|---|---|---|---|---|")
    for B in (int(b) for b in args.batches.split(",")):
        m = measure(model, tokenizer, B, args)
        med = {name: statistics.median(v) for name, v in m.items()}
        wins = {name: sum(s < o for s, o in zip(m["stack"], m[name])) for name in ("layers", "seam")}
        print(f"| {B} | {med['layers'] * 1e3:.2f} | {med['seam'] * 1e3:.2f} | {med['stack'] * 1e3:.2f} | "
              f"{med['layers'] / med['stack']:.3f}x | {med['seam'] / med['stack']:.3f}x | "
              f"{wins['layers']} of {args.rounds} | {wins['seam']} of {args.rounds} |")


if __name__ == "__main__":
    main()
