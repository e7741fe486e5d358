"""Redis hot blob cache: byte budget, least-recently-used eviction, exact accounting, shared by clients."""

from __future__ import annotations

import hashlib
import os
import threading

from lorafleet.infra.hot_cache import HotCache


def blob(num_bytes: int) -> tuple[str, bytes]:
    data = os.urandom(num_bytes)
    return hashlib.sha256(data).hexdigest(), data


def test_budget_and_lru_eviction(redis_client, prefix):
    cache = HotCache(redis_client, prefix, max_bytes=3000)
    (a, da), (b, db), (c, dc) = blob(1000), blob(1000), blob(1000)
    for sha, data in ((a, da), (b, db), (c, dc)):
        assert cache.put(sha, data)
    assert cache.num_bytes() == 3000
    assert cache.get_many([a]) == {a: da}  # a is now the most recently used
    d, dd = blob(1500)
    cache.put(d, dd)
    assert cache.get_many([a, b, c, d]) == {a: da, d: dd}  # b and c (least recent) made room
    assert cache.num_bytes() == 2500
    assert not cache.put(*blob(3001))  # never fits: not cached, nothing evicted
    assert cache.num_bytes() == 2500
    cache.remove(a)
    cache.remove(a)
    assert cache.num_bytes() == 1500 and cache.get_many([a]) == {}


def test_repeated_put_counts_once(redis_client, prefix):
    cache = HotCache(redis_client, prefix, max_bytes=10_000)
    sha, data = blob(1000)
    for _ in range(3):
        cache.put(sha, data)
    assert cache.num_bytes() == 1000


def test_concurrent_writers_keep_exact_accounting(redis_client, prefix):
    cache = HotCache(redis_client, prefix, max_bytes=20_000)
    blobs = [blob(1000) for _ in range(40)]

    def writer(offset: int) -> None:
        for i in range(40):
            cache.put(*blobs[(i + offset) % 40])

    threads = [threading.Thread(target=writer, args=(k * 7,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    present = cache.get_many([sha for sha, _ in blobs])
    assert cache.num_bytes() == 1000 * len(present) <= 20_000
    assert all(hashlib.sha256(data).hexdigest() == sha for sha, data in present.items())


def test_disabled_cache(redis_client, prefix):
    cache = HotCache(redis_client, prefix, max_bytes=0)
    sha, data = blob(10)
    assert not cache.is_enabled and not cache.put(sha, data) and cache.get_many([sha]) == {}
