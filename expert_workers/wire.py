"""The data-plane contract between a router (rank 0) and one expert shard, per MoE layer.

router -> shard: header int64 [3] = (op, layer, n_rows); if n_rows > 0: rows [n_rows, D] (model dtype,
                 already scaled by the routing score, grouped by local expert), local expert ids int64 [n_rows]
shard -> router: if n_rows > 0: expert outputs [n_rows, D], same order.
The header goes out even when a shard gets no rows, so both sides stay in step layer by layer.
"""

from __future__ import annotations

import torch

OP_EXPERTS = 1  # run the experts of ``layer`` on the rows that follow
OP_CLOSE = 2  # the router leaves the group


def header(op: int, layer: int, n_rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    # On the device the group's backend moves (NCCL sends only CUDA tensors; gloo only CPU ones).
    return torch.tensor([op, layer, n_rows], dtype=torch.int64, device=device)


def empty_header(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty(3, dtype=torch.int64, device=device)
