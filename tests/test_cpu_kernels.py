"""The CPU kernels (models/csrc/) against torch: odd shapes, bf16 weights, experts without rows, the fused norm /
RoPE / activation / decode-attention operations against the reference math, the fallback, a build from scratch,
the model with bf16-held weights against fp32-held ones, and the model without the kernels against with them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.expert_math import grouped_swiglu, pack_experts, unpack_experts
from models.attention import temperature_scale
from models.layers import Linear, apply_rope, l2_norm, rope_cos_sin

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
    attn = m16.layers[0].self_attn
    assert attn.q_proj.weight is None and attn.qkv_packed.dtype == torch.bfloat16  # q|k|v fused, held bf16
    assert m16.layers[0].self_attn.o_proj.packed.dtype == torch.bfloat16 and m16.norm.weight.dtype == torch.float32
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


# ----------------------------------------------------------------------------- fused operations (decode_ops.c)


@pytest.mark.parametrize("M,D", [(1, 8), (3, 64), (37, 768), (5, 13)])
def test_rms_norm_with_and_without_the_residual_add(M, D):
    g = torch.Generator().manual_seed(M + D)
    x, d, w = torch.randn(M, 2 * D, generator=g)[:, :D], torch.randn(M, D, generator=g), torch.randn(D, generator=g)
    h, y = cpu_kernels.rms_norm(x, w, 1e-5, residual=d)  # x is a strided view: read in place
    assert torch.equal(h, x + d)
    torch.testing.assert_close(y, l2_norm(x + d, 1e-5) * w, rtol=1e-6, atol=1e-6)
    same, y0 = cpu_kernels.rms_norm(x, None, 1e-5)
    assert same is x
    torch.testing.assert_close(y0, l2_norm(x, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rope,qk_norm,tuned", [(True, True, False), (True, False, False), (False, False, True)])
def test_rope_qk_norm_and_temperature_in_place(rope, qk_norm, tuned):
    H, Hkv, Dh, T = 6, 2, 16, 7
    g = torch.Generator().manual_seed(int(rope) * 4 + int(qk_norm) * 2 + int(tuned))
    qkv = torch.randn(T, (H + 2 * Hkv) * Dh, generator=g)
    pos_T = torch.tensor([0, 1, 5, 31, 32, 900, 70000])
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, Dh, 2).float() / Dh))
    rope_TF = rope_cos_sin(inv_freq, pos_T)
    scale_T = temperature_scale(pos_T, 32, 0.1) if tuned else None
    q = qkv[:, :H * Dh].unflatten(-1, (H, Dh))
    k = qkv[:, H * Dh:(H + Hkv) * Dh].unflatten(-1, (Hkv, Dh))
    v = qkv[:, (H + Hkv) * Dh:].clone()
    if rope:
        q, k = apply_rope(q, *rope_TF), apply_rope(k, *rope_TF)
    if qk_norm:
        q, k = l2_norm(q, 1e-5), l2_norm(k, 1e-5)
    if tuned:
        q = q * scale_T[:, None, None]
    cpu_kernels.rope_qk(qkv, H, Hkv, Dh, rope_TF if rope else None, qk_norm, 1e-5, scale_T)
    torch.testing.assert_close(qkv[:, :H * Dh], q.flatten(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[:, H * Dh:(H + Hkv) * Dh], k.flatten(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (H + Hkv) * Dh:], v)  # values untouched


@pytest.mark.parametrize("M,F_", [(1, 8), (4, 13), (33, 1000)])
def test_silu_mul_matches_torch_across_the_range(M, F_):
    g = torch.Generator().manual_seed(M + F_)
    x = torch.randn(M, 2 * F_, generator=g) * 30  # reaches where exp over- and underflows
    x[0, :4] = torch.tensor([0.0, -100.0, 100.0, 1e-30])
    ref = F.silu(x[:, :F_].double()) * x[:, F_:].double()
    torch.testing.assert_close(cpu_kernels.silu_mul(x).double(), ref, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("H,Hkv,Dh", [(12, 4, 64), (4, 2, 16), (8, 1, 128), (3, 3, 8)])
def test_paged_decode_attention_matches_sdpa_over_the_same_keys(H, Hkv, Dh):
    bs, S = 4, 6
    g = torch.Generator().manual_seed(H * 100 + Dh)
    # 170 keys: enough for two threads; 2100: values summed keys-outer in a batch, heads-outer alone (below)
    len_S = torch.tensor([1, 2, 5, 9, 170, 2100])
    first_S = torch.tensor([0, 3, 1, 0, 2, 0])  # where the window starts in the first listed block
    width = int(((first_S + len_S + bs - 1) // bs).max())
    n_blocks = S * width + 3
    blocks_SB = torch.randperm(n_blocks, generator=g)[:S * width].view(S, width).contiguous()  # disjoint, shuffled
    k_cache, v_cache = torch.randn(2, n_blocks * bs, Hkv, Dh, generator=g)
    qkv = torch.randn(S, (H + 2 * Hkv) * Dh, generator=g)  # q|k|v side by side, as the fused projection leaves them
    q = qkv[:, :H * Dh].unflatten(-1, (H, Dh))
    k = qkv[:, H * Dh:(H + Hkv) * Dh].unflatten(-1, (Hkv, Dh))
    v = qkv[:, (H + Hkv) * Dh:].unflatten(-1, (Hkv, Dh))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = cpu_kernels.paged_decode_attention(q, k, v, k_cache, v_cache, blocks_SB, first_S, len_S, bs, Dh ** -0.5)
    for s in range(S):
        offs = first_S[s] + torch.arange(len_S[s])
        slots = blocks_SB[s][offs // bs] * bs + offs % bs
        k_ref[slots[-1]], v_ref[slots[-1]] = k[s], v[s]
        ref = F.scaled_dot_product_attention(q[s][:, None], k_ref[slots].transpose(0, 1), v_ref[slots].transpose(0, 1),
                                             scale=Dh ** -0.5, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[s], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # wrote each new key, nothing else
    # A sequence's output is the same alone or in a batch, on one thread or several, keys- or heads-outer.
    alone = [cpu_kernels.paged_decode_attention(q[s:s + 1], k[s:s + 1], v[s:s + 1], k_cache, v_cache,
                                                blocks_SB[s:s + 1], first_S[s:s + 1], len_S[s:s + 1], bs, Dh ** -0.5)
             for s in range(S)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = cpu_kernels.paged_decode_attention(q, k, v, k_cache, v_cache, blocks_SB, first_S, len_S, bs,
                                                        Dh ** -0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.cat(alone), out) and torch.equal(one_thread, out)


def test_model_without_the_kernels_gives_the_same_logits(ckpt, monkeypatch):
    """The torch path (no compiler, no AVX2, or MOE_SERVE_CPU_KERNELS=0) and the kernel path are the same model."""
    from models.loading import load_model

    fast = load_model(ckpt)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    plain = load_model(ckpt)
    assert plain.layers[0].self_attn.qkv_packed is None and plain.layers[0].self_attn.q_proj.weight is not None
    prompt = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        c_plain, c_fast = plain.new_cache(2), fast.new_cache(2)
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        logits_plain = plain(prompt, c_plain)
        monkeypatch.undo()
        torch.testing.assert_close(fast(prompt, c_fast), logits_plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,E,K", [(1, 16, 1), (7, 4, 2), (40, 16, 1), (5, 8, 3)])
def test_routing_kernels_match_the_torch_reference(T, E, K):
    g = torch.Generator().manual_seed(T * E * K)
    logits_TE, x_TD = torch.randn(T, E, generator=g), torch.randn(T, 2 * 24, generator=g)[:, ::2]  # strided x
    scores_TK, ids_TK = cpu_kernels.topk_sigmoid(logits_TE, K)
    ref_logits, ref_ids = torch.topk(logits_TE, K)
    assert torch.equal(ids_TK, ref_ids)
    torch.testing.assert_close(scores_TK, torch.sigmoid(ref_logits), rtol=1e-6, atol=0)
    slot_S, counts = cpu_kernels.route_sort(ids_TK, E)
    assert torch.equal(slot_S, torch.argsort(ids_TK.reshape(-1), stable=True))
    assert counts == torch.bincount(ids_TK.reshape(-1), minlength=E).tolist()
    rows_SD = cpu_kernels.gather_scaled(x_TD, scores_TK, slot_S)
    assert torch.equal(rows_SD, x_TD[slot_S // K] * scores_TK.reshape(-1)[slot_S, None])
    token_major = torch.empty_like(rows_SD)
    token_major[slot_S] = rows_SD
    torch.testing.assert_close(cpu_kernels.scatter_sum(rows_SD, slot_S, T, K), token_major.view(T, K, -1).sum(1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,E,K", [(1, 16, 1), (7, 4, 2), (40, 16, 1), (0, 4, 1)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_one_call_layer_parts_equal_their_separate_kernels(T, E, K, wdtype):
    """swiglu, moe_gate and experts_ffn (what models/kernel_step.py calls per layer) against the separate kernels
    they are made of, bit for bit, and against torch's math in float64."""
    g = torch.Generator().manual_seed(T + E + K)
    D, F_ = 48, 40
    x_TD = torch.randn(T, 2 * D, generator=g)[:, ::2]  # strided rows, as a view of a wider buffer
    gate_up, down = (torch.randn(2 * F_, D, generator=g) / 8).to(wdtype), (torch.randn(D, F_, generator=g) / 8).to(wdtype)
    gu_p, down_p = cpu_kernels.pack(gate_up), cpu_kernels.pack(down)
    separate = cpu_kernels.packed_linear(cpu_kernels.silu_mul(cpu_kernels.packed_linear(x_TD.contiguous(), gu_p, 2 * F_)),
                                         down_p, D)
    assert torch.equal(cpu_kernels.swiglu(x_TD, gu_p, down_p), separate)
    x64, (g64, u64) = x_TD.double(), gate_up.double().chunk(2)
    torch.testing.assert_close(separate.double(), (F.silu(x64 @ g64.T) * (x64 @ u64.T)) @ down.double().T,
                               rtol=1e-4, atol=1e-5)

    router = torch.randn(E, D, generator=g).to(wdtype)
    scores_TK, ids_TK = cpu_kernels.moe_gate(x_TD, cpu_kernels.pack(router), E, K)
    ref_scores, ref_ids = cpu_kernels.topk_sigmoid(cpu_kernels.packed_linear(x_TD.contiguous(), cpu_kernels.pack(router), E), K)
    assert torch.equal(ids_TK, ref_ids) and torch.equal(scores_TK, ref_scores)

    gate_up_E, down_E = torch.randn(E, D, 2 * F_, generator=g) / 8, torch.randn(E, F_, D, generator=g) / 8
    packed = pack_experts(gate_up_E.to(wdtype), down_E.to(wdtype), torch.float32)
    out_TD, slot_S, counts = cpu_kernels.experts_ffn(x_TD, scores_TK, ids_TK, *packed)
    ref_slot, ref_counts = cpu_kernels.route_sort(ids_TK, E)
    assert torch.equal(slot_S, ref_slot) and counts == ref_counts and (0 in counts or T * K >= E)  # rowless experts
    rows_SD = cpu_kernels.gather_scaled(x_TD, scores_TK, slot_S)
    assert torch.equal(out_TD, cpu_kernels.scatter_sum(grouped_swiglu(rows_SD, counts, *packed), slot_S, T, K))
