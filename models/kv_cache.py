"""A simple contiguous KV cache for the single-process model (the engine uses a paged one).

It is also the attention backend of the oracle: attention layers hand it the new q/k/v of every token and it
returns the attention output. The batch is B sequences of equal length that started together.

Shape legend: B batch, Hkv key/value heads, H query heads, L cached tokens, T new tokens (flat, B*Tn),
Tn new tokens per sequence, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(q_pos_T: torch.Tensor, k_pos_L: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean [..., T, L]: causal, and for chunked layers only keys in the query's own chunk.

    Leading dims broadcast (e.g. q [S, 1] and k [S, L] give [S, 1, L] for a batch of decodes).
    """
    q, k = q_pos_T[..., :, None], k_pos_L[..., None, :]
    allowed_TL = k <= q
    if chunk is not None:
        allowed_TL = allowed_TL & ((k // chunk) == (q // chunk))
    return allowed_TL


class SimpleKVCache:
    """Per-layer K/V grown by concatenation; every sequence in the batch has the same positions."""

    def __init__(self, num_layers: int, batch: int = 1):
        self.batch = batch
        self.k_BHLDh: list[torch.Tensor | None] = [None] * num_layers
        self.v_BHLDh: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        k = next((k for k in self.k_BHLDh if k is not None), None)
        return 0 if k is None else k.shape[2]

    def attend(self, layer: int, chunk: int | None, pos_T: torch.Tensor, q_THDh: torch.Tensor,
               k_THDh: torch.Tensor, v_THDh: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values of ``layer`` and attend over the whole cache: [T, H, Dh]."""
        B = self.batch
        # flat [B*Tn, H, Dh] -> [B, H, Tn, Dh] (head-major, what SDPA wants)
        q, k, v = (t.unflatten(0, (B, -1)).transpose(1, 2) for t in (q_THDh, k_THDh, v_THDh))
        if self.k_BHLDh[layer] is not None:
            k = torch.cat((self.k_BHLDh[layer], k), dim=2)
            v = torch.cat((self.v_BHLDh[layer], v), dim=2)
        self.k_BHLDh[layer], self.v_BHLDh[layer] = k, v
        q_pos = pos_T[: q.shape[2]]  # the same positions for every sequence
        mask_TL = attention_mask(q_pos, torch.arange(k.shape[2], device=q.device), chunk)
        out_BHTDh = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TL, scale=q.shape[-1] ** -0.5,
                                                   enable_gqa=True)
        return out_BHTDh.transpose(1, 2).flatten(0, 1)
