"""A minimal reader of the safetensors format that reads exactly the bytes asked for.

Not the ``safetensors`` library: a worker holding a few experts of a fused ``[E, D, 2F]`` tensor must read
only those experts' rows, and we count every byte read so callers can prove it.

File layout: u64 little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data section;
offsets are relative to the data section's start (byte 8 + N).

Shape legend: R rows requested along dim 0; ``*rest`` the tensor's remaining dims; B raw bytes (uint8 buffers).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: missing, malformed, mis-shaped or refused."""


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit; guards against garbage lengths


def refuse_pickle(path: str | Path) -> None:
    """Raise ``CheckpointError`` for a pickle-based checkpoint file name (unpickling can run arbitrary code)."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"refusing to load pickle-based checkpoint file {path}: only safetensors are "
                              "supported (pickle can run arbitrary code)")


class SafetensorsFile:
    """One open ``.safetensors`` file; the header is parsed and validated once, tensors are read on demand.

    ``bytes_read`` counts every byte read from the file, header included (read at open).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        refuse_pickle(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)  # raises FileNotFoundError naming the path
        self.bytes_read = 0
        try:
            self._entries = self._parse_header()
        except BaseException:
            self.close()
            raise

    # -- header ---------------------------------------------------------------------------------------------

    def _error(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path.name}: {msg} ({self.path})")

    def _parse_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        size = os.fstat(self._fd).st_size
        head = self._pread(min(8, size), 0)
        n = int.from_bytes(head, "little")
        if size < 8 or n == 0 or n > min(size - 8, MAX_HEADER_BYTES):
            # Sniff only now: a valid header length can itself start with the pickle opcode bytes.
            if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
                raise self._error("looks like a zip/pickle file (torch.save format), not safetensors; pickle "
                                  "checkpoints are refused (pickle can run arbitrary code)")
            if size < 8:
                raise self._error(f"file is {size} bytes, too small for a safetensors header")
            raise self._error(f"header length {n} does not fit a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(self._pread(n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(f"corrupted header: not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._error("corrupted header: JSON is not an object")
        header.pop("__metadata__", None)
        self.data_start, data_size = 8 + n, size - 8 - n
        entries = {name: self._check_entry(name, info) for name, info in header.items()}
        # Report the first tensor in file order that runs past the end: that is where truncation struck.
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            if end > data_size:
                raise self._error(f"tensor {name!r} needs bytes [{begin}, {end}) of the data section but the "
                                  f"file holds only {data_size} bytes (truncated file?)")
        return entries

    def _check_entry(self, name: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise self._error(f"corrupted header: tensor {name!r} needs dtype, shape and data_offsets: {info!r}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise self._error(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
        dtype, shape, offsets = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(d) is int and d >= 0 for d in (*shape, *offsets))):
            raise self._error(f"corrupted header: tensor {name!r} has a malformed entry {info!r}")
        shape, (begin, end) = tuple(shape), offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise self._error(f"corrupted header: tensor {name!r} ({info['dtype']} {list(shape)}) needs {nbytes} "
                              f"bytes but data_offsets [{begin}, {end}) span {end - begin}")
        return dtype, shape, begin, end

    # -- reads ----------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Tensor names in the file (``__metadata__`` excluded)."""
        return list(self._entries)

    def _entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if name not in self._entries:
            raise self._error(f"no tensor named {name!r}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored shape and dtype."""
        dtype, shape, begin, end = self._entry(name)
        buf_B = torch.empty(end - begin, dtype=torch.uint8)
        self._pread_into(buf_B, self.data_start + begin)
        return buf_B.view(dtype).reshape(shape)

    def read_rows(self, name: str, row_ids: Sequence[int]) -> torch.Tensor:
        """Rows ``row_ids`` of dim 0, in the order given: ``[R, *rest]``, stored dtype.

        Only those rows' bytes are read; runs of consecutive ids are merged into one read each.
        """
        dtype, shape, begin, _ = self._entry(name)
        if not shape:
            raise self._error(f"tensor {name!r} is a scalar; it has no rows to read")
        rows = [int(r) for r in row_ids]
        bad = [r for r in rows if not 0 <= r < shape[0]]
        if bad:
            raise self._error(f"tensor {name!r} has {shape[0]} rows; row ids {bad} are out of range")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        buf_B = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            self._pread_into(buf_B[i * row_bytes:j * row_bytes], self.data_start + begin + rows[i] * row_bytes)
            i = j
        return buf_B.view(dtype).reshape(len(rows), *shape[1:])

    def _pread(self, n: int, offset: int) -> bytes:
        buf_B = torch.empty(n, dtype=torch.uint8)
        self._pread_into(buf_B, offset)
        return buf_B.numpy().tobytes()

    def _pread_into(self, buf_B: torch.Tensor, offset: int) -> None:
        # preadv into the tensor's own memory: no mmap, no intermediate copy, safe to call from threads.
        view = memoryview(buf_B.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise self._error(f"unexpected end of file at byte {offset + done} (file changed while open?)")
            done += got
        self.bytes_read += done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()
