"""The routed experts' SwiGLU FFN on rows grouped by expert: only the chosen expert's weights are touched.

Shape legend: S rows (token-expert slots) sorted expert-major, E experts held, D hidden, F expert ffn width,
F2 = 2F (gate then up, fused along the last dim as in the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grouped_swiglu(x_SD: torch.Tensor, counts_E: Sequence[int], gate_up_EDF2: torch.Tensor,
                   down_EFD: torch.Tensor) -> torch.Tensor:
    """Expert e's rows are ``x_SD[sum(counts_E[:e]) : sum(counts_E[:e+1])]``; returns [S, D] in the same order.

    ``counts_E`` are host ints (the caller owns the device-to-host sync). Experts with no rows cost nothing.
    On CUDA in bf16, one grouped matmul per projection where this torch has one.
    """
    if _grouped_mm_ok(x_SD, gate_up_EDF2):
        return _grouped_swiglu_cuda(x_SD, counts_E, gate_up_EDF2, down_EFD)
    out_SD = torch.empty_like(x_SD)
    start = 0
    for e, n in enumerate(counts_E):
        if n == 0:
            continue
        rows_nD = x_SD[start:start + n]
        gate_nF, up_nF = (rows_nD @ gate_up_EDF2[e]).chunk(2, dim=-1)
        out_SD[start:start + n] = (F.silu(gate_nF) * up_nF) @ down_EFD[e]
        start += n
    return out_SD


def _grouped_mm_ok(x_SD: torch.Tensor, w_EDF2: torch.Tensor) -> bool:
    return (x_SD.is_cuda and x_SD.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and x_SD.shape[-1] % 16 == 0 and w_EDF2.shape[-1] % 32 == 0)


def _grouped_swiglu_cuda(x_SD, counts_E, gate_up_EDF2, down_EFD) -> torch.Tensor:
    # offs: cumulative row ends per expert, the layout torch._grouped_mm expects for a 2-D x 3-D product
    offs_E = torch.tensor(counts_E, device=x_SD.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    gate_SF, up_SF = torch._grouped_mm(x_SD, gate_up_EDF2, offs=offs_E).chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate_SF) * up_SF).contiguous(), down_EFD, offs=offs_E)
