"""Read Llama 4 text-model weights from a Hugging Face safetensors checkpoint by *canonical* name.

Canonical names are the text model's own: ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``,
``layers.{i}.<rest>``. The file naming (which prefix the release used) is detected once, so no caller
ever sees it. Pickle checkpoints (``.bin``/``.pt``) are refused: unpickling can run arbitrary code.

Shape legend: E experts (in the file, or the ids asked for), D hidden, F expert ffn width, F2 = 2F
(gate then up along the last dim, the fused checkpoint orientation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.safetensors_io import PICKLE_SUFFIXES, CheckpointError, SafetensorsFile, refuse_pickle

__all__ = ["CheckpointError", "CheckpointReader", "ExpertWeights"]

INDEX_FILE = "model.safetensors.index.json"
LAYOUTS = (  # (architecture, model prefix, LM head name); the more specific prefixes first
    ("Llama4ForConditionalGeneration", "language_model.model.", "language_model.lm_head.weight"),
    ("Llama4ForConditionalGeneration (model.language_model naming)", "model.language_model.", "lm_head.weight"),
    ("Llama4ForCausalLM", "model.", "lm_head.weight"),
)


@dataclass(frozen=True)
class ExpertWeights:
    """Some experts of one MoE layer, fused orientation, stored dtype."""

    expert_ids: tuple[int, ...]
    gate_up_EDF2: torch.Tensor  # [len(expert_ids), D, 2F]
    down_EFD: torch.Tensor  # [len(expert_ids), F, D]


class CheckpointReader:
    """A checkpoint directory (sharded with an index, or one ``*.safetensors``) or a ``.safetensors`` path.

    Shard files are opened on first use and kept open; ``bytes_read`` sums the bytes read from all of them.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files: dict[str, SafetensorsFile] = {}
        self._weight_map, self._source = self._find_weights()
        self.layout, self._prefix, self._head = self._detect_layout()

    def _find_weights(self) -> tuple[dict[str, str], str]:
        """(file tensor name -> shard file name relative to ``self._root``, description for errors)."""
        p = self.path
        if p.is_file():
            refuse_pickle(p)
            self._root = p.parent
            return self._single(p.name), str(p)
        if not p.is_dir():
            raise CheckpointError(f"checkpoint path {p} does not exist")
        self._root = p
        if (p / INDEX_FILE).is_file():
            return self._indexed(p / INDEX_FILE), str(p / INDEX_FILE)
        files = sorted(f.name for f in p.glob("*.safetensors"))
        if "model.safetensors" in files or len(files) == 1:
            name = "model.safetensors" if "model.safetensors" in files else files[0]
            return self._single(name), str(p / name)
        if files:
            raise CheckpointError(f"{p} holds {len(files)} safetensors files but no {INDEX_FILE} to map them")
        pickles = sorted(f.name for f in p.iterdir() if f.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            refuse_pickle(p / pickles[0])
        raise CheckpointError(f"no safetensors weights in {p} (expected {INDEX_FILE} or model.safetensors)")

    def _single(self, name: str) -> dict[str, str]:
        return {tensor: name for tensor in self._open(name).names()}

    def _indexed(self, index_path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid index, expected JSON with a 'weight_map' ({e!r})") \
                from None
        for file in sorted(set(weight_map.values())):  # fail at load, not mid-way through a layer
            refuse_pickle(file)
            if not (self._root / file).is_file():
                users = [n for n, f in weight_map.items() if f == file]
                raise CheckpointError(f"shard file {file} named in {index_path} is missing "
                                      f"(it holds {len(users)} tensors, e.g. {users[0]!r})")
        return weight_map

    def _detect_layout(self) -> tuple[str, str, str]:
        for arch, prefix, head in LAYOUTS:
            if any(name.startswith(prefix) for name in self._weight_map):
                return arch, prefix, head
        raise CheckpointError(f"{self._source}: no Llama 4 text-model weights; expected names starting with "
                              f"one of {[prefix for _, prefix, _ in LAYOUTS]}")

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(self._root / file)
        return self._files[file]

    # -- by canonical name ----------------------------------------------------------------------------------

    def file_name(self, name: str) -> str:
        """The tensor name in the files for canonical ``name``."""
        return self._head if name == "lm_head.weight" else self._prefix + name

    def has(self, name: str) -> bool:
        return self.file_name(name) in self._weight_map

    def _locate(self, name: str) -> tuple[SafetensorsFile, str]:
        key = self.file_name(name)
        if key not in self._weight_map:
            raise CheckpointError(f"tensor {name!r} not found: looked for {key!r} in {self._source} "
                                  f"({self.layout} layout)")
        return self._open(self._weight_map[key]), key

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self._locate(name)
        return file.shape(key)

    def dtype(self, name: str) -> torch.dtype:
        file, key = self._locate(name)
        return file.dtype(key)

    def _check_shape(self, name: str, expected: tuple[int, ...] | None) -> tuple[SafetensorsFile, str]:
        file, key = self._locate(name)
        if expected is not None and tuple(file.shape(key)) != tuple(expected):
            raise CheckpointError(f"tensor {name!r} ({key!r} in {file.path}) has shape {tuple(file.shape(key))} "
                                  f"but the model expects {tuple(expected)}")
        return file, key

    def read(self, name: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor in its stored dtype; the shape is checked (before reading) when given."""
        file, key = self._check_shape(name, expected_shape)
        return file.read(key)

    # -- experts --------------------------------------------------------------------------------------------

    def read_experts(self, layer: int, expert_ids: Sequence[int], num_experts: int, hidden: int,
                     ffn: int) -> ExpertWeights:
        """Experts ``expert_ids`` (in that order) of MoE layer ``layer``, fused orientation, stored dtype.

        Fused files are sliced: only the asked experts' bytes are read. Per-expert files (nn.Linear
        ``[F, D]``/``[D, F]`` per expert, as quantized releases store them) are transposed and fused.
        """
        ids = tuple(int(e) for e in expert_ids)
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise CheckpointError(f"layer {layer}: expert ids {bad} out of range [0, {num_experts})")
        E, D, F = num_experts, hidden, ffn
        prefix = f"layers.{layer}.feed_forward.experts."
        if self.has(prefix + "gate_up_proj"):
            gu_file, gu_key = self._check_shape(prefix + "gate_up_proj", (E, D, 2 * F))
            down_file, down_key = self._check_shape(prefix + "down_proj", (E, F, D))
            return ExpertWeights(ids, gu_file.read_rows(gu_key, ids), down_file.read_rows(down_key, ids))
        if not self.has(prefix + "0.gate_proj.weight"):
            fused, per_expert = self.file_name(prefix + "gate_up_proj"), self.file_name(prefix + "0.gate_proj.weight")
            raise CheckpointError(f"layer {layer}: no expert weights: looked for {fused!r} (fused) and "
                                  f"{per_expert!r} (per-expert) in {self._source}")
        if not self.has(f"{prefix}{E - 1}.gate_proj.weight") or self.has(f"{prefix}{E}.gate_proj.weight"):
            raise CheckpointError(f"layer {layer}: the checkpoint's per-expert weights do not number {E} experts")
        gate_up, down = [], []
        for e in ids:
            gate_FD = self.read(f"{prefix}{e}.gate_proj.weight", (F, D))
            up_FD = self.read(f"{prefix}{e}.up_proj.weight", (F, D))
            down_DF = self.read(f"{prefix}{e}.down_proj.weight", (D, F))
            gate_up.append(torch.cat([gate_FD.T, up_FD.T], dim=-1))
            down.append(down_DF.T)
        if not ids:  # keep the stored dtype even for an empty selection
            file, key = self._locate(prefix + "0.gate_proj.weight")
            dtype = file.dtype(key)
            return ExpertWeights(ids, torch.empty(0, D, 2 * F, dtype=dtype), torch.empty(0, F, D, dtype=dtype))
        return ExpertWeights(ids, torch.stack(gate_up), torch.stack(down))

    @property
    def bytes_read(self) -> int:
        """Bytes read so far from all open shard files (headers included)."""
        return sum(f.bytes_read for f in self._files.values())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
