"""What goes into the engine and what comes out of it, and the errors it refuses requests with."""

from __future__ import annotations

from dataclasses import dataclass

from router.sampling import SamplingParams


class EngineError(Exception):
    """A request the engine will not (or can no longer) serve; the message is meant for a person."""


class InvalidRequestError(EngineError, ValueError):
    """Bad input: the API maps it to INVALID_ARGUMENT / HTTP 400."""


class OverloadedError(EngineError):
    """Too many waiting requests: the API maps it to RESOURCE_EXHAUSTED / HTTP 429."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic() after which the request is cut off
    # Tokens this request already produced elsewhere (a stream resumed on another replica): recomputed, not
    # re-emitted, and counted in max_tokens, so the continuation is exactly what the first run would have given.
    output_prefix: tuple[int, ...] = ()
    trace_context: tuple[tuple[str, str], ...] = ()  # W3C headers of the caller's span, for tracing


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationOutput:
    """One increment of a request's stream: the tokens sampled since the last increment."""

    request_id: str
    token_ids: tuple[int, ...]
    text_delta: str
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...] | None, ...]
    finish_reason: str | None  # None while running; "stop", "length", "abort", "deadline" or "error"
    usage: Usage
    error: str | None = None  # set with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
