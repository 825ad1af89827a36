"""Runs one engine step through the model: flat tokens of every scheduled chunk -> logits of the sampled rows.

Shape legend: T tokens in the step, R rows that sample (one per chunk that reaches its sequence's end),
D hidden, V vocabulary.
"""

from __future__ import annotations

import torch

from models.model import Llama4TextModel
from router.kv_blocks import KVBlockManager
from router.paged_attention import PagedKVCache, StepAttention
from router.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: Llama4TextModel, cache: PagedKVCache, blocks: KVBlockManager):
        self.model, self.cache, self.blocks = model, cache, blocks
        self.device = model.embed_tokens.weight.device

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """fp32 logits [R, V] for the chunks with ``samples`` set, in their order in ``chunks``.

        ``chunks`` must list single-token chunks first (what ``StepAttention`` batches together).
        """
        ids, pos, last_rows, row = [], [], [], 0
        for c in chunks:
            ids += c.seq.token_ids(c.start, c.end)
            pos += range(c.start, c.end)
            row += c.num_tokens
            if c.samples:
                last_rows.append(row - 1)
        token_ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos_T = torch.tensor(pos, dtype=torch.long, device=self.device)
        backend = StepAttention(self.cache, self.blocks, chunks, self.device)
        h_TD = self.model.forward_flat(token_ids_T, pos_T, backend)
        # Only rows that sample need the LM head: for a long prefill this is most of the saving.
        h_RD = h_TD if len(last_rows) == row else h_TD[torch.tensor(last_rows, dtype=torch.long, device=self.device)]
        return self.model.hidden_to_logits(h_RD).float()


def decodes_first(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    return sorted(chunks, key=lambda c: c.num_tokens > 1)  # stable: keeps admission order otherwise
