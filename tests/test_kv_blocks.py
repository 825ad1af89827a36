import math
import random

import pytest

from router.kv_blocks import (
    KVBlockManager,
    OutOfBlocks,
    block_bytes,
    cache_bytes,
    chunked_blocks_bound,
    num_blocks_for_budget,
)


def referenced(mgr, seq_ids):
    """All physical block ids the given sequences' tables point at."""
    ids = []
    for s in seq_ids:
        ids += [b for t in mgr.global_tables(s) for b in t]
        ids += [b for t in mgr.chunked_tables(s) for b in t if b is not None]
    return ids


def assert_consistent(mgr, seq_ids):
    ids = referenced(mgr, seq_ids)
    assert len(ids) == len(set(ids)), "a physical block is shared"
    assert all(0 <= b < mgr.num_blocks for b in ids)
    assert mgr.num_used == len(ids)
    assert mgr.num_free + mgr.num_used == mgr.num_blocks


@pytest.mark.parametrize("bs,chunk", [(4, 16), (4, 10), (4, 9), (3, 16)])
def test_decode_growth_bounded(bs, chunk):
    n_glob, n_chunk = 2, 3
    mgr = KVBlockManager(1000, bs, n_glob, n_chunk, chunk)
    bound = math.ceil(chunk / bs) + (1 if chunk % bs else 0)
    assert bound == chunked_blocks_bound(chunk, bs)
    for length in range(1, 101):
        pos = length - 1  # decode: the new token is the only query
        mgr.ensure("s", length, keep_from=pos)
        assert mgr.num_tokens("s") == length
        assert mgr.slot_mapping("s", [pos])  # the new token is writable in every layer
        mgr.release_outside_window("s", keep_from=length)  # next step queries `length`
        g, c = mgr.global_tables("s"), mgr.chunked_tables("s")
        assert [len(t) for t in g] == [math.ceil(length / bs)] * n_glob
        for t in c:
            live = [b for b in t if b is not None]
            assert len(live) <= bound
        assert_consistent(mgr, ["s"])
    assert mgr.num_used <= mgr.max_blocks_for(100)
    used = mgr.num_used
    assert mgr.free("s") == used
    assert mgr.num_free == mgr.num_blocks


def test_decode_peak_matches_max_blocks_for():
    mgr = KVBlockManager(1000, 4, 2, 3, 16)
    peak = 0
    for length in range(1, 101):
        mgr.ensure("s", length, keep_from=length - 1)
        peak = max(peak, mgr.num_used)
        mgr.release_outside_window("s", keep_from=length)
    assert peak <= mgr.max_blocks_for(100)
    # 25 global logical blocks x2 + one full chunk (4 blocks) x3
    assert mgr.max_blocks_for(100) == 25 * 2 + 4 * 3


def test_step_across_chunk_boundary_keeps_previous_chunk():
    bs, chunk = 4, 16
    mgr = KVBlockManager(200, bs, 1, 2, chunk)
    mgr.ensure("s", 14, keep_from=0)  # prefill positions 0..13, all in chunk 0
    mgr.release_outside_window("s", keep_from=14)
    # next step queries 14..21: starts in chunk 0, crosses into chunk 1
    need = mgr.blocks_needed("s", 22, keep_from=14)
    assert need == 2 * 1 + 2 * 2  # logical blocks 4, 5 for each layer
    mgr.ensure("s", 22, keep_from=14)
    for t in mgr.chunked_tables("s"):
        assert all(b is not None for b in t)  # position 14 still needs blocks 0..3
    mgr.slot_mapping("s", range(14, 22))
    assert mgr.num_used <= mgr.max_blocks_for(22, step_tokens=8)
    # after the step, the next query (22) is in chunk 1: chunk 0 goes back
    assert mgr.release_outside_window("s", keep_from=22) == 4 * 2
    for t in mgr.chunked_tables("s"):
        assert t == [None] * 4 + t[4:] and None not in t[4:]
    with pytest.raises(ValueError):
        mgr.slot_mapping("s", [3])
    # the window cannot move back onto released blocks
    with pytest.raises(ValueError):
        mgr.ensure("s", 21, keep_from=10)
    assert_consistent(mgr, ["s"])


def test_chunk_not_multiple_of_block_keeps_partial_block():
    mgr = KVBlockManager(200, 4, 0, 1, 10)
    for length in range(1, 31):
        mgr.ensure("s", length, keep_from=length - 1)
        mgr.release_outside_window("s", keep_from=length)
    # next query 30 -> chunk [30, 40): starts mid logical block 7 (positions 28..31)
    (t,) = mgr.chunked_tables("s")
    assert [i for i, b in enumerate(t) if b is not None] == [7]
    assert mgr.max_blocks_for(30) == 4  # ceil(10/4) + 1 partial


def test_prefill_far_ahead_skips_blocks_outside_window():
    mgr = KVBlockManager(200, 4, 1, 1, 16)
    # only positions 40..49 are queried: chunked layer needs blocks from chunk 2 (pos 32)
    assert mgr.blocks_needed("s", 50, keep_from=40) == 13 + 5
    mgr.ensure("s", 50, keep_from=40)
    (t,) = mgr.chunked_tables("s")
    assert t[:8] == [None] * 8 and None not in t[8:]
    assert_consistent(mgr, ["s"])


def test_chunk_none_behaves_as_global():
    mgr = KVBlockManager(100, 4, 1, 2, None)
    mgr.ensure("s", 40, keep_from=39)
    assert mgr.release_outside_window("s", keep_from=40) == 0
    assert all(None not in t and len(t) == 10 for t in mgr.chunked_tables("s"))
    assert mgr.num_used == 30 == mgr.max_blocks_for(40)


def test_ensure_all_or_nothing_and_free():
    mgr = KVBlockManager(10, 4, 1, 1, 16)
    mgr.ensure("a", 8, keep_from=0)  # 2 + 2
    before = (mgr.num_free, mgr.global_tables("a"), mgr.chunked_tables("a"), mgr.num_tokens("a"))
    # window runs from keep_from's chunk (block 0) to the last new block: 2, 3, 4 are new
    assert mgr.blocks_needed("a", 20, keep_from=8) == 3 + 3
    assert mgr.blocks_needed("a", 24, keep_from=8) == 4 + 4
    assert not mgr.can_ensure("a", 24, keep_from=8)
    with pytest.raises(OutOfBlocks) as err:
        mgr.ensure("a", 24, keep_from=8)
    assert isinstance(err.value, RuntimeError) and err.value.needed == 8
    after = (mgr.num_free, mgr.global_tables("a"), mgr.chunked_tables("a"), mgr.num_tokens("a"))
    assert after == before
    with pytest.raises(OutOfBlocks):
        mgr.ensure("b", 40, keep_from=0)
    assert "b" not in mgr and mgr.num_free == before[0]
    assert mgr.free("a") == 4
    assert mgr.num_free == mgr.num_blocks == 10
    assert mgr.free("a") == 0 and mgr.free("nope") == 0


def test_random_workload_never_leaks():
    rng = random.Random(1234)
    mgr = KVBlockManager(300, 4, 2, 3, 12)
    live: dict[int, int] = {}
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.15 or not live:
            sid, next_id = next_id, next_id + 1
            n = rng.randint(1, 30)
            try:
                mgr.ensure(sid, n, keep_from=rng.randrange(n))
                live[sid] = n
            except OutOfBlocks:
                assert sid not in mgr
        elif op < 0.25:
            sid = rng.choice(list(live))
            freed = mgr.free(sid)
            assert freed >= 0
            del live[sid]
        else:
            sid = rng.choice(list(live))
            n = live[sid]
            new_len = n + rng.randint(1, 6)
            keep_from = n  # next queries start at the first new token
            ok = mgr.can_ensure(sid, new_len, keep_from)
            free_before = mgr.num_free
            try:
                mgr.ensure(sid, new_len, keep_from)
                assert ok
                live[sid] = new_len
            except OutOfBlocks:
                assert not ok and mgr.num_free == free_before
            mgr.release_outside_window(sid, keep_from=live[sid])
        if rng.random() < 0.05:
            assert_consistent(mgr, list(live))
    assert_consistent(mgr, list(live))
    for sid in list(live):
        mgr.free(sid)
    assert mgr.num_free == mgr.num_blocks and mgr.num_used == 0


def test_slot_mapping():
    bs = 4
    mgr = KVBlockManager(100, bs, 2, 1, 8)
    mgr.ensure("s", 11, keep_from=0)
    g, c = mgr.global_tables("s"), mgr.chunked_tables("s")
    positions = [0, 3, 4, 7, 10]
    gs, cs = mgr.slot_mapping("s", positions)
    assert len(gs) == 2 and len(cs) == 1
    for table, slots in list(zip(g, gs)) + list(zip(c, cs)):
        assert slots == [table[p // bs] * bs + p % bs for p in positions]
        for p, s in zip(positions, slots):
            assert s // bs == table[p // bs] and s % bs == p % bs
    all_slots = [s for row in gs + cs for s in row]
    assert len(all_slots) == len(set(all_slots))
    with pytest.raises(ValueError):
        mgr.slot_mapping("s", [11])  # not covered yet
    mgr.release_outside_window("s", keep_from=9)  # chunk [8, 16): blocks 0, 1 go
    gs2, cs2 = mgr.slot_mapping("s", [10])
    assert gs2 == [row[-1:] for row in gs] and cs2 == [row[-1:] for row in cs]
    # global layers still hold position 7, but its chunked block is gone
    with pytest.raises(ValueError):
        mgr.slot_mapping("s", [7])


def test_32k_sequence_with_1k_chunk():
    L, bs, C = 32 * 1024, 16, 1024
    n_glob, n_chunk, kv_heads, head_dim, dt = 12, 36, 8, 128, 2  # Scout-like 1:3 split
    mgr = KVBlockManager(1, bs, n_glob, n_chunk, C)
    assert mgr.max_blocks_for(L) == 2048 * n_glob + 64 * n_chunk
    bounded, full = cache_bytes(L, bs, n_glob, n_chunk, C, kv_heads, head_dim, dt)
    per_block = block_bytes(bs, kv_heads, head_dim, dt)
    assert per_block == 2 * bs * kv_heads * head_dim * dt
    assert full == 2048 * (n_glob + n_chunk) * per_block
    chunked_part = bounded - 2048 * n_glob * per_block
    assert chunked_part <= (C // bs + 1) * n_chunk * per_block  # one chunk (+1 block)
    assert bounded < full / 3
    # chunk not a multiple of the block size -> one partial extra block per layer
    assert KVBlockManager(1, 16, 0, 1, 1000).max_blocks_for(L) == 63 + 1
    # short sequences are bounded by their own length
    assert mgr.max_blocks_for(100) == 7 * (n_glob + n_chunk)


def test_num_blocks_for_budget():
    per = 2 * 16 * 8 * 128 * 2
    assert num_blocks_for_budget(10 * per + per - 1, 16, 8, 128, 2) == 10
    assert num_blocks_for_budget(0, 16, 8, 128, 2) == 0
    with pytest.raises(ValueError):
        num_blocks_for_budget(-1, 16, 8, 128, 2)


@pytest.mark.parametrize("args", [
    (0, 4, 1, 1, 16), (10, 0, 1, 1, 16), (10, 4, -1, 1, 16),
    (10, 4, 0, 0, 16), (10, 4, 1, 1, 0),
])
def test_constructor_validation(args):
    with pytest.raises(ValueError):
        KVBlockManager(*args)


def test_argument_validation():
    mgr = KVBlockManager(10, 4, 1, 1, 16)
    with pytest.raises(ValueError):
        mgr.ensure("s", 0, keep_from=0)
    with pytest.raises(ValueError):
        mgr.ensure("s", 5, keep_from=5)
    with pytest.raises(KeyError):
        mgr.global_tables("missing")


def test_table_slices_and_released_window_are_guarded():
    bs, chunk = 4, 8
    mgr = KVBlockManager(64, bs, num_global_layers=1, num_chunked_layers=2, chunk_size=chunk)
    mgr.ensure("s", 6, 0)
    for n in range(6, 21):  # decode to 21 tokens: chunked layers release the chunks left behind
        mgr.ensure("s", n + 1, n)
        mgr.release_outside_window("s", n + 1)
    for chunked, full in ((False, mgr.global_tables("s")), (True, mgr.chunked_tables("s"))):
        assert mgr.table_slices("s", chunked, 2, 5) == [t[2:5] for t in full]
    assert mgr.chunked_tables("s")[0][:4] == [None] * 4  # positions 0..15: two chunks ago and one chunk ago
    assert mgr.release_outside_window("s", 21) == 0  # nothing left to hand back, nothing handed back twice
    with pytest.raises(ValueError, match="already released"):
        mgr.ensure("s", 22, 3)  # a query at position 3 would need keys whose blocks are gone
    mgr.ensure("s", 22, 21)  # the current window is fine
    assert_consistent(mgr, ["s"])
