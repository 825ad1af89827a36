"""The router engine against the foundation model: continuous batching, preemption, sampling, stops, limits."""

import asyncio
import dataclasses
import time

import pytest
import torch

from models.generate import greedy_generate
from router.async_engine import AsyncEngine
from router.engine import Engine, EngineConfig
from router.paged_attention import StepAttention
from models.attention import Attention
from router.request import GenerationRequest, InvalidRequestError, OverloadedError
from router.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# tiny preset: 4 layers (3 chunked with chunk 16, 1 global), 2 KV heads x 16 dims, fp32, block 4 tokens:
BLOCK_BYTES = 4 * 2 * 16 * 4 * 2


def _engine(model, tokenizer, blocks=4096, **kw):
    cfg = dict(kv_cache_bytes=blocks * BLOCK_BYTES, block_size=4, max_tokens_per_step=24, max_num_seqs=16)
    return Engine(model, tokenizer, EngineConfig(**{**cfg, **kw}))


def _prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, 400, (lengths[i % len(lengths)],), generator=g).tolist()) for i in range(n)]


def _run(engine, requests, join_at=None):
    """Step until idle; ``join_at`` maps step number -> requests added before that step. Returns id -> tokens."""
    out, join_at = {}, dict(join_at or {})
    for r in requests:
        engine.add_request(r)
    step = 0
    while engine.has_work() or join_at:
        for r in join_at.pop(step, []):
            engine.add_request(r)
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        step += 1
    return out


def _alone(model, prompt, n):
    return greedy_generate(model, torch.tensor([prompt]), n)[0].tolist()


@pytest.mark.parametrize("prefill_reads,path", [(StepAttention.KERNEL_PREFILL_READS, "kernel_step"),
                                               (StepAttention.KERNEL_PREFILL_READS, "layers"), (0, "layers"),
                                               (StepAttention.KERNEL_PREFILL_READS, "separate")])
def test_mixed_batch_with_late_joins_and_preemption_matches_running_alone(model, tokenizer, prefill_reads, path,
                                                                           monkeypatch):
    # prefill_reads 0: prefill chunks go to SDPA over gathered keys while the decodes stay with the CPU kernel;
    # "kernel_step": whole steps driven by models/kernel_step.py; "layers": layer by layer with the attention
    # sub-layer in one call (cpu_kernels.attention_block); "separate": that sub-layer as separate kernel calls
    assert model.kernel_step is not None
    monkeypatch.setattr(StepAttention, "KERNEL_PREFILL_READS", prefill_reads)
    if path != "kernel_step":
        monkeypatch.setattr(model, "kernel_step", None)
    if path == "separate":
        monkeypatch.setattr(Attention, "block", lambda *args, **kwargs: None)
    prompts = _prompts(7, [5, 40, 17, 61, 3, 33, 9])
    reqs = [GenerationRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    # 60 blocks: not enough for everyone at once, so the newest get preempted and recomputed.
    engine = _engine(model, tokenizer, blocks=60)
    out = _run(engine, reqs[:3], join_at={2: reqs[3:5], 6: reqs[5:]})
    assert engine.scheduler.num_preemptions > 0
    for r in reqs:
        assert out[r.request_id] == _alone(model, list(r.prompt_ids), GREEDY.max_tokens), r.request_id
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block came back


def test_torch_path_without_the_cpu_kernels_matches_running_alone(ckpt, tokenizer, monkeypatch):
    """Where the CPU kernels cannot run (GPU, no compiler): gathered keys and padded SDPA for the decodes."""
    from models import cpu_kernels
    from models.loading import load_model

    monkeypatch.setattr(cpu_kernels, "_lib", None)
    plain = load_model(ckpt)
    prompts = _prompts(4, [5, 40, 17, 3], seed=3)
    reqs = [GenerationRequest(f"p{i}", p, GREEDY) for i, p in enumerate(prompts)]
    engine = _engine(plain, tokenizer, blocks=60)  # too few for all at once: preemption too
    out = _run(engine, reqs[:2], join_at={3: reqs[2:]})
    for r in reqs:
        assert out[r.request_id] == _alone(plain, list(r.prompt_ids), GREEDY.max_tokens), r.request_id
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_bf16_held_weights_serve_the_same_tokens(ckpt, model, tokenizer):
    """What the server does with a bf16 checkpoint on CPU (weight_dtype auto): fp32 KV cache and arithmetic."""
    from models.loading import load_model

    narrow = load_model(ckpt, weight_dtype=torch.bfloat16)
    prompts = _prompts(4, [7, 30, 12, 50], seed=3)
    reqs = [GenerationRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    engine = _engine(narrow, tokenizer)
    assert engine.cache.k_NHDh.dtype == torch.float32
    out = _run(engine, reqs)
    for r in reqs:
        assert out[r.request_id] == _alone(model, list(r.prompt_ids), GREEDY.max_tokens), r.request_id


def test_seeded_sampling_same_in_any_batch_and_after_replay(model, tokenizer):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True,
                            repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2)
    prompt = _prompts(1, [12], seed=3)[0]
    alone = _run(_engine(model, tokenizer), [GenerationRequest("x", prompt, params)])["x"]
    others = [GenerationRequest(f"o{i}", p, SamplingParams(temperature=1.0, seed=i, max_tokens=30))
              for i, p in enumerate(_prompts(5, [7, 30, 2], seed=9))]
    batched = _run(_engine(model, tokenizer), others[:2] + [GenerationRequest("x", prompt, params)],
                   join_at={3: others[2:]})["x"]
    assert batched == alone
    # A stream resumed from the middle (as on another replica) continues exactly as it would have.
    resumed = _run(_engine(model, tokenizer), [GenerationRequest("x", prompt, params, output_prefix=tuple(alone[:8]))])
    assert resumed["x"] == alone[8:]
    # A different seed gives a different stream (the seed is really used).
    other_seed = SamplingParams(**{**params.__dict__, "seed": 99})
    assert _run(_engine(model, tokenizer), [GenerationRequest("x", prompt, other_seed)])["x"] != alone


def test_chunked_prefill_keeps_decodes_going(model, tokenizer):
    engine = _engine(model, tokenizer, max_tokens_per_step=8)
    engine.add_request(GenerationRequest("short", (5, 6, 7), GREEDY))
    engine.step()  # prefill of the short one
    engine.add_request(GenerationRequest("long", _prompts(1, [60])[0], GREEDY))
    for _ in range(8):  # the 60-token prompt needs 9 steps at 7 prefill tokens per step
        got = {o.request_id for o in engine.step()}
        assert "short" in got  # one token for the running stream in every step
        assert "long" not in got
    assert engine.sequences["long"].num_computed < 60


def test_chunked_layers_hold_one_chunk(model, tokenizer):
    engine = _engine(model, tokenizer, max_tokens_per_step=64)
    engine.add_request(GenerationRequest("a", _prompts(1, [50])[0], SamplingParams(temperature=0, max_tokens=60,
                                                                                 ignore_eos=True)))
    peak = 0
    while engine.has_work():
        engine.step()
        if "a" in engine.sequences:
            tables = engine.blocks.chunked_tables("a")
            peak = max(peak, max(sum(b is not None for b in t) for t in tables))
            n = engine.blocks.num_tokens("a")
            assert all(len(t) == -(-n // 4) for t in engine.blocks.global_tables("a"))  # global keeps all
    assert peak <= 16 // 4 + 1  # chunk 16, block 4: one chunk of blocks (+1 while a step crosses into the next)


def test_abort_and_errors_never_leak_blocks(model, tokenizer):
    engine = _engine(model, tokenizer, blocks=60)
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(temperature=0.7, seed=i, max_tokens=16))
            for i, p in enumerate(_prompts(12, [4, 25, 11]))]
    for r in reqs[:6]:
        engine.add_request(r)
    for step in range(30):
        if step == 3:
            engine.abort("r1")
            engine.abort("r4")
            assert engine.abort("nope") is None
        if step == 5:
            for r in reqs[6:]:
                engine.add_request(r)
        if step == 9:
            finals = engine.fail_all("injected failure")
            assert finals and all(o.finish_reason == "error" for o in finals)
        engine.step()
    while engine.has_work():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_stops(model, tokenizer):
    prompt = _prompts(1, [6], seed=4)[0]
    first = _run(_engine(model, tokenizer), [GenerationRequest("a", prompt, GREEDY)])["a"]
    text = tokenizer.decode(first, skip_special_tokens=True)  # what the stream emits
    # stop token id: finish on it, and the id is reported
    stop_id = first[5]
    out = list(_run(_engine(model, tokenizer), [GenerationRequest(
        "b", prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(stop_id,)))])["b"])
    assert out == first[:first.index(stop_id) + 1]
    # stop string across token boundaries: the text stops right before it, the stop string is not emitted
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        engine = _engine(model, tokenizer)
        engine.add_request(GenerationRequest("c", prompt, SamplingParams(temperature=0, max_tokens=24, stop=(stop,))))
        pieces, reason = [], None
        while engine.has_work():
            for o in engine.step():
                pieces.append(o.text_delta)
                reason = o.finish_reason or reason
        assert reason == "stop"
        assert "".join(pieces) == text[:text.index(stop)]
    # max_tokens: finish_reason "length" and exactly that many tokens
    engine = _engine(model, tokenizer)
    engine.add_request(GenerationRequest("d", prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)))
    outs = [o for _ in range(10) for o in engine.step()]
    assert sum(len(o.token_ids) for o in outs) == 5 and outs[-1].finish_reason == "length"
    assert outs[-1].usage.prompt_tokens == len(prompt) and outs[-1].usage.completion_tokens == 5


@pytest.mark.parametrize("make,needle", [
    (lambda: GenerationRequest("e", (), GREEDY), "prompt is empty"),
    (lambda: GenerationRequest("e", (1, 10 ** 6), GREEDY), "token ids must be in [0, "),
    (lambda: GenerationRequest("e", (5,) * 4090, GREEDY), "context length of 4096"),
    (lambda: GenerationRequest("e", (1, 2), SamplingParams(max_tokens=4095)), "exceeds the context length"),
    (lambda: GenerationRequest("e", (1, 2), SamplingParams(stop_token_ids=(10 ** 6,))), "stop_token_ids"),
    (lambda: GenerationRequest("e", (1, 2), GREEDY, output_prefix=(3,) * 24), "leaves nothing"),
])
def test_bad_requests_refused_with_the_limit(model, tokenizer, make, needle):
    engine = _engine(model, tokenizer)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(make())
    assert needle in str(err.value)
    assert not engine.has_work()


def test_refuses_what_could_never_fit_and_overload(model, tokenizer):
    engine = _engine(model, tokenizer, blocks=20)
    limit = engine.max_model_len  # 20 blocks of 4 tokens: far below the model's 4096 positions
    assert limit < 200 and engine.blocks.max_blocks_for(limit, 24) <= 20 < engine.blocks.max_blocks_for(limit + 1, 24)
    with pytest.raises(InvalidRequestError, match=f"context length of {limit} tokens .*KV cache of 20 blocks"):
        engine.add_request(GenerationRequest("big", tuple(range(3, 203)), GREEDY))
    engine = _engine(model, tokenizer, max_waiting=2)
    engine.add_request(GenerationRequest("a", (1, 2), GREEDY))
    engine.add_request(GenerationRequest("b", (1, 2), GREEDY))
    with pytest.raises(OverloadedError, match="overloaded"):
        engine.add_request(GenerationRequest("c", (1, 2), GREEDY))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(GenerationRequest("a", (1, 2), GREEDY))
    _run(engine, [])  # and it keeps serving
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_async_stream_cancel_and_deadline(model, tokenizer):
    async def main():
        aengine = AsyncEngine(_engine(model, tokenizer))
        try:
            prompt = _prompts(1, [8])[0]
            texts, tokens = [], []
            async for o in aengine.generate(GenerationRequest("s", prompt, GREEDY)):
                tokens += o.token_ids
                texts.append(o.text_delta)
            assert tokens == _alone(model, list(prompt), GREEDY.max_tokens)
            assert "".join(texts) == tokenizer.decode(tokens, skip_special_tokens=True)
            # a consumer that goes away mid-stream: the work stops and the blocks come back
            long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
            stream = aengine.generate(GenerationRequest("c", prompt, long))
            async for _ in stream:
                break
            await stream.aclose()
            await asyncio.sleep(0.2)
            assert await aengine.call(lambda: ("c" not in aengine.engine.sequences,
                                               aengine.engine.blocks.num_free == aengine.engine.blocks.num_blocks)) \
                == (True, True)
            # a deadline that passes: finish_reason "deadline", blocks freed
            last = None
            async for o in aengine.generate(GenerationRequest("d", prompt, long, deadline=time.monotonic() + 0.3)):
                last = o
            assert last.finish_reason == "deadline"
            assert await aengine.call(lambda: aengine.engine.blocks.num_free) == aengine.engine.blocks.num_blocks
            # a refused request raises before any output, and the engine keeps serving
            with pytest.raises(InvalidRequestError):
                async for _ in aengine.generate(GenerationRequest("x", (), GREEDY)):
                    pass
            n = 0
            async for o in aengine.generate(GenerationRequest("y", prompt, GREEDY)):
                n += len(o.token_ids)
            assert n == GREEDY.max_tokens
        finally:
            aengine.shutdown()

    asyncio.run(main())


def test_attention_sub_layer_in_one_call_gives_the_logits_of_separate_calls(model, tokenizer, monkeypatch):
    """cpu_kernels.attention_block against the same sub-layer as norm / q|k|v / RoPE / attention / o_proj calls,
    on one step of decodes and short prefills (the same step run twice: its K/V writes are the same values)."""
    from router.model_runner import decodes_first

    engine = _engine(model, tokenizer)
    prompts = _prompts(3, [5, 40, 17], seed=11)
    _run(engine, [GenerationRequest(f"d{i}", p, dataclasses.replace(GREEDY, max_tokens=30))
                  for i, p in enumerate(prompts[:2])], join_at={})
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"s{i}", p, GREEDY))
    for _ in range(3):  # some decode, the rest prefill
        engine.step()
    engine.add_request(GenerationRequest("late", prompts[0], GREEDY))
    chunks = decodes_first(engine.scheduler.schedule())
    assert any(c.num_tokens == 1 for c in chunks) and any(c.num_tokens > 1 for c in chunks)
    from models import cpu_kernels

    monkeypatch.setattr(model, "kernel_step", None)  # layer by layer (the whole-step path has its own test)
    calls = []
    real = cpu_kernels.attention_block
    monkeypatch.setattr(cpu_kernels, "attention_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    one_call = engine.runner.run(chunks)
    assert len(calls) == model.cfg.num_hidden_layers  # every layer took the one-call path
    monkeypatch.setattr(Attention, "block", lambda *args, **kwargs: None)
    torch.testing.assert_close(engine.runner.run(chunks), one_call, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def dense_and_moe(tmp_path_factory):
    """tiny with dense and MoE layers alternating (Maverick's pattern) and top-2 routing: every branch of a step."""
    from models.checkpoint_writer import make_checkpoint
    from models.tokenizer import Tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("alt"), "tiny", seed=3,
                           overrides=dict(interleave_moe_layer_step=2, num_experts_per_tok=2))
    return path, Tokenizer.from_dir(path)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts", ["held", "seam"])
def test_whole_step_on_the_kernels_gives_the_logits_of_the_layer_by_layer_path(dense_and_moe, weights, experts,
                                                                               monkeypatch):
    """models/kernel_step.py against the layer-by-layer path, bit for bit, on steps of decodes and short prefills
    (the same step run twice: its K/V writes are the same values). "held": the experts are packed here, the whole
    step is one kernel call; "seam": the seam does not hand them over (as a remote one would not), so every MoE
    layer goes through dispatch / combine between calls."""
    from models.kernel_step import KernelStep
    from models.loading import load_model
    from models.seam import LocalExperts
    from router.model_runner import decodes_first

    path, tok = dense_and_moe
    model = load_model(path, weight_dtype=weights)
    assert model.kernel_step is not None and {layer.is_moe for layer in model.layers} == {True, False}
    if experts == "seam":
        monkeypatch.setattr(LocalExperts, "packed_layer", lambda self, layer_idx: None)
        model.kernel_step = KernelStep(model)
    engine = _engine(model, tok)
    prompts = _prompts(4, [5, 40, 17, 9], seed=12)
    for i, p in enumerate(prompts[:2]):
        engine.add_request(GenerationRequest(f"d{i}", p, dataclasses.replace(GREEDY, max_tokens=30)))
    compared, real = 0, LocalExperts.dispatch
    for step in range(12):
        if step == 4:
            for i, p in enumerate(prompts[2:]):
                engine.add_request(GenerationRequest(f"s{i}", p, GREEDY))
        chunks = decodes_first(engine.scheduler.schedule())
        dispatched = []
        monkeypatch.setattr(LocalExperts, "dispatch", lambda *a, **k: dispatched.append(1) or real(*a, **k))
        whole = engine.runner.run(chunks)
        assert len(dispatched) == (sum(layer.is_moe for layer in model.layers) if experts == "seam" else 0)
        monkeypatch.setattr(LocalExperts, "dispatch", real)
        step_fn = model.kernel_step
        model.kernel_step = None
        try:
            layers = engine.runner.run(chunks)
        finally:
            model.kernel_step = step_fn
        assert torch.equal(whole, layers), f"step {step}"
        compared += any(c.num_tokens > 1 for c in chunks) and any(c.num_tokens == 1 for c in chunks)
        engine.scheduler.after_step(chunks)  # the engine's bookkeeping without sampling (positions only matter)
        for c in chunks:
            if c.samples:
                c.seq.output_ids.append(7)
    assert compared  # some step mixed decodes and prefill rows


def test_whole_step_falls_back_when_the_kernel_does_not_take_every_row(model, tokenizer, monkeypatch):
    """A step with a long prefill (SDPA) goes layer by layer; the engine's tokens are those of running alone."""
    calls = []
    real = type(model.kernel_step).__call__
    monkeypatch.setattr(type(model.kernel_step), "__call__",
                        lambda self, *a: calls.append(out := real(self, *a)) or out)
    monkeypatch.setattr(StepAttention, "KERNEL_PREFILL_READS", 0)
    prompt = _prompts(1, [20], seed=4)[0]
    out = _run(_engine(model, tokenizer), [GenerationRequest("x", prompt, GREEDY)])
    assert calls[0] is None and all(c is not None for c in calls[1:])  # prefill: layers; decodes: whole steps
    assert len(calls) == GREEDY.max_tokens
    assert out["x"] == _alone(model, list(prompt), GREEDY.max_tokens)
