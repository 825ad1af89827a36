"""Total and active parameter counts of real Llama 4 configs, from the model built on the ``meta`` device.

The text model is counted by instantiating ``Llama4TextModel`` on ``meta`` (no memory); the vision tower
(not served yet) is counted from its config with the same module shapes transformers builds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.config import Llama4Config, parse_config
from models.model import Llama4TextModel
from models.seam import expert_param_count


@dataclass(frozen=True)
class ParamCounts:
    text_total: int
    text_active: int  # per token: dense parts, shared experts and top-k routed experts of each MoE layer
    vision: int
    expert: int  # one routed expert of one layer

    @property
    def total(self) -> int:
        return self.text_total + self.vision

    @property
    def active(self) -> int:
        return self.text_active + self.vision


def text_param_counts(cfg: Llama4Config) -> tuple[int, int]:
    model = Llama4TextModel(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    idle_experts = (cfg.num_local_experts - cfg.num_experts_per_tok) * len(cfg.moe_layers)
    return total, total - idle_experts * expert_param_count(cfg)


def vision_param_count(raw: dict) -> int:
    """Vision encoder + pixel-shuffle adapter + projector into the text model (0 for text-only configs)."""
    v = raw.get("vision_config")
    if not v:
        return 0
    h, i, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patch, image, channels = v["patch_size"], v["image_size"], v.get("num_channels", 3)
    patches = (image // patch) ** 2 + 1
    embed = channels * patch * patch * h + h + patches * h + 2 * (2 * h)  # patch linear, class, positions, 2 LNs
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * (2 * h)  # attn (bias), MLP (bias), 2 LNs
    adapter = i * v["projector_input_dim"] + v["projector_output_dim"] ** 2
    text_hidden = raw["text_config"]["hidden_size"]
    return embed + layers * layer + adapter + v["vision_output_dim"] * text_hidden


def param_counts(config_path: str | Path) -> ParamCounts:
    raw = json.loads(Path(config_path).read_text())
    cfg = parse_config(raw)
    total, active = text_param_counts(cfg)
    return ParamCounts(text_total=total, text_active=active, vision=vision_param_count(raw),
                       expert=expert_param_count(cfg))
