"""The router<->experts seam: LocalExperts against the every-expert-on-every-token formula transformers uses."""

import torch
import torch.nn.functional as F

from models.presets import preset_config
from models.seam import LocalExperts, route_layout, top_k_gate


def _experts(E=6, D=8, Fw=12, top_k=2, seed=0):
    cfg = preset_config("tiny", num_local_experts=E, hidden_size=D, intermediate_size=Fw,
                        num_experts_per_tok=top_k, num_attention_heads=2, num_key_value_heads=1)
    g = torch.Generator().manual_seed(seed)
    experts = LocalExperts(cfg)
    for layer in cfg.moe_layers:
        experts.load_layer(layer, torch.randn(E, D, 2 * Fw, generator=g), torch.randn(E, Fw, D, generator=g))
    return cfg, experts


def _dense_reference(x_TD, ids_TK, scores_TK, gate_up_EDF2, down_EFD):
    """Every expert on every token, non-chosen experts see a zero input (score 0), as transformers does."""
    E = gate_up_EDF2.shape[0]
    score_TE = torch.zeros(x_TD.shape[0], E).scatter(1, ids_TK, scores_TK)
    out = torch.zeros_like(x_TD)
    for e in range(E):
        gate, up = ((x_TD * score_TE[:, e:e + 1]) @ gate_up_EDF2[e]).chunk(2, dim=-1)
        out += (F.silu(gate) * up) @ down_EFD[e]
    return out


def test_local_experts_match_dense_formula():
    cfg, experts = _experts()
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(33, cfg.hidden_size, generator=g)
    scores_TK, ids_TK = top_k_gate(torch.randn(33, cfg.num_local_experts, generator=g), cfg.num_experts_per_tok)
    handle = experts.dispatch(0, x_TD, ids_TK, scores_TK)
    y_TD = experts.combine(handle)
    ref = _dense_reference(x_TD, ids_TK, scores_TK, experts.gate_up_EDF2["0"], experts.down_EFD["0"])
    torch.testing.assert_close(y_TD, ref, atol=1e-5, rtol=1e-5)


def test_layout_is_expert_major_and_rows_keep_their_origin():
    # Rows carry their token index, so a misrouted or reordered row is obvious.
    ids_TK = torch.tensor([[2, 0], [1, 2], [2, 1], [0, 3]])
    layout = route_layout(ids_TK, num_experts=5)
    assert layout.counts_E == (2, 2, 3, 1, 0)
    experts_of_rows = ids_TK.reshape(-1)[layout.slot_S]
    assert experts_of_rows.tolist() == [0, 0, 1, 1, 2, 2, 2, 3]
    assert (layout.slot_S // 2).tolist() == [0, 3, 1, 2, 0, 1, 2, 3]  # token order kept within an expert


def test_zero_tokens_and_idle_experts():
    cfg, experts = _experts(top_k=1)
    x_TD = torch.zeros(0, cfg.hidden_size)
    ids_TK = torch.zeros(0, 1, dtype=torch.long)
    handle = experts.dispatch(0, x_TD, ids_TK, torch.zeros(0, 1))
    assert experts.combine(handle).shape == (0, cfg.hidden_size)
    assert handle.layout.counts_E == (0,) * cfg.num_local_experts
