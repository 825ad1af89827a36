"""An expert shard's weights and compute: the SwiGLU experts of its (layer, expert) set, nothing else.

It knows nothing of requests, tokens or communication: rows come in grouped by local expert, rows go out.
Shape legend: n rows, D hidden, F expert ffn width, F2 = 2F, El local experts of a layer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import CheckpointReader
from models.config import load_config
from models.expert_math import grouped_swiglu, pack_experts


@dataclass(frozen=True)
class LoadReport:
    bytes_read: int
    seconds: float
    num_experts: int  # (layer, expert) pairs held


class ExpertShard:
    def __init__(self, experts: Mapping[int, Sequence[int]], gate_up: Mapping[int, torch.Tensor],
                 down: Mapping[int, torch.Tensor], activation_dtype: torch.dtype | None = None):
        """``gate_up`` [E, D, 2F] and ``down`` [E, F, D] per layer; packed for the CPU kernels where they apply."""
        self.experts = {layer: tuple(ids) for layer, ids in experts.items()}  # layer -> global expert ids
        self.hidden = next(iter(gate_up.values())).shape[1]
        self.gate_up_EDF2, self.down_EFD = {}, {}
        for layer in gate_up:
            self.gate_up_EDF2[layer], self.down_EFD[layer] = pack_experts(gate_up[layer], down[layer],
                                                                          activation_dtype)

    @classmethod
    def load(cls, checkpoint: str | Path, experts: Mapping[int, Sequence[int]], dtype: torch.dtype,
             device: str | torch.device = "cpu", weight_dtype: torch.dtype | None = None
             ) -> tuple["ExpertShard", LoadReport]:
        """Read only this shard's experts from the checkpoint (sliced reads of the fused tensors).

        ``dtype`` is the rows' (the arithmetic's); the weights are held in ``weight_dtype`` (default ``dtype``).
        """
        t0 = time.perf_counter()
        cfg = load_config(checkpoint)
        gate_up, down = {}, {}
        with CheckpointReader(checkpoint) as reader:
            for layer, ids in experts.items():
                w = reader.read_experts(layer, list(ids), cfg.num_local_experts, cfg.hidden_size,
                                        cfg.intermediate_size)
                gate_up[layer] = w.gate_up_EDF2.to(device=device, dtype=weight_dtype or dtype)
                down[layer] = w.down_EFD.to(device=device, dtype=weight_dtype or dtype)
            bytes_read = reader.bytes_read
        report = LoadReport(bytes_read, time.perf_counter() - t0, sum(len(v) for v in experts.values()))
        return cls(experts, gate_up, down, activation_dtype=dtype), report

    def forward(self, layer: int, rows_nD: torch.Tensor, local_ids_n: torch.Tensor,
                out_nD: torch.Tensor | None = None) -> torch.Tensor:
        """Expert outputs [n, D] for rows grouped by local expert (``local_ids_n`` non-decreasing), written into
        ``out_nD`` when given (the shared-memory buffer: the CPU kernels write there, no copy afterwards)."""
        counts_El = torch.bincount(local_ids_n, minlength=len(self.experts[layer])).tolist()  # device-to-host sync
        return grouped_swiglu(rows_nD, counts_El, self.gate_up_EDF2[layer], self.down_EFD[layer], out_nD)
