"""Llama 4 MoE feed-forward: top-k sigmoid router, routed experts through the seam, shared expert.

Shape legend: T tokens, K top-k, E experts, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from models import cpu_kernels
from models.config import Llama4Config
from models.layers import Linear, SwiGLU
from models.seam import ExpertSeam, top_k_gate


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: Llama4Config, layer_idx: int, experts: ExpertSeam):
        super().__init__()
        self.layer_idx, self.top_k = layer_idx, cfg.num_experts_per_tok
        self.router = Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        # The seam is owned by the model, not by each layer: a plain attribute keeps it out of this
        # layer's state dict (expert weights live with the seam, here or on other machines).
        self.__dict__["experts"] = experts

    def kernel_router(self) -> torch.Tensor | None:
        """The router's packed weight for the one-call gate (``cpu_kernels.moe_gate``, ``models/kernel_step.py``);
        None where it does not apply (not packed, or a bias)."""
        router = self.router._kernel_args
        return None if router is None or router[2] is not None else router[0]

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        router = self.kernel_router()
        if router is not None and cpu_kernels.fused_ok(x_TD):  # one call, any T
            scores_TK, expert_ids_TK = cpu_kernels.moe_gate(x_TD, router, self.router.out_features, self.top_k)
        else:
            scores_TK, expert_ids_TK = top_k_gate(self.router(x_TD), self.top_k)
        handle = self.experts.dispatch(self.layer_idx, x_TD, expert_ids_TK, scores_TK)
        shared_TD = self.shared_expert(x_TD)  # runs while the rows are with the experts
        return shared_TD + self.experts.combine(handle)
