"""A forward step driven by the CPU kernels: each decoder layer in two (dense) or four (MoE) kernel calls whose
arguments are plain ints prepared once per model, the residual stream updated in place in one buffer per step.

Why: a decode step streams every weight once, and each product evicts the interpreter's and torch's working set
from the caches, so the Python between two kernels costs several times what it costs hot (a tensor allocation or
an attribute lookup: tens of microseconds). The layer-by-layer path (``models/model.py``) spent 4 ms of a 17 ms
batch-1 step there (BENCHMARKS.md). Here a layer is ``attention_block`` (norm, q|k|v, RoPE, attention over the
paged cache, o, residual, norm), then ``swiglu_block`` with the residual add (dense), or ``moe_gate``, the seam's
``dispatch``, the shared expert, the seam's ``combine`` and ``residual_add`` (MoE): the routed experts still go
through the seam, local or remote. The kernels are the ones the layer-by-layer path calls, in the same order on the
same numbers, so both paths give identical results (tests/test_engine.py checks it bit for bit).

It runs when every layer's weights are packed for the kernels and the attention backend hands out its block tables
as addresses (``StepAttention.kernel_pointers``: the kernel takes every row of the step); otherwise ``__call__``
returns None and the model takes the layer-by-layer path.

Shape legend: T tokens in the step, D hidden, K experts per token, E experts, F ffn width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import cpu_kernels
from models.attention import temperature_scale


@dataclass(frozen=True)
class _Attention:
    w_in: int
    w_post: int
    qkv: int
    qkv_bf16: bool
    qkv_bias: int | None
    o: int
    o_bf16: bool
    o_bias: int | None
    rope: bool
    qk_norm: bool
    temperature: bool


@dataclass(frozen=True)
class _SwiGLU:
    gate_up: int
    gate_up_bf16: bool
    down: int
    down_bf16: bool
    ffn: int


@dataclass(frozen=True)
class _MoE:
    layer_idx: int
    router: int
    router_bf16: bool
    shared: _SwiGLU


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _swiglu(module) -> _SwiGLU | None:
    gate_up, down = module._gate_up, module.down_proj._kernel_args
    if gate_up is None or down is None or down[2] is not None:
        return None
    return _SwiGLU(gate_up.data_ptr(), gate_up.dtype == torch.bfloat16, down[0].data_ptr(),
                   down[0].dtype == torch.bfloat16, module.ffn)


def _attention(layer) -> _Attention | None:
    attn = layer.self_attn
    w_in, w_post, o = layer.input_layernorm._kernel_weight, layer.post_attention_layernorm._kernel_weight, \
        attn.o_proj._kernel_args
    if attn._qkv is None or w_in is None or w_post is None or o is None:
        return None
    qkv, qkv_bias = attn._qkv
    return _Attention(w_in.data_ptr(), w_post.data_ptr(), qkv.data_ptr(), qkv.dtype == torch.bfloat16, _ptr(qkv_bias),
                      o[0].data_ptr(), o[0].dtype == torch.bfloat16, _ptr(o[2]), attn.use_rope, attn.use_qk_norm,
                      attn.temperature_tuning)


class KernelStep:
    """Built once per model after its weights are packed (``models/loading.py``); holds addresses into the model's
    weights, so the model keeps it (``Llama4TextModel.kernel_step``) and passes itself to each call."""

    def __init__(self, model):
        cfg = model.cfg
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.layers: list[tuple[_Attention, _SwiGLU | _MoE]] | None = []
        for layer in model.layers:
            attn, ffn = _attention(layer), layer.feed_forward
            if layer.is_moe:
                router, shared = ffn.router._kernel_args, _swiglu(ffn.shared_expert)
                ok = router is not None and router[2] is None and shared is not None
                ffn = ok and _MoE(ffn.layer_idx, router[0].data_ptr(), router[0].dtype == torch.bfloat16, shared)
            else:
                ffn = _swiglu(ffn)
            if attn is None or not ffn:
                self.layers = None  # something is not packed: the layer-by-layer path
                break
            self.layers.append((attn, ffn))
        self.widest_ffn = max(cfg.intermediate_size, cfg.intermediate_size_mlp)

    @property
    def usable(self) -> bool:
        return self.layers is not None and cpu_kernels.library() is not None

    def __call__(self, model, token_ids_T: torch.Tensor, pos_T: torch.Tensor, backend) -> torch.Tensor | None:
        """``model.forward_flat``'s final hidden states [T, D], or None when this step is not for the kernels alone."""
        pointers = getattr(backend, "kernel_pointers", None)
        pointers = pointers() if pointers is not None else None
        if pointers is None or not self.usable:
            return None
        k_cache, v_cache, bs, tables = pointers
        cfg, lib = model.cfg, cpu_kernels.library()
        H, Hkv, Dh = self.heads
        T, D, E, K = token_ids_T.numel(), cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
        threads, eps, scale = torch.get_num_threads(), cfg.rms_norm_eps, Dh ** -0.5

        h_TD = model.embed_tokens(token_ids_T).to(torch.float32).contiguous()  # the residual stream, in place
        cos_TF, sin_TF = (t.contiguous() for t in model.rope_tables(pos_T))
        q_scale_T = temperature_scale(pos_T, cfg.floor_scale, cfg.attn_scale).contiguous()
        x_TD, shared_TD = torch.empty(T, D), torch.empty(T, D)
        scores_TK, ids_TK = torch.empty(T, K), torch.empty(T, K, dtype=torch.int64)
        work = torch.empty(T * max(2 * D + (2 * H + 2 * Hkv) * Dh, 3 * self.widest_ffn + D, E))
        scratch, per_thread, _ = cpu_kernels._attention_scratch(H, Dh, max(t[4] for t in tables))
        h, x, w, sh = h_TD.data_ptr(), x_TD.data_ptr(), work.data_ptr(), shared_TD.data_ptr()
        cos, sin, q_scale, att_scratch = cos_TF.data_ptr(), sin_TF.data_ptr(), q_scale_T.data_ptr(), scratch.data_ptr()

        for (a, ffn), (blocks, width, first, length, _) in zip(self.layers, tables):
            lib.attention_block(h, T, D, a.w_in, eps, a.qkv, a.qkv_bf16, a.qkv_bias, H, Hkv, Dh,
                                cos if a.rope else None, sin if a.rope else None, a.qk_norm,
                                q_scale if a.temperature else None, k_cache, v_cache, blocks, width, first, length, bs,
                                scale, att_scratch, per_thread, a.o, a.o_bf16, a.o_bias, a.w_post, w, h, x, threads)
            if isinstance(ffn, _SwiGLU):
                lib.swiglu_block(x, T, D, ffn.gate_up, ffn.gate_up_bf16, ffn.ffn, ffn.down, ffn.down_bf16, h, h, w,
                                 threads)
                continue
            lib.moe_gate(x, T, D, ffn.router, ffn.router_bf16, E, K, w, scores_TK.data_ptr(), ids_TK.data_ptr(),
                         threads)
            handle = model.experts.dispatch(ffn.layer_idx, x_TD, ids_TK, scores_TK)
            s = ffn.shared  # runs while the rows are with the experts
            lib.swiglu_block(x, T, D, s.gate_up, s.gate_up_bf16, s.ffn, s.down, s.down_bf16, None, sh, w, threads)
            routed_TD = model.experts.combine(handle)
            if routed_TD.dtype != torch.float32 or not routed_TD.is_contiguous():
                routed_TD = routed_TD.float().contiguous()
            lib.residual_add(h, sh, routed_TD.data_ptr(), h, T * D)
        return h_TD
