"""Paged KV-cache block accounting for Llama 4's mixed global / chunked attention.

One physical storage tensor ``[num_blocks, block_size, kv_heads, head_dim]`` (one for K,
one for V) is shared by every layer; a physical block holds ONE layer's K/V for
``block_size`` consecutive positions.  A logical block ``i`` of a sequence (positions
``[i*bs, (i+1)*bs)``) therefore costs one physical block per global layer, forever, and
one per chunked layer only while it overlaps the current attention chunk.  Dropping the
chunked blocks behind the window is what bounds memory at 1M-10M token contexts.

Pure bookkeeping: no tensors, so the scheduler can use it without torch.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """Not enough free physical blocks; nothing was allocated."""

    def __init__(self, needed: int, free: int):
        super().__init__(f"need {needed} KV blocks, only {free} free")
        self.needed = needed
        self.free = free


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunked_blocks_bound(chunk_size: int, block_size: int, step_tokens: int = 1) -> int:
    """Most logical blocks a chunked layer can hold at once for one sequence.

    A step's queries start inside one chunk and may run ``step_tokens - 1`` past its end,
    so the window spans at most ``chunk_size + step_tokens - 1`` positions.  When the chunk
    size is not a multiple of the block size the chunk start falls mid-block, so the window
    can straddle one extra (partial) block.
    """
    span = chunk_size + step_tokens - 1
    return _ceil_div(span, block_size) + (1 if chunk_size % block_size else 0)


def _max_blocks(seq_len: int, block_size: int, n_global: int, n_chunked: int,
                chunk_size: int | None, step_tokens: int = 1) -> int:
    logical = _ceil_div(seq_len, block_size)
    if chunk_size is None:
        return logical * (n_global + n_chunked)
    windowed = min(logical, chunked_blocks_bound(chunk_size, block_size, step_tokens))
    return logical * n_global + windowed * n_chunked


def block_bytes(block_size: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one physical block, K and V together."""
    return 2 * block_size * kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(budget_bytes: int, block_size: int, kv_heads: int,
                          head_dim: int, dtype_bytes: int) -> int:
    """How many physical blocks (K and V both counted) fit in ``budget_bytes``."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    return budget_bytes // block_bytes(block_size, kv_heads, head_dim, dtype_bytes)


def cache_bytes(seq_len: int, block_size: int, n_global: int, n_chunked: int,
                chunk_size: int | None, kv_heads: int, head_dim: int,
                dtype_bytes: int) -> tuple[int, int]:
    """(peak KV bytes of one sequence with the chunked bound, bytes if every layer kept all).

    Both are block-granular, i.e. what the paged cache actually reserves.
    """
    per_block = block_bytes(block_size, kv_heads, head_dim, dtype_bytes)
    bounded = _max_blocks(seq_len, block_size, n_global, n_chunked, chunk_size)
    full = _ceil_div(seq_len, block_size) * (n_global + n_chunked)
    return bounded * per_block, full * per_block


@dataclass
class _Seq:
    num_tokens: int = 0
    global_tables: list[list[int]] = field(default_factory=list)
    chunked_tables: list[list[int | None]] = field(default_factory=list)
    # Bookkeeping that keeps every step O(new blocks), not O(context): chunked logical blocks below ``released``
    # have been handed back; no chunked entry at or above ``nones_below`` is None.
    released: int = 0
    nones_below: int = 0

    @property
    def num_logical(self) -> int:
        return len(self.global_tables[0]) if self.global_tables else (
            len(self.chunked_tables[0]) if self.chunked_tables else 0)


class KVBlockManager:
    """Allocates physical KV blocks to sequences, per layer kind, from one shared pool."""

    def __init__(self, num_blocks: int, block_size: int, num_global_layers: int,
                 num_chunked_layers: int, chunk_size: int | None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_global_layers < 0 or num_chunked_layers < 0:
            raise ValueError("layer counts must be >= 0, got "
                             f"{num_global_layers} global / {num_chunked_layers} chunked")
        if num_global_layers + num_chunked_layers == 0:
            raise ValueError("need at least one attention layer")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.block_size = block_size
        self.n_global = num_global_layers
        self.n_chunked = num_chunked_layers
        self.chunk_size = chunk_size
        self._num_blocks = num_blocks
        # Stack popped from the end; reversed so low ids go out first (easier to debug).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[Hashable, _Seq] = {}

    # ---- pool state -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_blocks - len(self._free)

    # ---- per-sequence views -----------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def global_tables(self, seq_id: Hashable) -> list[list[int]]:
        """Block tables of the global layers, ``[n_global][logical block]`` (copies)."""
        return [list(t) for t in self._seqs[seq_id].global_tables]

    def chunked_tables(self, seq_id: Hashable) -> list[list[int | None]]:
        """Block tables of the chunked layers; ``None`` marks blocks outside the window."""
        return [list(t) for t in self._seqs[seq_id].chunked_tables]

    def table_slices(self, seq_id: Hashable, chunked: bool, lo: int, hi: int) -> list[list[int | None]]:
        """Logical blocks ``lo .. hi-1`` of every layer of one kind: what a step reads, without copying whole
        tables (a long context has thousands of entries per layer)."""
        seq = self._seqs[seq_id]
        return [t[lo:hi] for t in (seq.chunked_tables if chunked else seq.global_tables)]

    def num_tokens(self, seq_id: Hashable) -> int:
        """Number of positions ``[0, n)`` the sequence's tables cover."""
        return self._seqs[seq_id].num_tokens

    # ---- sizing -----------------------------------------------------------------------
    def max_blocks_for(self, seq_len: int, step_tokens: int = 1) -> int:
        """Peak physical blocks one sequence of ``seq_len`` can hold at once.

        Assumes each step queries at most ``step_tokens`` positions (1 = decode); a prefill
        step that crosses a chunk boundary holds both chunks until released.
        """
        return _max_blocks(seq_len, self.block_size, self.n_global, self.n_chunked,
                           self.chunk_size, step_tokens)

    def longest_sequence(self, step_tokens: int = 1) -> int:
        """The longest sequence whose peak blocks (``max_blocks_for``) fit in the whole pool."""
        lo, hi = 0, 1 << 40  # with chunked layers only, the bound can be huge: search, don't solve
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.max_blocks_for(mid, step_tokens) <= self._num_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _window_start(self, keep_from: int) -> int:
        """First logical block a query at ``keep_from`` (or later) can attend to."""
        if self.chunk_size is None:
            return 0  # chunked layers behave as global
        return (keep_from // self.chunk_size) * self.chunk_size // self.block_size

    def _plan(self, seq_id: Hashable, new_len: int, keep_from: int) -> tuple[int, list[int]]:
        """(new global logical blocks, chunked logical blocks to allocate) for an ensure."""
        if new_len < 1:
            raise ValueError(f"new_len must be >= 1, got {new_len}")
        if not 0 <= keep_from < new_len:
            raise ValueError(f"keep_from must be in [0, {new_len}), got {keep_from}")
        seq = self._seqs.get(seq_id)
        have = seq.num_logical if seq else 0
        want = max(have, _ceil_div(new_len, self.block_size))
        start, end = self._window_start(keep_from), (new_len - 1) // self.block_size
        if seq and self.n_chunked and start < seq.nones_below:
            table = seq.chunked_tables[0]
            # A released block's K/V is gone; re-allocating it would attend to garbage.
            lost = [i for i in range(start, min(end + 1, have, seq.nones_below)) if table[i] is None]
            if lost:
                raise ValueError(f"seq {seq_id!r}: keep_from={keep_from} needs logical "
                                 f"blocks {lost[0]}..{lost[-1]} already released")
        chunked = list(range(max(start, have), end + 1)) if self.n_chunked else []
        return want - have, chunked

    def blocks_needed(self, seq_id: Hashable, new_len: int, keep_from: int) -> int:
        """Physical blocks ``ensure(seq_id, new_len, keep_from)`` would allocate now."""
        new_logical, chunked = self._plan(seq_id, new_len, keep_from)
        return new_logical * self.n_global + len(chunked) * self.n_chunked

    def can_ensure(self, seq_id: Hashable, new_len: int, keep_from: int) -> bool:
        """Whether ``ensure`` would succeed right now."""
        return self.blocks_needed(seq_id, new_len, keep_from) <= self.num_free

    # ---- mutation ---------------------------------------------------------------------
    def ensure(self, seq_id: Hashable, new_len: int, keep_from: int) -> None:
        """Grow tables to cover ``[0, new_len)``; chunked layers only inside the window.

        ``keep_from`` is the lowest query position of the coming step.  All-or-nothing:
        raises ``OutOfBlocks`` leaving every table and the free list untouched.
        """
        new_logical, chunked = self._plan(seq_id, new_len, keep_from)
        needed = new_logical * self.n_global + len(chunked) * self.n_chunked
        if needed > self.num_free:
            raise OutOfBlocks(needed, self.num_free)
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _Seq(
                global_tables=[[] for _ in range(self.n_global)],
                chunked_tables=[[] for _ in range(self.n_chunked)])
        have = seq.num_logical
        for table in seq.global_tables:
            table.extend(self._free.pop() for _ in range(new_logical))
        fresh = set(chunked)
        for table in seq.chunked_tables:
            # Blocks appended but outside the window were never written: None, not owed.
            table.extend(None for _ in range(new_logical))
            for i in range(have, have + new_logical):
                if i in fresh:
                    table[i] = self._free.pop()
                else:
                    seq.nones_below = max(seq.nones_below, i + 1)
        seq.num_tokens = max(seq.num_tokens, new_len)

    def release_outside_window(self, seq_id: Hashable, keep_from: int) -> int:
        """Free chunked-layer blocks lying wholly before the chunk of ``keep_from``.

        Call after a step with the next step's lowest query position; returns blocks freed.
        """
        if keep_from < 0:
            raise ValueError(f"keep_from must be >= 0, got {keep_from}")
        seq = self._seqs[seq_id]
        start = self._window_start(keep_from)
        freed = 0
        for table in seq.chunked_tables:
            for i in range(seq.released, min(start, len(table))):  # below ``released``: handed back already
                if table[i] is not None:
                    self._free.append(table[i])
                    table[i] = None
                    freed += 1
        if seq.chunked_tables:
            seq.released = max(seq.released, min(start, len(seq.chunked_tables[0])))
            seq.nones_below = max(seq.nones_below, seq.released)
        return freed

    def free(self, seq_id: Hashable) -> int:
        """Return every block of ``seq_id`` to the pool; unknown ids free nothing (0)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return 0
        blocks = [b for t in seq.global_tables for b in t]
        blocks += [b for t in seq.chunked_tables for b in t if b is not None]
        self._free.extend(blocks)
        return len(blocks)

    # ---- engine addressing ------------------------------------------------------------
    def slot_mapping(self, seq_id: Hashable, positions: Iterable[int]
                     ) -> tuple[list[list[int]], list[list[int]]]:
        """Flat cache slots ``block_id * block_size + pos % block_size`` per layer.

        Returns ``(global_slots[n_global][len(positions)],
        chunked_slots[n_chunked][len(positions)])``.  Raises ``ValueError`` for positions
        not covered by ``ensure`` or, for chunked layers, outside the window.
        """
        seq = self._seqs[seq_id]
        positions = list(positions)
        bs = self.block_size
        for p in positions:
            if not 0 <= p < seq.num_tokens:
                raise ValueError(f"position {p} outside [0, {seq.num_tokens}) of {seq_id!r}")
        glob = [[t[p // bs] * bs + p % bs for p in positions] for t in seq.global_tables]
        chunked = []
        for table in seq.chunked_tables:
            row = []
            for p in positions:
                block = table[p // bs]
                if block is None:
                    raise ValueError(f"position {p} of {seq_id!r} is outside the chunk "
                                     "window (its chunked block was released)")
                row.append(block * bs + p % bs)
            chunked.append(row)
        return glob, chunked
