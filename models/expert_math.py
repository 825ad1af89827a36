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
    """
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
