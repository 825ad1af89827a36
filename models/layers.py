"""Small building blocks of the Llama 4 text model: norms, SwiGLU MLP, rotary embedding.

Shape legend: T tokens (new, flattened over sequences), H query heads, Dh head dim, D hidden, F ffn width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_kernels
from models.config import Llama4Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # Hot-path tensors live in the instance dict once bound: a parameter lookup through nn.Module.__getattr__
        # costs ~2 us, and a decode step makes hundreds of them.
        self._kernel_weight: torch.Tensor | None = None

    def pack_for_cpu(self, activation_dtype: torch.dtype) -> None:
        """Bind the (loaded) weight for the fused CPU kernel when the arithmetic is fp32."""
        ok = activation_dtype == torch.float32 and cpu_kernels.fused_ok(self.weight)
        self._kernel_weight = self.weight.detach() if ok else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._kernel_weight
        if w is not None and cpu_kernels.fused_ok(x):
            return cpu_kernels.rms_norm(x, w, self.eps)[1]
        # Normalise in fp32, cast back, then scale: the order transformers uses, which matters in bf16.
        return l2_norm(x, self.eps) * self.weight

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, norm(h + delta)): the residual add and the next norm, in one pass on CPU."""
        w = self._kernel_weight
        if w is not None and cpu_kernels.fused_ok(h, delta):
            return cpu_kernels.rms_norm(h, w, self.eps, residual=delta)
        h = h + delta
        return h, self(h)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless q/k norm (it is an RMS norm despite the name)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) that can hand its weight to the CPU kernels: after
    ``pack_for_cpu`` the weight is held only packed (``weight`` is None) and every product goes to the kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **factory):
        super().__init__(in_features, out_features, bias, **factory)
        self.register_buffer("packed", None, persistent=False)
        self._kernel_args: tuple | None = None  # (packed, N, bias) in the instance dict: see RMSNorm

    def pack_for_cpu(self, activation_dtype: torch.dtype) -> None:
        if self.weight is not None and cpu_kernels.can_pack(self.weight, activation_dtype):
            self.packed = cpu_kernels.pack(self.weight.detach())
            self.weight = None
            self._kernel_args = (self.packed, self.out_features, None if self.bias is None else self.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self._kernel_args
        if args is not None:
            return cpu_kernels.packed_linear(x, *args)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)  # weights may be narrower
        return F.linear(x, w, self.bias)


class SwiGLU(nn.Module):
    """Dense FFN and shared expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.ffn = ffn
        self.gate_proj = Linear(hidden, ffn, bias=False)
        self.up_proj = Linear(hidden, ffn, bias=False)
        self.down_proj = Linear(ffn, hidden, bias=False)
        self.register_buffer("gate_up_packed", None, persistent=False)
        self._gate_up: torch.Tensor | None = None  # gate_up_packed, in the instance dict: see RMSNorm

    def pack_for_cpu(self, activation_dtype: torch.dtype) -> None:
        """Gate and up packed as one [2F, D] weight: one pass over x, and the activation fused after it."""
        self.gate_up_packed = self._gate_up = pack_fused(activation_dtype, self.gate_proj, self.up_proj)[0]

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate|up, down) packed for the one-call kernel (``cpu_kernels.swiglu``, ``models/kernel_step.py``); None
        where it does not apply (not packed, or a bias on down)."""
        gate_up, down = self._gate_up, self.down_proj._kernel_args
        return None if gate_up is None or down is None or down[2] is not None else (gate_up, down[0])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        packed = self.kernel_weights()
        if packed is not None:
            return cpu_kernels.swiglu(x_TD, *packed)
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))


def pack_fused(activation_dtype: torch.dtype, *linears: Linear) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(packed weight, bias) of several ``Linear``s on the same input as one product (their outputs side by side),
    or (None, None) where the CPU kernels do not apply. Each output column is computed exactly as it would be alone;
    the ``Linear``s give up their weights."""
    weights = [lin.weight for lin in linears]
    if any(w is None for w in weights) or len({w.dtype for w in weights}) != 1 \
            or not cpu_kernels.can_pack(weights[0], activation_dtype):
        return None, None
    packed = cpu_kernels.pack(torch.cat([w.detach() for w in weights]))
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(lin.out_features, dtype=activation_dtype)
         for b, lin in zip(biases, linears)])
    for lin in linears:
        lin.weight = None
    return packed, bias


def rope_inv_freq(cfg: Llama4Config) -> torch.Tensor:
    """Inverse frequencies [Dh/2], with llama3 scaling when the config asks for it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s.rope_type == "default":
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [T, Dh/2] in fp32 for the given absolute positions."""
    angles_TF = positions_T.float()[:, None] * inv_freq[None, :]
    return torch.cos(angles_TF), torch.sin(angles_TF)


def apply_rope(x_THDh: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate *adjacent* pairs (x[2i], x[2i+1]): Llama 4 uses the complex-number form, not rotate-half."""
    x = x_THDh.float().unflatten(-1, (-1, 2))  # [T, H, Dh/2, 2]
    a, b = x[..., 0], x[..., 1]
    cos, sin = cos_TF[:, None, :], sin_TF[:, None, :]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x_THDh)
