"""Paged KV cache and the attention backend of one engine step.

One flat slot store per K and V, shared by all layers: a physical block holds ``block_size`` positions of one
layer. Global (NoPE) layers keep every block of a sequence; chunked (RoPE) layers keep only the blocks of the
current chunk (see ``router/kv_blocks.py``). Each step writes the new tokens' K/V into their slots, gathers each
sequence's visible keys and runs SDPA: all single-token (decode) rows in one padded batch, each multi-token
(prefill) chunk on its own. On CPU in fp32 one kernel takes the decode rows instead (``cpu_kernels.
paged_decode_attention``), and the prefill rows too when every prefill chunk of the step is short: it writes their
K/V and each row reads its visible keys in place through the block tables: no gather, no padding, no mask.

Shape legend: N slots (blocks x block size), T new tokens in the step, S decode sequences, L visible keys,
K layers of one kind, H query heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.config import Llama4Config
from models.kv_cache import attention_mask
from router.kv_blocks import KVBlockManager
from router.scheduler import ScheduledChunk

GLOBAL, CHUNKED = "global", "chunked"
_PAD_POS = 2 ** 62  # a key position no query can see: padded keys are masked out


class PagedKVCache:
    def __init__(self, cfg: Llama4Config, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.block_size = block_size
        shape = (num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_NHDh = torch.zeros(shape, dtype=dtype, device=device)
        self.v_NHDh = torch.zeros(shape, dtype=dtype, device=device)
        self.layer_kind: dict[int, tuple[str, int]] = {}  # layer -> (kind, index among layers of that kind)
        counts = {GLOBAL: 0, CHUNKED: 0}
        for layer in range(cfg.num_hidden_layers):
            kind = CHUNKED if cfg.is_chunked_layer(layer) else GLOBAL
            self.layer_kind[layer] = (kind, counts[kind])
            counts[kind] += 1
        self.num_layers = counts
        self.chunk_size = cfg.attention_chunk_size

    def new_block_manager(self) -> KVBlockManager:
        return KVBlockManager(self.k_NHDh.shape[0] // self.block_size, self.block_size, self.num_layers[GLOBAL],
                              self.num_layers[CHUNKED], self.chunk_size)


@dataclass(frozen=True)
class _Visible:
    """The keys one chunk of queries may see, for every layer of one kind."""

    slots_KL: torch.Tensor  # int64 slot of each visible key, per layer
    k_pos_L: torch.Tensor  # absolute position of each visible key


def _visible(blocks: KVBlockManager, c: ScheduledChunk, kind: str, bs: int, chunk: int | None) -> _Visible:
    first = _window_start(c.start, chunk if kind == CHUNKED else None)
    lo, hi = first // bs, (c.end - 1) // bs
    in_window = blocks.table_slices(c.seq.request_id, kind == CHUNKED, lo, hi + 1)  # never None
    blocks_KB = torch.tensor(in_window, dtype=torch.long)
    slots_KL = (blocks_KB[:, :, None] * bs + torch.arange(bs)).flatten(1)  # positions lo*bs ... (hi+1)*bs-1
    slots_KL = slots_KL[:, first - lo * bs:c.end - lo * bs]
    return _Visible(slots_KL, torch.arange(first, c.end))


class StepAttention:
    """``AttentionBackend`` for one step over ``chunks`` (decodes must come first, in the flat token order)."""

    # A prefill chunk goes to the kernel when its rows read few keys in all (each row reads its visible keys
    # itself, where SDPA reads them once per chunk): tokens x visible keys at most this.
    KERNEL_PREFILL_READS = 1 << 18

    def __init__(self, cache: PagedKVCache, blocks: KVBlockManager, chunks: list[ScheduledChunk],
                 device: torch.device | str = "cpu"):
        self.cache = cache
        bs, chunk = cache.block_size, cache.chunk_size
        S = sum(c.num_tokens == 1 for c in chunks)
        assert all(c.num_tokens == 1 for c in chunks[:S]), "decodes must come first"
        # On CPU in fp32 the kernel takes the decodes, and the prefill chunks too when all of them are short: it
        # writes those rows' K/V and reads their keys in place. Everything else is written here and goes to SDPA.
        fused = (torch.device(device).type == "cpu" and cpu_kernels.fused_ok(cache.k_NHDh)
                 and cache.k_NHDh.shape[-1] % 8 == 0)  # the kernel's head dim
        short = all(c.num_tokens * c.end <= self.KERNEL_PREFILL_READS for c in chunks[S:])  # global layers: all keys
        n_kernel = (len(chunks) if short else S) if fused else 0
        self.kernel_rows = sum(c.num_tokens for c in chunks[:n_kernel])
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}  # see _kernel_tables
        self.write_slots: dict[str, torch.Tensor] = {}  # kind -> [K, rows written here]
        self.decode: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # kind -> (slots [K, S, L], mask [S,1,1,L])
        self.prefill: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # kind -> [(slots [K, L], mask [n, L])]
        rest = chunks[n_kernel:]
        self.all_kernel = n_kernel > 0 and not rest
        self._pointers = None  # see kernel_pointers
        for kind, num_layers in cache.num_layers.items():
            if num_layers == 0:
                continue
            kind_chunk = chunk if kind == CHUNKED else None
            if n_kernel:
                self.tables[kind] = _kernel_tables(blocks, chunks[:n_kernel], kind, bs, kind_chunk)
            vis = [_visible(blocks, c, kind, bs, chunk) for c in rest]
            if rest:
                self.write_slots[kind] = torch.cat([v.slots_KL[:, -c.num_tokens:] for v, c in zip(vis, rest)],
                                                   dim=1).to(device)
            sdpa_decodes = S - min(S, n_kernel)
            if sdpa_decodes:
                self.decode[kind] = _batch_decodes(vis[:sdpa_decodes], rest[:sdpa_decodes], kind_chunk, device)
            self.prefill[kind] = [
                (v.slots_KL.to(device),
                 attention_mask(torch.arange(c.start, c.end), v.k_pos_L, kind_chunk).to(device))
                for v, c in zip(vis[sdpa_decodes:], rest[sdpa_decodes:])]

    def kernel_tables(self, layer: int) -> tuple[tuple[torch.Tensor, torch.Tensor, int],
                                                 tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] | None:
        """((K cache, V cache, block size), (blocks [T, B], first [T], len [T], max len)) of ``layer`` when the
        kernel takes every row of this step (``cpu_kernels.attention_block`` can then run the sub-layer), else
        None."""
        if not self.all_kernel:
            return None
        kind, idx = self.cache.layer_kind[layer]
        blocks_KRB, first_R, len_R, longest = self.tables[kind]
        return ((self.cache.k_NHDh, self.cache.v_NHDh, self.cache.block_size),
                (blocks_KRB[idx], first_R, len_R, longest))

    def kernel_pointers(self) -> tuple[int, int, int, torch.Tensor, int] | None:
        """``kernel_tables`` of every layer for a caller that calls the kernels itself (``models/kernel_step.py``):
        (K cache, V cache, block size, tables [layers, 4], max len) with a layer's row (blocks [T, B], B, first [T],
        len [T]) and the caches as addresses, valid while this object lives; None unless the kernel takes every
        row."""
        if not self.all_kernel:
            return None
        if self._pointers is None:
            per_kind = {kind: (blocks_KRB.data_ptr(), blocks_KRB.stride(0) * blocks_KRB.element_size(),
                               blocks_KRB.shape[2], first_R.data_ptr(), len_R.data_ptr())
                        for kind, (blocks_KRB, first_R, len_R, _) in self.tables.items()}
            rows = []
            for layer in range(len(self.cache.layer_kind)):
                kind, idx = self.cache.layer_kind[layer]
                base, per_layer, width, first, length = per_kind[kind]
                rows.append((base + idx * per_layer, width, first, length))
            self._pointers = (self.cache.k_NHDh.data_ptr(), self.cache.v_NHDh.data_ptr(), self.cache.block_size,
                              torch.tensor(rows, dtype=torch.int64), max(t[3] for t in self.tables.values()))
        return self._pointers

    def attend(self, layer: int, chunk: int | None, pos_T: torch.Tensor, q_THDh: torch.Tensor,
               k_THDh: torch.Tensor, v_THDh: torch.Tensor) -> torch.Tensor:
        kind, idx = self.cache.layer_kind[layer]
        k_NHDh, v_NHDh = self.cache.k_NHDh, self.cache.v_NHDh
        R, scale = self.kernel_rows, q_THDh.shape[-1] ** -0.5
        if kind in self.write_slots:
            slots_T = self.write_slots[kind][idx]
            k_NHDh[slots_T] = k_THDh[R:].to(k_NHDh.dtype)  # write first: every query sees its own key
            v_NHDh[slots_T] = v_THDh[R:].to(v_NHDh.dtype)
        outs = []
        if R:
            blocks_KRB, first_R, len_R, longest = self.tables[kind]
            outs.append(cpu_kernels.paged_decode_attention(q_THDh[:R], k_THDh[:R], v_THDh[:R], k_NHDh, v_NHDh,
                                                           blocks_KRB[idx], first_R, len_R, self.cache.block_size,
                                                           scale, longest))
        row = R
        if kind in self.decode:
            slots_KSL, mask_S11L = self.decode[kind]
            S = mask_S11L.shape[0]
            keys = k_NHDh[slots_KSL[idx]].transpose(1, 2)  # [S, L, Hkv, Dh] -> [S, Hkv, L, Dh]
            values = v_NHDh[slots_KSL[idx]].transpose(1, 2)
            q_SH1Dh = q_THDh[row:row + S, :, None, :]
            outs.append(F.scaled_dot_product_attention(q_SH1Dh, keys, values, attn_mask=mask_S11L, scale=scale,
                                                       enable_gqa=True)[:, :, 0, :])
            row += S
        for slots_KL, mask_nL in self.prefill[kind]:
            n = mask_nL.shape[0]
            keys, values = k_NHDh[slots_KL[idx]].transpose(0, 1), v_NHDh[slots_KL[idx]].transpose(0, 1)
            q_HnDh = q_THDh[row:row + n].transpose(0, 1)
            out_HnDh = F.scaled_dot_product_attention(q_HnDh, keys, values, attn_mask=mask_nL, scale=scale,
                                                      enable_gqa=True)
            outs.append(out_HnDh.transpose(0, 1))
            row += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _window_start(pos: int, chunk: int | None) -> int:
    """First position a query at ``pos`` sees: its attention chunk's start (0 for global layers)."""
    return 0 if chunk is None else (pos // chunk) * chunk


def _kernel_tables(blocks: KVBlockManager, chunks: list[ScheduledChunk], kind: str, bs: int,
                   chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """What the attention kernel reads for every token of ``chunks``, one row per token: the blocks of its chunk's
    window per layer [K, R, B] (zero-padded), the offset of its first visible key in them [R], how many keys it
    sees [R] (its own included: a prefill row sees the chunk's earlier rows, not the later ones), and the most
    keys any row sees (sizes the kernel's score buffer; computed once per step, not once per layer)."""
    padded, lo_C, n_C, window_C = [], [], [], []
    for c in chunks:
        window = _window_start(c.start, chunk)
        lo, hi = window // bs, (c.end - 1) // bs
        padded.append(blocks.table_slices(c.seq.request_id, kind == CHUNKED, lo, hi + 1))  # in-window: never None
        lo_C.append(lo)
        n_C.append(c.num_tokens)
        window_C.append(window)
    width = max(len(t[0]) for t in padded)
    if all(n == 1 for n in n_C):  # decodes only, one row per chunk: plain ints, three tensors (runs every step)
        flat = []  # one flat list: torch.tensor of nested lists costs several times more
        for k in range(len(padded[0])):
            for t in padded:
                flat += t[k]
                flat += [0] * (width - len(t[k]))
        blocks_KRB = torch.tensor(flat, dtype=torch.long).view(len(padded[0]), len(padded), width)
        len_R = [c.start - w + 1 for c, w in zip(chunks, window_C)]
        return (blocks_KRB, torch.tensor([w - lo * bs for w, lo in zip(window_C, lo_C)], dtype=torch.long),
                torch.tensor(len_R, dtype=torch.long), max(len_R))
    blocks_CKB = torch.tensor([[t + [0] * (width - len(t)) for t in ts] for ts in padded], dtype=torch.long)
    counts_C = torch.tensor(n_C)  # prefill rows: a chunk's rows share its blocks
    pos_R = torch.cat([torch.arange(c.start, c.end) for c in chunks])
    lo_R = torch.repeat_interleave(torch.tensor(lo_C, dtype=torch.long), counts_C)
    blocks_RKB = torch.repeat_interleave(blocks_CKB, counts_C, dim=0)
    window_R = torch.zeros_like(pos_R) if chunk is None else torch.div(pos_R, chunk, rounding_mode="floor") * chunk
    len_R = pos_R - window_R + 1
    return blocks_RKB.transpose(0, 1).contiguous(), window_R - lo_R * bs, len_R, int(len_R.max())


def _batch_decodes(vis: list[_Visible], chunks: list[ScheduledChunk], chunk: int | None,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every decode's visible keys to the longest: slots [K, S, L] and mask [S, 1, 1, L]."""
    L = max(v.k_pos_L.numel() for v in vis)
    slots_KSL = torch.stack([F.pad(v.slots_KL, (0, L - v.slots_KL.shape[1])) for v in vis], dim=1)
    k_pos_SL = torch.stack([F.pad(v.k_pos_L, (0, L - v.k_pos_L.numel()), value=_PAD_POS) for v in vis])
    q_pos_S1 = torch.tensor([[c.start] for c in chunks])
    mask_S1L = attention_mask(q_pos_S1, k_pos_SL, chunk)
    return slots_KSL.to(device), mask_S1L[:, None].to(device)
