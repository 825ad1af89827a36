"""Checkpoint files round-trip between transformers, our writer and our loader.

1. Files transformers' ``save_pretrained`` writes (sharded, with an index) load in our loader and give the
   logits of the model that wrote them, for ``Llama4ForCausalLM`` and ``Llama4ForConditionalGeneration``.
2. Our writer's file variants (per-expert expert tensors, one unsharded ``model.safetensors``) load to
   bit-identical logits to the default sharded, fused layout.
3. The writer is deterministic and writes the whole Hugging Face directory layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from models.checkpoint import CheckpointReader
from models.checkpoint_writer import TINY_VISION_CONFIG, make_checkpoint, write_checkpoint
from models.loading import load_model
from models.presets import preset_config

FP32_ATOL = 1e-4
VOCAB = 512


def _cfg(**overrides):
    return preset_config("tiny", vocab_size=VOCAB, bos_token_id=0, eos_token_id=(1,), pad_token_id=2, **overrides)


def _prompts(seed: int, vocab: int = VOCAB, length: int = 40) -> torch.Tensor:
    # 40 tokens cross the tiny preset's 16-token attention chunks and its floor_scale of 32.
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, prompt_BT: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(prompt_BT)


# -- 1. transformers' save_pretrained -> our loader -------------------------------------------------------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights: norms around 1 (so a misapplied norm shows), everything else N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _hf_model(architecture: str):
    transformers = pytest.importorskip("transformers")
    text = _cfg().to_hf_text_dict()
    text.pop("model_type")
    if architecture == "causal_lm":
        config = transformers.Llama4TextConfig(**text, attn_implementation="eager")
        model = transformers.Llama4ForCausalLM(config)
    else:
        config = transformers.Llama4Config(text_config=text, vision_config=dict(TINY_VISION_CONFIG),
                                           attn_implementation="eager")
        model = transformers.Llama4ForConditionalGeneration(config)
    _randomize(model, seed=11)
    return model.eval()


@pytest.mark.parametrize("architecture", ["causal_lm", "conditional_generation"])
def test_transformers_save_pretrained_loads_in_our_loader(architecture, tmp_path):
    hf = _hf_model(architecture)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "max_shard_size should have split the weights into several shards"
    assert not list(tmp_path.glob("*.bin"))
    names = set(index["weight_map"])
    # What transformers 5 writes (also what the released checkpoints use): the reader must detect it.
    reader = CheckpointReader(tmp_path)
    expected_prefix = "model." if architecture == "causal_lm" else "language_model.model."
    print(f"{architecture}: {len(names)} tensors, e.g. {sorted(names)[:3]}; reader layout: {reader.layout}")
    assert reader.file_name("embed_tokens.weight") in names
    assert reader.file_name("layers.0.feed_forward.experts.gate_up_proj") in names
    assert any(n.startswith(expected_prefix) for n in names), sorted(names)[:5]
    reader.close()

    ours = load_model(tmp_path)
    assert ours.cfg == _cfg()  # the config.json transformers wrote parses back to the config it was built from
    prompt = _prompts(seed=5)
    with torch.inference_mode():
        hf_logits = hf(input_ids=prompt).logits
    ours_logits = _logits(ours, prompt)
    assert ours_logits.shape == hf_logits.shape == (2, prompt.shape[1], VOCAB)
    assert hf_logits.std() > 0.5, "random weights should give logits far from ties"
    diff = (ours_logits - hf_logits).abs().max().item()
    assert diff < FP32_ATOL, f"{architecture}: max |logit diff| {diff:.2e}"


# -- 2. our writer's file variants ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fused"), _cfg(), seed=5)


@pytest.fixture(scope="module")
def fused_logits(fused_dir) -> torch.Tensor:
    return _logits(load_model(fused_dir), _prompts(seed=1))


@pytest.mark.parametrize("layout", ["conditional_generation", "causal_lm"])
def test_per_expert_layout_gives_bit_identical_logits(layout, tmp_path, fused_dir, fused_logits):
    per_expert = write_checkpoint(tmp_path, _cfg(), seed=5, layout=layout, expert_layout="per_expert")
    names = set(json.loads((per_expert / "model.safetensors.index.json").read_text())["weight_map"])
    prefix = "language_model.model." if layout == "conditional_generation" else "model."
    assert prefix + "layers.0.feed_forward.experts.3.gate_proj.weight" in names
    assert prefix + "layers.0.feed_forward.experts.3.down_proj.weight" in names
    assert not [n for n in names if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert torch.equal(_logits(load_model(per_expert), _prompts(seed=1)), fused_logits)


def test_single_unsharded_file_loads_identically(tmp_path, fused_logits):
    write_checkpoint(tmp_path, _cfg(), seed=5, num_shards=1)
    (tmp_path / "model-00001-of-00001.safetensors").rename(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").unlink()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert torch.equal(_logits(load_model(tmp_path), _prompts(seed=1)), fused_logits)


# -- 3. writer determinism and directory layout ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), "tiny", seed=seed)
            for name, seed in [("a3", 3), ("b3", 3), ("c4", 4)]}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_gives_byte_identical_files(tiny_dirs):
    a, b = _files(tiny_dirs["a3"]), _files(tiny_dirs["b3"])
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []


def test_other_seed_gives_other_weights(tiny_dirs):
    a, c = _files(tiny_dirs["a3"]), _files(tiny_dirs["c4"])
    assert sorted(a) == sorted(c)
    shards = [n for n in a if n.endswith(".safetensors")]
    assert shards and all(a[n] != c[n] for n in shards)
    for same in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert a[same] == c[same], same  # only the weights depend on the seed


def test_directory_layout_index_and_configs(tiny_dirs):
    d = tiny_dirs["a3"]
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    index = json.loads((d / "model.safetensors.index.json").read_text())
    weight_map, total = index["weight_map"], 0
    in_files: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(d / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert name not in in_files, f"{name} is in {in_files.get(name)} and {shard}"
                in_files[name] = shard
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16
                total += t.numel() * t.element_size()
    assert weight_map == in_files  # every tensor mapped, to the shard that holds it; nothing extra
    assert index["metadata"]["total_size"] == total
    assert all(name.startswith(("language_model.model.", "language_model.lm_head.")) for name in weight_map)

    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForConditionalGeneration"]
    assert config["model_type"] == "llama4"
    text = config["text_config"]
    assert text["model_type"] == "llama4_text"
    assert "hidden_size" not in config and text["hidden_size"] == 64
    assert config["vision_config"]["model_type"] == "llama4_vision_model"

    generation = json.loads((d / "generation_config.json").read_text())
    assert generation["eos_token_id"] == text["eos_token_id"] and generation["bos_token_id"] == text["bos_token_id"]

    assert json.loads((d / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    tokenizer_config = json.loads((d / "tokenizer_config.json").read_text())
    assert isinstance(tokenizer_config.get("chat_template"), str) and tokenizer_config["chat_template"]

    model = load_model(d)  # and the whole directory loads
    assert model.cfg.vocab_size == text["vocab_size"]
    assert os.path.getsize(d / shards[0]) > 0
