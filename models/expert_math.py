"""The routed experts' SwiGLU FFN on rows grouped by expert: only the chosen expert's weights are touched.

Shape legend: S rows (token-expert slots) sorted expert-major, E experts held, D hidden, F expert ffn width,
F2 = 2F (gate then up, fused along the last dim as in the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models import cpu_kernels


def grouped_swiglu(x_SD: torch.Tensor, counts_E: Sequence[int], gate_up_EDF2: torch.Tensor,
                   down_EFD: torch.Tensor, out_SD: torch.Tensor | None = None) -> torch.Tensor:
    """Expert e's rows are ``x_SD[sum(counts_E[:e]) : sum(counts_E[:e+1])]``; returns [S, D] in the same order.

    ``counts_E`` are host ints (the caller owns the device-to-host sync). Experts with no rows cost nothing.
    The weights are either in the checkpoint's orientation ([E, D, 2F] and [E, F, D]) or packed for the CPU
    kernels by ``pack_experts`` (4-D). On CUDA in bf16, one grouped matmul per projection where this torch has one.
    ``out_SD`` (contiguous [S, D]), when given, receives the result: the packed path writes it there directly.
    """
    if gate_up_EDF2.dim() == 4:  # packed: [E, 2F/16, D, 16] and [E, D/16, F, 16]
        h_SF2 = cpu_kernels.grouped_packed_linear(x_SD, counts_E, gate_up_EDF2, 2 * down_EFD.shape[2])
        return cpu_kernels.grouped_packed_linear(cpu_kernels.silu_mul(h_SF2), counts_E, down_EFD, x_SD.shape[1], out_SD)
    if _grouped_mm_ok(x_SD, gate_up_EDF2):
        y_SD = _grouped_swiglu_cuda(x_SD, counts_E, gate_up_EDF2, down_EFD)
        return y_SD if out_SD is None else out_SD.copy_(y_SD)
    out_SD = torch.empty_like(x_SD) if out_SD is None else out_SD
    start = 0
    for e, n in enumerate(counts_E):
        if n == 0:
            continue
        rows_nD = x_SD[start:start + n]
        gate_nF, up_nF = (rows_nD @ gate_up_EDF2[e].to(x_SD.dtype)).chunk(2, dim=-1)  # weights may be narrower
        out_SD[start:start + n] = (F.silu(gate_nF) * up_nF) @ down_EFD[e].to(x_SD.dtype)
        start += n
    return out_SD


def pack_experts(gate_up_EDF2: torch.Tensor, down_EFD: torch.Tensor,
                 activation_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's experts packed for the CPU kernels where they apply (``cpu_kernels.can_pack``), else as given."""
    if activation_dtype is None or not cpu_kernels.can_pack(gate_up_EDF2, activation_dtype):
        return gate_up_EDF2, down_EFD
    return cpu_kernels.pack(gate_up_EDF2.transpose(1, 2)), cpu_kernels.pack(down_EFD.transpose(1, 2))


def unpack_experts(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint orientation ([E, D, 2F], [E, F, D]) of weights as ``pack_experts`` left them."""
    if gate_up.dim() == 3:
        return gate_up, down
    D, F_ = gate_up.shape[2], down.shape[2]
    return (cpu_kernels.unpack(gate_up, 2 * F_).transpose(1, 2), cpu_kernels.unpack(down, D).transpose(1, 2))


def _grouped_mm_ok(x_SD: torch.Tensor, w_EDF2: torch.Tensor) -> bool:
    return (x_SD.is_cuda and x_SD.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and x_SD.shape[-1] % 16 == 0 and w_EDF2.shape[-1] % 32 == 0)


def _grouped_swiglu_cuda(x_SD, counts_E, gate_up_EDF2, down_EFD) -> torch.Tensor:
    # offs: cumulative row ends per expert, the layout torch._grouped_mm expects for a 2-D x 3-D product
    offs_E = torch.tensor(counts_E, device=x_SD.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    gate_SF, up_SF = torch._grouped_mm(x_SD, gate_up_EDF2, offs=offs_E).chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate_SF) * up_SF).contiguous(), down_EFD, offs=offs_E)
