"""Token sampling: request parameters, penalties, top-k / top-p / min-p, seeded draws.

Randomness is keyed by (seed, absolute position): the noise for the token at position
``p`` comes from a generator seeded with ``mix(seed, p)``, so a request's draws never
depend on which other requests share its batch or on how many draws came before, and a
request replayed from any point (preemption, retry on another replica) continues
identically.  The draw uses the exponential race: ``argmax(probs / q)`` with
``q ~ Exponential(1)`` picks token ``i`` with probability ``probs[i]`` (Gumbel-max in
disguise), and needs no cumulative sum, so filtered tokens (prob 0) can never win.

Shape legend: B batch rows, R rows that sample (non-greedy), V vocab, L padded id-list
length, N top-n log-probs.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
_MASK64 = (1 << 64) - 1
# Below this, logits / T overflows float32; such temperatures are greedy in effect (vLLM's eps).
GREEDY_TEMPERATURE = 1e-5


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type; the message names it."""


# ----------------------------------------------------------------------------- validation


def _fail(name: str, rule: str, value: object) -> SamplingParamsError:
    return SamplingParamsError(f"{name} must be {rule}, got {value!r}")


def _real(name: str, value: object) -> float:
    # bool is an int subclass; `temperature=True` is a bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, "a number", value)
    if not math.isfinite(value):
        raise _fail(name, "finite", value)
    return float(value)


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, "an int", value)
    return int(value)


def _in_range(name: str, value: float, lo: float, hi: float, rule: str) -> None:
    if not lo <= value <= hi:
        raise _fail(name, rule, value)


def _as_tuple(name: str, value: object) -> tuple:
    if isinstance(value, str):
        return (value,)  # OpenAI accepts `stop: "x"` as one stop string
    if not isinstance(value, (tuple, list)):
        raise _fail(name, "a tuple", value)
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI / vLLM semantics); validated on construction.

    temperature 0 means greedy.  top_k 0 or -1 disables top-k.  ``logprobs`` is the number
    of top alternatives to report besides the sampled token (None: none).  ``stop`` may be
    given as a list or a single string; it is stored as a tuple.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Normalise sequences so the frozen instance stays hashable.
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        """Deterministic argmax: temperature ~0, or top_k 1 (same token at any temperature)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError naming the first bad field; with ``vocab_size`` also
        check that stop_token_ids are in the vocabulary."""
        self._validate_distribution()
        self._validate_penalties()
        self._validate_limits()
        self._validate_stops(vocab_size)

    def _validate_distribution(self) -> None:
        _in_range("temperature", _real("temperature", self.temperature), 0, MAX_TEMPERATURE,
                  f"in [0, {MAX_TEMPERATURE:g}]")
        top_k = _int("top_k", self.top_k)
        if top_k < 1 and top_k not in (0, -1):
            raise _fail("top_k", ">= 1, or 0 / -1 to disable", top_k)
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise _fail("top_p", "in (0, 1]", top_p)
        _in_range("min_p", _real("min_p", self.min_p), 0, 1, "in [0, 1]")

    def _validate_penalties(self) -> None:
        rep = _real("repetition_penalty", self.repetition_penalty)
        if not 0 < rep <= MAX_REPETITION_PENALTY:
            raise _fail("repetition_penalty", f"in (0, {MAX_REPETITION_PENALTY:g}]", rep)
        for name in ("presence_penalty", "frequency_penalty"):
            _in_range(name, _real(name, getattr(self, name)), -2, 2, "in [-2, 2]")

    def _validate_limits(self) -> None:
        if self.seed is not None:
            _in_range("seed", _int("seed", self.seed), 0, 2**63 - 1, "in [0, 2**63)")
        if _int("max_tokens", self.max_tokens) < 1:
            raise _fail("max_tokens", ">= 1", self.max_tokens)
        if not isinstance(self.ignore_eos, bool):
            raise _fail("ignore_eos", "a bool", self.ignore_eos)
        if self.logprobs is not None:
            _in_range("logprobs", _int("logprobs", self.logprobs), 0, MAX_LOGPROBS,
                      f"in [0, {MAX_LOGPROBS}]")

    def _validate_stops(self, vocab_size: int | None) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _fail("stop", f"at most {MAX_STOP_STRINGS} strings", len(self.stop))
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise _fail(f"stop[{i}]", "a non-empty string", s)
            if len(s) > MAX_STOP_STRING_CHARS:
                raise _fail(f"stop[{i}]", f"at most {MAX_STOP_STRING_CHARS} chars long", len(s))
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise _fail("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids", len(self.stop_token_ids))
        hi = math.inf if vocab_size is None else vocab_size - 1
        for i, t in enumerate(self.stop_token_ids):
            _in_range(f"stop_token_ids[{i}]", _int(f"stop_token_ids[{i}]", t), 0, hi,
                      ">= 0" if vocab_size is None else f"in [0, {vocab_size})")


# ----------------------------------------------------------------------------- seeds


def fresh_seed() -> int:
    """A random seed for a request that gave none; draw it ONCE, at arrival, and keep it."""
    return secrets.randbits(63)


def request_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, else a fresh one (call once per request)."""
    return params.seed if params.seed is not None else fresh_seed()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, position: int) -> int:
    """64-bit generator seed for the draw at ``position``; nearby (seed, position) pairs
    map to unrelated streams because both pass through splitmix64."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))


# ----------------------------------------------------------------------------- penalties


def _token_counts(ids_per_row: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """float32 [B, V] occurrence counts.  Rows are padded with id V into a spare column."""
    longest = max((len(ids) for ids in ids_per_row), default=0)
    ids_BL = torch.tensor([list(ids) + [vocab] * (longest - len(ids)) for ids in ids_per_row],
                          dtype=torch.long, device=device).reshape(len(ids_per_row), longest)
    lengths_B = torch.tensor([len(ids) for ids in ids_per_row], device=device)
    real_BL = torch.arange(longest, device=device) < lengths_B[:, None]
    if bool(((ids_BL < 0) | ((ids_BL >= vocab) & real_BL)).any()):
        raise ValueError(f"token ids must be in [0, {vocab})")
    counts_BV = torch.zeros(len(ids_per_row), vocab + 1, device=device)
    counts_BV.scatter_add_(1, ids_BL, torch.ones_like(ids_BL, dtype=counts_BV.dtype))
    return counts_BV[:, :vocab]


def _row_values(params: Sequence[SamplingParams], name: str, device: torch.device) -> Tensor:
    """float32 [B, 1] column of one parameter, to broadcast over the vocab."""
    return torch.tensor([float(getattr(p, name)) for p in params], device=device)[:, None]


def apply_penalties(
    logits_BV: Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> Tensor:
    """Penalised float32 ``logits_BV`` [B, V]: a copy, or ``logits_BV`` itself when no row has a penalty.

    Repetition (HF): tokens seen in prompt or output have positive logits divided by the
    penalty, negative ones multiplied.  Presence / frequency (OpenAI), output tokens only:
    ``logit -= presence * (count > 0) + frequency * count``.
    """
    vocab, device = logits_BV.shape[1], logits_BV.device
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_pf = any(p.presence_penalty or p.frequency_penalty for p in params)
    if not (use_rep or use_pf):
        return logits_BV
    out_counts_BV = _token_counts(output_ids, vocab, device)
    if use_rep:
        seen_BV = (_token_counts(prompt_ids, vocab, device) > 0) | (out_counts_BV > 0)
        rep_B1 = _row_values(params, "repetition_penalty", device)
        scaled_BV = torch.where(logits_BV > 0, logits_BV / rep_B1, logits_BV * rep_B1)
        logits_BV = torch.where(seen_BV, scaled_BV, logits_BV)
    if use_pf:
        logits_BV = logits_BV - _row_values(params, "frequency_penalty", device) * out_counts_BV
        logits_BV = logits_BV - _row_values(params, "presence_penalty", device) * (out_counts_BV > 0)
    return logits_BV


# ----------------------------------------------------------------------------- filters


def apply_top_k_top_p(logits_RV: Tensor, top_k_R: Tensor, top_p_R: Tensor) -> Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its nucleus.

    top_k_R: int64 [R], V means off.  top_p_R: float32 [R], 1 means off.  The nucleus is
    the smallest set of highest-prob tokens (renormalised after top-k) with mass >= top_p;
    the top token is always kept.  Ties are broken by lower token id, like argmax.
    """
    vocab = logits_RV.shape[1]
    sorted_RV, order_RV = logits_RV.sort(dim=-1, descending=True, stable=True)
    rank_V = torch.arange(vocab, device=logits_RV.device)
    drop_RV = rank_V >= top_k_R[:, None]
    probs_RV = sorted_RV.masked_fill(drop_RV, -math.inf).softmax(dim=-1)
    mass_before_RV = probs_RV.cumsum(dim=-1) - probs_RV  # exactly 0 for the top token
    # top_p == 1 must keep everything even where float cumsum rounds past 1.
    drop_RV |= (mass_before_RV >= top_p_R[:, None]) & (top_p_R[:, None] < 1)
    keep_RV = torch.empty_like(drop_RV).scatter_(1, order_RV, ~drop_RV)
    return logits_RV.masked_fill(~keep_RV, -math.inf)


def apply_min_p(logits_RV: Tensor, min_p_R: Tensor) -> Tensor:
    """Mask tokens whose prob is below ``min_p * max prob`` of their row (float32 [R])."""
    probs_RV = logits_RV.softmax(dim=-1)
    floor_R1 = min_p_R[:, None] * probs_RV.amax(dim=-1, keepdim=True)
    return logits_RV.masked_fill(probs_RV < floor_R1, -math.inf)


# ----------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class SampleOutput:
    """Per-row results.  Log-probs come from the RAW model logits (before penalties,
    temperature and filters), as OpenAI reports them."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Stateless apart from one reusable generator per device (reseeded for every draw)."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(
        self,
        logits_BV: Tensor,
        params: Sequence[SamplingParams],
        positions: Sequence[int],
        seeds: Sequence[int],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
    ) -> SampleOutput:
        """Pick one token per row of float32 ``logits_BV`` [B, V] (not modified).

        positions[i]: absolute sequence position of the token being sampled.  seeds[i]: the
        request's seed (``request_seed(params)``, fixed for the request's lifetime).
        prompt_ids / output_ids: the row's tokens so far, for the penalties.
        """
        batch = logits_BV.shape[0]
        if logits_BV.ndim != 2 or not all(
            len(x) == batch for x in (params, positions, seeds, prompt_ids, output_ids)
        ):
            raise ValueError("logits_BV must be [B, V] with one params/position/seed/ids entry per row")
        raw_BV = logits_BV.float()
        penalized_BV = apply_penalties(raw_BV, params, prompt_ids, output_ids)
        token_B = penalized_BV.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if rows:
            rows_R = torch.tensor(rows, device=raw_BV.device)
            picked_R = self._sample_rows(penalized_BV[rows_R], [params[i] for i in rows],
                                         [positions[i] for i in rows], [seeds[i] for i in rows])
            token_B[rows_R] = picked_R
        return _with_logprobs(raw_BV, token_B, params)

    def _sample_rows(self, logits_RV: Tensor, params: Sequence[SamplingParams],
                     positions: Sequence[int], seeds: Sequence[int]) -> Tensor:
        """int64 [R]: temperature, top-k, top-p, min-p, then the seeded exponential race."""
        vocab, device = logits_RV.shape[1], logits_RV.device
        logits_RV = logits_RV / _row_values(params, "temperature", device)
        top_k_R = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        top_p_R = _row_values(params, "top_p", device)[:, 0]
        if bool((top_k_R < vocab).any()) or bool((top_p_R < 1).any()):
            logits_RV = apply_top_k_top_p(logits_RV, top_k_R, top_p_R)
        min_p_R = _row_values(params, "min_p", device)[:, 0]
        if bool((min_p_R > 0).any()):
            logits_RV = apply_min_p(logits_RV, min_p_R)
        q_RV = self._exponential_noise(seeds, positions, vocab, device)
        return (logits_RV.softmax(dim=-1) / q_RV).argmax(dim=-1)

    def _exponential_noise(self, seeds: Sequence[int], positions: Sequence[int],
                           vocab: int, device: torch.device) -> Tensor:
        """float32 [R, V] Exponential(1) noise; row r depends only on (seeds[r], positions[r])."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        q_RV = torch.empty(len(seeds), vocab, device=device)
        for r, (seed, pos) in enumerate(zip(seeds, positions)):
            gen.manual_seed(draw_seed(seed, pos))
            q_RV[r].exponential_(generator=gen)
        # An exact 0 would turn a filtered token's 0/0 into NaN, which argmax would pick.
        return q_RV.clamp_min_(torch.finfo(q_RV.dtype).tiny)


def _with_logprobs(raw_BV: Tensor, token_B: Tensor, params: Sequence[SamplingParams]) -> SampleOutput:
    """Attach raw-distribution log-probs of the chosen tokens and the requested top-N."""
    logprobs_BV = raw_BV.log_softmax(dim=-1)
    chosen_B = logprobs_BV.gather(1, token_B[:, None])[:, 0]
    most = max((p.logprobs or 0 for p in params), default=0)
    top: list[list[tuple[int, float]] | None] = [None] * len(params)
    if most:
        values_BN, ids_BN = logprobs_BV.topk(min(most, raw_BV.shape[1]), dim=-1)  # sorted desc
        values, ids = values_BN.tolist(), ids_BN.tolist()
        for b, p in enumerate(params):
            if p.logprobs:
                top[b] = list(zip(ids[b][: p.logprobs], values[b][: p.logprobs]))
    return SampleOutput(token_B.tolist(), chosen_B.tolist(), top)
