"""Named model sizes for checkpoints the project makes itself (no real weights can be downloaded here).

``tiny`` is for unit tests (seconds). ``small`` is for benchmarks: ~190M parameters, 16 experts, MoE on
alternate layers like Maverick, big enough that matrix work, not Python, dominates a step on a CPU.
Token ids (vocab size, bos/eos/pad) are filled in from the tokenizer the writer builds.
"""

from __future__ import annotations

import dataclasses

from models.config import Llama4Config

PRESETS: dict[str, dict] = {
    # Scout-like: every layer MoE, q/k norm; small chunks and floor_scale so tests cross them cheaply.
    "tiny": dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                 interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=16, floor_scale=32,
                 max_position_embeddings=4096, rope_theta=500000.0),
    # Maverick-like: dense and MoE layers alternate, no q/k norm.
    "small": dict(hidden_size=768, intermediate_size=1024, intermediate_size_mlp=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_local_experts=16,
                  interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=2048, floor_scale=2048,
                  max_position_embeddings=32768, rope_theta=500000.0),
}

# Ordinary (non-special) tokenizer vocabulary per preset.
BPE_VOCAB = {"tiny": 384, "small": 1024}


def preset_config(name: str, **overrides) -> Llama4Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {"vocab_size": 1024, "bos_token_id": 0, "eos_token_id": (1,), "pad_token_id": None,
              **PRESETS[name], **overrides}
    return Llama4Config(**fields)


def with_token_ids(cfg: Llama4Config, vocab_size: int, bos: int, eos: tuple[int, ...], pad: int) -> Llama4Config:
    return dataclasses.replace(cfg, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=tuple(eos),
                               pad_token_id=pad)
