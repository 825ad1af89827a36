"""The CPU kernels (models/csrc/packed_matmul.c) against torch: odd shapes, bf16 weights, experts without rows,
the fallback, a build from scratch, and the model with bf16-held weights against fp32-held ones."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.expert_math import grouped_swiglu, pack_experts, unpack_experts
from models.layers import Linear

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no AVX2/FMA CPU or no C compiler here")


def _ref(x, w):
    return (x.double() @ w.double().T).float()


def _linear(x, w):
    return cpu_kernels.packed_linear(x, cpu_kernels.pack(w), w.shape[0])


@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 100, 200])  # micro-tiles of 6 rows, chunks of 96
@pytest.mark.parametrize("N,K", [(1, 8), (5, 13), (30, 64), (67, 770)])
def test_packed_linear_matches_float64(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    y = _linear(x, w)
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y, _ref(x, w), rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_pack_round_trips():
    w = torch.randn(3, 37, 20)
    packed = cpu_kernels.pack(w)
    assert packed.shape == (3, 3, 20, 16) and torch.equal(cpu_kernels.unpack(packed, 37), w)


def test_bf16_weights_are_widened_exactly_and_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    x, w16 = torch.randn(13, 200, generator=g), torch.randn(33, 200, generator=g).bfloat16()
    y = _linear(x, w16)
    assert torch.equal(y, _linear(x, w16.float()))  # same values, same FMA chain: bit-identical
    torch.testing.assert_close(y, _ref(x, w16.float()), rtol=1e-5, atol=1e-4)
    for rows in (slice(0, 1), slice(3, 5), slice(2, 9)):  # a row's result is the same in any batch
        assert torch.equal(_linear(x[rows], w16), y[rows])


def test_leading_dims_bias_and_empty_input():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 3, 40, generator=g), torch.randn(9, 40, generator=g), torch.randn(9, generator=g)
    y = cpu_kernels.packed_linear(x, cpu_kernels.pack(w), 9, b)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert _linear(torch.empty(0, 40), w).shape == (0, 9)


def test_grouped_linear_with_empty_experts():
    g = torch.Generator().manual_seed(3)
    E, N, K, counts = 5, 21, 48, [3, 0, 1, 0, 100]
    w_ENK, x_SK = torch.randn(E, N, K, generator=g), torch.randn(sum(counts), K, generator=g)
    y = cpu_kernels.grouped_packed_linear(x_SK, counts, cpu_kernels.pack(w_ENK), N)
    start = 0
    for e, n in enumerate(counts):
        torch.testing.assert_close(y[start:start + n], _ref(x_SK[start:start + n], w_ENK[e]), rtol=1e-5, atol=1e-5)
        start += n
    with pytest.raises(ValueError, match="4 counts for 5 experts"):
        cpu_kernels.grouped_packed_linear(x_SK, counts[:4], cpu_kernels.pack(w_ENK), N)


def test_grouped_swiglu_packed_matches_checkpoint_orientation():
    g = torch.Generator().manual_seed(4)
    E, D, F_, counts = 4, 64, 40, [2, 0, 5, 1]
    gate_up, down = torch.randn(E, D, 2 * F_, generator=g) / 8, torch.randn(E, F_, D, generator=g) / 8
    x_SD = torch.randn(sum(counts), D, generator=g)
    expected = grouped_swiglu(x_SD, counts, gate_up, down)  # checkpoint orientation: torch's matmul
    packed = pack_experts(gate_up, down, torch.float32)
    assert packed[0].dim() == 4 and all(torch.equal(a, b) for a, b in zip(unpack_experts(*packed), (gate_up, down)))
    torch.testing.assert_close(grouped_swiglu(x_SD, counts, *packed), expected, rtol=1e-5, atol=1e-5)
    buffer = torch.full((len(x_SD) + 3, D), float("nan"))  # e.g. a shared-memory buffer bigger than needed
    returned = grouped_swiglu(x_SD, counts, *packed, out_SD=buffer[:len(x_SD)])
    assert returned.data_ptr() == buffer.data_ptr() and torch.equal(buffer[:len(x_SD)], returned)
    torch.testing.assert_close(returned, expected, rtol=1e-5, atol=1e-5)
    assert buffer[len(x_SD):].isnan().all()
    torch.testing.assert_close(grouped_swiglu(x_SD, counts, gate_up, down, out_SD=torch.empty_like(x_SD)), expected)
    packed16 = pack_experts(gate_up.bfloat16(), down.bfloat16(), torch.float32)
    torch.testing.assert_close(grouped_swiglu(x_SD, counts, *packed16),
                               grouped_swiglu(x_SD, counts, gate_up.bfloat16().float(), down.bfloat16().float()),
                               rtol=1e-5, atol=1e-5)
    assert pack_experts(gate_up.bfloat16(), down.bfloat16(), torch.bfloat16)[0].dim() == 3  # bf16 math: torch


def test_without_the_library_nothing_is_packed(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    w = torch.randn(6, 24)
    assert not cpu_kernels.can_pack(w, torch.float32)
    lin = Linear(24, 6, bias=False)
    lin.weight.data.copy_(w)
    lin.pack_for_cpu(torch.float32)
    x = torch.randn(3, 24)
    assert lin.packed is None and torch.equal(lin(x), F.linear(x, w))


def test_builds_from_scratch_and_can_be_turned_off(tmp_path):
    code = ("from models import cpu_kernels; import torch; lib = cpu_kernels.library(); "
            "from models.layers import Linear; lin = Linear(16, 3, bias=False); lin.weight.data.fill_(1); "
            "lin.pack_for_cpu(torch.float32); "
            "print(lib is not None, torch.equal(lin(torch.ones(2, 16)), torch.full((2, 3), 16.0)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MOE_SERVE_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # one library, no temporary left behind
    off = subprocess.run([sys.executable, "-c", code], env={**env, "MOE_SERVE_CPU_KERNELS": "0"},
                         capture_output=True, text=True, timeout=120)
    assert off.stdout.split() == ["False", "True"], off.stderr


def test_model_with_bf16_weights_equals_fp32_weights(ckpt):
    from models.loading import load_model, resident_weight_dtype

    assert resident_weight_dtype(ckpt, torch.float32) == torch.bfloat16  # the tiny checkpoint is stored bf16
    assert resident_weight_dtype(ckpt, torch.bfloat16) == torch.bfloat16
    assert resident_weight_dtype(ckpt, torch.float32, requested="float32") == torch.float32  # told: as told
    m32, m16 = load_model(ckpt), load_model(ckpt, weight_dtype=torch.bfloat16)
    q_proj = m16.layers[0].self_attn.q_proj
    assert q_proj.weight is None and q_proj.packed.dtype == torch.bfloat16 and m16.norm.weight.dtype == torch.float32
    assert m16.experts.gate_up_EDF2["0"].dtype == torch.bfloat16 and m16.experts.gate_up_EDF2["0"].dim() == 4
    prompt = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        c32, c16 = m32.new_cache(3), m16.new_cache(3)
        logits32, logits16 = m32(prompt, c32), m16(prompt, c16)  # prefill: 120 rows
        assert logits16.dtype == torch.float32 and torch.equal(logits32, logits16)
        nxt = logits32[:, -1:].argmax(-1)
        for _ in range(3):  # decode: 3 rows, the kernels
            step32, step16 = m32(nxt, c32), m16(nxt, c16)
            assert torch.equal(step32, step16)
            nxt = step32[:, -1:].argmax(-1)
