"""Expert parallelism on a local Ray cluster of simulated nodes vs the same model with local experts.

One run, four parts, same checkpoint, fp32, the same seeded random prompts on both sides:

1. Decode step time. For each shard count N (``--shards``) a fleet of N expert-shard actors spread round robin
   over ``--nodes`` simulated nodes (each a real raylet); the router model (this process) uses the distributed
   seam (``connect_experts``). For each batch B (``--batches``): prefill B prompts of ``--prompt-tokens`` tokens
   into the simple cache (``model.new_cache(B)``; ``model(prompt_BT, cache)``), one untimed decode step, then
   ``--steps`` timed greedy decode steps ``model(next_B1, cache)``. The local-experts model
   (``load_model(ckpt)``) is timed the same way, on the same prompts, right before, with the same fleet up and
   idle (same background load). Both sides produce the same tokens, so the routing is the same. This is repeated
   ``--rounds`` times; best and median over all timed steps. Ratio = distributed / local.
   Contention: the router process (``--threads`` torch threads) and the N shard processes share this machine's
   cores (2 on the dev sandbox, also shared with other work). To show how much of the gap is CPU and not the
   exchange, the local model is also timed before Ray starts with ``torch.set_num_threads(1)`` and with
   ``--threads`` threads: its per-layer expert time at 1 thread is what a single-threaded shard spends on the
   same rows (summed over shards). With the fleet up, both sides are also timed with the router at
   ``--probe-threads`` torch threads (default 1), which leaves the shards (1 torch thread each, as Ray sets
   for fractional-CPU actors) a core instead of competing with the router's OpenMP threads.
2. Time per MoE layer in the seam: a wrapper with the seam's two methods (delegating) times ``dispatch`` and
   ``combine`` (= waiting for every shard: the remote expert compute plus the exchange, minus what overlaps
   the shared expert) during the timed decode steps; ms per MoE layer, vs the same for ``LocalExperts``
   (where ``dispatch`` runs the experts).
3. Exchange bandwidth, both payload paths: a helper process (multiprocessing spawn) joins a ``cluster.comm``
   gloo group as rank 1 and echoes; for each payload S (fp32) the round trip is timed (best of
   ``--echo-repeats`` after warm-ups). Group path (between hosts): send S, the echo receives it and sends it
   back. Shm path (same host, ``cluster.shm``): the driver copies S into the pair's shared buffer and sends
   the header, the echo sends the ack, answering with the rows in place (as the group echo sends back what it
   received; a shard computes from views of the buffer), the driver copies S out: put S, get S back, as the
   router's gather into and scatter out of the buffer do per layer. "shm+out": the echo first copies the rows
   to the buffer's output region (an extra copy; our shard does not make it: its expert kernel writes the
   outputs into the buffer directly, ``grouped_swiglu(out_SD=...)``). Also: the shm handshake
   alone (0 rows) and one plain copy of S into the buffer.
   Bandwidth = 2*S / rtt (the bytes carried, both legs in series over one round trip). Memcpy: best of
   ``dst.copy_(src)`` of 256 MB fp32 with the default torch threads, counted as bytes copied once / time
   (half the STREAM "copy" convention of read + write that bench/engine.py uses). Exchange / memcpy in %.
4. Ray calls on the hot path: ``ray.actor.ActorMethod._remote`` and ``RemoteFunction._remote`` are counted
   during every distributed run (prefill, warm-up and timed decode steps); must be 0.

    python bench/expert_parallel.py --checkpoint ~/.cache/moe-serve/small
    python bench/expert_parallel.py --checkpoint ~/.cache/moe-serve/small --exchange-only   # part 3 only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.comm import Rendezvous, join, new_rendezvous  # noqa: E402
from cluster.shm import PayloadBuffer, buffer_path, capacity_for, new_prefix, unlink  # noqa: E402
from expert_workers.wire import OP_EXPERTS_SHM, ack, empty_ack, empty_header, header  # noqa: E402
from models.config import load_config  # noqa: E402
from models.loading import load_model, resident_weight_dtype  # noqa: E402
from models.param_count import text_param_counts  # noqa: E402
from models.seam import DispatchHandle, ExpertSeam  # noqa: E402

LOOPBACK = "127.0.0.1"


# ----------------------------------------------------------------------------- seam timing


class TimedSeam(ExpertSeam):
    """Delegates to ``inner`` (swappable), adding up the time spent in dispatch and in combine."""

    def __init__(self, inner: ExpertSeam | None = None):
        self.inner = inner
        self.dispatch_s = self.combine_s = 0.0
        self.layers = 0

    def dispatch(self, layer_idx, x_TD, expert_ids_TK, scores_TK) -> DispatchHandle:
        t0 = time.perf_counter()
        handle = self.inner.dispatch(layer_idx, x_TD, expert_ids_TK, scores_TK)
        self.dispatch_s += time.perf_counter() - t0
        return handle

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner.combine(handle)
        self.combine_s += time.perf_counter() - t0
        self.layers += 1
        return out

    def snapshot(self) -> tuple[float, float, int]:
        return self.dispatch_s, self.combine_s, self.layers


def wrap_local_seam(model) -> TimedSeam:
    """Put a TimedSeam between the local model's MoE layers and its LocalExperts."""
    timed = TimedSeam(model.experts)
    for layer in model.layers:
        if layer.is_moe:
            layer.feed_forward.__dict__["experts"] = timed
    return timed


# ----------------------------------------------------------------------------- decode timing


def prompts(cfg, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_steps(model, seam: TimedSeam, prompt_BT: torch.Tensor, steps: int) -> list[tuple[float, float, float]]:
    """Per timed step: (step s, dispatch s, combine s) summed over the step's MoE layers."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(prompt_BT.shape[0])
        nxt = model(prompt_BT, cache)[:, -1].argmax(-1, keepdim=True)
        nxt = model(nxt, cache)[:, -1].argmax(-1, keepdim=True)  # warm-up step
        for _ in range(steps):
            d0, c0, _ = seam.snapshot()
            t0 = time.perf_counter()
            nxt = model(nxt, cache)[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t0
            d1, c1, _ = seam.snapshot()
            out.append((dt, d1 - d0, c1 - c0))
    return out


@contextmanager
def counting_ray_calls(counter: list):
    """Count Ray actor-method and remote-function submissions made in the block."""
    import ray.actor
    import ray.remote_function

    originals = (ray.actor.ActorMethod._remote, ray.remote_function.RemoteFunction._remote)

    def wrap(original):
        def counted(*a, **k):
            counter[0] += 1
            return original(*a, **k)
        return counted

    ray.actor.ActorMethod._remote = wrap(originals[0])
    ray.remote_function.RemoteFunction._remote = wrap(originals[1])
    try:
        yield
    finally:
        ray.actor.ActorMethod._remote, ray.remote_function.RemoteFunction._remote = originals


class Stats:
    def __init__(self, rows: list[tuple[float, float, float]], moe_layers: int):
        self.step = [r[0] for r in rows]
        self.layer = [(r[1] + r[2]) / moe_layers for r in rows]
        self.disp = [r[1] / moe_layers for r in rows]
        self.comb = [r[2] / moe_layers for r in rows]

    @staticmethod
    def ms(xs, how):
        return 1e3 * (min(xs) if how == "best" else statistics.median(xs))


# ----------------------------------------------------------------------------- exchange bandwidth


ECHO_ROW = 256  # fp32 values per row of the shm echo (1 KB rows)


def _echo(rdv: dict, sizes: list[int], rounds: int) -> None:
    """Rank 1 of the exchange benchmark: echo each payload back over the group, or through the pair's buffer."""
    torch.set_num_threads(1)
    group = join(Rendezvous.from_dict(rdv), 1, LOOPBACK)
    try:
        if group.shares_memory_with(0):
            header_4, buffer = empty_header(), None
            for _ in range(len(sizes) * rounds):
                group.recv(header_4, 0).wait()
                _, write_outputs, n, capacity = header_4.tolist()
                if buffer is None:
                    buffer = PayloadBuffer.open(buffer_path(rdv["shm_prefix"], 1, capacity), capacity, ECHO_ROW,
                                                torch.float32)
                if write_outputs:  # an extra copy our shard does not make (its kernel writes into the buffer)
                    buffer.out_CD[:n] = buffer.rows_CD[:n]
                group.send(ack(n), 0).wait()
            return
        for size in sizes:
            buf = torch.empty(size // 4, dtype=torch.float32)
            for _ in range(rounds):
                group.recv(buf, 0).wait()
                group.send(buf, 0).wait()
    finally:
        group.close()


def exchange_bandwidth(sizes: list[int], repeats: int, path: str, warmup: int = 3) -> dict[int, float]:
    """Best round-trip seconds per payload size, driver (rank 0) <-> spawned echo process (rank 1).

    "group": send S bytes, receive them back. "shm": copy S bytes into the shared buffer, send the header, the
    echo acks (its answer is the rows in place, as the group echo sends back what it received), copy S bytes
    out. "shm+out": the same, but the echo first copies the rows to the buffer's output region.
    """
    shm, write_outputs = path != "group", path == "shm+out"
    rdv = new_rendezvous("bench-echo", 2, "gloo", 60.0, LOOPBACK, shm_prefix=new_prefix() if shm else "")
    proc = mp.get_context("spawn").Process(target=_echo, args=(rdv.to_dict(), sizes, warmup + repeats), daemon=True)
    proc.start()
    group = join(rdv, 0, LOOPBACK)
    assert group.shares_memory_with(1) == shm
    best = {}
    try:
        capacity = capacity_for(max(sizes) // 4 // ECHO_ROW)
        path = buffer_path(rdv.shm_prefix, 1, capacity)
        buffer = PayloadBuffer.create(path, capacity, ECHO_ROW, torch.float32) if shm else None
        ack_1 = empty_ack()
        for size in sizes:
            out = torch.randn(size // 4 // ECHO_ROW, ECHO_ROW)
            back = torch.empty_like(out)
            n = out.shape[0]
            times = []
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                if shm:
                    buffer.rows_CD[:n] = out
                    group.send(header(OP_EXPERTS_SHM, write_outputs, n, capacity), 1).wait()
                    group.recv(ack_1, 1).wait()
                    back.copy_((buffer.out_CD if write_outputs else buffer.rows_CD)[:n])
                else:
                    group.send(out, 1).wait()
                    group.recv(back, 1).wait()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            assert torch.equal(out, back)
            best[size] = min(times)
    finally:
        if shm:
            unlink(path)
        group.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
    return best


def copy_into_buffer(sizes: list[int], repeats: int) -> dict[int, float]:
    """Best seconds of one plain copy of S bytes into a mapped /dev/shm buffer (the router's write-in)."""
    capacity = capacity_for(max(sizes) // 4 // ECHO_ROW)
    path = buffer_path(new_prefix(), 1, capacity)
    buffer = PayloadBuffer.create(path, capacity, ECHO_ROW, torch.float32)
    unlink(path)
    best = {}
    for size in sizes:
        src = torch.randn(size // 4 // ECHO_ROW, ECHO_ROW)
        dst = buffer.rows_CD[:src.shape[0]]
        dst.copy_(src)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        best[size] = min(times)
    return best


def memcpy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes copied once per second, best of ``repeats`` (after one warm-up)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def cpu_busy(window_s: float = 0.5) -> float:
    """Fraction of the machine's CPU time busy over ``window_s`` (from /proc/stat; this process idle meanwhile)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    i0, t0 = read()
    time.sleep(window_s)
    i1, t1 = read()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def settle(threshold: float = 0.15, max_s: float = 15.0) -> float:
    """Wait until the rest of the machine is mostly idle (or ``max_s`` passed); the last busy fraction."""
    deadline = time.monotonic() + max_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def fmt_size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# ----------------------------------------------------------------------------- exchange report


def report_exchange(sizes: list[int], repeats: int) -> None:
    print(f"\n[3] exchange driver <-> spawned echo process over {LOOPBACK} (fp32 payload, best of "
          f"{repeats}); bandwidth = 2*S/rtt; memcpy = bytes copied once / time, 256 MB, best of 5")
    print("group: gloo send S, receive S back (TCP: user -> kernel -> user per leg). shm: copy S into the shared "
          "buffer + header, echo acks (rows answered in place), copy S out: 2 copies of S + 2 small gloo "
          "messages (what a shard does: its kernel writes outputs into the buffer). shm+out: the echo also copies S "
          "to the output region first (3 copies, for comparison). 0 B: the header + "
          "ack handshake alone. copy-in: one plain copy of S into the buffer")
    rtts = {}
    for path in ("group", "shm", "shm+out"):
        print(f"background CPU busy before {path}: {100 * settle():.0f}%")
        rtts[path] = exchange_bandwidth(([0] if path == "shm" else []) + sizes, repeats, path)
    copy_in = copy_into_buffer(sizes, repeats)
    memcpy = memcpy_bandwidth()
    print(f"memcpy: {memcpy / 1e9:.2f} GB/s (x2 = {2 * memcpy / 1e9:.2f} GB/s in the read+write convention)")
    print(f"shm handshake alone (0 B): rtt {1e3 * rtts['shm'][0]:.3f} ms")
    print(f"{'payload':>8} | " + " | ".join(f"{p + ' rtt ms':>14} | {'GB/s':>5} | {'%':>4}" for p in rtts)
          + f" | {'copy-in GB/s':>12} | {'%':>4}")
    for size in sizes:
        cells = []
        for r in rtts.values():
            bw = 2 * size / r[size]
            cells.append(f"{1e3 * r[size]:>14.3f} | {bw / 1e9:>5.2f} | {100 * bw / memcpy:>3.0f}%")
        cin = size / copy_in[size]
        print(f"{fmt_size(size):>8} | " + " | ".join(cells) + f" | {cin / 1e9:>12.2f} | {100 * cin / memcpy:>3.0f}%",
              flush=True)


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("~/.cache/moe-serve/small").expanduser(),
                   help="e.g. one made by `moe-serve make-checkpoint DIR --preset small` (default: %(default)s)")
    p.add_argument("--shards", default="1,2,4", help="shard counts N (default: %(default)s)")
    p.add_argument("--batches", default="1,16,64", help="decode batch sizes B (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=2, help="simulated Ray nodes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="local/distributed alternations per (N, B) (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of this (router) process")
    p.add_argument("--probe-threads", type=int, default=1,
                   help="also time both sides with the router at this many torch threads, leaving the shards a "
                        "core (0: off; default: %(default)s)")
    p.add_argument("--payload-sizes", default="64K,256K,1M,4M,16M", help="echo payloads (default: %(default)s)")
    p.add_argument("--echo-repeats", type=int, default=20)
    p.add_argument("--exchange-only", action="store_true", help="stop after part 3 (no Ray cluster)")
    args = p.parse_args()
    shard_counts, batches = ints(args.shards), ints(args.batches)
    sizes = [parse_size(s) for s in args.payload_sizes.split(",") if s]
    ckpt = str(args.checkpoint.expanduser())
    cfg = load_config(ckpt)
    L = len(cfg.moe_layers)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    import ray

    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable.replace(str(Path.cwd()) + "/", "")] + sys.argv))
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
          f"torch {torch.__version__}, ray {ray.__version__}, router threads {args.threads}, "
          f"load avg at start {os.getloadavg()[0]:.2f}")
    if args.exchange_only:
        report_exchange(sizes, args.echo_repeats)
        return
    # Matrices held as the server holds them (a bf16 checkpoint stays bf16 on CPU), as the shards do.
    weight_dtype = resident_weight_dtype(ckpt, torch.float32)
    local = load_model(ckpt, weight_dtype=weight_dtype)
    local_seam = wrap_local_seam(local)
    params = text_param_counts(cfg)[0]
    print(f"checkpoint: {ckpt} ({params / 1e6:.0f}M params, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts "
          f"top-{cfg.num_experts_per_tok}, MoE layers {list(cfg.moe_layers)}), fp32 arithmetic, matrices held in "
          f"{str(weight_dtype).removeprefix('torch.')} (router and shards); prompt {args.prompt_tokens} "
          f"tokens; {args.steps} timed decode steps x {args.rounds} rounds per (N, B), best / median")
    prompt_of = {B: prompts(cfg, B, args.prompt_tokens, seed=B) for B in batches}

    # ---- 0. local experts without Ray running: router threads vs 1 thread (the contention yardstick)
    print(f"\n[0] local experts before Ray starts: {args.threads} threads vs 1 thread "
          f"(seam ms/layer at 1 thread ~ the expert compute a 1-thread shard does, summed over shards)")
    print(f"{'B':>4} | {'step ms ' + str(args.threads) + 'T':>11} | {'step ms 1T':>10} | "
          f"{'seam ms/layer ' + str(args.threads) + 'T':>17} | {'seam ms/layer 1T':>16} | {'bg busy':>7}")
    for B in batches:
        res = {}
        busy = settle()
        for threads in (args.threads, 1):
            torch.set_num_threads(threads)
            rows = []
            for _ in range(args.rounds):
                rows += decode_steps(local, local_seam, prompt_of[B], args.steps)
            res[threads] = Stats(rows, L)
        torch.set_num_threads(args.threads)
        a, b = res[args.threads], res[1]
        print(f"{B:>4} | {a.ms(a.step, 'best'):>11.2f} | {b.ms(b.step, 'best'):>10.2f} | "
              f"{a.ms(a.layer, 'best'):>17.3f} | {b.ms(b.layer, 'best'):>16.3f} | {100 * busy:>6.0f}%", flush=True)

    # ---- 3. exchange bandwidth (before Ray: only the two processes of the exchange are ours)
    report_exchange(sizes, args.echo_repeats)

    # ---- 1, 2, 4: the cluster
    from cluster.fleet import FleetSpec, start_fleet, stop_fleet
    from cluster.local_cluster import start_local_cluster
    from router.fleet_client import connect_experts

    thread_list = [args.threads] + ([args.probe_threads] if args.probe_threads not in (0, args.threads) else [])
    results = {}  # (N, B, router threads) -> (local Stats, dist Stats, ray calls, tokens, background busy)
    fleet_info = {}
    # No prestarted idle workers: they burn CPU while importing, right when the timing starts.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    lc = start_local_cluster(args.nodes)
    try:
        dist_seam = TimedSeam()
        dist_model = load_model(ckpt, experts=dist_seam, weight_dtype=weight_dtype)
        for N in shard_counts:
            t0 = time.perf_counter()
            fleet = start_fleet(FleetSpec(ckpt, N, node_ids=tuple(lc.node_ids), shard_cpus=0.05),
                                name=f"bench-ep-{N}-{os.getpid()}")
            experts = None
            try:
                info = ray.get(fleet.info.remote())
                _, shards = ray.get(fleet.router_view.remote())
                shard_threads = ray.get([s.__ray_call__.remote(lambda self: torch.get_num_threads()) for s in shards])
                experts = connect_experts(fleet, cfg.hidden_size, torch.float32, timeout_s=60)
                dist_seam.inner = experts
                nodes = len({s["node_id"] for s in info["shards"]})
                fleet_info[N] = (time.perf_counter() - t0, nodes, shard_threads)
                print(f"\nfleet of {N} shard(s) on {nodes} node(s) ready in {fleet_info[N][0]:.1f} s "
                      f"(shard torch threads {shard_threads})", flush=True)
                for B in batches:
                    for T in thread_list:
                        torch.set_num_threads(T)
                        lrows, drows, calls = [], [], [0]
                        busy = settle()
                        for _ in range(args.rounds):
                            lrows += decode_steps(local, local_seam, prompt_of[B], args.steps)
                            with counting_ray_calls(calls):
                                drows += decode_steps(dist_model, dist_seam, prompt_of[B], args.steps)
                        results[N, B, T] = (Stats(lrows, L), Stats(drows, L), calls[0],
                                            (args.steps + 2) * args.rounds * B, busy)
                        ls, ds = results[N, B, T][:2]
                        print(f"  N={N} B={B:>3} router threads {T}: local {ls.ms(ls.step, 'best'):7.2f} ms, "
                              f"distributed {ds.ms(ds.step, 'best'):7.2f} ms, ratio {min(ds.step) / min(ls.step):.2f};"
                              f" ray calls {calls[0]}; background busy before {100 * busy:.0f}%", flush=True)
                    torch.set_num_threads(args.threads)
            finally:
                dist_seam.inner = None
                if experts is not None:
                    experts.close()
                stop_fleet(fleet)
    finally:
        lc.shutdown()

    # ---- report
    print("\n[1] decode step time, distributed / local (local timed alongside, same fleet up; best and median ms "
          "over all timed steps); T = router torch threads (shards: 1 each); 'vs best local' = distributed / the "
          "faster local of any T")
    print(f"{'N':>2} | {'B':>3} | {'T':>1} | {'local best':>10} | {'local med':>9} | {'dist best':>9} | {'dist med':>8} | "
          f"{'ratio best':>10} | {'ratio med':>9} | {'vs best local':>13} | {'bg busy':>7}")
    for (N, B, T), (ls, ds, _, _, busy) in results.items():
        best_local = min(min(results[N, B, t][0].step) for t in thread_list)
        print(f"{N:>2} | {B:>3} | {T:>1} | {ls.ms(ls.step, 'best'):>10.2f} | {ls.ms(ls.step, 'med'):>9.2f} | "
              f"{ds.ms(ds.step, 'best'):>9.2f} | {ds.ms(ds.step, 'med'):>8.2f} | "
              f"{min(ds.step) / min(ls.step):>10.2f} | {statistics.median(ds.step) / statistics.median(ls.step):>9.2f} | "
              f"{min(ds.step) / best_local:>13.2f} | {100 * busy:>6.0f}%")
    for T in thread_list:
        if (2, 64, T) in results:
            ls, ds = results[2, 64, T][:2]
            r = min(ds.step) / min(ls.step)
            print(f"target N=2 B=64 distributed/local <= 1.3 with router threads {T}: {r:.2f} -> "
                  f"{'met' if r <= 1.3 else 'missed'}")
    print("\n[2] ms per MoE layer in the seam (median over timed steps): distributed dispatch / combine (wait) / "
          "total vs local (dispatch runs the experts)")
    print(f"{'N':>2} | {'B':>3} | {'T':>1} | {'dispatch':>8} | {'combine':>7} | {'dist total':>10} | "
          f"{'local total':>11} | {'dist - local':>12}")
    med = lambda xs: Stats.ms(xs, "med")  # noqa: E731
    for (N, B, T), (ls, ds, _, _, _) in results.items():
        print(f"{N:>2} | {B:>3} | {T:>1} | {med(ds.disp):>8.3f} | {med(ds.comb):>7.3f} | {med(ds.layer):>10.3f} | "
              f"{med(ls.layer):>11.3f} | {med(ds.layer) - med(ls.layer):>12.3f}")
    print("\n[4] Ray calls (ActorMethod._remote + RemoteFunction._remote) during distributed prefill + decode")
    total_calls = 0
    for (N, B, T), (_, _, calls, tokens, _) in results.items():
        total_calls += calls
        print(f"N={N} B={B:>3} T={T}: {calls} calls over {tokens} generated tokens -> {calls / tokens:.3f} per token")
    print(f"hot-path Ray calls: {'0 (ok)' if total_calls == 0 else f'{total_calls} (FAIL)'}")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s; load avg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
