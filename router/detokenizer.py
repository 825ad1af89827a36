"""Streaming detokenization with stop strings.

Byte-level BPE tokens are byte strings, so one token may hold half a UTF-8 character and
decoding it alone ends in U+FFFD.  We use the prefix/read-offset technique (TGI, vLLM):
decode only a short window ``tokens[prefix:]`` and emit what it adds over
``tokens[prefix:read]``; the window moves forward whenever the new text is complete, so
each step costs O(window), not O(sequence).  The ``prefix`` tokens give the decoder left
context, and the difference of two decodes of the same prefix stays exact.

Stop strings act on the text, not the tokens: text that could still be the start of a stop
string is held back, so a stop string split across tokens is caught and never leaked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Left context taken from the prompt, as vLLM does.
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 char is <= 4 bytes, so a longer stall is invalid bytes (or a run of skipped special
# tokens), not an incomplete char: emit it as-is rather than re-decode an ever-growing window.
MAX_HELD_TOKENS = 16


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


@dataclass(frozen=True)
class DetokenizerStep:
    """New text to stream, and the stop string that ended generation (if one did)."""

    text_delta: str
    stop_string: str | None


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas, one token at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(self._stops):
            raise ValueError("stop strings must be non-empty")
        self._tokens = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._prefix = 0  # window start: context tokens whose text was already emitted
        self._read = len(self._tokens)  # first token whose text is not yet decoded
        self._pending = ""  # decoded text held back because it may begin a stop string
        self._emitted: list[str] = []
        self._stop_string: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    def add(self, token_id: int) -> DetokenizerStep:
        """Feed one generated token; returns the text that is now safe to stream."""
        if self._finished:
            raise RuntimeError("detokenizer already finished (stop string matched or flushed)")
        self._tokens.append(token_id)
        return DetokenizerStep(self._release(self._decode_new(final=False)), self._stop_string)

    def flush(self) -> str:
        """Finish (length / EOS): emit everything held back.  A trailing incomplete UTF-8
        char comes out as U+FFFD rather than being dropped."""
        if self._finished:
            return ""
        delta = self._release(self._decode_new(final=True), final=True)
        self._finished = True
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._tokens[start:end], skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """Text added by tokens[read:], or "" while it ends in a partial character."""
        prefix_text = self._decode(self._prefix, self._read)
        full_text = self._decode(self._prefix, len(self._tokens))
        held = len(self._tokens) - self._read
        if full_text.endswith(REPLACEMENT_CHAR) and not final and held < MAX_HELD_TOKENS:
            return ""
        if held >= MAX_HELD_TOKENS:
            self._read = len(self._tokens)  # restart the window: no context into garbage
        self._prefix, self._read = self._read, len(self._tokens)
        del self._tokens[: self._prefix]  # drop tokens left of the window: O(1) memory
        self._read -= self._prefix
        self._prefix = 0
        return full_text[len(prefix_text):]

    def _release(self, new_text: str, final: bool = False) -> str:
        """Append to the held text; emit what can no longer be (part of) a stop string."""
        text = self._pending + new_text
        hit = self._first_stop(text)
        if hit is not None:
            start, self._stop_string = hit
            self._finished = True
            return self._emit(text[:start], pending="")
        cut = len(text) if final else len(text) - self._stop_prefix_len(text)
        return self._emit(text[:cut], pending=text[cut:])

    def _emit(self, delta: str, pending: str) -> str:
        self._pending = pending
        if delta:
            self._emitted.append(delta)
        return delta

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop) of the earliest match; the shortest stop wins a tie, as it would
        have matched first had the text arrived one char at a time."""
        hits = [(i, len(s), s) for s in self._stops if (i := text.find(s)) >= 0]
        return (min(hits)[0], min(hits)[2]) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
