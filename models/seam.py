"""The seam between router and experts: ``dispatch`` -> frozen handle -> ``combine``.

The router computes the gate (top-k expert ids and sigmoid scores), then calls ``dispatch`` with the
token rows; while the rows are with the experts it may run the shared expert; ``combine`` returns each
token's summed expert outputs. ``LocalExperts`` holds every expert in-process and is the reference that
the distributed implementation is tested against.

Shape legend: T tokens, K experts per token (top-k), S = T*K slots, E experts, D hidden, F expert ffn width,
F2 = 2F.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import cpu_kernels
from models.config import Llama4Config
from models.expert_math import grouped_swiglu, pack_experts


@dataclass(frozen=True)
class RouteLayout:
    """Where each (token, k) slot goes. Slots are laid out expert-major: all of expert 0's rows, then 1's..."""

    num_tokens: int
    top_k: int
    slot_S: torch.Tensor  # int64 [S]: slot index t*K + k of each expert-major row
    counts_E: tuple[int, ...]  # rows per expert (host ints)


def route_layout(expert_ids_TK: torch.Tensor, num_experts: int) -> RouteLayout:
    T, K = expert_ids_TK.shape
    if cpu_kernels.library() is not None and expert_ids_TK.device.type == "cpu":
        slot_S, counts = cpu_kernels.route_sort(expert_ids_TK, num_experts)
        return RouteLayout(num_tokens=T, top_k=K, slot_S=slot_S, counts_E=tuple(counts))
    flat_S = expert_ids_TK.reshape(-1)
    # token-major -> expert-major; stable so rows of one expert keep token order (deterministic results)
    slot_S = torch.argsort(flat_S, stable=True)
    counts_E = torch.bincount(flat_S, minlength=num_experts).tolist()  # device-to-host sync
    return RouteLayout(num_tokens=T, top_k=K, slot_S=slot_S, counts_E=tuple(counts_E))


def gather_scaled_rows(x_TD: torch.Tensor, scores_TK: torch.Tensor, layout: RouteLayout) -> torch.Tensor:
    """Expert-major rows [S, D], each already multiplied by its routing score (Llama 4 scales the *input*)."""
    if cpu_kernels.fused_ok(x_TD, scores_TK):
        return cpu_kernels.gather_scaled(x_TD, scores_TK, layout.slot_S)
    token_S = layout.slot_S // layout.top_k
    return x_TD[token_S] * scores_TK.reshape(-1)[layout.slot_S, None]


def scatter_sum(out_SD: torch.Tensor, layout: RouteLayout) -> torch.Tensor:
    """Expert-major rows back to token order, summed over each token's K experts: [S, D] -> [T, D]."""
    T, K = layout.num_tokens, layout.top_k
    if cpu_kernels.fused_ok(out_SD):
        return cpu_kernels.scatter_sum(out_SD, layout.slot_S, T, K)
    slots_SD = torch.empty_like(out_SD)
    slots_SD[layout.slot_S] = out_SD  # expert-major -> token-major
    return slots_SD.view(T, K, out_SD.shape[-1]).sum(dim=1)


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs: the layout, plus the implementation's in-flight state."""

    layer_idx: int
    layout: RouteLayout
    in_flight: Any  # LocalExperts: the finished per-token sums [T, D]; distributed: pending exchange


class ExpertSeam(ABC):
    """One interface, two implementations (in-process and expert-parallel); both give the same numbers."""

    @abstractmethod
    def dispatch(self, layer_idx: int, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 scores_TK: torch.Tensor) -> DispatchHandle:
        """Send token rows to their experts.

        x_TD: [T, D] float, the post-attention-norm hidden states of one MoE layer.
        expert_ids_TK: [T, K] int64, chosen experts. scores_TK: [T, K], sigmoid routing scores (x.dtype).
        """

    @abstractmethod
    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        """Wait for the expert outputs of ``handle`` and return them summed per token: [T, D]."""

    def packed_layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate|up, down) of every expert of the layer when they are held in this process packed for the CPU
        kernels, so a whole step can run in one kernel call (``models/kernel_step.py``); None where they are not."""
        return None


class LocalExperts(ExpertSeam, nn.Module):
    """All routed experts of every MoE layer in this process (fused checkpoint orientation)."""

    def __init__(self, cfg: Llama4Config, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.num_experts = cfg.num_local_experts
        E, D, F = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        factory = {"device": device, "dtype": dtype}
        self.gate_up_EDF2 = nn.ParameterDict(
            {str(i): nn.Parameter(torch.empty(E, D, 2 * F, **factory), requires_grad=False) for i in cfg.moe_layers})
        self.down_EFD = nn.ParameterDict(
            {str(i): nn.Parameter(torch.empty(E, F, D, **factory), requires_grad=False) for i in cfg.moe_layers})

    def load_layer(self, layer_idx: int, gate_up_EDF2: torch.Tensor, down_EFD: torch.Tensor,
                   activation_dtype: torch.dtype | None = None) -> None:
        """Given the activations' dtype, the weights are packed for the CPU kernels where those apply."""
        key = str(layer_idx)
        gate_up, down = pack_experts(gate_up_EDF2, down_EFD, activation_dtype)
        self.gate_up_EDF2[key] = nn.Parameter(gate_up, requires_grad=False)
        self.down_EFD[key] = nn.Parameter(down, requires_grad=False)

    def dispatch(self, layer_idx: int, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 scores_TK: torch.Tensor) -> DispatchHandle:
        T, K = expert_ids_TK.shape
        packed = self.packed_layer(layer_idx)
        if packed is not None and cpu_kernels.fused_ok(x_TD, scores_TK):  # the whole layer in one call
            out_TD, slot_S, counts_E = cpu_kernels.experts_ffn(x_TD, scores_TK, expert_ids_TK, *packed)
            layout = RouteLayout(num_tokens=T, top_k=K, slot_S=slot_S, counts_E=tuple(counts_E))
        else:
            key = str(layer_idx)
            layout = route_layout(expert_ids_TK, self.num_experts)
            rows_SD = gather_scaled_rows(x_TD, scores_TK, layout)
            out_TD = scatter_sum(grouped_swiglu(rows_SD, layout.counts_E, self.gate_up_EDF2[key],
                                                self.down_EFD[key]), layout)
        return DispatchHandle(layer_idx=layer_idx, layout=layout, in_flight=out_TD)

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        return handle.in_flight  # computed in dispatch: nothing is in flight in-process

    def packed_layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = str(layer_idx)
        gate_up, down = self.gate_up_EDF2[key], self.down_EFD[key]
        return (gate_up, down) if gate_up.dim() == 4 and self.num_experts == gate_up.shape[0] else None


def top_k_gate(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their sigmoid scores (sigmoid in fp32, like the reference)."""
    if cpu_kernels.fused_ok(router_logits_TE) and router_logits_TE.shape[0] <= 256:  # few tokens: no torch ops
        return cpu_kernels.topk_sigmoid(router_logits_TE, top_k)
    logits_TK, expert_ids_TK = torch.topk(router_logits_TE, top_k, dim=-1)
    scores_TK = torch.sigmoid(logits_TK.float()).to(router_logits_TE.dtype)
    return scores_TK, expert_ids_TK


def expert_param_count(cfg: Llama4Config) -> int:
    """Parameters of one routed expert (gate, up, down)."""
    return 3 * cfg.hidden_size * cfg.intermediate_size


__all__: Sequence[str] = ("RouteLayout", "DispatchHandle", "ExpertSeam", "LocalExperts", "route_layout",
                          "gather_scaled_rows", "scatter_sum", "top_k_gate", "expert_param_count")
