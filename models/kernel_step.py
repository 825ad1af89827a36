"""A forward step driven by the CPU kernels: the decoder layers in one kernel call (``layer_stack``) when the
routed experts are held in this process, or one call per stretch between two MoE layers when they are elsewhere,
with the residual stream updated in place in one buffer per step.

Why: a decode step streams every weight once, and each product evicts the interpreter's and torch's working set
from the caches, so the Python between two kernels costs several times what it costs hot (a tensor allocation or
an attribute lookup: tens of microseconds). Layer by layer (``models/model.py``) that was 4 ms of a 17 ms batch-1
step (BENCHMARKS.md). Per layer ``layer_stack`` runs ``attention_block`` (norm, q|k|v, RoPE, attention over the
paged cache, o, residual, norm), then ``swiglu_block`` with the residual add (dense), or ``moe_gate``,
``experts_ffn``, the shared expert's ``swiglu_block`` and ``residual_add`` (MoE): the kernels the layer-by-layer
path calls, in the same order on the same numbers, so both paths give identical results (tests/test_engine.py
checks it bit for bit).

The routed experts are the seam's: ``ExpertSeam.packed_layer`` hands over a layer's expert weights when they are
packed in this process (``LocalExperts``); otherwise the stack stops after that layer's gate, and the layer goes on
through ``dispatch``, the shared expert (while the rows are away), ``combine`` and the residual add.

It runs when every layer's weights are packed for the kernels and the attention backend hands out its block tables
as addresses (``StepAttention.kernel_pointers``: the kernel takes every row of the step); otherwise ``__call__``
returns None and the model goes layer by layer.

Shape legend: T tokens in the step, D hidden, K experts per token, E experts, L layers.
"""

from __future__ import annotations

import torch

from models import cpu_kernels
from models.attention import temperature_scale

# The fields of one layer's plan row, in the order of the enum in models/csrc/decode_ops.c.
PLAN = ("w_in", "w_post", "qkv", "qkv_bf16", "qkv_bias", "o", "o_bf16", "o_bias", "rope", "qk_norm", "temperature",
        "gate_up", "gate_up_bf16", "down", "down_bf16", "ffn", "router", "router_bf16", "experts_gate_up",
        "experts_down", "experts_bf16", "expert_ffn")
_F = {name: i for i, name in enumerate(PLAN)}


class KernelStep:
    """Built once per model after its weights are packed (``models/loading.py``), kept by the model
    (``Llama4TextModel.kernel_step``), which passes itself to each call. It holds the tensors whose addresses its
    plan records, so the plan can never point at freed memory."""

    def __init__(self, model):
        cfg = model.cfg
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self._keep: list[torch.Tensor] = []
        rows = [self._plan_row(layer, model.experts) for layer in model.layers]
        self.rows: list[list[int]] | None = None if None in rows else rows
        self.plan_LP = None if self.rows is None else torch.tensor(self.rows, dtype=torch.int64)
        expert_ffn = cfg.intermediate_size
        H, Hkv, Dh = self.heads
        D, E, K = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
        # floats of work per token: the largest of what one layer's calls need at a time
        self.work_per_token = max(2 * D + (2 * H + 2 * Hkv) * Dh, 3 * max(cfg.intermediate_size_mlp, expert_ffn) + D,
                                  E, K * (2 * D + 3 * expert_ffn))

    @property
    def usable(self) -> bool:
        return self.rows is not None and cpu_kernels.library() is not None

    def _addr(self, t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        self._keep.append(t)
        return t.data_ptr()

    def _swiglu_fields(self, module) -> dict | None:
        packed = module.kernel_weights()
        if packed is None:
            return None
        gate_up, down = packed
        return dict(gate_up=self._addr(gate_up), gate_up_bf16=gate_up.dtype == torch.bfloat16,
                    down=self._addr(down), down_bf16=down.dtype == torch.bfloat16, ffn=module.ffn)

    def _plan_row(self, layer, experts) -> list[int] | None:
        """The layer's plan row, or None where something is not packed (then the model goes layer by layer)."""
        attn, ffn = layer.self_attn, layer.feed_forward
        weights = attn.kernel_weights(layer.input_layernorm, layer.post_attention_layernorm)
        if weights is None:
            return None
        (w_in, w_post, o), (qkv, qkv_bias) = weights, attn._qkv
        row = dict(w_in=self._addr(w_in), w_post=self._addr(w_post), qkv=self._addr(qkv),
                   qkv_bf16=qkv.dtype == torch.bfloat16, qkv_bias=self._addr(qkv_bias), o=self._addr(o[0]),
                   o_bf16=o[0].dtype == torch.bfloat16, o_bias=self._addr(o[2]), rope=attn.use_rope,
                   qk_norm=attn.use_qk_norm, temperature=attn.temperature_tuning)
        swiglu = self._swiglu_fields(ffn.shared_expert if layer.is_moe else ffn)
        if swiglu is None:
            return None
        row.update(swiglu)
        if layer.is_moe:
            router = ffn.kernel_router()
            if router is None:
                return None
            row.update(router=self._addr(router), router_bf16=router.dtype == torch.bfloat16)
            held = experts.packed_layer(ffn.layer_idx)
            if held is not None:  # else the stack stops after this layer's gate: the seam takes over
                gate_up_E, down_E = held
                row.update(experts_gate_up=self._addr(gate_up_E), experts_down=self._addr(down_E),
                           experts_bf16=gate_up_E.dtype == torch.bfloat16, expert_ffn=down_E.shape[-2])
        return [int(row.get(name, 0)) for name in PLAN]

    def __call__(self, model, token_ids_T: torch.Tensor, pos_T: torch.Tensor, backend) -> torch.Tensor | None:
        """``model.forward_flat``'s final hidden states [T, D], or None when this step is not for the kernels alone."""
        pointers = getattr(backend, "kernel_pointers", None)
        pointers = pointers() if pointers is not None else None
        if pointers is None or not self.usable:
            return None
        k_cache, v_cache, bs, tables_L4, longest = pointers
        cfg, lib, experts = model.cfg, cpu_kernels.library(), model.experts
        H, Hkv, Dh = self.heads
        T, D, E, K, L = token_ids_T.numel(), cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, \
            len(self.rows)
        threads = torch.get_num_threads()

        h_TD = model.embed_tokens(token_ids_T).to(torch.float32).contiguous()  # the residual stream, in place
        cos_TF, sin_TF = (t.contiguous() for t in model.rope_tables(pos_T))
        q_scale_T = temperature_scale(pos_T, cfg.floor_scale, cfg.attn_scale).contiguous()
        x_TD, shared_TD, routed_TD = torch.empty(T, D), torch.empty(T, D), torch.empty(T, D)
        scores_TK, ids_TK = torch.empty(T, K), torch.empty(T, K, dtype=torch.int64)
        slot_S, counts_E = torch.empty(T * K, dtype=torch.int64), torch.empty(E, dtype=torch.int64)
        work = torch.empty(T * self.work_per_token)
        scratch, per_thread, _ = cpu_kernels.attention_scratch(H, Dh, longest)
        h, x, shared = h_TD.data_ptr(), x_TD.data_ptr(), shared_TD.data_ptr()
        plan, tables, row_bytes = self.plan_LP.data_ptr(), tables_L4.data_ptr(), len(PLAN) * 8
        args = (h, x, T, D, H, Hkv, Dh, E, K, cfg.rms_norm_eps, cos_TF.data_ptr(), sin_TF.data_ptr(),
                q_scale_T.data_ptr(), k_cache, v_cache, bs, Dh ** -0.5, scratch.data_ptr(), per_thread,
                work.data_ptr(), shared, routed_TD.data_ptr(), scores_TK.data_ptr(), ids_TK.data_ptr(),
                slot_S.data_ptr(), counts_E.data_ptr(), threads)
        layer = 0
        while True:
            layer += lib.layer_stack(plan + layer * row_bytes, tables + layer * 32, L - layer, *args)
            if layer == L:
                return h_TD
            # a MoE layer whose experts are elsewhere: gate done, the seam does the rest
            r = self.rows[layer]
            handle = experts.dispatch(layer, x_TD, ids_TK, scores_TK)
            lib.swiglu_block(x, T, D, r[_F["gate_up"]], r[_F["gate_up_bf16"]], r[_F["ffn"]], r[_F["down"]],
                             r[_F["down_bf16"]], None, shared, work.data_ptr(), threads)
            routed = experts.combine(handle).float().contiguous()
            lib.residual_add(h, shared, routed.data_ptr(), h, T * D)
            layer += 1
