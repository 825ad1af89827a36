"""Sampling parameters, penalties, filters and (seed, position)-keyed draws.

Legend: B batch rows, V vocab, S seeds.
"""

import math

import pytest
import torch

from router.sampling import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    apply_penalties,
)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": NAN}, "temperature"),
        ({"temperature": INF}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 101}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": NAN}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"min_p": -INF}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": INF}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": NAN}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("x",) * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop": ("x" * (MAX_STOP_STRING_CHARS + 1),)}, "stop[0]"),
        ({"stop": ("ok", "")}, "stop[1]"),
        ({"stop": (3,)}, "stop[0]"),
        ({"stop_token_ids": (5, -1)}, "stop_token_ids[1]"),
        ({"stop_token_ids": tuple(range(65))}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_params_rejected_naming_the_field(kwargs, name):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(name + " ")


def test_error_message_format_and_vocab_check():
    with pytest.raises(SamplingParamsError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)
    params = SamplingParams(stop_token_ids=[3, 10], stop="END")
    assert params.stop_token_ids == (3, 10) and params.stop == ("END",)
    params.validate(vocab_size=11)
    with pytest.raises(SamplingParamsError, match=r"^stop_token_ids\[1\]"):
        params.validate(vocab_size=10)


def test_valid_edges_accepted():
    SamplingParams(temperature=0, top_k=-1, top_p=1, min_p=1, seed=0, logprobs=20,
                   presence_penalty=-2, frequency_penalty=2, repetition_penalty=10)
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy
    assert not SamplingParams().is_greedy


def run(logits_BV, params, positions=None, seeds=None, prompt=None, output=None):
    """Sampler.sample with per-row defaults (positions 0, seeds 0, no history)."""
    batch = logits_BV.shape[0]
    return Sampler().sample(
        logits_BV, params, positions or [0] * batch, seeds or [0] * batch,
        prompt or [[]] * batch, output or [[]] * batch,
    )


def seed_sweep(logits_V, params, num_seeds, position=0) -> list[int]:
    """Tokens drawn for one row under ``num_seeds`` seeds, in one batch."""
    logits_BV = logits_V.expand(num_seeds, -1).contiguous()
    out = run(logits_BV, [params] * num_seeds, [position] * num_seeds, list(range(num_seeds)))
    return out.token_ids


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits_BV = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    argmax = logits_BV.argmax(-1).tolist()
    assert run(logits_BV, [SamplingParams(temperature=0)] * 6).token_ids == argmax
    for temp in (0.01, 0.7, 1.0, 5.0, 100.0):
        params = [SamplingParams(temperature=temp, top_k=1, seed=s) for s in range(6)]
        assert run(logits_BV, params, seeds=list(range(6))).token_ids == argmax


def allowed_tokens(logits_V, temp, top_k, top_p, min_p) -> set[int]:
    """The filter chain recomputed independently, in float64 Python."""
    scaled = [x / temp for x in logits_V.double().tolist()]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    if top_k > 0:
        order = order[:top_k]
    z = sum(math.exp(scaled[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(scaled[i]) / z
    top = math.exp(scaled[kept[0]])
    return {i for i in kept if math.exp(scaled[i]) >= min_p * top}


@pytest.mark.parametrize(
    "temp, top_k, top_p, min_p",
    [(1.5, 5, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (2.0, 0, 1.0, 0.3), (3.0, 12, 0.8, 0.05)],
)
def test_filters_never_emit_excluded_tokens(temp, top_k, top_p, min_p):
    logits_V = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 2
    allowed = allowed_tokens(logits_V, temp, top_k, top_p, min_p)
    assert 1 < len(allowed) < 64
    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p)
    drawn = set(seed_sweep(logits_V, params, 400))
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 4)  # the filters are not over-restrictive


def test_draw_depends_only_on_seed_and_position():
    gen = torch.Generator().manual_seed(2)
    logits_V = torch.randn(100, generator=gen) * 0.5
    mine = SamplingParams(temperature=1.0, top_p=0.95)
    alone = run(logits_V[None], [mine], [17], [1234]).token_ids[0]
    others = [SamplingParams(temperature=0.3, top_k=3), SamplingParams(temperature=0),
              SamplingParams(min_p=0.2), SamplingParams(temperature=2.0)]
    for where in range(5):
        logits_BV = torch.randn(5, 100, generator=gen)
        logits_BV[where] = logits_V
        params = others[:where] + [mine] + others[where:]
        positions = [3, 99, 17, 5, 0]
        positions[where] = 17
        seeds = [1234 + k + 1 for k in range(5)]
        seeds[where] = 1234
        assert run(logits_BV, params, positions, seeds).token_ids[where] == alone


def test_different_positions_and_seeds_draw_differently():
    logits_BV = torch.zeros(50, 1000)  # uniform: every draw is pure noise
    params = [SamplingParams()] * 50
    by_position = run(logits_BV, params, list(range(50)), [7] * 50).token_ids
    by_seed = run(logits_BV, params, [5] * 50, list(range(50))).token_ids
    assert len(set(by_position)) > 40 and len(set(by_seed)) > 40
    assert run(logits_BV, params, list(range(50)), [7] * 50).token_ids == by_position


def test_empirical_frequencies_match_softmax():
    logits_V = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temp, num = 0.8, 4000
    counts = torch.bincount(torch.tensor(seed_sweep(logits_V, SamplingParams(temperature=temp), num)),
                            minlength=8).double()
    expected = torch.softmax(logits_V.double() / temp, -1) * num
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 7 dof: p=0.001 at ~24; the draws are deterministic, so no flakes


def test_penalties_hand_computed():
    logits_BV = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    got = apply_penalties(logits_BV, params, prompt_ids=[[0, 1]], output_ids=[[3, 3, 4]])
    # 0, 1: prompt only -> repetition; 3 (x2), 4 (x1): repetition, then presence+frequency.
    want = [2.0 / 2, -1.0 * 2, 0.5, 3.0 / 2 - 0.5 - 0.25 * 2, -2.0 * 2 - 0.5 - 0.25, 1.0]
    torch.testing.assert_close(got, torch.tensor([want]))
    assert logits_BV[0, 0] == 2.0  # input untouched


def test_penalties_are_per_row_and_change_greedy_choice():
    logits_BV = torch.tensor([[3.0, 2.9, 0.0]] * 2)
    params = [SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(temperature=0)]
    out = run(logits_BV, params, output=[[0], [0]])
    assert out.token_ids == [1, 0]
    no_history = apply_penalties(logits_BV, params, [[], []], [[], []])
    torch.testing.assert_close(no_history, logits_BV)


def test_logprobs_come_from_raw_logits():
    logits_BV = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)) * 2
    params = [
        SamplingParams(temperature=0.5, top_k=10, repetition_penalty=1.5, logprobs=5),
        SamplingParams(temperature=0, presence_penalty=1.0, logprobs=None),
        SamplingParams(top_p=0.5, logprobs=0),
    ]
    out = run(logits_BV, params, seeds=[1, 2, 3], prompt=[[0, 1], [2], []], output=[[5], [7], [9]])
    raw_BV = torch.log_softmax(logits_BV, -1)
    for b, tok in enumerate(out.token_ids):
        assert out.logprobs[b] == pytest.approx(raw_BV[b, tok].item(), abs=1e-6)
    assert out.top_logprobs[1] is None and out.top_logprobs[2] is None
    top = out.top_logprobs[0]
    values, ids = raw_BV[0].topk(5)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_sample_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(2, 5), [SamplingParams()], [0], [0], [[]], [[]])
