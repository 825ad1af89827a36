"""The CPU decode kernels (models/csrc/gemv.c) against torch: odd shapes, bf16 weights, experts without rows,
the fallback, a build from scratch, and the model with bf16-held weights against fp32-held ones."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.expert_math import grouped_swiglu, kernel_layout

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no AVX2/FMA CPU or no C compiler here")


def _ref(x, w):
    return (x.double() @ w.double().T).float()


@pytest.mark.parametrize("M", [1, 2, 3, 5, cpu_kernels.MAX_ROWS])
@pytest.mark.parametrize("N,K", [(1, 8), (5, 13), (30, 64), (67, 770)])
def test_linear_matches_float64(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    y = cpu_kernels.linear(x, w)
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y, _ref(x, w), rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_bf16_weights_are_widened_exactly():
    g = torch.Generator().manual_seed(1)
    x, w16 = torch.randn(7, 200, generator=g), torch.randn(33, 200, generator=g).bfloat16()
    # Same values, same arithmetic order: bit-identical whether the weights are held in bf16 or in fp32.
    assert torch.equal(cpu_kernels.linear(x, w16), cpu_kernels.linear(x, w16.float()))
    torch.testing.assert_close(cpu_kernels.linear(x, w16), _ref(x, w16.float()), rtol=1e-5, atol=1e-4)


def test_leading_dims_bias_and_many_rows_fall_back():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 3, 40, generator=g), torch.randn(9, 40, generator=g), torch.randn(9, generator=g)
    torch.testing.assert_close(cpu_kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    big = torch.randn(cpu_kernels.MAX_ROWS + 1, 40, generator=g)
    assert torch.equal(cpu_kernels.linear(big, w), F.linear(big, w))  # torch's GEMM above MAX_ROWS
    assert torch.equal(cpu_kernels.linear(big, w.bfloat16()), F.linear(big, w.bfloat16().float()))


def test_grouped_linear_with_empty_experts():
    g = torch.Generator().manual_seed(3)
    E, N, K, counts = 5, 21, 48, [3, 0, 1, 0, 4]
    w_ENK, x_SK = torch.randn(E, N, K, generator=g), torch.randn(sum(counts), K, generator=g)
    y = cpu_kernels.grouped_linear(x_SK, counts, w_ENK)
    start = 0
    for e, n in enumerate(counts):
        torch.testing.assert_close(y[start:start + n], _ref(x_SK[start:start + n], w_ENK[e]), rtol=1e-5, atol=1e-5)
        start += n
    assert cpu_kernels.grouped_linear(x_SK, [8, 0, 0, 0, 0], w_ENK) is not None
    assert cpu_kernels.grouped_linear(x_SK, counts[:4], w_ENK) is None  # counts must cover every expert
    many = torch.randn(cpu_kernels.MAX_ROWS + 1, K, generator=g)
    assert cpu_kernels.grouped_linear(many, [len(many), 0, 0, 0, 0], w_ENK) is None


def test_grouped_swiglu_kernel_layout_matches_checkpoint_layout():
    g = torch.Generator().manual_seed(4)
    E, D, F_, counts = 4, 64, 48, [2, 0, 5, 1]
    gate_up, down = torch.randn(E, D, 2 * F_, generator=g) / 8, torch.randn(E, F_, D, generator=g) / 8
    x_SD = torch.randn(sum(counts), D, generator=g)
    expected = grouped_swiglu(x_SD, counts, gate_up, down)  # checkpoint orientation: torch's matmul
    gu_k, down_k = kernel_layout(gate_up), kernel_layout(down)
    assert torch.equal(gu_k, gate_up) and gu_k.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(grouped_swiglu(x_SD, counts, gu_k, down_k), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped_swiglu(x_SD, counts, kernel_layout(gate_up.bfloat16()),
                                              kernel_layout(down.bfloat16())),
                               grouped_swiglu(x_SD, counts, gate_up.bfloat16().float(), down.bfloat16().float()),
                               rtol=1e-5, atol=1e-5)


def test_without_the_library_torch_answers(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 24, generator=g), torch.randn(6, 24, generator=g)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    assert torch.equal(cpu_kernels.linear(x, w.bfloat16()), F.linear(x, w.bfloat16().float()))
    assert cpu_kernels.grouped_linear(x, [3], w[None]) is None


def test_builds_from_scratch_and_can_be_turned_off(tmp_path):
    code = ("from models import cpu_kernels; import torch; lib = cpu_kernels.library(); "
            "print(lib is not None, torch.equal(cpu_kernels.linear(torch.ones(2, 16), torch.ones(3, 16)), "
            "torch.full((2, 3), 16.0)))")
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
    m32, m16 = load_model(ckpt), load_model(ckpt, weight_dtype=torch.bfloat16)
    assert m16.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16 and m16.norm.weight.dtype == torch.float32
    prompt = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        c32, c16 = m32.new_cache(3), m16.new_cache(3)
        logits32, logits16 = m32(prompt, c32), m16(prompt, c16)  # prefill: 120 rows, torch's GEMM
        assert logits16.dtype == torch.float32 and torch.equal(logits32, logits16)
        nxt = logits32[:, -1:].argmax(-1)
        for _ in range(3):  # decode: 3 rows, the kernels
            step32, step16 = m32(nxt, c32), m16(nxt, c16)
            assert torch.equal(step32, step16)
            nxt = step32[:, -1:].argmax(-1)
