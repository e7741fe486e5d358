"""The adapter cache keeps what it serves current with the store: events, the resync after a lost event feed,
the periodic resync, and requests in flight that finish on the version they started with (never a mix)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lf_testing import REDIS_URL, FreezableProxy, wait_until

from lorafleet.infra.adapter_maker import make_adapter
from lorafleet.infra.object_store import LocalDirObjectStore
from lorafleet.infra.redis_conn import connect
from lorafleet.infra.store import AdapterStore
from lorafleet.infra.store_source import StoreSource
from lorafleet.replicas import Engine, SamplingParams

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = "the quick brown fox"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ENGINE = {"kernel_backend": "torch", "max_num_seqs": 4, "kv_cache_bytes": 8 << 20}


@pytest.fixture(scope="module")
def versions(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two versions of one adapter whose greedy answers differ."""
    root = tmp_path_factory.mktemp("versions")
    return {v: make_adapter(root / v, tiny_model_dir, "lora", 8, ATTN, seed=seed) for v, seed in (("1", 11), ("2", 12))}


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, versions: dict[str, Path]) -> dict[str, list[int]]:
    """Greedy tokens of each version, from an offline engine that loads it from its directory."""
    with Engine.from_pretrained(tiny_model_dir, **ENGINE) as offline:
        out = {}
        for version, path in versions.items():
            offline.load_adapter(f"v{version}", path)
            out[version] = offline.generate(PROMPT, GREEDY, f"v{version}")[0].token_ids
    assert out["1"] != out["2"], "the two versions must answer differently for these tests to mean anything"
    return out


@pytest.fixture
def admin(tiny_model_dir, tmp_path, redis_prefix) -> AdapterStore:
    """The operator's store (pushes go straight to Redis and the object store)."""
    _, prefix = redis_prefix
    return AdapterStore(LocalDirObjectStore(tmp_path / "objects"), connect(REDIS_URL), prefix, base=tiny_model_dir)


def replica_engine(tiny_model_dir, admin: AdapterStore, redis_url: str, resync_s: float, **source_kwargs):
    """An engine whose adapter source reaches Redis at `redis_url` (a proxy the test can cut)."""
    store = AdapterStore(admin.objects, connect(redis_url, 1.0), admin.prefix, base=tiny_model_dir)
    source = StoreSource(store)
    return Engine.from_pretrained(tiny_model_dir, adapter_source=source, adapter_resync_s=resync_s, **ENGINE), source


def served(engine: Engine) -> list[int]:
    return engine.generate(PROMPT, GREEDY, "a")[0].token_ids


def test_an_update_missed_while_the_event_feed_was_cut_is_served_after_it_reconnects(
        tiny_model_dir, admin, versions, expected):
    admin.push("a", versions["1"])
    proxy = FreezableProxy(6379)
    engine, source = replica_engine(tiny_model_dir, admin, proxy.url, resync_s=3600)   # no periodic resync here
    try:
        listener = engine.adapters._subscription
        assert listener.wait_live()
        assert served(engine) == expected["1"] and engine.adapters.residency("a") == "device"
        proxy.cut()
        wait_until(lambda: not listener.is_live, 5, "the replica notices the lost event feed")
        admin.push("a", versions["2"])   # its 'updated' event is published while the replica cannot hear it
        time.sleep(0.3)
        assert served(engine) == expected["1"]   # cut off from Redis: keeps serving what it holds
        proxy.restore()
        # The reconnect delivers a resync: the replica asks the registry and replaces its stale copy.
        wait_until(lambda: engine.adapters.version("a") == "2", 10, "version 2 loaded after the reconnect")
        assert served(engine) == expected["2"]
        assert engine.adapters.info()["stale_replaced"] == 1
    finally:
        engine.close()
        source.close()
        proxy.close()


class DeafSource(StoreSource):
    """A store source whose event feed never delivers (pub/sub drops messages under a slow consumer)."""

    def subscribe(self, callback):
        return None


def test_the_periodic_resync_finds_an_update_no_event_announced(tiny_model_dir, admin, versions, expected):
    admin.push("a", versions["1"])
    store = AdapterStore(admin.objects, connect(REDIS_URL, 1.0), admin.prefix, base=tiny_model_dir)
    with Engine.from_pretrained(tiny_model_dir, adapter_source=DeafSource(store), adapter_resync_s=0.3,
                                **ENGINE) as engine:
        assert served(engine) == expected["1"]
        admin.push("a", versions["2"])
        wait_until(lambda: engine.adapters.version("a") == "2", 5, "the periodic resync loads version 2")
        assert served(engine) == expected["2"]
        admin.remove("a")
        wait_until(lambda: engine.adapters.residency("a") == "cold", 5, "the periodic resync drops a removed adapter")
        (out,) = engine.generate(PROMPT, GREEDY, "a")
        assert out.finish_reason == "error" and "removed" in str(out.error)


def test_a_request_in_flight_finishes_on_its_version_and_the_next_gets_the_new_one(
        tiny_model_dir, admin, versions, tmp_path):
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    with Engine.from_pretrained(tiny_model_dir, **ENGINE) as offline:
        offline.load_adapter("v1", versions["1"])
        offline.load_adapter("v2", versions["2"])
        want_v1, want_v2 = (offline.generate(PROMPT, long, a)[0].token_ids for a in ("v1", "v2"))
    assert want_v1 != want_v2
    admin.push("a", versions["1"])
    engine, source = replica_engine(tiny_model_dir, admin, REDIS_URL, resync_s=3600)
    try:
        assert engine.adapters._subscription.wait_live()
        first = engine.add_request(PROMPT, long, "a")
        outputs: dict[str, object] = {}

        def step() -> None:
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out

        while engine.adapters.residency("a") != "device" or len(engine.scheduler.running) == 0:
            step()
        for _ in range(5):   # a few tokens on version 1
            step()
        admin.push("a", versions["2"])   # the event arrives while `first` is decoding
        wait_until(lambda: engine.adapters.version("a") == "2", 10, "version 2 fetched")
        second = engine.add_request(PROMPT, long, "a")
        while len(outputs) < 2:
            step()
        assert outputs[first].token_ids == want_v1     # not one token from version 2
        assert outputs[second].token_ids == want_v2
        info = engine.adapters.info()   # version 1's rows were freed with its last pin: only version 2's 8 are used
        assert info["resident"] == ["a"] and info["free_rows"] == engine.adapters.pools.allocator.num_rows - 8
    finally:
        engine.close()
        source.close()
