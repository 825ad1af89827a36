"""A request's life inside the engine: its tokens, how many of them are in the KV cache, its text so far."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from router.detokenizer import IncrementalDetokenizer
from router.request import GenerationRequest


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    seed: int  # drawn once at arrival, so a replay samples the same tokens
    detokenizer: IncrementalDetokenizer
    arrival: int  # admission order; preemption takes the newest first
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    num_preemptions: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Prompt and output ids in ``[start, end)``."""
        prompt = self.request.prompt_ids
        head = list(prompt[start:end]) if start < len(prompt) else []
        return head + self.output_ids[max(start - len(prompt), 0):max(end - len(prompt), 0)]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed
