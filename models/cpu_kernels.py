"""Matrix products on CPU over packed weights: ``models/csrc/packed_matmul.c``, compiled on first use.

A decode step multiplies a few rows by every weight once, so it is bound by how fast weights stream from memory;
prefill is bound by FMA throughput. The BLAS in the torch wheel is far from both on this kind of CPU (see
BENCHMARKS.md). The kernel is plain C (AVX2 + FMA, OpenMP) built with the system compiler into
``~/.cache/moe-serve/kernels`` (about a second) and loaded with ctypes; it links the same ``libgomp.so.1`` that
torch has already loaded, so both share one thread pool. Where it cannot run (no compiler, no AVX2,
``MOE_SERVE_CPU_KERNELS=0``) nothing is packed and torch does the work.

Packed layout: a weight [N, K] (nn.Linear's orientation) becomes [ceil(N/16), K, 16], zero-padded, fp32 or bf16
(bf16 is widened exactly in registers, so bf16-held weights give the same results as fp32-held ones). Every
output is one fp32 FMA chain over k, so a row's result does not depend on how many rows share the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "packed_matmul.c"
NR = 16  # output columns per packed block (the kernel's NR)

_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))


def _build() -> ctypes.CDLL | None:
    if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    source = _SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(source + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    so = _cache_dir() / f"packed_matmul-{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: several processes (shard actors) may build at once.
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=so.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], check=True, capture_output=True, timeout=120)
            os.replace(tmp, so)
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            log.warning("CPU kernels not built (%s %s); using torch's matmul", e, err.decode(errors="replace")[-500:])
            Path(tmp).unlink(missing_ok=True)
            return None
    lib = ctypes.CDLL(str(so))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.grouped_packed_linear.argtypes = [ptr, i64, ptr, i64, ptr, ctypes.c_int, i64, ptr, ctypes.c_int]
    lib.packed_linear.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, i64, ptr, ctypes.c_int]
    lib.grouped_packed_linear.restype = lib.packed_linear.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib


def can_pack(weight: torch.Tensor, activation_dtype: torch.dtype) -> bool:
    """Whether ``weight`` should be packed: CPU, fp32 arithmetic, fp32/bf16 weights, and the kernel is here."""
    return (weight.device.type == "cpu" and activation_dtype == torch.float32
            and weight.dtype in (torch.float32, torch.bfloat16) and library() is not None)


def pack(w_NK: torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> [..., ceil(N/16), K, 16]: each block of 16 outputs' weights contiguous, k-major."""
    N, K = w_NK.shape[-2:]
    nb = -(-N // NR)
    w_NK = F.pad(w_NK, (0, 0, 0, nb * NR - N))
    return w_NK.reshape(*w_NK.shape[:-2], nb, NR, K).transpose(-1, -2).contiguous()


def unpack(packed: torch.Tensor, N: int) -> torch.Tensor:
    """The inverse of ``pack``: [..., N, K]."""
    nb, K = packed.shape[-3], packed.shape[-2]
    return packed.transpose(-1, -2).reshape(*packed.shape[:-3], nb * NR, K)[..., :N, :]


def packed_linear(x: torch.Tensor, packed: torch.Tensor, N: int, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W given packed; x fp32 [..., K]."""
    K = x.shape[-1]
    x_MK = x.reshape(-1, K)
    if not x_MK.is_contiguous():
        x_MK = x_MK.contiguous()
    M = x_MK.shape[0]
    y_MN = torch.empty(M, N, dtype=torch.float32)
    if M:
        _lib.packed_linear(x_MK.data_ptr(), M, K, packed.data_ptr(), packed.dtype == torch.bfloat16, N,
                           y_MN.data_ptr(), torch.get_num_threads())
    if bias_N is not None:
        y_MN += bias_N
    return y_MN.view(*x.shape[:-1], N)


def grouped_packed_linear(x_SK: torch.Tensor, counts_E: Sequence[int], packed_E: torch.Tensor, N: int,
                          out_SN: torch.Tensor | None = None) -> torch.Tensor:
    """Expert e's rows (``counts_E[e]`` of them, expert-major) times its packed weights [E, N/16, K, 16].

    ``out_SN`` (contiguous fp32 [S, N]), when given, receives the result (e.g. a shared-memory buffer)."""
    S, K = x_SK.shape
    E = packed_E.shape[0]
    if len(counts_E) != E:
        raise ValueError(f"{len(counts_E)} counts for {E} experts")
    offs = (ctypes.c_int64 * (E + 1))()
    for e, n in enumerate(counts_E):
        offs[e + 1] = offs[e] + n
    x_SK = x_SK.contiguous()
    y_SN = torch.empty(S, N, dtype=torch.float32) if out_SN is None else out_SN
    if y_SN.shape != (S, N) or y_SN.dtype != torch.float32 or not y_SN.is_contiguous():
        raise ValueError(f"out must be contiguous fp32 [{S}, {N}], got {y_SN.dtype} {tuple(y_SN.shape)}")
    _lib.grouped_packed_linear(x_SK.data_ptr(), K, offs, E, packed_E.data_ptr(), packed_E.dtype == torch.bfloat16,
                               N, y_SN.data_ptr(), torch.get_num_threads())
    return y_SN
