"""Expert parallelism through real Ray actors on simulated nodes and real gloo groups: the same numbers as
the in-process experts, with 1, 2 and 4 shards, with and without replicas, for two routers at once.

The simulated nodes share this host, so by default payloads go through shared memory; each test that moves
rows runs twice, once that way ("shm") and once with every payload over the group ("network", as between
real hosts). The two runs share one fleet."""

import glob
import os
import signal
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster import shm as shm_buffers  # noqa: E402
from cluster.fleet import FleetSpec, start_fleet, stop_fleet  # noqa: E402
from cluster.local_cluster import start_local_cluster  # noqa: E402
from models.checkpoint_writer import make_checkpoint  # noqa: E402
from models.config import load_config  # noqa: E402
from models.generate import greedy_generate  # noqa: E402
from models.loading import load_model  # noqa: E402
from router.distributed_experts import ExpertExchangeError  # noqa: E402
from router.fleet_client import SHM_ENV, connect_experts  # noqa: E402
from router.replica import RouterReplica  # noqa: E402

NEW_TOKENS = 24
PATHS = pytest.mark.parametrize("shm", [True, False], ids=["shm", "network"])


@pytest.fixture(scope="module")
def cluster():
    lc = start_local_cluster(num_nodes=2)
    yield lc
    lc.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 8 experts on every layer: enough to spread over 4 shards with replicas.
    return str(make_checkpoint(tmp_path_factory.mktemp("ep"), "tiny", seed=11,
                               overrides=dict(num_local_experts=8), dtype=torch.float32))


@pytest.fixture(scope="module")
def local_model(ckpt):
    return load_model(ckpt)


def _prompts(n=2, length=20, seed=0):
    return torch.randint(3, 400, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def no_shared_files_left():
    """Every router-shard buffer file is unlinked once its exchange is answered, failed, or the router left."""
    pattern = os.path.join(shm_buffers.SHM_DIR, shm_buffers.FILE_PREFIX + "*")
    before = set(glob.glob(pattern))
    yield
    assert set(glob.glob(pattern)) - before == set()


@pytest.fixture(scope="module")
def fleet_factory(cluster, ckpt):
    """A fleet by name; asking for the same name again (the other exchange path) reuses it. One up at a time."""
    current = {}

    def make(name, **kw):
        if name not in current:
            for f in current.values():
                stop_fleet(f)
            current.clear()
            spec = FleetSpec(checkpoint=ckpt, node_ids=tuple(cluster.node_ids), shard_cpus=0.05, **kw)
            current[name] = start_fleet(spec, name=name)
        return current[name]

    yield make
    for f in current.values():
        stop_fleet(f)


def _connect(fleet, cfg, shm, timeout_s=20):
    experts = connect_experts(fleet, cfg.hidden_size, torch.float32, timeout_s=timeout_s, shm=shm)
    assert experts.payload_paths == ("shm" if shm else "group",) * experts.placement.num_shards
    return experts


@PATHS
@pytest.mark.parametrize("num_shards,strategy,replicas", [
    (1, "contiguous", ()),
    (2, "contiguous", ()),
    (4, "round_robin", ()),
    (2, "contiguous", ((0, 1, 2), (1, 5, 2))),
    (4, "contiguous", ((0, 0, 3), (2, 7, 2), (3, 3, 4))),
], ids=["1shard", "2shards", "4shards-rr", "2shards-replicas", "4shards-replicas"])
def test_same_logits_and_greedy_as_local(fleet_factory, ckpt, local_model, num_shards, strategy, replicas, shm):
    fleet = fleet_factory(f"fleet-{num_shards}-{strategy}-{len(replicas)}", num_shards=num_shards,
                          strategy=strategy, replicas=replicas)
    info = ray.get(fleet.info.remote())
    if num_shards > 1:
        assert len({s["node_id"] for s in info["shards"]}) == 2  # the shards really sit on two nodes
    cfg = load_config(ckpt)
    experts = _connect(fleet, cfg, shm)
    try:
        model = load_model(ckpt, experts=experts)
        prompt = _prompts()
        with torch.inference_mode():
            diff = (model(prompt) - local_model(prompt)).abs().max().item()
        assert diff < 1e-5
        assert torch.equal(greedy_generate(model, prompt, NEW_TOKENS), greedy_generate(local_model, prompt, NEW_TOKENS))
    finally:
        experts.close()


def _origin_rows(T, cfg):
    """Row t is (t + 1) / T everywhere: a row that comes back to another token changes the result."""
    x_TD = (torch.arange(T, dtype=torch.float32)[:, None] + 1) / T * torch.ones(T, cfg.hidden_size)
    return x_TD, torch.arange(T)[:, None] % cfg.num_local_experts, torch.full((T, 1), 0.5)


def _check_layer_1(experts, local_model, fleet, x_TD, ids_TK, scores_TK):
    before = [s["rows_served"].get(1, 0) for s in ray.get(fleet.stats.remote())]
    y = experts.combine(experts.dispatch(1, x_TD, ids_TK, scores_TK))
    ref = local_model.experts.combine(local_model.experts.dispatch(1, x_TD, ids_TK, scores_TK))
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    after = [s["rows_served"].get(1, 0) for s in ray.get(fleet.stats.remote())]
    assert sum(a - b for a, b in zip(after, before)) == x_TD.shape[0]  # every row served exactly once


@PATHS
def test_rows_that_name_their_origin_come_back_to_it(fleet_factory, ckpt, local_model, shm):
    fleet = fleet_factory("fleet-origin", num_shards=3, replicas=((1, 2, 2),))
    cfg = load_config(ckpt)
    experts = _connect(fleet, cfg, shm)
    try:
        x_TD, ids_TK, scores_TK = _origin_rows(64, cfg)
        _check_layer_1(experts, local_model, fleet, x_TD, ids_TK, scores_TK)
        # empty batches still keep every shard in step
        empty = experts.combine(experts.dispatch(1, x_TD[:0], ids_TK[:0], scores_TK[:0]))
        assert empty.shape == (0, cfg.hidden_size)
        _check_layer_1(experts, local_model, fleet, x_TD, ids_TK, scores_TK)
    finally:
        experts.close()


def test_shared_buffers_grow_and_too_large_layers_go_over_the_group(fleet_factory, ckpt, local_model,
                                                                     monkeypatch):
    fleet = fleet_factory("fleet-origin", num_shards=3, replicas=((1, 2, 2),))
    cfg = load_config(ckpt)
    experts = _connect(fleet, cfg, shm=True)
    try:
        assert experts.buffer_rows == (0, 0, 0)  # made on first use
        for T in (8, 600, 8):
            _check_layer_1(experts, local_model, fleet, *_origin_rows(T, cfg))
        assert min(experts.buffer_rows) > shm_buffers.MIN_ROWS  # 600 rows over 3 shards: every buffer grew
    finally:
        experts.close()
    # A router whose buffers may hold at most MIN_ROWS rows: the big layer goes over the group instead.
    monkeypatch.setattr(shm_buffers, "MAX_BYTES", 3 * shm_buffers.MIN_ROWS * cfg.hidden_size * 4)
    experts = _connect(fleet, cfg, shm=True)
    try:
        for T in (8, 600, 8):
            _check_layer_1(experts, local_model, fleet, *_origin_rows(T, cfg))
        assert experts.buffer_rows == (shm_buffers.MIN_ROWS,) * 3
    finally:
        experts.close()


@PATHS
def test_two_routers_share_the_shards_at_once(fleet_factory, ckpt, local_model, shm):
    fleet_factory("fleet-shared", num_shards=2)
    replica_cls = ray.remote(num_cpus=0.05, runtime_env={"env_vars": {SHM_ENV: "1" if shm else "0"}})(RouterReplica)
    routers = [replica_cls.remote(ckpt, "fleet-shared") for _ in range(2)]
    try:
        paths = ray.get([r.__ray_call__.remote(lambda self: self.experts.payload_paths) for r in routers])
        assert paths == [("shm" if shm else "group",) * 2] * 2
        prompts = [_prompts(1, 17, seed=1).tolist(), _prompts(2, 9, seed=2).tolist()]
        refs = [r.greedy.remote(p, NEW_TOKENS) for r, p in zip(routers, prompts)]  # both in flight together
        for p, got in zip(prompts, ray.get(refs)):
            assert got == greedy_generate(local_model, torch.tensor(p), NEW_TOKENS).tolist()
        groups = ray.get(ray.get_actor("fleet-shared").stats.remote())[0]["groups"]
        assert len(groups) == 2  # one group per router (the other run's routers have left)
    finally:
        ray.get([r.close.remote() for r in routers])
        for r in routers:
            ray.kill(r)


def test_no_ray_call_on_the_per_token_path(fleet_factory, ckpt, monkeypatch):
    fleet = fleet_factory("fleet-noray", num_shards=2)
    cfg = load_config(ckpt)
    experts = connect_experts(fleet, cfg.hidden_size, torch.float32, timeout_s=20)
    try:
        model = load_model(ckpt, experts=experts)
        calls = []
        original = ray.actor.ActorMethod._remote
        monkeypatch.setattr(ray.actor.ActorMethod, "_remote", lambda *a, **k: calls.append(a) or original(*a, **k))
        monkeypatch.setattr(ray, "get", lambda *a, **k: calls.append(a) or pytest.fail("ray.get on the hot path"))
        greedy_generate(model, _prompts(), 8)
        assert calls == []
    finally:
        monkeypatch.undo()
        experts.close()


@PATHS
def test_a_shard_that_stops_answering_is_an_error_within_the_timeout(fleet_factory, ckpt, shm):
    fleet = fleet_factory("fleet-hang", num_shards=2)
    cfg = load_config(ckpt)
    experts = _connect(fleet, cfg, shm, timeout_s=3)
    model = load_model(ckpt, experts=experts)
    pid = ray.get(fleet.info.remote())["shards"][1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but silent: the worst case for a hang
    try:
        t0 = time.monotonic()
        with pytest.raises(ExpertExchangeError, match="timed out after 3 s"):
            greedy_generate(model, _prompts(), 4)
        assert time.monotonic() - t0 < 3 + 5
    finally:
        os.kill(pid, signal.SIGCONT)
        experts.close()
