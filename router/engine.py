"""The engine of a router replica: continuous batching over a paged KV cache, sampling, detokenizing.

``Engine`` is the synchronous core (one thread owns it); ``router/async_engine.py`` wraps it for asyncio.
Requests that could never be served are refused up front with a message that gives the limit.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from models.model import Llama4TextModel
from router.detokenizer import IncrementalDetokenizer
from router.model_runner import ModelRunner, decodes_first
from router.paged_attention import PagedKVCache
from router.request import GenerationOutput, GenerationRequest, InvalidRequestError, Usage
from router.sampling import Sampler, SamplingParamsError, request_seed
from router.scheduler import ScheduledChunk, Scheduler
from router.sequence import Sequence, Status
from models.config import Llama4Config
from router.kv_blocks import KVBlockManager, num_blocks_for_budget


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_bytes: int = 256 << 20  # K and V of every layer
    block_size: int = 16
    max_num_seqs: int = 64  # running at once
    max_tokens_per_step: int = 512  # decodes + prefill chunks per step
    max_waiting: int = 256  # queued beyond this -> overloaded
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings

    def __post_init__(self):
        for name in ("kv_cache_bytes", "block_size", "max_num_seqs", "max_tokens_per_step", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"EngineConfig.max_model_len must be positive, got {self.max_model_len}")


def num_kv_blocks(cfg: Llama4Config, config: EngineConfig, dtype: torch.dtype) -> int:
    num_blocks = num_blocks_for_budget(config.kv_cache_bytes, config.block_size, cfg.num_key_value_heads,
                                       cfg.head_dim, torch.finfo(dtype).bits // 8)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no {config.block_size}-token block")
    return num_blocks


def max_sequence_len(cfg: Llama4Config, config: EngineConfig, dtype: torch.dtype) -> int:
    """The context a request may use: the model's, the configured cap, and what the KV cache can ever hold."""
    n_chunked = sum(cfg.is_chunked_layer(i) for i in range(cfg.num_hidden_layers))
    blocks = KVBlockManager(num_kv_blocks(cfg, config, dtype), config.block_size,
                            cfg.num_hidden_layers - n_chunked, n_chunked, cfg.attention_chunk_size)
    return min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings,
               blocks.longest_sequence(step_tokens=config.max_tokens_per_step))


class Engine:
    def __init__(self, model: Llama4TextModel, tokenizer, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = model.cfg
        dtype, device = model.activation_dtype, model.embed_tokens.weight.device
        self.max_model_len = max_sequence_len(cfg, config, dtype)
        self.cache = PagedKVCache(cfg, num_kv_blocks(cfg, config, dtype), config.block_size, dtype, device)
        self.blocks = self.cache.new_block_manager()
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_tokens_per_step, config.max_waiting)
        self.runner = ModelRunner(model, self.cache, self.blocks)
        self.sampler = Sampler()
        self.eos_ids = frozenset(getattr(tokenizer, "eos_token_ids", ()) or cfg.eos_token_id)
        self.sequences: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request, or raise ``InvalidRequestError`` / ``OverloadedError`` without queueing it."""
        self._validate(request)
        context = request.prompt_ids + request.output_prefix  # the detokenizer continues after the prefix
        seq = Sequence(request=request, seed=request_seed(request.params), arrival=next(self._arrivals),
                       detokenizer=IncrementalDetokenizer(self.tokenizer, context, request.params.stop),
                       output_ids=list(request.output_prefix))
        self.scheduler.add(seq)
        self.sequences[request.request_id] = seq

    def _validate(self, request: GenerationRequest) -> None:
        prompt, params, vocab = request.prompt_ids, request.params, self.model.cfg.vocab_size
        if request.request_id in self.sequences:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if not prompt:
            raise InvalidRequestError("the prompt is empty: at least one token is needed")
        for name, ids in (("prompt", prompt), ("output_prefix", request.output_prefix)):
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise InvalidRequestError(f"{name} token ids must be in [0, {vocab}); got {bad[:5]}")
        if len(request.output_prefix) >= params.max_tokens:
            raise InvalidRequestError(f"output_prefix ({len(request.output_prefix)} tokens) leaves nothing of "
                                      f"max_tokens ({params.max_tokens}) to generate")
        try:
            params.validate(vocab)
        except SamplingParamsError as e:
            raise InvalidRequestError(str(e)) from None
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:  # also what the KV cache could ever hold: it never fits later either
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"context length of {self.max_model_len} tokens{self._why_limit()}")

    def _why_limit(self) -> str:
        if self.max_model_len < min(self.config.max_model_len or 1 << 62, self.model.cfg.max_position_embeddings):
            return f" (all that this server's KV cache of {self.blocks.num_blocks} blocks can hold)"
        return ""

    def abort(self, request_id: str, reason: str = "abort") -> GenerationOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown/finished)."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, reason, [], [], [], "")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[GenerationOutput]:
        outputs = self._expire_deadlines()
        chunks = decodes_first(self.scheduler.schedule())
        if not chunks:
            return outputs
        logits_RV = self.runner.run(chunks)
        sampling = [c for c in chunks if c.samples]
        seqs = [c.seq for c in sampling]
        sampled = self.sampler.sample(
            logits_RV, [s.request.params for s in seqs], positions=[s.num_tokens for s in seqs],
            seeds=[s.seed for s in seqs], prompt_ids=[s.prompt_ids for s in seqs],
            output_ids=[s.output_ids for s in seqs])
        self.scheduler.after_step(chunks)
        for i, seq in enumerate(seqs):
            outputs.append(self._append(seq, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i]))
        self.num_steps += 1
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float, top) -> GenerationOutput:
        seq.output_ids.append(token)
        params = seq.request.params
        if token in self.eos_ids and not params.ignore_eos or token in params.stop_token_ids:
            return self._finish(seq, "stop", [token], [logprob], [top], seq.detokenizer.flush())
        step = seq.detokenizer.add(token)
        if step.stop_string is not None:
            return self._finish(seq, "stop", [token], [logprob], [top], step.text_delta)
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", [token], [logprob], [top], step.text_delta + seq.detokenizer.flush())
        return self._output(seq, [token], [logprob], [top], step.text_delta, None)

    def _finish(self, seq: Sequence, reason: str, tokens, logprobs, tops, text: str,
                error: str | None = None) -> GenerationOutput:
        self.scheduler.remove(seq)
        del self.sequences[seq.request_id]
        return self._output(seq, tokens, logprobs, tops, text, reason, error)

    @staticmethod
    def _output(seq, tokens, logprobs, tops, text, reason, error=None) -> GenerationOutput:
        return GenerationOutput(
            request_id=seq.request_id, token_ids=tuple(tokens), text_delta=text, logprobs=tuple(logprobs),
            top_logprobs=tuple(None if t is None else tuple(t) for t in tops), finish_reason=reason,
            usage=Usage(len(seq.prompt_ids), len(seq.output_ids)), error=error)

    def _expire_deadlines(self) -> list[GenerationOutput]:
        now = time.monotonic()
        late = [s for s in self.sequences.values()
                if s.request.deadline is not None and s.request.deadline <= now and s.status is not Status.FINISHED]
        return [self._finish(s, "deadline", [], [], [], "") for s in late]

    def fail_all(self, message: str) -> list[GenerationOutput]:
        """Finish every request with an error (the step itself failed); frees all their blocks."""
        return [self._finish(s, "error", [], [], [], "", error=message) for s in list(self.sequences.values())]


__all__ = ["Engine", "EngineConfig", "ScheduledChunk"]
