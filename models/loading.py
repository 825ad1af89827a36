"""Build the single-process model from a checkpoint directory with the real loader."""

from __future__ import annotations

from pathlib import Path

import torch

from models import cpu_kernels
from models.checkpoint import CheckpointReader
from models.config import load_config
from models.kernel_step import KernelStep
from models.model import Llama4TextModel
from models.seam import ExpertSeam, LocalExperts


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               experts: ExpertSeam | None = None, weight_dtype: torch.dtype | None = None) -> Llama4TextModel:
    """Read config.json and the safetensors weights of ``path`` into a ``Llama4TextModel``.

    With ``experts`` given (e.g. a distributed seam) the routed experts are not read here at all.
    ``weight_dtype`` (default ``dtype``) is what the matrices (projections, embeddings, experts) are held in;
    norms and activations are ``dtype``. bf16 matrices with fp32 activations keep a bf16 checkpoint's weights
    at their size (half the bytes to stream per decode step) while the arithmetic stays fp32: the CPU kernels
    widen them exactly, in registers, so the results equal those of fp32-held weights.
    """
    wdtype = weight_dtype or dtype
    cfg = load_config(path)
    reader = CheckpointReader(path)
    model = Llama4TextModel(cfg, experts=experts, device="meta")
    state = {}
    for name, param in model.state_dict().items():
        if name.startswith("experts."):
            continue
        source = name
        if name == "lm_head.weight" and cfg.tie_word_embeddings and not reader.has(name):
            source = "embed_tokens.weight"
        matrix = param.dim() == 2
        state[name] = reader.read(source, expected_shape=tuple(param.shape)).to(
            device=device, dtype=wdtype if matrix else dtype)
    if isinstance(model.experts, LocalExperts):
        all_experts = range(cfg.num_local_experts)
        for layer in cfg.moe_layers:
            w = reader.read_experts(layer, all_experts, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
            model.experts.load_layer(layer, w.gate_up_EDF2.to(device=device, dtype=wdtype),
                                     w.down_EFD.to(device=device, dtype=wdtype), activation_dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():  # parents first: fused q|k|v and gate|up take their Linears' weights
        if hasattr(module, "pack_for_cpu"):
            module.pack_for_cpu(dtype)
    step = KernelStep(model)
    model.kernel_step = step if step.usable else None
    _check_nothing_left_on_meta(model)
    return model.eval()


def resident_weight_dtype(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
                          requested: str = "auto") -> torch.dtype:
    """The ``weight_dtype`` to serve with. ``requested`` names a torch dtype, or "auto": a bf16 checkpoint computed
    in fp32 on a CPU keeps its matrices bf16 where the CPU kernels can widen them (same results, half the
    bytes); otherwise ``dtype``."""
    if requested != "auto":
        return getattr(torch, requested)
    if torch.device(device).type == "cpu" and dtype == torch.float32 and cpu_kernels.library() is not None:
        with CheckpointReader(path) as reader:
            if reader.dtype("embed_tokens.weight") == torch.bfloat16:
                return torch.bfloat16
    return dtype


def _check_nothing_left_on_meta(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"weights not loaded from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
