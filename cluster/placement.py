"""The placement table: which expert-shard actors hold each routed expert of each MoE layer.

The control plane publishes a ``Placement`` under an epoch; routers use it to send each token row to a shard
holding that row's expert. Shard ids are stable for the life of a deployment: a dead shard is removed from the
replica lists under a new epoch (``without_shards``), never renumbered, so routers and shards agree on ids.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence

Key = tuple[int, int]  # (layer, expert)


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    epoch: int
    num_shards: int
    num_experts: int
    layers: tuple[int, ...]  # MoE layer indices; dense layers have no routed experts and are absent
    table: tuple[tuple[tuple[int, ...], ...], ...]  # table[i][e]: shards holding expert e of layers[i]

    def __post_init__(self) -> None:
        # Normalise (from_dict hands in lists) and sort, so equal placements compare and serialise equal.
        # Sorting keeps duplicates, so validate() still sees them.
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "table", tuple(tuple(tuple(sorted(r)) for r in row) for row in self.table))
        if self.epoch < 0 or self.num_shards < 1 or self.num_experts < 1:
            raise PlacementError(
                f"need epoch >= 0, num_shards >= 1, num_experts >= 1; "
                f"got epoch={self.epoch}, num_shards={self.num_shards}, num_experts={self.num_experts}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise PlacementError(f"duplicate layer in layers={self.layers}")
        if len(self.table) != len(self.layers):
            raise PlacementError(f"table has {len(self.table)} layers, layers={self.layers}")
        for layer, row in zip(self.layers, self.table):
            if len(row) != self.num_experts:
                raise PlacementError(f"layer {layer}: table row has {len(row)} experts, expected {self.num_experts}")
        self.validate()

    def validate(self, live_shards: Iterable[int] | None = None) -> None:
        live = None if live_shards is None else set(live_shards)
        for layer, row in zip(self.layers, self.table):
            for e, shards in enumerate(row):
                where = f"layer {layer} expert {e}"
                if not shards:
                    raise PlacementError(f"{where} has no replica")
                if len(set(shards)) != len(shards):
                    raise PlacementError(f"{where}: duplicate shard in replicas {shards}")
                bad = [s for s in shards if not 0 <= s < self.num_shards]
                if bad:
                    raise PlacementError(f"{where}: shards {bad} outside [0, {self.num_shards}) in {shards}")
                if live is not None and not live.intersection(shards):
                    raise PlacementError(f"{where}: no live replica among shards {shards}; live={sorted(live)}")

    @cached_property
    def _layer_index(self) -> dict[int, int]:
        return {layer: i for i, layer in enumerate(self.layers)}

    @cached_property
    def _by_shard(self) -> list[dict[int, tuple[int, ...]]]:
        # Built once: routers and shards ask per step, the table never changes within an epoch.
        held: list[dict[int, list[int]]] = [{layer: [] for layer in self.layers} for _ in range(self.num_shards)]
        for layer, row in zip(self.layers, self.table):
            for e, shards in enumerate(row):
                for s in shards:
                    held[s][layer].append(e)
        return [{layer: tuple(es) for layer, es in h.items()} for h in held]

    def replicas(self, layer: int, expert: int) -> tuple[int, ...]:
        if layer not in self._layer_index or not 0 <= expert < self.num_experts:
            raise PlacementError(f"no (layer {layer}, expert {expert}) in layers={self.layers}, E={self.num_experts}")
        return self.table[self._layer_index[layer]][expert]

    def experts_of(self, shard: int) -> dict[int, tuple[int, ...]]:
        if not 0 <= shard < self.num_shards:
            raise PlacementError(f"shard {shard} outside [0, {self.num_shards})")
        return dict(self._by_shard[shard])

    def local_index(self, shard: int, layer: int, expert: int) -> int:
        """Row of ``expert`` in the shard's stacked weights for ``layer`` (its experts in global-id order)."""
        held = self.experts_of(shard).get(layer, ())
        if expert not in held:
            raise PlacementError(f"shard {shard} does not hold layer {layer} expert {expert}; it holds {held}")
        return held.index(expert)

    def without_shards(self, dead: Iterable[int], epoch: int) -> Placement:
        dead = set(dead)
        if epoch <= self.epoch:  # routers drop placements older than the one they have, so epochs must grow
            raise PlacementError(f"new epoch {epoch} must exceed current epoch {self.epoch}")
        table = tuple(tuple(tuple(s for s in r if s not in dead) for r in row) for row in self.table)
        lost = [(layer, e) for layer, row in zip(self.layers, table) for e, r in enumerate(row) if not r]
        if lost:
            raise PlacementError(f"removing shards {sorted(dead)} leaves {len(lost)} experts with no replica: {lost}")
        return Placement(epoch, self.num_shards, self.num_experts, self.layers, table)

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "num_shards": self.num_shards,
            "num_experts": self.num_experts,
            "layers": list(self.layers),
            "table": [[list(r) for r in row] for row in self.table],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Placement:
        return cls(d["epoch"], d["num_shards"], d["num_experts"], d["layers"], d["table"])

    def shard_load(self, weights: Mapping[Key, float] | None = None) -> list[float]:
        """Per-shard expected work; each expert's weight (default 1, absent keys 0) is split evenly over replicas."""
        if weights is not None:
            unknown = [k for k in weights if k[0] not in self._layer_index or not 0 <= k[1] < self.num_experts]
            if unknown:
                raise PlacementError(f"weights name experts not in this placement: {unknown}")
        load = [0.0] * self.num_shards
        for layer, row in zip(self.layers, self.table):
            for e, shards in enumerate(row):
                w = 1.0 if weights is None else float(weights.get((layer, e), 0.0))
                for s in shards:
                    load[s] += w / len(shards)
        return load

    def spread(self, layer: int, expert: int, num_rows: int) -> list[tuple[int, int]]:
        """Split one expert's ``num_rows`` rows over its replicas, in sorted shard order.

        Rows are assigned contiguously: the router sends rows [0, c0) to the first returned shard, [c0, c0+c1)
        to the second, and so on. Counts differ by at most 1 (earlier replicas take the extra rows); shards that
        would get 0 rows are left out so the router sends them nothing.
        """
        if num_rows < 0:
            raise PlacementError(f"num_rows must be >= 0, got {num_rows}")
        shards = self.replicas(layer, expert)
        base, extra = divmod(num_rows, len(shards))
        counts = [(s, base + (i < extra)) for i, s in enumerate(shards)]
        return [(s, c) for s, c in counts if c > 0]


def balanced_placement(
    layers: Sequence[int],
    num_experts: int,
    num_shards: int,
    strategy: str = "contiguous",
    replicas: Mapping[Key, int] | None = None,
    epoch: int = 0,
) -> Placement:
    layers = tuple(layers)
    if num_experts < 1 or not layers or not 1 <= num_shards <= num_experts * len(layers):
        raise PlacementError(
            f"need 1 <= num_shards <= num_experts * len(layers) so no shard is empty; "
            f"got num_shards={num_shards}, num_experts={num_experts}, len(layers)={len(layers)}"
        )
    table = [[[_primary_shard(strategy, i, e, num_experts, num_shards, len(layers))] for e in range(num_experts)]
             for i in range(len(layers))]
    _add_replicas(table, layers, num_experts, num_shards, replicas or {})
    empty = sorted(set(range(num_shards)) - {s for row in table for r in row for s in r})
    if empty:  # e.g. contiguous with num_shards > num_experts: a shard actor that would hold nothing
        raise PlacementError(
            f"strategy {strategy!r} leaves shards {empty} empty "
            f"(num_shards={num_shards}, num_experts={num_experts}, len(layers)={len(layers)})"
        )
    return Placement(epoch, num_shards, num_experts, layers, table)


def _primary_shard(strategy: str, layer_pos: int, e: int, num_experts: int, num_shards: int,
                   num_layers: int) -> int:
    if strategy == "contiguous":
        # Shard s owns [s*E//N, (s+1)*E//N): block sizes are floor or ceil of E/N.
        return _block_owner(e, num_experts, num_shards)
    if strategy == "round_robin":
        return (e + layer_pos) % num_shards  # offset per layer so every layer's expert 0 is not on shard 0
    if strategy == "flat":
        # All (layer, expert) pairs in one row, cut into N blocks whose sizes differ by at most 1: the even
        # spread the planner sizes GPUs for when there are more shards than experts per layer.
        return _block_owner(layer_pos * num_experts + e, num_experts * num_layers, num_shards)
    raise PlacementError(f"unknown strategy {strategy!r}; expected 'contiguous', 'round_robin' or 'flat'")


def _block_owner(e: int, num_experts: int, num_shards: int) -> int:
    # The largest s with s*E//N <= e, i.e. the block that contains e.
    return ((e + 1) * num_shards - 1) // num_experts


def _add_replicas(table: list, layers: tuple[int, ...], num_experts: int, num_shards: int,
                  replicas: Mapping[Key, int]) -> None:
    count = [0] * num_shards  # experts held per shard, across all layers: a proxy for memory and work
    for row in table:
        for r in row:
            count[r[0]] += 1
    pos = {layer: i for i, layer in enumerate(layers)}
    for (layer, e), want in sorted(replicas.items()):  # sorted: the same request always yields the same table
        if layer not in pos or not 0 <= e < num_experts:
            raise PlacementError(f"replicas names (layer {layer}, expert {e}), not in layers={layers}, E={num_experts}")
        if not 1 <= want <= num_shards:
            raise PlacementError(f"(layer {layer}, expert {e}) asks for {want} replicas; need 1..{num_shards}")
        held = table[pos[layer]][e]
        while len(held) < want:
            s = min((s for s in range(num_shards) if s not in held), key=lambda s: (count[s], s))
            held.append(s)
            count[s] += 1


def hot_expert_replicas(
    token_counts: Mapping[Key, float], num_extra: int, max_replicas: int | None = None
) -> dict[Key, int]:
    """EPLB-style greedy: give each extra replica to the expert with the highest load per replica.

    Ties go to the smallest (layer, expert). ``max_replicas`` (usually num_shards) caps any one expert, since
    balanced_placement cannot place more copies than there are shards. Returns total counts for experts with > 1.
    """
    if num_extra < 0 or (max_replicas is not None and max_replicas < 1):
        raise PlacementError(f"need num_extra >= 0 and max_replicas >= 1; got {num_extra}, {max_replicas}")
    negative = {k: v for k, v in token_counts.items() if v < 0}
    if negative:
        raise PlacementError(f"token counts must be >= 0: {negative}")
    reps = {k: 1 for k in token_counts}
    heap = [(-float(v), k) for k, v in token_counts.items()]
    heapq.heapify(heap)
    for _ in range(num_extra):
        while heap and max_replicas is not None and reps[heap[0][1]] >= max_replicas:
            heapq.heappop(heap)  # capped: it can take no more
        if not heap:
            break
        _, k = heapq.heappop(heap)
        reps[k] += 1
        heapq.heappush(heap, (-float(token_counts[k]) / reps[k], k))
    return {k: r for k, r in sorted(reps.items()) if r > 1}
