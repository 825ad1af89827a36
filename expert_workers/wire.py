"""The data-plane contract between a router (rank 0) and one expert shard, per MoE layer.

router -> shard: header int64 [4] = (op, layer, n_rows, capacity_rows), then by op:
  OP_EXPERTS, n_rows > 0: rows [n_rows, D] (model dtype, already scaled by the routing score, grouped by local
                 expert), local expert ids int64 [n_rows], over the group;
  OP_EXPERTS_SHM: nothing more; rows and ids are already in the pair's shared buffer (``cluster.shm``) of
                 ``capacity_rows`` rows (a capacity the shard has not mapped yet names a new, bigger file).
shard -> router: OP_EXPERTS, n_rows > 0: expert outputs [n_rows, D], same order, over the group;
                 OP_EXPERTS_SHM: ack int64 [1] = n_rows once the outputs are in the buffer.
The header goes out even when a shard gets no rows (then OP_EXPERTS, nothing follows), so both sides stay in
step layer by layer. The ack is what makes the shared buffer safe to read, and it is bounded by the group's
timeout like every other receive.
"""

from __future__ import annotations

import torch

OP_EXPERTS = 1  # run the experts of ``layer`` on the rows that follow
OP_CLOSE = 2  # the router leaves the group
OP_EXPERTS_SHM = 3  # run the experts of ``layer`` on the rows in the shared buffer


def header(op: int, layer: int, n_rows: int, capacity_rows: int = 0, *,
           device: torch.device | str = "cpu") -> torch.Tensor:
    # On the device the group's backend moves (NCCL sends only CUDA tensors; gloo only CPU ones).
    return torch.tensor([op, layer, n_rows, capacity_rows], dtype=torch.int64, device=device)


def empty_header(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty(4, dtype=torch.int64, device=device)


def ack(n_rows: int) -> torch.Tensor:
    return torch.tensor([n_rows], dtype=torch.int64)


def empty_ack() -> torch.Tensor:
    return torch.empty(1, dtype=torch.int64)
