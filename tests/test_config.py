import json

import pytest

from models.config import ConfigError, Llama4Config, load_config, parse_config


def _raw(shared_models, name):
    return json.loads((shared_models / f"{name}.config.json").read_text())


def test_published_configs_parse_with_transformers_defaults(shared_models):
    scout = load_config(shared_models / "llama4-scout-17b-16e.config.json")
    maverick = load_config(shared_models / "llama4-maverick-17b-128e.config.json")
    assert scout.num_local_experts == 16 and maverick.num_local_experts == 128
    assert scout.moe_layers == tuple(range(48))
    assert maverick.moe_layers == tuple(range(1, 48, 2))  # interleave_moe_layer_step 2: layers 1, 3, ...
    # every 4th layer is NoPE / global: no_rope_layers[3] == 0, the others 1
    assert scout.no_rope_layers[:8] == (1, 1, 1, 0, 1, 1, 1, 0)
    assert [scout.is_chunked_layer(i) for i in range(4)] == [True, True, True, False]
    assert scout.use_qk_norm and not maverick.use_qk_norm
    assert scout.eos_token_id == (200001, 200007, 200008)
    assert scout.attention_chunk_size == 8192 and scout.floor_scale == 8192 and scout.attn_scale == 0.1


@pytest.mark.parametrize("model", ["llama4-scout-17b-16e", "llama4-maverick-17b-128e"])
def test_derived_fields_match_transformers(shared_models, model):
    from transformers import Llama4TextConfig

    raw = _raw(shared_models, model)
    ours = parse_config(raw)
    theirs = Llama4TextConfig(**{k: v for k, v in raw["text_config"].items() if k != "model_type"})
    assert list(ours.moe_layers) == list(theirs.moe_layers)
    assert list(ours.no_rope_layers) == list(theirs.no_rope_layers)
    assert ours.head_dim == theirs.head_dim


def test_text_only_causal_lm_config_and_explicit_lists():
    raw = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "num_hidden_layers": 4,
           "no_rope_layers": [1, 0, 1, 0], "moe_layers": [0, 2], "vocab_size": 100, "eos_token_id": 5,
           "bos_token_id": 1, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    cfg = parse_config(raw)
    assert cfg.no_rope_layers == (1, 0, 1, 0) and cfg.moe_layers == (0, 2) and cfg.eos_token_id == (5,)
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0


def test_round_trip_through_hf_text_dict():
    cfg = Llama4Config(num_hidden_layers=6, interleave_moe_layer_step=3, vocab_size=300, bos_token_id=0,
                       eos_token_id=(1, 2))
    assert parse_config(cfg.to_hf_text_dict()) == cfg


@pytest.mark.parametrize("field,value,needle", [
    ("num_key_value_heads", 7, "num_key_value_heads=7"),
    ("num_experts_per_tok", 99, "num_experts_per_tok=99"),
    ("hidden_size", -5, "hidden_size must be a positive integer, got -5"),
    ("moe_layers", [0, 60], "moe_layers=[0, 60]"),
    ("no_rope_layers", [1, 1], "no_rope_layers=[1, 1]"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_chunk_size", 0, "attention_chunk_size=0"),
    ("rope_scaling", {"rope_type": "yarn"}, "rope_scaling.rope_type='yarn'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "llama3 scaling needs"),
    ("eos_token_id", [1, 10**9], "eos_token_id"),
    ("model_type", "mixtral", "model_type='mixtral'"),
    ("moe_layers", "all", "moe_layers='all'"),
])
def test_bad_config_names_field_and_value(field, value, needle):
    raw = {"text_config": {"num_hidden_layers": 4, "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 1,
                           field: value}}
    with pytest.raises(ConfigError, match=None) as err:
        parse_config(raw)
    assert needle in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
