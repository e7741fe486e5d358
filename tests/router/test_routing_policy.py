"""Routing policies (pure: tiers, table sampling, consistent hash, fallbacks) and TableCache on a real Redis."""

from __future__ import annotations

import math
import random
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.placement.routing_table import RoutingTable, default_replica, jump_hash, stable_hash64
from lorafleet.placement.table_store import RoutingTableStore
from lorafleet.router.request_router import TableCache, ViewCache, replica_view
from lorafleet.router.routing_policy import (
    POLICIES,
    AffinityPolicy,
    RandomPolicy,
    RankAwarePolicy,
    ReplicaView,
)

pytestmark = pytest.mark.timeout(120)

REDIS_URL = "redis://127.0.0.1:6379/0"
CLOSED_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused at once
ADAPTERS = ["a", "b", "c", "zeta-7", "never-placed"]
NUM_TABLE_REPLICAS = 16


def within_5_sigma(count: int, n: int, p: float) -> bool:
    """|count - n p| <= 5 sd of Binomial(n, p): a false failure about once in 1.7 million runs."""
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def flat(tiers: list[list[ReplicaView]]) -> list[ReplicaView]:
    return [r for tier in tiers for r in tier]


# -- strategies ---------------------------------------------------------------------------------------
@st.composite
def replica_lists(draw) -> list[ReplicaView]:
    ranks = draw(st.lists(st.integers(0, NUM_TABLE_REPLICAS + 3), max_size=12, unique=True))
    return [ReplicaView(rank=None if draw(st.integers(0, 4)) == 0 else rank,  # ~1 in 5 without stats yet
                        queue_len=draw(st.integers(0, 20)),
                        resident=frozenset(draw(st.sets(st.sampled_from(ADAPTERS), max_size=3))))
            for rank in ranks]


@st.composite
def tables(draw) -> RoutingTable:
    entries = {}
    for adapter_id in ("a", "b", "c"):
        ranks = draw(st.lists(st.integers(0, NUM_TABLE_REPLICAS - 1), min_size=1, max_size=4, unique=True))
        weights = draw(st.lists(st.integers(1, 100), min_size=len(ranks), max_size=len(ranks)))
        entries[adapter_id] = [[r, w] for r, w in zip(ranks, weights, strict=True)]
    return RoutingTable.from_dict({"num_replicas": NUM_TABLE_REPLICAS, "entries": entries})  # renormalises


def views(*ranks: int | None, queue: dict[int | None, int] | None = None) -> list[ReplicaView]:
    return [ReplicaView(rank=r, queue_len=(queue or {}).get(r, 0)) for r in ranks]


# -- every policy: tiers are a partition of the live replicas -----------------------------------------
@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(sorted(POLICIES)), replicas=replica_lists(),
       adapter_id=st.one_of(st.none(), st.just(""), st.sampled_from(ADAPTERS)),
       table=st.one_of(st.none(), tables()), seed=st.integers(0, 2**32))
def test_tiers_cover_every_live_replica_exactly_once(policy, replicas, adapter_id, table, seed):
    tiers = POLICIES[policy]().choose(adapter_id, replicas, table, random.Random(seed))
    chosen = flat(tiers)
    assert len(chosen) == len(replicas)
    assert sorted(map(id, chosen)) == sorted(map(id, replicas))  # each object once, nothing invented
    assert all(tiers), "no empty tiers"
    if not replicas:
        assert tiers == []


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(sorted(POLICIES)), replicas=replica_lists().filter(bool),
       adapter_id=st.sampled_from(ADAPTERS), table=st.one_of(st.none(), tables()), seed=st.integers(0, 2**32))
def test_first_tier_is_the_target_then_holders_then_others_least_queued_first(policy, replicas, adapter_id,
                                                                               table, seed):
    chooser = POLICIES[policy]()
    target = chooser.target(adapter_id, replicas, table, random.Random(seed))
    tiers = chooser.choose(adapter_id, replicas, table, random.Random(seed))  # same draws as target()
    first = [r for r in replicas if r.rank is not None and r.rank == target]
    if first:
        assert tiers[0] == first
        tiers = tiers[1:]
    assert not any(r.rank is not None and r.rank == target for r in flat(tiers))
    assert len(tiers) <= 2
    for tier in tiers:
        holds = {adapter_id in r.resident for r in tier}
        assert len(holds) == 1, "a fallback tier mixes holders and non-holders"
        assert [r.queue_len for r in tier] == sorted(r.queue_len for r in tier)
    if len(tiers) == 2:
        assert adapter_id in tiers[0][0].resident and adapter_id not in tiers[1][0].resident


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("adapter_id", [None, ""])
def test_base_model_requests_go_least_loaded_first(policy, adapter_id):
    replicas = views(0, 1, 2, None, queue={0: 5, 1: 0, 2: 9, None: 3})
    tiers = POLICIES[policy]().choose(adapter_id, replicas, None, random.Random(0))
    assert len(tiers) == 1
    assert [r.queue_len for r in tiers[0]] == [0, 3, 5, 9]


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("adapter_id", [None, "a"])
def test_no_replicas_no_tiers(policy, adapter_id):
    table = RoutingTable(2, {"a": ((0, 1.0),)})
    assert POLICIES[policy]().choose(adapter_id, [], table, random.Random(0)) == []


def test_policies_register_by_name():
    assert set(POLICIES) == {"rank-aware", "random", "affinity"}
    assert all(POLICIES[name].name == name for name in POLICIES)


# -- rank-aware: the table's probabilities, the consistent-hash default for unknown adapters ----------
def test_rank_aware_follows_the_table_probabilities_when_queues_are_equal():
    probabilities = {0: 0.1, 2: 0.25, 3: 0.65}
    table = RoutingTable(5, {"hot": tuple(probabilities.items())}, version=3)
    replicas = views(0, 1, 2, 3, 4, queue={0: 5, 2: 5, 3: 5})
    rng, policy, n = random.Random(1234), RankAwarePolicy(), 20_000
    counts = Counter(policy.choose("hot", replicas, table, rng)[0][0].rank for _ in range(n))
    assert set(counts) <= set(probabilities), "only replicas in the table's entry come first"
    for rank, p in probabilities.items():
        assert within_5_sigma(counts[rank], n, p), (rank, counts[rank], n * p)


def test_rank_aware_prefers_the_shorter_queue_of_two_weighted_draws():
    """Power of two choices within the table: two different replicas drawn with the table's weights (the second
    among the rest), the shorter queue wins: the longest queue never, the middle one only against the longest."""
    table = RoutingTable(5, {"hot": ((0, 0.1), (2, 0.25), (3, 0.65))})
    replicas = views(0, 1, 2, 3, 4, queue={0: 40, 2: 10, 3: 1})
    rng, policy, n = random.Random(99), RankAwarePolicy(), 20_000
    counts = Counter(policy.choose("hot", replicas, table, rng)[0][0].rank for _ in range(n))
    p_middle = 0.1 * 0.25 / 0.9 + 0.25 * 0.1 / 0.75   # {0, 2} drawn, in either order
    expected = {0: 0.0, 2: p_middle, 3: 1 - p_middle}
    assert counts[0] == 0
    for rank, p in expected.items():
        assert within_5_sigma(counts[rank], n, p), (rank, counts[rank], n * p)
    dead = views(0, 1, 2, 4, queue={0: 40, 2: 10})   # rank 3 has no live replica: the other draw wins
    counts = Counter(policy.choose("hot", dead, table, rng)[0][0].rank for _ in range(n))
    assert counts[3] < 0.65 ** 2 * n + 5 * (n * 0.65 ** 2 * (1 - 0.65 ** 2)) ** 0.5


@settings(max_examples=100, deadline=None)
@given(adapter_id=st.text(min_size=1, max_size=40).filter(lambda a: a not in ("a", "b", "c")),
       table=tables(), seed=st.integers(0, 2**32))
def test_rank_aware_unknown_adapter_uses_the_consistent_hash_default(adapter_id, table, seed):
    replicas = views(*range(NUM_TABLE_REPLICAS))
    tiers = RankAwarePolicy().choose(adapter_id, replicas, table, random.Random(seed))
    assert [r.rank for r in tiers[0]] == [default_replica(adapter_id, NUM_TABLE_REPLICAS)]


def test_rank_aware_target_not_live_falls_back_to_holders_then_others():
    table = RoutingTable(4, {"x": ((3, 1.0),)})  # rank 3 is dead: Serve left it out of the candidates
    replicas = [ReplicaView(0, 7), ReplicaView(1, 2, frozenset({"x"})), ReplicaView(2, 0),
                ReplicaView(None, 1, frozenset({"x"})), ReplicaView(None, 0)]
    tiers = RankAwarePolicy().choose("x", replicas, table, random.Random(0))
    assert [[(r.rank, r.queue_len) for r in tier] for tier in tiers] == [
        [(None, 1), (1, 2)],           # holders, least queued first; a replica with no stats yet included
        [(2, 0), (None, 0), (0, 7)],  # then every other live replica
    ]


def test_rank_aware_without_a_table_is_affinity():
    replicas = views(0, 1, 2, 5, None)
    for adapter_id in ADAPTERS:
        rank_aware = RankAwarePolicy().target(adapter_id, replicas, None, random.Random(0))
        assert rank_aware == AffinityPolicy().target(adapter_id, replicas, None, random.Random(1))


def test_replicas_without_a_rank_never_come_first_but_are_in_the_fallback():
    replicas = views(None, None, 4, queue={4: 3})
    only_unranked = views(None, None)
    table = RoutingTable(8, {"a": ((4, 1.0),)})
    for name, policy in POLICIES.items():
        tiers = policy().choose("a", replicas, table, random.Random(0))
        assert [[r.rank for r in tier] for tier in tiers] == [[4], [None, None]], name
        tiers = policy().choose("a", only_unranked, table, random.Random(0))
        assert [[r.rank for r in tier] for tier in tiers] == [[None, None]], name


def test_fallback_tiers_order():
    replicas = [ReplicaView(0, 9, frozenset({"a"})), ReplicaView(1, 1), ReplicaView(2, 4, frozenset({"a", "b"})),
                ReplicaView(3, 0)]
    table = RoutingTable(4, {"a": ((1, 1.0),)})
    first, holders, others = RankAwarePolicy().choose("a", replicas, table, random.Random(0))
    assert [r.rank for r in first] == [1]
    assert [r.rank for r in holders] == [2, 0]
    assert [r.rank for r in others] == [3]


def test_replicas_that_cannot_run_the_adapter_are_left_out_while_any_can():
    # Rank 0, the table's choice, is dead; of the rest the shortest queues cannot run a rank-32 adapter (rank 1: a
    # vLLM replica of class 8) or cannot run FLoRA (rank 3: vLLM), so the fallback must skip them for those.
    table = RoutingTable(5, {"x": ((0, 1.0),)})
    small = ReplicaView(1, 0, frozenset({"x"}), max_rank=8, adapter_types=("LORA",))
    big = ReplicaView(2, 9, max_rank=64)
    vllm_big = ReplicaView(3, 1, max_rank=64, adapter_types=("LORA",))
    unknown = ReplicaView(4, 5)   # no capability reported yet: assumed able
    replicas = [small, big, vllm_big, unknown]

    def ranks(rank, peft_type):
        tiers = RankAwarePolicy().choose("x", replicas, table, random.Random(0), rank, peft_type)
        return [[r.rank for r in tier] for tier in tiers]

    assert ranks(32, "LORA") == [[3, 4, 2]]
    assert ranks(8, "FLORA") == [[4, 2]]
    assert ranks(8, "LORA") == [[1], [3, 4, 2]]   # rank 8 runs on the class-8 replica, which holds it
    assert ranks(None, None) == [[1], [3, 4, 2]]   # facts unknown (registry down): every replica
    assert ranks(128, "LORA") == [[4]]   # only the one that has not said what it runs
    replicas.remove(unknown)
    assert ranks(128, "LORA") == [[1], [3, 2]]   # none can: every replica (the chosen one says why)
    replicas.append(unknown)
    # The table's own target is dropped as well when it cannot run the adapter (an outdated table).
    table = RoutingTable(5, {"x": ((1, 1.0),)})
    tiers = RankAwarePolicy().choose("x", replicas, table, random.Random(0), 16, "LORA")
    assert [[r.rank for r in tier] for tier in tiers] == [[3, 4, 2]]


# -- affinity and random ------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(adapter_id=st.text(min_size=1, max_size=40), ranks=st.sets(st.integers(0, 64), min_size=1, max_size=10),
       seeds=st.tuples(st.integers(0, 2**32), st.integers(0, 2**32)), order_seed=st.integers(0, 1000))
def test_affinity_is_stable_across_calls_rngs_and_candidate_order(adapter_id, ranks, seeds, order_seed):
    replicas = views(*ranks)
    shuffled = replicas[:]
    random.Random(order_seed).shuffle(shuffled)
    first = AffinityPolicy().choose(adapter_id, replicas, None, random.Random(seeds[0]))[0]
    again = AffinityPolicy().choose(adapter_id, shuffled, None, random.Random(seeds[1]))[0]
    assert [r.rank for r in first] == [r.rank for r in again]
    live = sorted(ranks)
    assert first[0].rank == live[jump_hash(stable_hash64(adapter_id), len(live))]


def test_affinity_moves_few_adapters_when_a_replica_joins():
    ids = [f"adapter-{i}" for i in range(3000)]
    before = {a: AffinityPolicy().target(a, views(*range(8)), None, random.Random(0)) for a in ids}
    after = {a: AffinityPolicy().target(a, views(*range(9)), None, random.Random(0)) for a in ids}
    moved = [a for a in ids if before[a] != after[a]]
    assert all(after[a] == 8 for a in moved), "jump hash only moves keys onto the new replica"
    assert within_5_sigma(len(moved), len(ids), 1 / 9)


def test_random_policy_is_uniform_over_ranked_replicas():
    replicas = views(0, 3, 7, None)
    rng, n = random.Random(99), 12_000
    counts = Counter(RandomPolicy().choose("a", replicas, None, rng)[0][0].rank for _ in range(n))
    assert set(counts) == {0, 3, 7}
    assert all(within_5_sigma(counts[r], n, 1 / 3) for r in (0, 3, 7)), counts


def test_replica_view_reads_routing_stats():
    fresh = replica_view(SimpleNamespace(routing_stats={}))  # a replica that has not reported yet
    assert (fresh.rank, fresh.queue_len, fresh.resident) == (None, 0, frozenset())
    odd = replica_view(SimpleNamespace(routing_stats={"rank": "3", "queue_len": 2}))
    assert odd.rank is None and odd.queue_len == 2
    full = SimpleNamespace(routing_stats={"rank": 2, "queue_len": 5, "resident_adapters": ["a", "b"]})
    view = replica_view(full)
    assert (view.rank, view.queue_len, view.resident, view.replica) == (2, 5, frozenset({"a", "b"}), full)
    # Before its first stats report, the rank the replica recorded at start (record_replica_metadata).
    new = replica_view(SimpleNamespace(routing_stats={}, replica_metadata={"rank": 1}))
    assert new.rank == 1 and new.queue_len == 0
    assert replica_view(SimpleNamespace(routing_stats={}, replica_metadata={"rank": True})).rank is None
    able = replica_view(SimpleNamespace(routing_stats={"rank": 0, "max_rank": 8, "adapter_types": ["LORA"]}))
    assert (able.max_rank, able.adapter_types) == (8, ("LORA",))
    odd = replica_view(SimpleNamespace(routing_stats={"rank": 0, "max_rank": "8", "adapter_types": "LORA"}))
    assert (odd.max_rank, odd.adapter_types) == (None, ())


def test_the_request_router_routes_by_the_rank_and_type_the_request_carries():
    """LoRAFleetRequestRouter.choose_replicas reads the GenerateRequest Serve hands it (the first argument)."""
    import asyncio

    from lorafleet.infra.replica_api import GenerateRequest
    from lorafleet.router.request_router import LoRAFleetRequestRouter

    router = LoRAFleetRequestRouter.__new__(LoRAFleetRequestRouter)
    router.initialize_state(policy="affinity", redis_url=None, seed=0)
    replicas = [SimpleNamespace(routing_stats={"rank": r, "queue_len": q, "max_rank": m, "adapter_types": t})
                for r, q, m, t in ((0, 0, 8, ["LORA"]), (1, 3, 64, ["LORA"]), (2, 5, 64, []))]

    def chosen(rank, peft_type):
        request = GenerateRequest("r", "x", prompt="hi", adapter_rank=rank, adapter_type=peft_type)
        pending = SimpleNamespace(args=[request], kwargs={}, metadata=SimpleNamespace(multiplexed_model_id="x"))
        tiers = asyncio.run(router.choose_replicas(replicas, pending))
        return sorted(r.routing_stats["rank"] for tier in tiers for r in tier)

    assert chosen(16, "LORA") == [1, 2]
    assert chosen(16, "IA3") == [2]
    assert chosen(None, None) == [0, 1, 2]


def test_view_cache_rebuilds_a_view_only_when_its_stats_change():
    a = SimpleNamespace(routing_stats={"rank": 0, "queue_len": 1, "resident_adapters": ["x"]})
    b = SimpleNamespace(routing_stats={"rank": 1, "queue_len": 0})
    cache = ViewCache()
    first = cache.views([a, b])
    assert [(v.rank, v.queue_len, v.resident, v.replica) for v in first] == [(0, 1, frozenset({"x"}), a),
                                                                            (1, 0, frozenset(), b)]
    again = cache.views([b, a])   # same stats objects: the same views, in the candidates' order
    assert again[0] is first[1] and again[1] is first[0]
    a.routing_stats = {"rank": 0, "queue_len": 7, "resident_adapters": ["x", "y"]}   # Serve's next report
    fresh = cache.views([a, b])
    assert fresh[0] is not first[0] and (fresh[0].queue_len, fresh[0].resident) == (7, frozenset({"x", "y"}))
    assert fresh[1] is first[1]
    others = [SimpleNamespace(routing_stats={"rank": i}) for i in range(40)]   # a and b gone, 40 new replicas
    cache.views(others)
    assert len(cache._views) <= 2 * len(others) + 16
    assert [v.rank for v in cache.views(others[:3])] == [0, 1, 2]
    assert len(cache._views) == 3   # the replicas no longer among the candidates were dropped


# -- TableCache on Redis ------------------------------------------------------------------------------
def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval_s)




def table_v(version_tag: int) -> RoutingTable:
    return RoutingTable(4, {"a": ((0, 0.5), (version_tag % 4, 0.5)) if version_tag % 4 else ((0, 1.0),)})


def test_table_cache_picks_up_a_new_version_after_refresh_s(redis_prefix):
    client, prefix = redis_prefix
    store = RoutingTableStore(client, prefix)
    cache = TableCache(REDIS_URL, prefix, refresh_s=1.5)
    assert cache.get() is None  # nothing published; the first read runs on a worker thread
    first = store.publish(table_v(1))
    t_read = time.monotonic()
    assert cache.refresh_now().version == first.version
    second = store.publish(table_v(2))
    assert cache.get().version == first.version  # within refresh_s: the cached table, no Redis round trip
    table = wait_for(lambda: (t := cache.get()) is not None and t.version == second.version and t, 10.0)
    assert time.monotonic() - t_read >= 1.5
    assert table.entries == second.entries
    assert cache.get() is table  # the same object until the version changes


def test_the_first_request_after_a_quiet_spell_sees_a_table_published_meanwhile(redis_prefix):
    client, prefix = redis_prefix
    store = RoutingTableStore(client, prefix)
    cache = TableCache(REDIS_URL, prefix, refresh_s=0.05)
    try:
        assert cache.get() is None   # the first request starts the poller
        published = store.publish(table_v(1))
        time.sleep(0.5)   # no request meanwhile
        table = cache.get()
        assert table is not None and table.version == published.version
    finally:
        cache.close()


def test_table_cache_survives_a_bad_table(redis_prefix):
    client, prefix = redis_prefix
    store = RoutingTableStore(client, prefix)
    good = store.publish(table_v(1))
    cache = TableCache(REDIS_URL, prefix, refresh_s=0.05)
    assert cache.refresh_now().version == good.version
    client.set(store.table_key, b"{not json")
    client.incr(store.version_key)
    time.sleep(0.1)
    for _ in range(20):  # several background refreshes, each failing to parse
        assert cache.get().version == good.version
        time.sleep(0.02)
    assert cache.refresh_now().version == good.version


def test_table_cache_with_redis_unreachable_never_raises():
    cache = TableCache(CLOSED_URL, "lftest-router-closed", refresh_s=0.0)
    t0 = time.monotonic()
    for _ in range(50):
        assert cache.get() is None
    assert time.monotonic() - t0 < 1.0, "get() never waits on Redis"
    assert cache.refresh_now() is None
    assert TableCache(None, "x").get() is None  # no Redis configured: no table, the policies' default


class ThrowawayRedis:
    """A private redis-server (no persistence) on a free port, killed by the test to take Redis down."""

    def __init__(self, tmp_path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server binary not on PATH")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._pong, 10.0, 0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def test_table_cache_keeps_the_last_table_when_redis_goes_down(tmp_path):
    import redis

    server = ThrowawayRedis(tmp_path)
    try:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)
        published = RoutingTableStore(client, "t").publish(table_v(3))
        cache = TableCache(server.url, "t", refresh_s=0.02)
        wait_for(lambda: cache.get() is not None)
        server.stop()
        errors: list[BaseException] = []

        def hammer() -> None:
            try:
                for _ in range(100):
                    assert cache.get().version == published.version
                    time.sleep(0.005)
            except BaseException as exc:  # surfaced below: get() must not raise on any thread
                errors.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors
        assert cache.refresh_now().version == published.version
        assert cache.get().sample("a", random.Random(0)) in (0, 3)
    finally:
        server.stop()
