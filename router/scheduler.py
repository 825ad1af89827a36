"""Continuous batching: which tokens of which sequences run in the next step.

Every step runs every running sequence. Decodes (one token each) go first so their latency stays bounded;
prefills fill the rest of a per-step token budget in chunks; waiting requests are admitted first come first
served while KV blocks last. When blocks run out, the newest running sequences are preempted: their blocks are
freed and they are recomputed later (nothing is lost, the tokens they produced stay).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router.kv_blocks import KVBlockManager, OutOfBlocks
from router.request import OverloadedError
from router.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed)
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's last known token, so the step samples the next one

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def _chunk(seq: Sequence, n: int) -> ScheduledChunk:
    return ScheduledChunk(seq, seq.num_computed, n, samples=seq.num_computed + n == seq.num_tokens)


class Scheduler:
    def __init__(self, blocks: KVBlockManager, max_num_seqs: int, max_tokens_per_step: int, max_waiting: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_tokens_per_step, self.max_waiting = max_num_seqs, max_tokens_per_step, max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise OverloadedError(f"server overloaded: {len(self.waiting)} requests already waiting "
                                  f"(limit {self.max_waiting}); retry later")
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and give its KV blocks back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.request_id)
        seq.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.max_tokens_per_step
        # Decodes before prefills: a long prompt never stalls the streams already running.
        for seq in sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.arrival)):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            scheduled = len(chunks)
            if self._reserve_or_preempt(seq, n, chunks):
                chunks.append(_chunk(seq, n))
            if len(chunks) == scheduled + 1:
                budget -= n
            else:  # a preemption took chunks of this step back
                budget = self.max_tokens_per_step - sum(c.num_tokens for c in chunks)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            try:
                self.blocks.ensure(seq.request_id, seq.num_computed + n, seq.num_computed)
            except OutOfBlocks:
                break  # first come first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(_chunk(seq, n))
            budget -= n
        return chunks

    def _reserve_or_preempt(self, seq: Sequence, n: int, chunks: list[ScheduledChunk]) -> bool:
        """Reserve blocks for ``n`` more tokens of ``seq``, preempting the newest sequences as needed."""
        while True:
            try:  # all or nothing: a refusal changes no table
                self.blocks.ensure(seq.request_id, seq.num_computed + n, seq.num_computed)
                return True
            except OutOfBlocks:
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                chunks[:] = [c for c in chunks if c.seq is not victim]  # it may already be in this step
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed = 0  # recompute prompt + outputs so far when readmitted
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)  # it was admitted before everyone still waiting

    def after_step(self, chunks: list[ScheduledChunk]) -> None:
        """Advance computed counts and hand back chunked-layer blocks the next step can no longer see."""
        for c in chunks:
            if c.seq.status is Status.RUNNING:
                c.seq.num_computed = c.end
                self.blocks.release_outside_window(c.seq.request_id, c.seq.num_computed)
