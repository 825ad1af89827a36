"""The distributed side of the router<->experts seam: rows go to expert shards over torch.distributed.

Same interface as ``LocalExperts``. Per MoE layer: every shard gets a header (counts), then its rows (already
scaled by the routing score) with local expert ids; while they are away the router runs the shared expert;
``combine`` waits for every shard's outputs and puts them back in token order. No Ray call on this path.

Shape legend: T tokens, K top-k, S = T*K rows, D hidden, N shards, E experts of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.comm import Group
from cluster.placement import Placement
from expert_workers.wire import OP_CLOSE, OP_EXPERTS, header
from models.seam import DispatchHandle, ExpertSeam, RouteLayout, gather_scaled_rows, route_layout, scatter_sum
from router.tracing import tracer


class ExpertExchangeError(RuntimeError):
    """A shard did not answer within the group's timeout (or its connection broke)."""


@dataclass(frozen=True)
class _Exchange:
    """Rows in flight for one layer."""

    order_S: torch.Tensor  # expert-major row -> its position in shard-major order
    sends: tuple  # send works (kept so the buffers stay alive until sent)
    recvs: tuple[tuple[int, torch.Tensor, object], ...]  # (shard, output buffer [n, D], recv work)


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
        rows_by_shard = rows_SD[order_S].split(counts_N)
        local_by_shard = local_S[order_S].split(counts_N)
        sends, recvs = [], []
        for shard, n in enumerate(counts_N):
            rank = shard + 1
            sends.append(self.group.send(header(OP_EXPERTS, layer_idx, n, self.device), rank))  # even when n == 0
            if n:
                sends.append(self.group.send(rows_by_shard[shard].contiguous(), rank))
                sends.append(self.group.send(local_by_shard[shard].contiguous(), rank))
                out_nD = torch.empty(n, self.hidden, dtype=self.dtype, device=self.device)
                recvs.append((shard, out_nD, self.group.recv(out_nD, rank)))
        return DispatchHandle(layer_idx, layout, _Exchange(order_S, tuple(sends), tuple(recvs)))

    def _combine(self, handle: DispatchHandle) -> torch.Tensor:
        ex: _Exchange = handle.in_flight
        for work in ex.sends:
            self._wait(work, None)
        for shard, _, work in ex.recvs:
            self._wait(work, shard)
        S = ex.order_S.numel()
        out_SD = torch.empty(S, self.hidden, dtype=self.dtype, device=self.device)
        if ex.recvs:
            out_SD[ex.order_S] = torch.cat([buf for _, buf, _ in ex.recvs])  # shard-major -> expert-major
        return scatter_sum(out_SD, handle.layout)

    def close(self) -> None:
        """Leave the group: every shard's loop for this router ends."""
        try:
            for shard in range(self.placement.num_shards):
                self.group.send(header(OP_CLOSE, 0, 0, self.device), shard + 1).wait()
        except RuntimeError:
            pass  # a dead shard has nothing to close
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

    def _wait(self, work, shard: int | None) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            who = f"shard {shard}" if shard is not None else "a shard"
            raise ExpertExchangeError(
                f"expert exchange with {who} of group {self.group.rendezvous.group_id} failed or timed out "
                f"after {self.group.rendezvous.timeout_s:.0f} s: {str(e).splitlines()[0][:200]}") from e
