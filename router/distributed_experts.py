"""The distributed side of the router<->experts seam: rows go to expert shards over torch.distributed.

Same interface as ``LocalExperts``. Per MoE layer: every shard gets a header (counts), then its rows (already
scaled by the routing score) with local expert ids; while they are away the router runs the shared expert;
``combine`` waits for every shard's outputs and puts them back in token order. No Ray call on this path.
A shard on the router's host gets its rows through a shared buffer instead of the group (``shard_links``).

Shape legend: T tokens, K top-k, S = T*K rows, D hidden, N shards, E experts of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import torch

from cluster.comm import Group
from cluster.placement import Placement
from expert_workers.wire import OP_CLOSE, header
from models.seam import DispatchHandle, ExpertSeam, RouteLayout, gather_scaled_rows, route_layout, scatter_sum
from router.shard_links import GroupLink, Pending, ShmLink
from router.tracing import tracer


class ExpertExchangeError(RuntimeError):
    """A shard did not answer within the group's timeout (or its connection broke)."""


@dataclass(frozen=True)
class _Exchange:
    """Rows in flight for one layer: one part per shard."""

    num_rows: int  # S
    parts: tuple[Pending, ...]


class DistributedExperts(ExpertSeam):
    def __init__(self, placement: Placement, group: Group, hidden: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.placement, self.group, self.hidden, self.dtype, self.device = placement, group, hidden, dtype, device
        self.num_experts, N = placement.num_experts, placement.num_shards
        self._first_shard_E: dict[int, torch.Tensor] = {}  # layer -> the shard of each expert's first replica
        self._local_NE: dict[int, torch.Tensor] = {}  # layer -> local index of expert e on shard s (-1: not there)
        self._replicated: dict[int, list[int]] = {}  # layer -> experts with more than one replica
        for layer in placement.layers:
            reps = [placement.replicas(layer, e) for e in range(self.num_experts)]
            self._first_shard_E[layer] = torch.tensor([r[0] for r in reps], device=device)
            local = torch.full((N, self.num_experts), -1, dtype=torch.long)
            for s in range(N):
                for i, e in enumerate(placement.experts_of(s)[layer]):
                    local[s, e] = i
            self._local_NE[layer] = local.to(device)
            self._replicated[layer] = [e for e, r in enumerate(reps) if len(r) > 1]
        shm_ok = torch.device(device).type == "cpu"
        self._links = [(ShmLink if shm_ok and group.shares_memory_with(s + 1) else GroupLink)(
            group, s, hidden, dtype, device) for s in range(N)]

    @property
    def payload_paths(self) -> tuple[str, ...]:
        """Per shard: "shm" (rows through a shared buffer) or "group" (rows as messages of the group)."""
        return tuple(link.path for link in self._links)

    @property
    def buffer_rows(self) -> tuple[int, ...]:
        """Per shard: rows its shared buffer holds now (0: none yet, or not shared)."""
        return tuple(link.capacity for link in self._links)

    def dispatch(self, layer_idx: int, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 scores_TK: torch.Tensor) -> DispatchHandle:
        with tracer().start_as_current_span("moe.dispatch", attributes={"layer": layer_idx,
                                                                        "rows": expert_ids_TK.numel()}):
            return self._dispatch(layer_idx, x_TD, expert_ids_TK, scores_TK)

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        with tracer().start_as_current_span("moe.combine", attributes={"layer": handle.layer_idx}):
            return self._combine(handle)

    def _dispatch(self, layer_idx: int, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                  scores_TK: torch.Tensor) -> DispatchHandle:
        layout = route_layout(expert_ids_TK, self.num_experts)
        rows_SD = gather_scaled_rows(x_TD, scores_TK, layout).to(self.dtype)
        expert_S = expert_ids_TK.reshape(-1)[layout.slot_S]
        shard_S = self._shards(layer_idx, layout, expert_S)
        local_S = self._local_NE[layer_idx][shard_S, expert_S]
        # expert-major -> shard-major; stable, so each shard's rows stay grouped by its local experts
        order_S = torch.argsort(shard_S, stable=True)
        counts_N = torch.bincount(shard_S, minlength=self.placement.num_shards).tolist()  # device-to-host sync
        parts = tuple(link.post(layer_idx, rows_SD, local_S, index_n)  # every shard, even with no rows
                      for link, index_n in zip(self._links, order_S.split(counts_N)))
        return DispatchHandle(layer_idx, layout, _Exchange(order_S.numel(), parts))

    def _combine(self, handle: DispatchHandle) -> torch.Tensor:
        ex: _Exchange = handle.in_flight
        out_SD = torch.empty(ex.num_rows, self.hidden, dtype=self.dtype, device=self.device)
        for part in ex.parts:
            for work in part.works:
                self._wait(work, part.shard)
            n = part.index_n.numel()
            if part.ack_1 is not None and part.ack_1.item() != n:
                self._fail(part.shard, f"answered {part.ack_1.item()} rows, expected {n}")
            if n:
                out_SD[part.index_n] = part.out_nD  # shard-major -> expert-major (copied out of a shared buffer)
        return scatter_sum(out_SD, handle.layout)

    def close(self) -> None:
        """Leave the group: every shard's loop for this router ends."""
        try:
            for shard in range(self.placement.num_shards):
                self.group.send(header(OP_CLOSE, 0, 0, device=self.device), shard + 1).wait()
        except RuntimeError:
            pass  # a dead shard has nothing to close
        for link in self._links:
            link.release()
        self.group.close()

    def _shards(self, layer: int, layout: RouteLayout, expert_S: torch.Tensor) -> torch.Tensor:
        shard_S = self._first_shard_E[layer][expert_S]
        if not self._replicated[layer]:
            return shard_S
        offsets, start = [], 0
        for n in layout.counts_E:
            offsets.append(start)
            start += n
        for e in self._replicated[layer]:  # split each replicated expert's rows among its replicas
            start = offsets[e]
            for shard, count in self.placement.spread(layer, e, layout.counts_E[e]):
                shard_S[start:start + count] = shard
                start += count
        return shard_S

    def _wait(self, work, shard: int) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            self._fail(shard, f"failed or timed out after {self.group.rendezvous.timeout_s:.0f} s: "
                              f"{str(e).splitlines()[0][:200]}", e)

    def _fail(self, shard: int, what: str, cause: Exception | None = None) -> NoReturn:
        for link in self._links:  # the group is broken: leave no shared file behind
            link.release()
        raise ExpertExchangeError(f"expert exchange with shard {shard} of group "
                                  f"{self.group.rendezvous.group_id} {what}") from cause
