"""CheckpointReader / SafetensorsFile on small checkpoints written by the real ``safetensors`` library.

Shape legend: E experts, D hidden, F expert ffn width, F2 = 2F, V vocab.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, CheckpointReader, ExpertWeights
from models.safetensors_io import SafetensorsFile

E, D, F, V = 8, 16, 12, 40
LAYOUTS = {  # file naming: model prefix, LM head name, vision prefix (ignored by the reader)
    "conditional_generation": ("language_model.model.", "language_model.lm_head.weight", "vision_model."),
    "causal_lm": ("model.", "lm_head.weight", None),
    "model_language_model": ("model.language_model.", "lm_head.weight", "model.vision_model."),
}


def canonical_weights(dtype: torch.dtype = torch.float32, seed: int = 0, E: int = E, D: int = D,
                      F: int = F) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed_tokens.weight": (V, D), "norm.weight": (D,), "lm_head.weight": (V, D),
        "layers.0.self_attn.q_proj.weight": (D, D), "layers.0.feed_forward.gate_proj.weight": (2 * D, D),
        "layers.1.feed_forward.router.weight": (E, D),
        "layers.1.feed_forward.shared_expert.gate_proj.weight": (F, D),
        "layers.1.feed_forward.experts.gate_up_proj": (E, D, 2 * F),
        "layers.1.feed_forward.experts.down_proj": (E, F, D),
    }
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}


def split_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused experts -> per-expert nn.Linear tensors, as quantized releases store them."""
    out = {}
    for name, t in weights.items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :, :t.shape[2] // 2].T.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, :, t.shape[2] // 2:].T.contiguous()
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].T.contiguous()
        else:
            out[name] = t
    return out


def write_checkpoint(root: Path, weights: dict[str, torch.Tensor], layout: str = "conditional_generation",
                     num_shards: int = 3, per_expert: bool = False) -> Path:
    prefix, head, vision = LAYOUTS[layout]
    weights = split_experts(weights) if per_expert else weights
    tensors = {head if n == "lm_head.weight" else prefix + n: t.contiguous() for n, t in weights.items()}
    if vision:
        tensors[vision + "patch_embedding.weight"] = torch.ones(4, 4)
    root.mkdir(parents=True, exist_ok=True)
    if num_shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    names = list(tensors)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = names[i::num_shards]
        save_file({n: tensors[n] for n in shard}, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return root


def raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


# -- round trips --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_tensor_round_trips(tmp_path, layout, num_shards, dtype):
    weights = canonical_weights(dtype)
    reader = CheckpointReader(write_checkpoint(tmp_path, weights, layout, num_shards))
    assert reader.layout.startswith("Llama4ForCausalLM" if layout == "causal_lm" else
                                    "Llama4ForConditionalGeneration")
    for name, t in weights.items():
        assert reader.has(name)
        got = reader.read(name, expected_shape=tuple(t.shape))
        assert got.dtype == dtype and torch.equal(got, t), name
    assert not reader.has("patch_embedding.weight") and not reader.has("layers.2.norm.weight")


def test_direct_file_path_and_single_unnamed_file(tmp_path):
    weights = canonical_weights()
    write_checkpoint(tmp_path, weights, "causal_lm", num_shards=1)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")
    for path in (tmp_path, tmp_path / "weights.safetensors"):
        assert torch.equal(CheckpointReader(path).read("norm.weight"), weights["norm.weight"])


def test_safetensors_file_matches_library(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.tensor([True, False]), "d": torch.randn(2, 2).to(torch.float8_e4m3fn),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert sorted(f.names()) == sorted(tensors)
        for name, t in tensors.items():
            assert f.shape(name) == tuple(t.shape) and f.dtype(name) == t.dtype
            assert torch.equal(f.read(name).view(torch.uint8), t.view(torch.uint8)), name


# -- experts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_per_expert_layouts_agree(tmp_path, dtype):
    weights = canonical_weights(dtype, seed=3)
    fused = CheckpointReader(write_checkpoint(tmp_path / "fused", weights))
    split = CheckpointReader(write_checkpoint(tmp_path / "split", weights, "causal_lm", per_expert=True))
    gate_up_EDF2 = weights["layers.1.feed_forward.experts.gate_up_proj"]
    down_EFD = weights["layers.1.feed_forward.experts.down_proj"]
    for ids in ([5, 1, 2], range(E), [7], []):
        a = fused.read_experts(1, ids, E, D, F)
        b = split.read_experts(1, ids, E, D, F)
        assert isinstance(a, ExpertWeights) and a.expert_ids == b.expert_ids == tuple(ids)
        for x, y, ref in ((a.gate_up_EDF2, b.gate_up_EDF2, gate_up_EDF2), (a.down_EFD, b.down_EFD, down_EFD)):
            assert x.dtype == y.dtype == dtype
            assert torch.equal(x, y) and torch.equal(x, ref[list(ids)])


def test_expert_errors(tmp_path):
    fused = CheckpointReader(write_checkpoint(tmp_path / "fused", canonical_weights()))
    split = CheckpointReader(write_checkpoint(tmp_path / "split", canonical_weights(), per_expert=True))
    for reader in (fused, split):
        with pytest.raises(CheckpointError, match=r"expert ids \[8, -1\] out of range \[0, 8\)"):
            reader.read_experts(1, [0, 8, -1], E, D, F)
        with pytest.raises(CheckpointError, match="layer 0: no expert weights"):
            reader.read_experts(0, [0], E, D, F)
    with pytest.raises(CheckpointError, match=r"gate_up_proj.*\(8, 16, 24\).*\(9, 16, 24\)"):
        fused.read_experts(1, [0], 9, D, F)
    with pytest.raises(CheckpointError, match="do not number 9 experts"):
        split.read_experts(1, [0], 9, D, F)
    with pytest.raises(CheckpointError, match=r"1\.gate_proj\.weight.*\(12, 16\).*\(13, 16\)"):
        split.read_experts(1, [1], E, D, F + 1)


def _rchar() -> int | None:
    try:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])
    except (OSError, KeyError, ValueError):
        return None


def test_fused_read_touches_only_the_asked_experts(tmp_path):
    big_E, big_D, big_F = 16, 256, 256  # gate_up 8 MiB + down 4 MiB in fp32
    weights = canonical_weights(E=big_E, D=big_D, F=big_F)
    reader = CheckpointReader(write_checkpoint(tmp_path, weights, num_shards=1))  # header read here
    one_expert = big_D * 2 * big_F * 4 + big_F * big_D * 4
    before, rchar_before = reader.bytes_read, _rchar()
    w = reader.read_experts(1, [11], big_E, big_D, big_F)
    rchar_after = _rchar()
    assert reader.bytes_read - before == one_expert
    assert torch.equal(w.gate_up_EDF2[0], weights["layers.1.feed_forward.experts.gate_up_proj"][11])
    if rchar_before is None or rchar_after is None:
        pytest.skip("/proc/self/io unavailable: the OS-level byte count is not checked")
    full = (big_E * big_D * 2 * big_F + big_E * big_F * big_D) * 4
    assert rchar_after - rchar_before < 2 * one_expert < full / 4


def test_read_rows_merges_consecutive_rows(tmp_path, monkeypatch):
    t = torch.randn(10, 3, 4)
    save_file({"t": t}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    calls, real = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(off) or real(fd, bufs, off))
    rows = [2, 3, 4, 9, 0]
    assert torch.equal(f.read_rows("t", rows), t[rows])
    assert len(calls) == 3
    with pytest.raises(CheckpointError, match=r"10 rows; row ids \[10\]"):
        f.read_rows("t", [1, 10])


# -- refusals and errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.bin", "weights.pt", "x.pth", "x.pkl", "x.ckpt"])
def test_pickle_files_refused(tmp_path, name):
    torch.save({"w": torch.zeros(2)}, tmp_path / name)
    for open_ in (SafetensorsFile, CheckpointReader):
        with pytest.raises(CheckpointError, match=rf"refusing to load pickle-based checkpoint file .*{name}.*"
                                                  r"only safetensors are supported"):
            open_(tmp_path / name)


def test_pickle_only_directory_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="refusing to load pickle-based.*pytorch_model.bin"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_disguised_as_safetensors_refused(tmp_path, zipfile):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.safetensors", _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match="model.safetensors: looks like a zip/pickle file"):
        CheckpointReader(tmp_path)


def test_missing_tensor_names_it(tmp_path):
    reader = CheckpointReader(write_checkpoint(tmp_path, canonical_weights()))
    with pytest.raises(CheckpointError) as e:
        reader.read("layers.7.self_attn.k_proj.weight")
    msg = str(e.value)
    assert "'layers.7.self_attn.k_proj.weight'" in msg
    assert "'language_model.model.layers.7.self_attn.k_proj.weight'" in msg and "model.safetensors.index.json" in msg


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    reader = CheckpointReader(write_checkpoint(tmp_path, canonical_weights(), num_shards=3))
    with pytest.raises(CheckpointError) as e:
        reader.read("layers.0.self_attn.q_proj.weight", expected_shape=(D, 2 * D))
    msg = str(e.value)
    assert "'layers.0.self_attn.q_proj.weight'" in msg and "model-0000" in msg
    assert "(16, 16)" in msg and "(16, 32)" in msg


def test_truncated_shard_names_file_and_tensor(tmp_path):
    write_checkpoint(tmp_path, canonical_weights(), num_shards=3)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:len(raw) - 200])
    (n,) = struct.unpack("<Q", raw[:8])
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    data_size = len(raw) - 200 - 8 - n
    first_cut = min((v["data_offsets"][0], k) for k, v in header.items() if v["data_offsets"][1] > data_size)[1]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    canonical = first_cut.removeprefix("language_model.model.").replace("language_model.lm_head", "lm_head")
    assert index[first_cut] == shard.name
    with pytest.raises(CheckpointError, match=rf"^model-00002-of-00003.safetensors: tensor '{first_cut}' needs "
                                              rf"bytes \[\d+, \d+\) of the data section but the file holds only "
                                              rf"{data_size} bytes \(truncated file\?\)"):
        CheckpointReader(tmp_path).read(canonical)


def test_missing_shard_named(tmp_path):
    write_checkpoint(tmp_path, canonical_weights(), num_shards=3)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard file model-00003-of-00003.safetensors named in .*index.json "
                                              "is missing"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("header, data, match", [
    (None, b"", "corrupted header: not valid JSON"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(16), r"'w'.*needs 16 bytes.*\[0, 12\)"),
    ({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1), "unsupported dtype 'F4'"),
    ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "needs dtype, shape and data_offsets"),
    ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, bytes(8), "malformed entry"),
    ([1, 2], b"", "JSON is not an object"),
])
def test_corrupted_header(tmp_path, header, data, match):
    path = tmp_path / "model.safetensors"
    if header is None:
        raw_safetensors(path, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
        raw = bytearray(path.read_bytes())
        raw[8:12] = b"\xff\x00{]"
        path.write_bytes(bytes(raw))
    else:
        raw_safetensors(path, header, data)
    with pytest.raises(CheckpointError, match=match):
        SafetensorsFile(path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match=r"x.safetensors: header length 1000000 does not fit a 10-byte file"):
        SafetensorsFile(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too small"):
        SafetensorsFile(path)
