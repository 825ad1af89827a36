"""Greedy generation with the single-process model (the engine in ``router/`` is the serving path).

Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.model import Llama4TextModel


@torch.inference_mode()
def greedy_generate(model: Llama4TextModel, prompt_ids_BT: torch.Tensor, max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> torch.Tensor:
    """New token ids [B, <=max_new_tokens]; stops early once every sequence has produced a stop id."""
    cache = model.new_cache(prompt_ids_BT.shape[0])
    logits_BTV = model(prompt_ids_BT, cache)
    stop = torch.tensor(list(stop_ids), dtype=torch.long)
    finished_B = torch.zeros(prompt_ids_BT.shape[0], dtype=torch.bool)
    out = []
    for _ in range(max_new_tokens):
        next_B = logits_BTV[:, -1].argmax(dim=-1)
        out.append(next_B)
        finished_B |= torch.isin(next_B, stop)
        if bool(finished_B.all()) or len(out) == max_new_tokens:  # device-to-host sync
            break
        logits_BTV = model(next_B[:, None], cache)
    return torch.stack(out, dim=1)
