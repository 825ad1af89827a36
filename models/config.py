"""Llama 4 text-model configuration, parsed from a Hugging Face ``config.json``.

One validated dataclass holds every field the math needs, with the defaults transformers'
``Llama4TextConfig`` applies. It accepts both ``Llama4ForConditionalGeneration`` files (text fields under
``text_config``) and text-only ``Llama4ForCausalLM`` files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a Llama 4 text model; the message names field and value."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``default`` (none) or ``llama3`` (what the released checkpoints use)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class Llama4Config:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: tuple[int, ...] = ()
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    no_rope_layers: tuple[int, ...] = ()  # 1 = the layer uses RoPE (and chunked attention), 0 = NoPE, global
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        # Derived fields, exactly as transformers derives them when the file leaves them out.
        if not self.no_rope_layers:
            pattern = tuple(int((i + 1) % self.no_rope_layer_interval != 0) for i in range(self.num_hidden_layers))
            object.__setattr__(self, "no_rope_layers", pattern)
        if not self.moe_layers and self.interleave_moe_layer_step > 0:
            step = self.interleave_moe_layer_step
            object.__setattr__(self, "moe_layers", tuple(range(step - 1, self.num_hidden_layers, step)))
        self._validate()

    # -- derived views -------------------------------------------------------------------------------
    def uses_rope(self, layer_idx: int) -> bool:
        return bool(self.no_rope_layers[layer_idx])

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers

    def is_chunked_layer(self, layer_idx: int) -> bool:
        """RoPE layers attend only within their chunk; NoPE layers attend globally."""
        return self.uses_rope(layer_idx) and self.attention_chunk_size is not None

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_hf_text_dict(self) -> dict[str, Any]:
        """The ``text_config`` of a config.json that transformers reads back to this config."""
        d = dataclasses.asdict(self)
        scaling = d.pop("rope_scaling")
        d["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
        for key in ("moe_layers", "no_rope_layers", "eos_token_id"):
            d[key] = list(d[key])
        d["model_type"] = "llama4_text"
        d["attention_dropout"] = 0.0
        d["router_aux_loss_coef"] = 0.001
        d["router_jitter_noise"] = 0.0
        return d

    # -- validation ----------------------------------------------------------------------------------
    def _validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                    "num_local_experts", "num_experts_per_tok", "floor_scale")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
               self.num_key_value_heads, f"must divide num_attention_heads ({self.num_attention_heads})")
        _check(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok", self.num_experts_per_tok,
               f"must be <= num_local_experts ({self.num_local_experts})")
        _check(self.hidden_act == "silu", "hidden_act", self.hidden_act, "only 'silu' (SwiGLU) is supported")
        _check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even for rotary embeddings")
        _check(self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps), "rms_norm_eps", self.rms_norm_eps,
               "must be a positive finite number")
        _check(self.rope_theta > 0 and math.isfinite(self.rope_theta), "rope_theta", self.rope_theta,
               "must be a positive finite number")
        _check(self.attention_chunk_size is None or (isinstance(self.attention_chunk_size, int)
                                                     and self.attention_chunk_size > 0),
               "attention_chunk_size", self.attention_chunk_size, "must be a positive integer or null")
        _check(math.isfinite(self.attn_scale), "attn_scale", self.attn_scale, "must be finite")
        _check(self.no_rope_layer_interval > 0, "no_rope_layer_interval", self.no_rope_layer_interval,
               "must be a positive integer")
        _check(len(self.no_rope_layers) >= self.num_hidden_layers, "no_rope_layers", list(self.no_rope_layers),
               f"needs one entry per layer ({self.num_hidden_layers} layers)")
        _check(set(self.no_rope_layers) <= {0, 1}, "no_rope_layers", list(self.no_rope_layers),
               "entries must be 0 (NoPE) or 1 (RoPE)")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        _check(not bad, "moe_layers", list(self.moe_layers), f"indices {bad} are outside 0..{self.num_hidden_layers - 1}")
        _check(len(set(self.moe_layers)) == len(self.moe_layers), "moe_layers", list(self.moe_layers),
               "has duplicate layers")
        _check(self.rope_scaling.rope_type in ("default", "llama3"), "rope_scaling.rope_type",
               self.rope_scaling.rope_type, "supported types are 'default' and 'llama3'")
        if self.rope_scaling.rope_type == "llama3":
            _check(self.rope_scaling.factor > 0, "rope_scaling.factor", self.rope_scaling.factor, "must be > 0")
            _check(self.rope_scaling.high_freq_factor > self.rope_scaling.low_freq_factor,
                   "rope_scaling.high_freq_factor", self.rope_scaling.high_freq_factor,
                   f"must exceed low_freq_factor ({self.rope_scaling.low_freq_factor})")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            _check(value is None or 0 <= value < self.vocab_size, name, value,
                   f"must be a token id below vocab_size ({self.vocab_size})")
        bad_eos = [t for t in self.eos_token_id if not 0 <= t < self.vocab_size]
        _check(not bad_eos, "eos_token_id", list(self.eos_token_id),
               f"ids {bad_eos} are not below vocab_size ({self.vocab_size})")


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name}={value!r}: {why}")


_FIELDS = {f.name for f in dataclasses.fields(Llama4Config)}


def parse_config(raw: dict[str, Any]) -> Llama4Config:
    """Parse a config.json dict of ``Llama4ForConditionalGeneration`` or ``Llama4ForCausalLM``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    text = raw.get("text_config", raw)
    if not isinstance(text, dict):
        raise ConfigError(f"config field text_config must be an object, got {text!r}")
    model_type = text.get("model_type", "llama4_text")
    if model_type not in ("llama4_text", "llama4"):
        raise ConfigError(f"config field model_type={model_type!r}: expected 'llama4_text' (a Llama 4 checkpoint)")
    kwargs = {k: v for k, v in text.items() if k in _FIELDS}
    if "head_dim" not in kwargs or kwargs["head_dim"] is None:
        heads = kwargs.get("num_attention_heads", Llama4Config.num_attention_heads)
        kwargs["head_dim"] = kwargs.get("hidden_size", Llama4Config.hidden_size) // max(heads, 1)
    eos = kwargs.get("eos_token_id", (2,))
    kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    for key in ("moe_layers", "no_rope_layers"):
        if kwargs.get(key) is not None and not isinstance(kwargs[key], (list, tuple)):
            raise ConfigError(f"config field {key}={kwargs[key]!r}: must be a list of integers")
        kwargs[key] = tuple(kwargs.get(key) or ())
    kwargs["rope_scaling"], theta = _parse_rope(text)
    if theta is not None:
        kwargs["rope_theta"] = theta
    try:
        return Llama4Config(**kwargs)
    except TypeError as e:  # e.g. a string where a number goes
        raise ConfigError(f"config has a value of the wrong type: {e}") from None


def _parse_rope(text: dict[str, Any]) -> tuple[RopeScaling, float | None]:
    """Old files say ``rope_scaling`` + ``rope_theta``; transformers 5 writes ``rope_parameters``."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config field rope_scaling={params!r}: must be an object or null")
    theta = params.get("rope_theta", text.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeScaling(), theta
    names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [n for n in names if n not in params]
    if rope_type == "llama3" and missing:
        raise ConfigError(f"config field rope_scaling={params!r}: llama3 scaling needs {missing}")
    return RopeScaling(rope_type=rope_type, **{n: params[n] for n in names if n in params}), theta


def load_config(path: str | Path) -> Llama4Config:
    """Load ``config.json`` from a checkpoint directory or a file path."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {file}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    return parse_config(raw)
