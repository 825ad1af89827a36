import json

import pytest

from cluster.placement import Placement, PlacementError, balanced_placement, hot_expert_replicas

LAYERS = (1, 3, 5, 7)  # interleaved MoE layers, as in Llama 4 Maverick


def per_layer_counts(p: Placement) -> dict[int, list[int]]:
    return {layer: [len(p.experts_of(s)[layer]) for s in range(p.num_shards)] for layer in p.layers}


@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
@pytest.mark.parametrize("E,N", [(16, 4), (16, 3), (128, 5), (8, 8), (16, 1)])
def test_every_expert_once_and_balanced(strategy, E, N):
    p = balanced_placement(LAYERS, E, N, strategy)
    for layer in LAYERS:
        assert all(len(p.replicas(layer, e)) == 1 for e in range(E))
        held = sorted(e for s in range(N) for e in p.experts_of(s)[layer])
        assert held == list(range(E))
        counts = per_layer_counts(p)[layer]
        assert max(counts) - min(counts) <= 1, counts


def test_contiguous_blocks():
    p = balanced_placement([0], 16, 3)
    assert [p.experts_of(s)[0] for s in range(3)] == [tuple(range(0, 5)), tuple(range(5, 10)), tuple(range(10, 16))]


def test_round_robin_offsets_layers():
    p = balanced_placement(LAYERS, 16, 4, "round_robin")
    assert [p.replicas(layer, 0) for layer in LAYERS] == [(0,), (1,), (2,), (3,)]
    assert p.replicas(3, 5) == ((5 + 1) % 4,)


def test_local_index_matches_experts_of():
    p = balanced_placement(LAYERS, 16, 3, "round_robin", replicas={(1, 2): 3})
    for s in range(3):
        for layer, experts in p.experts_of(s).items():
            assert [p.local_index(s, layer, e) for e in experts] == list(range(len(experts)))
    with pytest.raises(PlacementError, match="shard 0 does not hold layer 1 expert 1"):
        p.local_index(0, 1, 1)


def test_replicas_distinct_and_on_least_loaded():
    # Contiguous E=10, N=4: blocks of 2, 3, 2, 3 experts; expert 9 lives on shard 3.
    p = balanced_placement([0], 10, 4, replicas={(0, 9): 3})
    assert p.replicas(0, 9) == (0, 2, 3)  # the two 2-expert shards
    # Requests are served in (layer, expert) order: expert 0 takes shard 2 (least loaded, tie by id after 0
    # already holds it), then expert 9 takes shard 0 (2 experts) and shard 1 (3, ties with 2, lower id).
    p = balanced_placement([0], 10, 4, replicas={(0, 9): 3, (0, 0): 2})
    assert p.replicas(0, 0) == (0, 2) and p.replicas(0, 9) == (0, 1, 3)
    assert all(len(set(r)) == len(r) for r in p.table[0])
    counts = [len(p.experts_of(s)[0]) for s in range(4)]
    assert sum(counts) == 10 + 1 + 2 and max(counts) - min(counts) <= 1


def test_builder_rejects_bad_arguments():
    with pytest.raises(PlacementError, match="num_shards=9, num_experts=2, len\\(layers\\)=4"):
        balanced_placement(LAYERS, 2, 9)
    with pytest.raises(PlacementError, match="num_shards=0"):
        balanced_placement(LAYERS, 16, 0)
    with pytest.raises(PlacementError, match="asks for 5 replicas; need 1..4"):
        balanced_placement(LAYERS, 16, 4, replicas={(1, 0): 5})
    with pytest.raises(PlacementError, match="layer 2, expert 0"):
        balanced_placement(LAYERS, 16, 4, replicas={(2, 0): 2})
    with pytest.raises(PlacementError, match="'striped'"):
        balanced_placement(LAYERS, 16, 4, "striped")
    with pytest.raises(PlacementError, match="leaves shards \\[0\\] empty"):
        balanced_placement([0, 1], 2, 3)  # contiguous with N > E: shard 0's block is empty


def make(table, num_shards=3):
    return Placement(0, num_shards, len(table[0]), tuple(range(len(table))), table)


def test_validate_catches_bad_tables():
    with pytest.raises(PlacementError, match="layer 0 expert 1 has no replica"):
        make([[[0], []]])
    with pytest.raises(PlacementError, match="layer 0 expert 0: duplicate shard in replicas \\(1, 1\\)"):
        make([[[1, 1], [0]]])
    with pytest.raises(PlacementError, match="layer 0 expert 1: shards \\[3\\] outside \\[0, 3\\)"):
        make([[[0], [3]]])
    with pytest.raises(PlacementError, match="table row has 1 experts, expected 2"):
        Placement(0, 3, 2, (0,), (((0,),),))
    p = make([[[0, 1], [2]]])
    p.validate(live_shards=[1, 2])
    msg = "layer 0 expert 1: no live replica among shards \\(2,\\); live=\\[0, 1\\]"
    with pytest.raises(PlacementError, match=msg):
        p.validate(live_shards=[0, 1])


def test_without_shards():
    # Shard 1 holds experts 2, 3 of each layer; copying them to shard 0 lets shard 1 die.
    p = balanced_placement([0, 1], 4, 2, replicas={(0, 2): 2, (0, 3): 2, (1, 2): 2, (1, 3): 2})
    q = p.without_shards([1], epoch=1)
    assert q.epoch == 1 and q.num_shards == 2  # ids are stable: shard 1 stays, holding nothing
    assert q.replicas(0, 2) == (0,) and q.experts_of(1) == {0: (), 1: ()}
    assert q.experts_of(0) == {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}
    q.validate(live_shards=[0])
    with pytest.raises(PlacementError, match="leaves 2 experts with no replica: \\[\\(0, 2\\), \\(0, 3\\)"):
        balanced_placement([0], 4, 2).without_shards([1], epoch=1)
    with pytest.raises(PlacementError, match="new epoch 0 must exceed current epoch 0"):
        p.without_shards([1], epoch=0)


def test_spread():
    p = balanced_placement([0], 4, 3, replicas={(0, 0): 3})
    for n in [0, 1, 2, 3, 7, 100]:
        out = p.spread(0, 0, n)
        counts = [c for _, c in out]
        assert sum(counts) == n and out == p.spread(0, 0, n)
        assert [s for s, _ in out] == sorted(s for s, _ in out)
        if n >= 3:
            assert max(counts) - min(counts) <= 1
    assert p.spread(0, 0, 7) == [(0, 3), (1, 2), (2, 2)]
    assert p.spread(0, 0, 2) == [(0, 1), (1, 1)]  # the shard with no rows is left out
    assert p.spread(0, 0, 0) == []
    with pytest.raises(PlacementError, match="-1"):
        p.spread(0, 0, -1)


def test_dict_round_trip():
    p = balanced_placement(LAYERS, 16, 3, "round_robin", replicas={(3, 4): 2}, epoch=7)
    q = Placement.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p and q.replicas(3, 4) == p.replicas(3, 4)


def test_shard_load():
    p = balanced_placement([0], 4, 2, replicas={(0, 0): 2})
    assert p.shard_load() == [1.5, 2.5]
    assert p.shard_load({(0, 0): 10.0, (0, 3): 1.0}) == [5.0, 6.0]
    with pytest.raises(PlacementError, match="\\(9, 0\\)"):
        p.shard_load({(9, 0): 1.0})


def test_hot_expert_replicas():
    counts = {(0, 0): 100.0, (0, 1): 30.0, (0, 2): 10.0, (1, 0): 30.0}
    reps = hot_expert_replicas(counts, num_extra=4)
    # 100 -> 50 -> 33.3 (both 30s tie with (0,1) first) -> ...: the hottest gets the most copies.
    assert reps[(0, 0)] == max(reps.values()) and sum(r - 1 for r in reps.values()) == 4
    assert reps == {(0, 0): 4, (0, 1): 2}
    assert hot_expert_replicas(counts, 0) == {}
    assert hot_expert_replicas(counts, 4, max_replicas=2) == {(0, 0): 2, (0, 1): 2, (0, 2): 2, (1, 0): 2}
    p = balanced_placement([0, 1], 3, 4, replicas=hot_expert_replicas(counts, 3, max_replicas=4))
    assert len(p.replicas(0, 0)) == max(len(r) for row in p.table for r in row)


def test_flat_spreads_all_pairs_evenly_even_with_more_shards_than_experts():
    # Behemoth-class on H100s: 72 layers x 16 experts over 55 shards, 20-21 pairs each.
    p = balanced_placement(range(72), 16, 55, strategy="flat")
    sizes = [sum(len(v) for v in p.experts_of(s).values()) for s in range(55)]
    assert sum(sizes) == 72 * 16 and max(sizes) - min(sizes) <= 1
    assert max(sizes) == -(-72 * 16 // 55)
    assert all(len(p.replicas(layer, e)) == 1 for layer in range(72) for e in range(16))
