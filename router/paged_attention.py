"""Paged KV cache and the attention backend of one engine step.

One flat slot store per K and V, shared by all layers: a physical block holds ``block_size`` positions of one
layer. Global (NoPE) layers keep every block of a sequence; chunked (RoPE) layers keep only the blocks of the
current chunk (see ``router/kv_blocks.py``). Each step writes the new tokens' K/V into their slots, gathers each
sequence's visible keys and runs SDPA: all single-token (decode) rows in one padded batch, each multi-token
(prefill) chunk on its own. On CPU in fp32 the decode rows go to one kernel instead (``cpu_kernels.
paged_decode_attention``) that writes their K/V and reads the visible keys in place through the block tables:
no gather, no padding, no mask.

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
    seq_id = c.seq.request_id
    tables = blocks.global_tables(seq_id) if kind == GLOBAL else blocks.chunked_tables(seq_id)
    first = 0 if kind == GLOBAL or chunk is None else (c.start // chunk) * chunk  # chunked: the chunk's start
    lo, hi = first // bs, (c.end - 1) // bs
    blocks_KB = torch.tensor([t[lo:hi + 1] for t in tables], dtype=torch.long)  # in-window: never None
    slots_KL = (blocks_KB[:, :, None] * bs + torch.arange(bs)).flatten(1)  # positions lo*bs ... (hi+1)*bs-1
    slots_KL = slots_KL[:, first - lo * bs:c.end - lo * bs]
    return _Visible(slots_KL, torch.arange(first, c.end))


class StepAttention:
    """``AttentionBackend`` for one step over ``chunks`` (decodes must come first, in the flat token order)."""

    def __init__(self, cache: PagedKVCache, blocks: KVBlockManager, chunks: list[ScheduledChunk],
                 device: torch.device | str = "cpu"):
        self.cache = cache
        bs, chunk = cache.block_size, cache.chunk_size
        self.num_decodes = S = sum(c.num_tokens == 1 for c in chunks)
        assert all(c.num_tokens == 1 for c in chunks[:S]), "decodes must come first"
        # The kernel writes and reads the decode rows itself; otherwise every row is written here.
        self.fused = S > 0 and torch.device(device).type == "cpu" and cpu_kernels.fused_ok(cache.k_NHDh)
        written = chunks[S:] if self.fused else chunks
        self.write_slots: dict[str, torch.Tensor] = {}  # kind -> [K, rows written here]
        self.decode: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # kind -> (slots [K, S, L], mask [S,1,1,L])
        self.decode_tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # fused: see _tables
        self.prefill: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # kind -> [(slots [K, L], mask [n, L])]
        for kind, num_layers in cache.num_layers.items():
            if num_layers == 0:
                continue
            kind_chunk = chunk if kind == CHUNKED else None
            vis = [_visible(blocks, c, kind, bs, chunk) for c in (chunks[S:] if self.fused else chunks)]
            if written:
                self.write_slots[kind] = torch.cat([v.slots_KL[:, -c.num_tokens:] for v, c in
                                                    zip(vis[-len(written):], written)], dim=1).to(device)
            if self.fused:
                self.decode_tables[kind] = _decode_tables(blocks, chunks[:S], kind, bs, kind_chunk)
            elif S:
                self.decode[kind] = _batch_decodes(vis[:S], chunks[:S], kind_chunk, device)
            self.prefill[kind] = [
                (v.slots_KL.to(device),
                 attention_mask(torch.arange(c.start, c.end), v.k_pos_L, kind_chunk).to(device))
                for v, c in zip(vis[-len(chunks[S:]):] if chunks[S:] else [], chunks[S:])]

    def attend(self, layer: int, chunk: int | None, pos_T: torch.Tensor, q_THDh: torch.Tensor,
               k_THDh: torch.Tensor, v_THDh: torch.Tensor) -> torch.Tensor:
        kind, idx = self.cache.layer_kind[layer]
        k_NHDh, v_NHDh = self.cache.k_NHDh, self.cache.v_NHDh
        S, scale = self.num_decodes, q_THDh.shape[-1] ** -0.5
        first_written = S if self.fused else 0
        if kind in self.write_slots:
            slots_T = self.write_slots[kind][idx]
            k_NHDh[slots_T] = k_THDh[first_written:].to(k_NHDh.dtype)  # write first: every query sees its own key
            v_NHDh[slots_T] = v_THDh[first_written:].to(v_NHDh.dtype)
        outs = []
        if self.fused:
            blocks_KSB, first_S, len_S = self.decode_tables[kind]
            outs.append(cpu_kernels.paged_decode_attention(q_THDh[:S], k_THDh[:S], v_THDh[:S], k_NHDh, v_NHDh,
                                                           blocks_KSB[idx], first_S, len_S, self.cache.block_size,
                                                           scale))
        elif S:
            slots_KSL, mask_S11L = self.decode[kind]
            keys = k_NHDh[slots_KSL[idx]].transpose(1, 2)  # [S, L, Hkv, Dh] -> [S, Hkv, L, Dh]
            values = v_NHDh[slots_KSL[idx]].transpose(1, 2)
            q_SH1Dh = q_THDh[:S, :, None, :]
            outs.append(F.scaled_dot_product_attention(q_SH1Dh, keys, values, attn_mask=mask_S11L, scale=scale,
                                                       enable_gqa=True)[:, :, 0, :])
        row = S
        for slots_KL, mask_nL in self.prefill[kind]:
            n = mask_nL.shape[0]
            keys, values = k_NHDh[slots_KL[idx]].transpose(0, 1), v_NHDh[slots_KL[idx]].transpose(0, 1)
            q_HnDh = q_THDh[row:row + n].transpose(0, 1)
            out_HnDh = F.scaled_dot_product_attention(q_HnDh, keys, values, attn_mask=mask_nL, scale=scale,
                                                      enable_gqa=True)
            outs.append(out_HnDh.transpose(0, 1))
            row += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _decode_tables(blocks: KVBlockManager, chunks: list[ScheduledChunk], kind: str, bs: int,
                   chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the decode kernel reads for single-token ``chunks``: the in-window blocks of each sequence per layer
    [K, S, B] (zero-padded), and the offset of the first visible key in them [S] and how many are visible [S]."""
    rows, first_S, len_S = [], [], []
    for c in chunks:
        tables = blocks.global_tables(c.seq.request_id) if kind == GLOBAL else blocks.chunked_tables(c.seq.request_id)
        first = 0 if chunk is None else (c.start // chunk) * chunk  # chunked: keys of the query's own chunk
        lo, hi = first // bs, c.start // bs
        rows.append([t[lo:hi + 1] for t in tables])  # in-window: never None
        first_S.append(first - lo * bs)
        len_S.append(c.start - first + 1)
    width = max(len(r[0]) for r in rows)
    padded = [[t + [0] * (width - len(t)) for t in r] for r in rows]
    blocks_KSB = torch.tensor(padded, dtype=torch.long).transpose(0, 1).contiguous()
    return blocks_KSB, torch.tensor(first_S, dtype=torch.long), torch.tensor(len_S, dtype=torch.long)


def _batch_decodes(vis: list[_Visible], chunks: list[ScheduledChunk], chunk: int | None,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every decode's visible keys to the longest: slots [K, S, L] and mask [S, 1, 1, L]."""
    L = max(v.k_pos_L.numel() for v in vis)
    slots_KSL = torch.stack([F.pad(v.slots_KL, (0, L - v.slots_KL.shape[1])) for v in vis], dim=1)
    k_pos_SL = torch.stack([F.pad(v.k_pos_L, (0, L - v.k_pos_L.numel()), value=_PAD_POS) for v in vis])
    q_pos_S1 = torch.tensor([[c.start] for c in chunks])
    mask_S1L = attention_mask(q_pos_S1, k_pos_SL, chunk)
    return slots_KSL.to(device), mask_S1L[:, None].to(device)
