"""Real-model shapes on the meta device: Scout ~109B total / ~17B active, Maverick ~400B / ~17B."""

import pytest

from models.config import load_config
from models.param_count import param_counts


def _by_hand(cfg) -> tuple[int, int]:
    """An independent count from the architecture, to check the meta-device model against."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = D * H * Dh * 2 + D * Hkv * Dh * 2 + 2 * D  # q, o, k, v, two norms
    expert = 3 * D * cfg.intermediate_size
    moe = D * cfg.num_local_experts + expert + cfg.num_local_experts * expert  # router, shared, routed
    dense = 3 * D * cfg.intermediate_size_mlp
    n_moe = len(cfg.moe_layers)
    embed = 2 * cfg.vocab_size * D + D  # embeddings, LM head, final norm
    total = cfg.num_hidden_layers * attn + n_moe * moe + (cfg.num_hidden_layers - n_moe) * dense + embed
    active = total - n_moe * (cfg.num_local_experts - cfg.num_experts_per_tok) * expert
    return total, active


@pytest.mark.parametrize("name,total_b,active_b", [
    ("llama4-scout-17b-16e", 109, 17),
    ("llama4-maverick-17b-128e", 400, 17),
])
def test_published_totals(shared_models, name, total_b, active_b):
    path = shared_models / f"{name}.config.json"
    counts = param_counts(path)
    assert (counts.text_total, counts.text_active) == _by_hand(load_config(path))
    assert abs(counts.total / (total_b * 1e9) - 1) < 0.01, counts.total
    # Meta's "17B active" is rounded: the exact text-model figure is 17.17-17.18B (attention, shared and one
    # routed expert per MoE layer, embeddings and LM head), 1.0-1.1% above the rounded 17B.
    assert round(counts.text_active / 1e9) == active_b
    assert abs(counts.text_active / (active_b * 1e9) - 1) < 0.011, counts.text_active
