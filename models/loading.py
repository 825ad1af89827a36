"""Build the single-process model from a checkpoint directory with the real loader."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import CheckpointReader
from models.config import load_config
from models.model import Llama4TextModel
from models.seam import ExpertSeam, LocalExperts


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               experts: ExpertSeam | None = None) -> Llama4TextModel:
    """Read config.json and the safetensors weights of ``path`` into a ``Llama4TextModel``.

    With ``experts`` given (e.g. a distributed seam) the routed experts are not read here at all.
    """
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
        state[name] = reader.read(source, expected_shape=tuple(param.shape)).to(device=device, dtype=dtype)
    if isinstance(model.experts, LocalExperts):
        all_experts = range(cfg.num_local_experts)
        for layer in cfg.moe_layers:
            w = reader.read_experts(layer, all_experts, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
            model.experts.load_layer(layer, w.gate_up_EDF2.to(device=device, dtype=dtype),
                                     w.down_EFD.to(device=device, dtype=dtype))
    model.load_state_dict(state, strict=False, assign=True)
    _check_nothing_left_on_meta(model)
    return model.eval()


def _check_nothing_left_on_meta(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"weights not loaded from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
