"""A simple contiguous KV cache for the single-process model (the engine replaces it with a paged one).

Shape legend: B batch, Hkv key/value heads, L cached tokens, T new tokens, Dh head dim.
"""

from __future__ import annotations

import torch


class SimpleKVCache:
    """Per-layer K/V grown by concatenation; every sequence in the batch shares the same positions."""

    def __init__(self, num_layers: int):
        self.k_BHLDh: list[torch.Tensor | None] = [None] * num_layers
        self.v_BHLDh: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        k = next((k for k in self.k_BHLDh if k is not None), None)
        return 0 if k is None else k.shape[2]

    def append(self, layer: int, k_BHTDh: torch.Tensor, v_BHTDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer`` and return all of that layer's keys/values."""
        if self.k_BHLDh[layer] is not None:
            k_BHTDh = torch.cat((self.k_BHLDh[layer], k_BHTDh), dim=2)
            v_BHTDh = torch.cat((self.v_BHLDh[layer], v_BHTDh), dim=2)
        self.k_BHLDh[layer], self.v_BHLDh[layer] = k_BHTDh, v_BHTDh
        return k_BHTDh, v_BHTDh
