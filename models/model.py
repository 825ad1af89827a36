"""The Llama 4 text model in plain torch, single process: the numerical oracle for everything distributed.

Shape legend: B batch, T new tokens (flat over sequences in ``forward_flat``), D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import Attention, AttentionBackend
from models.config import Llama4Config
from models.kv_cache import SimpleKVCache
from models.layers import Linear, RMSNorm, SwiGLU, rope_cos_sin, rope_inv_freq
from models.moe import MoEFeedForward
from models.seam import ExpertSeam, LocalExperts


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Llama4Config, layer_idx: int, experts: ExpertSeam):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.feed_forward = (MoEFeedForward(cfg, layer_idx, experts) if self.is_moe
                             else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp))

    def forward(self, h_TD, pos_T, rope_TF, backend: AttentionBackend):
        fused = self.self_attn.block(h_TD, self.input_layernorm, self.post_attention_layernorm, pos_T, rope_TF,
                                     backend)
        if fused is not None:  # CPU kernels: the attention sub-layer in one call
            h_TD, x_TD = fused
        else:
            attn_TD = self.self_attn(self.input_layernorm(h_TD), pos_T, rope_TF, backend)
            h_TD, x_TD = self.post_attention_layernorm.add_forward(h_TD, attn_TD)
        return h_TD + self.feed_forward(x_TD)


class Llama4TextModel(nn.Module):
    """Embeddings, decoder layers (iRoPE attention; dense or MoE FFN), final norm, LM head.

    ``experts`` is the router<->experts seam; ``LocalExperts`` (all experts here) when not given.
    """

    def __init__(self, cfg: Llama4Config, experts: ExpertSeam | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        with torch.device(device or "cpu"):
            self.experts = experts if experts is not None else LocalExperts(cfg, dtype=dtype)
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
            self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.experts) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if dtype is not None:
            self.to(dtype)
        # Not a buffer: it is derived from the config, never loaded, and stays fp32 whatever the weights are.
        self.inv_freq = rope_inv_freq(cfg)
        # Set by the loader once the weights are packed for the CPU kernels (models/kernel_step.py); None: every
        # step goes layer by layer.
        self.kernel_step = None

    @property
    def activation_dtype(self) -> torch.dtype:
        """What hidden states, the KV cache and the arithmetic use (matrices may be held narrower)."""
        return self.norm.weight.dtype

    def new_cache(self, batch: int = 1) -> SimpleKVCache:
        return SimpleKVCache(self.cfg.num_hidden_layers, batch)

    def forward(self, token_ids_BT: torch.Tensor, cache: SimpleKVCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] (fp32 when the weights are) of ``token_ids_BT`` following what ``cache`` holds."""
        B, T = token_ids_BT.shape
        cache = cache if cache is not None else self.new_cache(B)
        start = cache.length
        pos_T = torch.arange(start, start + T, device=token_ids_BT.device).repeat(B)
        return self.hidden_to_logits(self.forward_flat(token_ids_BT.reshape(-1), pos_T, cache)).unflatten(0, (B, T))

    def forward_flat(self, token_ids_T: torch.Tensor, pos_T: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """Final hidden states [T, D] of a flat batch of tokens from any number of sequences.

        ``pos_T`` are absolute positions; ``backend`` knows which sequence each token belongs to.
        """
        if self.kernel_step is not None:
            h_TD = self.kernel_step(self, token_ids_T, pos_T, backend)
            if h_TD is not None:
                return h_TD
        rope_TF = self.rope_tables(pos_T)
        h_TD = self.embed_tokens(token_ids_T).to(self.activation_dtype)  # embeddings may be held narrower
        for layer in self.layers:
            h_TD = layer(h_TD, pos_T, rope_TF, backend)
        return h_TD

    def rope_tables(self, pos_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq.to(pos_T.device), pos_T)

    def hidden_to_logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_TD))
