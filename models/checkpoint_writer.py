"""Write deterministic random-weight Llama 4 checkpoints in the real Hugging Face layout.

Sharded safetensors + ``model.safetensors.index.json`` + ``config.json`` (``Llama4ForConditionalGeneration``
naming, text weights only) + ``generation_config.json`` + a real tokenizer. Weights are drawn per tensor
from a generator seeded by (seed, tensor name), so a file does not depend on the order tensors are made.

Shape legend: E experts, D hidden, F expert ffn width, F2 = 2F.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import Llama4Config
from models.model import Llama4TextModel
from models.presets import BPE_VOCAB, preset_config, with_token_ids
from models.tokenizer_builder import build_tokenizer, padded_vocab_size

# A vision tower is not part of this project's checkpoints yet; this keeps transformers'
# Llama4ForConditionalGeneration small when it reads our config.
TINY_VISION_CONFIG = {
    "model_type": "llama4_vision_model", "hidden_size": 32, "hidden_act": "gelu", "num_hidden_layers": 1,
    "num_attention_heads": 2, "intermediate_size": 64, "image_size": 28, "patch_size": 14, "num_channels": 3,
    "vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32, "pixel_shuffle_ratio": 0.5,
    "vision_feature_select_strategy": "default", "vision_feature_layer": -1, "multi_modal_projector_bias": False,
    "norm_eps": 1e-5, "rope_theta": 10000,
}

LAYOUTS = {  # file naming: model prefix, LM head name
    "conditional_generation": ("language_model.model.", "language_model.lm_head.weight"),
    "causal_lm": ("model.", "lm_head.weight"),
}


def random_weights(cfg: Llama4Config, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, fp32 tensor) for every text-model weight, experts in the fused layout."""
    shapes = {n: tuple(p.shape) for n, p in Llama4TextModel(cfg, device="meta").state_dict().items()}
    for name, shape in shapes.items():
        if name.startswith("experts."):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        yield name, _draw(name, shape, seed)
    E, D, F = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for layer in cfg.moe_layers:
        prefix = f"layers.{layer}.feed_forward.experts."
        yield prefix + "gate_up_proj", _draw(prefix + "gate_up_proj", (E, D, 2 * F), seed, fan_in=D)
        yield prefix + "down_proj", _draw(prefix + "down_proj", (E, F, D), seed, fan_in=F)


def _draw(name: str, shape: tuple[int, ...], seed: int, fan_in: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):  # not all ones, so a norm applied wrongly shows in the logits
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g)
    fan_in = fan_in or shape[-1]  # nn.Linear weights are [out, in]
    return torch.randn(shape, generator=g) / fan_in ** 0.5  # unit-variance outputs: logits far from ties


def split_experts(name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Fused expert tensors -> the per-expert nn.Linear layout that quantized releases use."""
    prefix = name.rsplit(".", 1)[0]
    if name.endswith("gate_up_proj"):
        gate_EDF, up_EDF = t.chunk(2, dim=-1)
        for e in range(t.shape[0]):
            yield f"{prefix}.{e}.gate_proj.weight", gate_EDF[e].T.contiguous()
            yield f"{prefix}.{e}.up_proj.weight", up_EDF[e].T.contiguous()
    else:
        for e in range(t.shape[0]):
            yield f"{prefix}.{e}.down_proj.weight", t[e].T.contiguous()


def write_checkpoint(out_dir: str | Path, cfg: Llama4Config, seed: int = 0, num_shards: int = 3,
                     layout: str = "conditional_generation", expert_layout: str = "fused",
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write weights + index + configs for ``cfg`` (tokenizer files are written by ``make_checkpoint``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_prefix, head_name = LAYOUTS[layout]
    tensors: dict[str, torch.Tensor] = {}
    for name, t in random_weights(cfg, seed):
        pieces = split_experts(name, t) if expert_layout == "per_expert" and ".experts." in name else [(name, t)]
        for piece_name, piece in pieces:
            file_name = head_name if piece_name == "lm_head.weight" else model_prefix + piece_name
            tensors[file_name] = piece.to(dtype).contiguous()
    _write_shards(out, tensors, num_shards)
    _write_json(out / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id), "pad_token_id": cfg.pad_token_id,
        "do_sample": True, "temperature": 0.6, "top_p": 0.9})
    _write_json(out / "config.json", _hf_config(cfg, layout, dtype))  # last: its presence marks a whole checkpoint
    return out


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per_shard, shards, current, size = total / num_shards, [], [], 0
    for name in names:  # fill shards in order, like save_pretrained's max_shard_size
        current.append(name)
        size += tensors[name].numel() * tensors[name].element_size()
        if size >= per_shard * (len(shards) + 1) and len(shards) < num_shards - 1:
            shards.append(current)
            current = []
    shards.append(current)
    shards = [s for s in shards if s]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _hf_config(cfg: Llama4Config, layout: str, dtype: torch.dtype) -> dict:
    text = cfg.to_hf_text_dict()
    text["torch_dtype"] = str(dtype).removeprefix("torch.")
    if layout == "causal_lm":
        return {"architectures": ["Llama4ForCausalLM"], **text}
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "torch_dtype": text["torch_dtype"], "tie_word_embeddings": False,
            "boi_token_index": cfg.vocab_size - 4, "eoi_token_index": cfg.vocab_size - 3,
            "image_token_index": cfg.vocab_size - 2, "text_config": text, "vision_config": TINY_VISION_CONFIG}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def make_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, **kwargs) -> Path:
    """Tokenizer + config + weights for a named preset; the model's token ids come from the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = build_tokenizer(out, BPE_VOCAB[preset])
    cfg = preset_config(preset, **kwargs.pop("overrides", {}))
    cfg = with_token_ids(cfg, padded_vocab_size(info.vocab_size), info.bos_token_id, info.eos_token_ids,
                         info.pad_token_id)
    return write_checkpoint(out, cfg, seed=seed, **kwargs)
