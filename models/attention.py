"""Llama 4 attention (iRoPE): RoPE + chunked local attention on most layers, NoPE global attention with
temperature tuning on every ``no_rope_layer_interval``-th layer, optional q/k L2 norm, grouped-query heads.

Shape legend: B batch, T new tokens, L attended tokens (cache + new), H query heads, Hkv key/value heads,
Dh head dim, D hidden, F rotary frequencies (Dh/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import Llama4Config
from models.kv_cache import SimpleKVCache
from models.layers import apply_rope, l2_norm


def attention_mask(q_pos_T: torch.Tensor, k_pos_L: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean [T, L]: causal, and for chunked layers only keys in the query's own chunk."""
    allowed_TL = k_pos_L[None, :] <= q_pos_T[:, None]
    if chunk is not None:
        allowed_TL &= (k_pos_L[None, :] // chunk) == (q_pos_T[:, None] // chunk)
    return allowed_TL


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
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.attention_bias)

    def forward(self, x_BTD: torch.Tensor, pos_T: torch.Tensor, rope_TF: tuple[torch.Tensor, torch.Tensor],
                cache: SimpleKVCache | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        Dh = self.cfg.head_dim
        q_BTHDh = self.q_proj(x_BTD).view(B, T, -1, Dh)
        k_BTHDh = self.k_proj(x_BTD).view(B, T, -1, Dh)
        v_BTHDh = self.v_proj(x_BTD).view(B, T, -1, Dh)
        if self.use_rope:
            q_BTHDh, k_BTHDh = apply_rope(q_BTHDh, *rope_TF), apply_rope(k_BTHDh, *rope_TF)
        if self.use_qk_norm:  # after RoPE, as the reference does
            q_BTHDh, k_BTHDh = l2_norm(q_BTHDh, self.cfg.rms_norm_eps), l2_norm(k_BTHDh, self.cfg.rms_norm_eps)
        if self.temperature_tuning:
            scale_T = temperature_scale(pos_T, self.cfg.floor_scale, self.cfg.attn_scale)
            q_BTHDh = (q_BTHDh * scale_T[None, :, None, None]).to(q_BTHDh.dtype)
        # [B, T, H, Dh] -> [B, H, T, Dh] (head-major, what SDPA and the cache want)
        q, k, v = (t.transpose(1, 2) for t in (q_BTHDh, k_BTHDh, v_BTHDh))
        k_pos_L = pos_T
        if cache is not None:  # the simple cache holds every position from 0
            k, v = cache.append(self.layer_idx, k, v)
            k_pos_L = torch.arange(k.shape[2], device=x_BTD.device)
        mask_TL = attention_mask(pos_T, k_pos_L, self.chunk)
        out_BHTDh = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TL, scale=Dh ** -0.5, enable_gqa=True)
        return self.o_proj(out_BHTDh.transpose(1, 2).reshape(B, T, -1))
