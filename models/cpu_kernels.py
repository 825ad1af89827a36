"""CPU kernels, compiled on first use: matrix products over packed weights (``models/csrc/packed_matmul.c``) and
the small fused operations of a forward step (``models/csrc/decode_ops.c``: RMS norm with the residual add, RoPE
with the q/k norm, SwiGLU's activation, MoE routing, attention over the paged KV cache), the parts of a layer made
of them (attention sub-layer, SwiGLU FFN, MoE gate, routed experts) and a whole stack of layers
(``layer_stack``, driven by ``models/kernel_step.py``).

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

from models import huge_pages

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("packed_matmul.c", "decode_ops.c")]
NR = 16  # output columns per packed block (the kernel's NR)
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]  # part of the library's cache key

_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))


def _build() -> ctypes.CDLL | None:
    if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    source = b"".join(src.read_bytes() for src in _SOURCES)
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(source + " ".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    so = _cache_dir() / f"cpu_kernels-{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: several processes (shard actors) may build at once.
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=so.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *CFLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"], check=True, capture_output=True,
                           timeout=120)
            os.replace(tmp, so)
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            log.warning("CPU kernels not built (%s %s); using torch's matmul", e, err.decode(errors="replace")[-500:])
            Path(tmp).unlink(missing_ok=True)
            return None
    lib = ctypes.CDLL(str(so))
    i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    signatures = {  # the last int is the thread count where there is one
        "grouped_packed_linear": [ptr, i64, ptr, i64, ptr, i32, i64, ptr, i32],
        "packed_linear": [ptr, i64, i64, ptr, i32, i64, ptr, i32],
        "rms_norm": [ptr, i64, ptr, i64, ptr, i64, i64, ptr, f32, ptr, i64, i32],
        "rope_qk": [ptr, i64, i64, i64, i64, i64, ptr, ptr, i32, f32, ptr, i32],
        "silu_mul": [ptr, i64, i64, ptr, i32],
        "paged_decode_attention": [ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64,
                                   f32, ptr, ptr, i64, i32],
        "attention_block": [ptr, i64, i64, ptr, f32, ptr, i32, ptr, i64, i64, i64, ptr, ptr, i32, ptr, ptr, ptr, ptr,
                            i64, ptr, ptr, i64, f32, ptr, i64, ptr, i32, ptr, ptr, ptr, ptr, ptr, i32],
        "topk_sigmoid": [ptr, i64, i64, i64, ptr, ptr],
        "route_sort": [ptr, i64, i64, ptr, ptr],
        "gather_scaled": [ptr, i64, ptr, ptr, i64, i64, i64, ptr],
        "scatter_sum": [ptr, ptr, i64, i64, i64, ptr],
        "swiglu_block": [ptr, i64, i64, ptr, i32, i64, ptr, i32, ptr, ptr, ptr, i32],
        "moe_gate": [ptr, i64, i64, ptr, i32, i64, i64, ptr, ptr, ptr, i32],
        "experts_ffn": [ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ptr, i32, ptr, i32, ptr, ptr, ptr, ptr, i32],
        "residual_add": [ptr, ptr, ptr, ptr, i64],
        "layer_stack": [ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, f32, ptr, ptr, ptr, ptr, ptr, i64,
                        f32, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, (i64 if name == "layer_stack" else None)  # the layer it stopped at
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


def fused_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether the fused CPU operations apply: the kernels are here and every given tensor is fp32 on CPU."""
    if library() is None:
        return False
    for t in tensors:  # a plain loop: this runs several times per layer, a generator costs more than the test
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu):
            return False
    return True


def pack(w_NK: torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> [..., ceil(N/16), K, 16]: each block of 16 outputs' weights contiguous, k-major."""
    N, K = w_NK.shape[-2:]
    nb = -(-N // NR)
    w_NK = F.pad(w_NK, (0, 0, 0, nb * NR - N))
    packed = huge_pages.empty((*w_NK.shape[:-2], nb, K, NR), w_NK.dtype)  # streamed every step: 2 MiB pages
    packed.copy_(w_NK.reshape(*w_NK.shape[:-2], nb, NR, K).transpose(-1, -2))
    return packed


def unpack(packed: torch.Tensor, N: int) -> torch.Tensor:
    """The inverse of ``pack``: [..., N, K]."""
    nb, K = packed.shape[-3], packed.shape[-2]
    return packed.transpose(-1, -2).reshape(*packed.shape[:-3], nb * NR, K)[..., :N, :]


def packed_linear(x: torch.Tensor, packed: torch.Tensor, N: int, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W given packed; x fp32 [..., K]."""
    flat = x.dim() == 2  # the common case, kept free of reshapes: this wrapper runs ~40 times per step
    x_MK = x if flat else x.reshape(-1, x.shape[-1])
    if not x_MK.is_contiguous():
        x_MK = x_MK.contiguous()
    M, K = x_MK.shape
    y_MN = torch.empty(M, N)
    if M:
        _lib.packed_linear(x_MK.data_ptr(), M, K, packed.data_ptr(), packed.dtype == torch.bfloat16, N,
                           y_MN.data_ptr(), torch.get_num_threads())
    if bias_N is not None:
        y_MN += bias_N
    return y_MN if flat else y_MN.view(*x.shape[:-1], N)


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


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's address for an optional kernel argument (NULL for None)."""
    return None if t is None else t.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [M, last] with unit stride along the last dim (a view where possible)."""
    x_MD = x.reshape(-1, x.shape[-1])
    return x_MD if x_MD.stride(-1) == 1 else x_MD.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual (x itself when residual is None), y = (h * rsqrt(mean(h^2) + eps)) * weight."""
    flat = x.dim() == 2
    x_MD = x if flat and x.stride(-1) == 1 else _rows(x)
    M, D = x_MD.shape
    y_MD = torch.empty(M, D)
    h_MD, d_MD = x_MD, None
    if residual is not None:
        d_MD = residual if flat and residual.stride(-1) == 1 else _rows(residual)
        h_MD = torch.empty(M, D)
    _lib.rms_norm(x_MD.data_ptr(), x_MD.stride(0), _ptr(d_MD), 0 if d_MD is None else d_MD.stride(0),
                  h_MD.data_ptr(), M, D, _ptr(weight), eps, y_MD.data_ptr(), D, torch.get_num_threads())
    if not flat:
        h_MD, y_MD = (h_MD.view(x.shape) if residual is not None else x), y_MD.view(x.shape)
    return (h_MD if residual is not None else x), y_MD


def rope_qk(qkv_TN: torch.Tensor, H: int, Hkv: int, Dh: int, rope_TF: tuple[torch.Tensor, torch.Tensor] | None,
            qk_norm: bool, eps: float, q_scale_T: torch.Tensor | None) -> None:
    """In place on the q|k|v rows of a fused projection: RoPE (when ``rope_TF``), q/k norm, q temperature scale."""
    T = qkv_TN.shape[0]
    assert qkv_TN.is_contiguous() and qkv_TN.shape[1] == (H + 2 * Hkv) * Dh
    cos, sin = (None, None) if rope_TF is None else (rope_TF[0].contiguous(), rope_TF[1].contiguous())
    scale = None if q_scale_T is None else q_scale_T.float().contiguous()
    _lib.rope_qk(qkv_TN.data_ptr(), qkv_TN.shape[1], T, H, Hkv, Dh, _ptr(cos), _ptr(sin), int(qk_norm), eps,
                 _ptr(scale), torch.get_num_threads())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate|up fused along the last dim: [..., 2F] -> [..., F]."""
    x_M2F = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    M, F2 = x_M2F.shape
    y_MF = torch.empty(M, F2 // 2, dtype=torch.float32)
    _lib.silu_mul(x_M2F.data_ptr(), M, F2 // 2, y_MF.data_ptr(), torch.get_num_threads())
    return y_MF.view(*gate_up.shape[:-1], F2 // 2)


def swiglu(x_TD: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) in one call: gate|up packed as one [2F, D] weight, down packed [D, F]."""
    x_TD = x_TD.contiguous()
    T, D = x_TD.shape
    F = down.shape[-2]  # packed [D/16, F, 16]
    out_TD, work = torch.empty(T, D), torch.empty(T * (3 * F + D))
    _lib.swiglu_block(x_TD.data_ptr(), T, D, gate_up.data_ptr(), gate_up.dtype == torch.bfloat16, F, down.data_ptr(),
                      down.dtype == torch.bfloat16, None, out_TD.data_ptr(), work.data_ptr(), torch.get_num_threads())
    return out_TD


def moe_gate(x_TD: torch.Tensor, router: torch.Tensor, num_experts: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_sigmoid`` of the router's logits (router packed, no bias) in one call: (scores [T, K], ids [T, K])."""
    x_TD = x_TD.contiguous()
    T, D = x_TD.shape
    logits, scores_TK, ids_TK = torch.empty(T * num_experts), torch.empty(T, k), torch.empty(T, k, dtype=torch.int64)
    _lib.moe_gate(x_TD.data_ptr(), T, D, router.data_ptr(), router.dtype == torch.bfloat16, num_experts, k,
                  logits.data_ptr(), scores_TK.data_ptr(), ids_TK.data_ptr(), torch.get_num_threads())
    return scores_TK, ids_TK


def experts_ffn(x_TD: torch.Tensor, scores_TK: torch.Tensor, ids_TK: torch.Tensor, gate_up_E: torch.Tensor,
                down_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every token's routed-expert outputs summed [T, D], with the route (slot_S, rows per expert) as
    ``route_sort`` gives it: routing, gathering, both grouped products and the sum in one call. All E experts are
    held here (packed as ``pack_experts`` leaves them)."""
    x = _rows(x_TD)
    scores, ids = scores_TK.contiguous(), ids_TK.contiguous()
    (T, K), (E, _, D, _), F = ids.shape, gate_up_E.shape, down_E.shape[-2]
    slot_S, counts_E = torch.empty(T * K, dtype=torch.int64), torch.empty(E, dtype=torch.int64)
    out_TD, work = torch.empty(T, D), torch.empty(T * K * (2 * D + 3 * F))
    _lib.experts_ffn(x.data_ptr(), x.stride(0), scores.data_ptr(), ids.data_ptr(), T, K, E, D, F, gate_up_E.data_ptr(),
                     gate_up_E.dtype == torch.bfloat16, down_E.data_ptr(), down_E.dtype == torch.bfloat16,
                     slot_S.data_ptr(), counts_E.data_ptr(), work.data_ptr(), out_TD.data_ptr(),
                     torch.get_num_threads())
    return out_TD, slot_S, counts_E.tolist()


def paged_decode_attention(q_SHDh: torch.Tensor, k_SHDh: torch.Tensor, v_SHDh: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, blocks_SB: torch.Tensor, first_S: torch.Tensor, len_S: torch.Tensor,
                           block_size: int, scale: float, longest: int | None = None) -> torch.Tensor:
    """One new token per sequence: write its k/v into the cache, attend over its visible keys: [S, H, Dh].

    Sequence s sees logical offsets ``first_S[s] .. first_S[s] + len_S[s] - 1`` of its block table ``blocks_SB[s]``
    (int64); the new key goes to the last of them. q/k/v rows may be strided views of a fused projection.
    ``longest`` is ``len_S.max()`` when the caller already knows it (it sizes the score buffer)."""
    S, H, Dh = q_SHDh.shape
    Hkv = k_SHDh.shape[1]
    q, k, v = (t.flatten(1) for t in (q_SHDh, k_SHDh, v_SHDh))
    assert all(t.stride(1) == 1 for t in (q, k, v)) and k.stride(0) == v.stride(0)
    assert blocks_SB.dtype == first_S.dtype == len_S.dtype == torch.int64 and blocks_SB.is_contiguous()
    if Dh % 8:
        raise ValueError(f"the attention kernel needs a head dim that is a multiple of 8, got {Dh}")
    out = torch.empty(S, H, Dh, dtype=torch.float32)
    scratch, per_thread, threads = attention_scratch(H, Dh, int(len_S.max()) if longest is None else longest)
    _lib.paged_decode_attention(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0), k_cache.data_ptr(),
                                v_cache.data_ptr(), blocks_SB.data_ptr(), blocks_SB.shape[1], first_S.data_ptr(),
                                len_S.data_ptr(), S, H, Hkv, Dh, block_size, scale, out.data_ptr(), scratch.data_ptr(),
                                per_thread, threads)
    return out


def attention_scratch(H: int, Dh: int, longest: int) -> tuple[torch.Tensor, int, int]:
    """(buffer, floats per thread, threads) for the attention kernel's scores: torch allocates it, so a shortage
    of memory is a clear error, never an allocation failing inside the kernel."""
    Hp, threads = -(-H // 8) * 8, torch.get_num_threads()
    per_thread = -(-(Hp * max(longest, 1) + Hp + Hp * Dh) // 8) * 8
    return torch.empty(threads * per_thread), per_thread, threads


def attention_block(h_TD: torch.Tensor, w_in: torch.Tensor, w_post: torch.Tensor, eps: float,
                    qkv: tuple[torch.Tensor, torch.Tensor | None], o: tuple[torch.Tensor, int, torch.Tensor | None],
                    heads: tuple[int, int, int], rope_TF: tuple[torch.Tensor, torch.Tensor] | None, qk_norm: bool,
                    q_scale_T: torch.Tensor | None, cache: tuple[torch.Tensor, torch.Tensor, int],
                    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + attention(norm_in(h)), norm_post of that): a whole attention sub-layer in one call, for rows the
    attention kernel takes. ``qkv`` = (packed q|k|v, bias), ``o`` = (packed o_proj, D, bias), ``heads`` = (H, Hkv,
    Dh), ``cache`` = (K, V, block size), ``tables`` = (blocks [T, B], first [T], len [T], max len)."""
    h_TD = h_TD.contiguous()
    T, D = h_TD.shape
    H, Hkv, Dh = heads
    (qkv_w, qkv_b), (o_w, _, o_b) = qkv, o
    k_cache, v_cache, bs = cache
    blocks_TB, first_T, len_T, longest = tables
    cos, sin = (None, None) if rope_TF is None else rope_TF
    q_scale = None if q_scale_T is None else q_scale_T.float().contiguous()
    work = torch.empty(T * (2 * D + (2 * H + 2 * Hkv) * Dh))
    h_out, x_out = torch.empty(T, D), torch.empty(T, D)
    scratch, per_thread, threads = attention_scratch(H, Dh, longest)
    _lib.attention_block(h_TD.data_ptr(), T, D, w_in.data_ptr(), eps, qkv_w.data_ptr(), qkv_w.dtype == torch.bfloat16,
                         _ptr(qkv_b), H, Hkv, Dh, _ptr(cos), _ptr(sin), int(qk_norm), _ptr(q_scale), k_cache.data_ptr(),
                         v_cache.data_ptr(), blocks_TB.data_ptr(), blocks_TB.shape[1], first_T.data_ptr(),
                         len_T.data_ptr(), bs, scale, scratch.data_ptr(), per_thread, o_w.data_ptr(),
                         o_w.dtype == torch.bfloat16, _ptr(o_b), w_post.data_ptr(), work.data_ptr(), h_out.data_ptr(),
                         x_out.data_ptr(), threads)
    return h_out, x_out


# ----------------------------------------------------------------------------- MoE routing (few tokens: no torch ops)


def topk_sigmoid(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid scores [T, K] fp32, expert ids [T, K] int64), best first; the lowest id wins a tie."""
    logits_TE = logits_TE.contiguous()
    T, E = logits_TE.shape
    scores_TK, ids_TK = torch.empty(T, k, dtype=torch.float32), torch.empty(T, k, dtype=torch.int64)
    _lib.topk_sigmoid(logits_TE.data_ptr(), T, E, k, scores_TK.data_ptr(), ids_TK.data_ptr())
    return scores_TK, ids_TK


def route_sort(expert_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """(slot_S: the slots t*K+k expert-major, token order kept within an expert; rows per expert)."""
    ids_S = expert_ids_TK.reshape(-1).contiguous()
    slot_S, counts_E = torch.empty_like(ids_S), torch.empty(num_experts, dtype=torch.int64)
    _lib.route_sort(ids_S.data_ptr(), ids_S.numel(), num_experts, slot_S.data_ptr(), counts_E.data_ptr())
    return slot_S, counts_E.tolist()


def gather_scaled(x_TD: torch.Tensor, scores_TK: torch.Tensor, slot_S: torch.Tensor) -> torch.Tensor:
    """rows [S, D]: x of each slot's token times the slot's score, expert-major."""
    x = _rows(x_TD)
    scores = scores_TK.contiguous()
    K, (S, D) = scores_TK.shape[1], (slot_S.numel(), x.shape[1])
    rows_SD = torch.empty(S, D, dtype=torch.float32)
    _lib.gather_scaled(x.data_ptr(), x.stride(0), scores.data_ptr(), slot_S.data_ptr(), S, K, D, rows_SD.data_ptr())
    return rows_SD


def scatter_sum(rows_SD: torch.Tensor, slot_S: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """[T, D]: each token's K expert rows summed, k in order."""
    rows_SD = rows_SD.contiguous()
    y_TD = torch.empty(T, rows_SD.shape[1], dtype=torch.float32)
    _lib.scatter_sum(rows_SD.data_ptr(), slot_S.data_ptr(), T, K, rows_SD.shape[1], y_TD.data_ptr())
    return y_TD
