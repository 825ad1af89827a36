"""Llama 4 attention (iRoPE): RoPE + chunked local attention on most layers, NoPE global attention with
temperature tuning on every ``no_rope_layer_interval``-th layer, optional q/k L2 norm, grouped-query heads.

The layer computes q/k/v for a flat batch of tokens; where keys and values are kept and how the attention
over them is computed belongs to a backend (the oracle's contiguous cache, or the engine's paged cache).

Shape legend: T new tokens (flat over sequences), H query heads, Hkv key/value heads, Dh head dim,
D hidden, F rotary frequencies (Dh/2).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from models.config import Llama4Config
from models import cpu_kernels
from models.layers import Linear, apply_rope, l2_norm, pack_fused


class AttentionBackend(Protocol):
    def attend(self, layer: int, chunk: int | None, pos_T: torch.Tensor, q_THDh: torch.Tensor,
               k_THDh: torch.Tensor, v_THDh: torch.Tensor) -> torch.Tensor:
        """Keep the new k/v of ``layer`` and return attention of q over the sequence's keys: [T, H, Dh].

        ``chunk`` is the attention chunk of a chunked (RoPE) layer, None for a global one.
        """


def temperature_scale(pos_T: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Query scale [T] for NoPE layers: grows with log(position / floor_scale) so long contexts stay sharp."""
    return torch.log1p(torch.floor((pos_T.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, cfg: Llama4Config, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.use_rope = cfg.uses_rope(layer_idx)
        self.chunk = cfg.attention_chunk_size if cfg.is_chunked_layer(layer_idx) else None
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        H, Hkv, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = Linear(D, H * Dh, bias=cfg.attention_bias)
        self.k_proj = Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.v_proj = Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.o_proj = Linear(H * Dh, D, bias=cfg.attention_bias)
        self.register_buffer("qkv_packed", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        self._qkv: tuple | None = None  # (qkv_packed, qkv_bias) in the instance dict: see RMSNorm

    def pack_for_cpu(self, activation_dtype: torch.dtype) -> None:
        """q, k and v packed as one weight: one pass over x, then RoPE / q/k norm in place on its output."""
        self.qkv_packed, self.qkv_bias = pack_fused(activation_dtype, self.q_proj, self.k_proj, self.v_proj)
        self._qkv = None if self.qkv_packed is None else (self.qkv_packed, self.qkv_bias)

    def forward(self, x_TD: torch.Tensor, pos_T: torch.Tensor, rope_TF: tuple[torch.Tensor, torch.Tensor],
                backend: AttentionBackend) -> torch.Tensor:
        if self._qkv is not None:
            return self._forward_fused(x_TD, pos_T, rope_TF, backend)
        Dh = self.cfg.head_dim
        q_THDh = self.q_proj(x_TD).unflatten(-1, (-1, Dh))
        k_THDh = self.k_proj(x_TD).unflatten(-1, (-1, Dh))
        v_THDh = self.v_proj(x_TD).unflatten(-1, (-1, Dh))
        if self.use_rope:
            q_THDh, k_THDh = apply_rope(q_THDh, *rope_TF), apply_rope(k_THDh, *rope_TF)
        if self.use_qk_norm:  # after RoPE, as the reference does
            q_THDh, k_THDh = l2_norm(q_THDh, self.cfg.rms_norm_eps), l2_norm(k_THDh, self.cfg.rms_norm_eps)
        if self.temperature_tuning:
            scale_T = temperature_scale(pos_T, self.cfg.floor_scale, self.cfg.attn_scale)
            q_THDh = (q_THDh * scale_T[:, None, None]).to(q_THDh.dtype)
        out_THDh = backend.attend(self.layer_idx, self.chunk, pos_T, q_THDh, k_THDh, v_THDh)
        return self.o_proj(out_THDh.flatten(1))

    def block(self, h_TD: torch.Tensor, norm_in, norm_post, pos_T: torch.Tensor,
              rope_TF: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend):
        """(h + self(norm_in(h)), norm_post of that) in one CPU kernel call when the weights are packed and the
        backend's attention kernel takes every row of the step; None otherwise (the caller takes the long way)."""
        kernel_tables = getattr(backend, "kernel_tables", None)
        weights = self.kernel_weights(norm_in, norm_post)
        if weights is None or kernel_tables is None:
            return None
        w_in, w_post, o_args = weights
        tables = kernel_tables(self.layer_idx)
        if tables is None or not cpu_kernels.fused_ok(h_TD):
            return None
        cfg = self.cfg
        return cpu_kernels.attention_block(
            h_TD, w_in, w_post, cfg.rms_norm_eps, self._qkv, o_args,
            (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim), rope_TF if self.use_rope else None,
            self.use_qk_norm, self._q_scale(pos_T), *tables, cfg.head_dim ** -0.5)

    def kernel_weights(self, norm_in, norm_post) -> tuple[torch.Tensor, torch.Tensor, tuple] | None:
        """(norm_in weight, norm_post weight, (packed o_proj, D, bias)) when the whole sub-layer can run on the
        kernels (``cpu_kernels.attention_block``, ``models/kernel_step.py``; q|k|v is ``self._qkv``); None where
        something is not packed."""
        w_in, w_post, o_args = norm_in._kernel_weight, norm_post._kernel_weight, self.o_proj._kernel_args
        if self._qkv is None or w_in is None or w_post is None or o_args is None:
            return None
        return w_in, w_post, o_args

    def _q_scale(self, pos_T: torch.Tensor) -> torch.Tensor | None:
        """The NoPE layers' query temperature [T] for the kernels; None on RoPE layers."""
        cfg = self.cfg
        return temperature_scale(pos_T, cfg.floor_scale, cfg.attn_scale) if self.temperature_tuning else None

    def _forward_fused(self, x_TD, pos_T, rope_TF, backend: AttentionBackend) -> torch.Tensor:
        """The same steps on CPU kernels: one q|k|v product, RoPE + q/k norm + temperature in one in-place pass."""
        cfg = self.cfg
        H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_TN = cpu_kernels.packed_linear(x_TD, self._qkv[0], (H + 2 * Hkv) * Dh, self._qkv[1])
        cpu_kernels.rope_qk(qkv_TN, H, Hkv, Dh, rope_TF if self.use_rope else None, self.use_qk_norm,
                            cfg.rms_norm_eps, self._q_scale(pos_T))
        q_THDh = qkv_TN[:, :H * Dh].unflatten(-1, (H, Dh))
        k_THDh = qkv_TN[:, H * Dh:(H + Hkv) * Dh].unflatten(-1, (Hkv, Dh))
        v_THDh = qkv_TN[:, (H + Hkv) * Dh:].unflatten(-1, (Hkv, Dh))
        out_THDh = backend.attend(self.layer_idx, self.chunk, pos_T, q_THDh, k_THDh, v_THDh)
        return self.o_proj(out_THDh.flatten(1))
