"""Decode-regime matrix products on CPU: ``models/csrc/gemv.c``, compiled on first use, torch as the fallback.

A decode step multiplies a few rows by every weight once, so it is bound by how fast weights stream from memory;
the BLAS in the torch wheel reaches a fraction of that for small M (see BENCHMARKS.md). The kernel is plain C
(AVX2 + FMA, OpenMP) built with the system compiler into ``~/.cache/moe-serve/kernels`` (about a second), loaded
with ctypes. It links the same ``libgomp.so.1`` that torch has already loaded, so both share one thread pool.
Anything it does not cover (no compiler, no AVX2, CUDA, grad, many rows) goes to torch. ``MOE_SERVE_CPU_KERNELS=0``
turns it off.

Weight layout is nn.Linear's: [N, K] (grouped: [E, N, K]), contiguous, fp32 or bf16; activations fp32.
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

_SOURCE = Path(__file__).parent / "csrc" / "gemv.c"
# Above this many rows per weight matrix the product is compute-bound and torch's GEMM is the better tool.
MAX_ROWS = 32

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
    so = _cache_dir() / f"gemv-{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: several processes (shard actors) may build at once.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
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
    lib.grouped_linear.argtypes = [ptr, i64, ptr, i64, ptr, ctypes.c_int, i64, ptr, ctypes.c_int]
    lib.linear.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, i64, ptr, ctypes.c_int]
    lib.grouped_linear.restype = lib.linear.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib


def _eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (not x.is_cuda and x.dtype == torch.float32 and w.dtype in (torch.float32, torch.bfloat16)
            and w.is_contiguous() and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and library() is not None)


def linear(x: torch.Tensor, weight_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for fp32 activations and fp32/bf16 weights; the kernel for up to ``MAX_ROWS`` rows."""
    K, N = x.shape[-1], weight_NK.shape[0]
    M = x.numel() // K if K else 0
    if not (0 < M <= MAX_ROWS and _eligible(x, weight_NK)):
        w = weight_NK if weight_NK.dtype == x.dtype else weight_NK.to(x.dtype)
        return F.linear(x, w, bias_N)
    x_MK = x.reshape(M, K).contiguous()
    y_MN = torch.empty(M, N, dtype=torch.float32, device=x.device)
    _lib.linear(x_MK.data_ptr(), M, K, weight_NK.data_ptr(), int(weight_NK.dtype == torch.bfloat16), N,
                y_MN.data_ptr(), torch.get_num_threads())
    if bias_N is not None:
        y_MN += bias_N
    return y_MN.view(*x.shape[:-1], N)


def grouped_linear(x_SK: torch.Tensor, counts_E: Sequence[int], weight_ENK: torch.Tensor) -> torch.Tensor | None:
    """Expert e's rows times ``weight_ENK[e]`` transposed; None when the kernel does not apply (caller falls back)."""
    if (len(counts_E) != weight_ENK.shape[0] or not counts_E or max(counts_E) > MAX_ROWS
            or not _eligible(x_SK, weight_ENK)):
        return None
    S, K = x_SK.shape
    E, N = weight_ENK.shape[0], weight_ENK.shape[1]
    offs = (ctypes.c_int64 * (E + 1))()
    for e, n in enumerate(counts_E):
        offs[e + 1] = offs[e] + n
    x_SK = x_SK.contiguous()
    y_SN = torch.empty(S, N, dtype=torch.float32, device=x_SK.device)
    _lib.grouped_linear(x_SK.data_ptr(), K, offs, E, weight_ENK.data_ptr(), int(weight_ENK.dtype == torch.bfloat16),
                        N, y_SN.data_ptr(), torch.get_num_threads())
    return y_SN
