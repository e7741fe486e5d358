"""Hot blob cache in Redis shared by all replicas: sha256 → bytes, a byte budget, least-recently-used eviction.

Keys under `{prefix}:hot:` — blob:{sha256} (the bytes), lru (zset sha256 → last use time), sizes (hash
sha256 → bytes counted), bytes (total counted). Entries are verified by the reader, never trusted.
"""

from __future__ import annotations

import time
from typing import Any

from lorafleet.infra.redis_conn import unavailable_as_error

# KEYS: blob, lru, sizes, total. ARGV: sha, now, budget, blob key prefix. Count a just-written blob once,
# then evict least recently used blobs until the total fits the budget. Returns the number evicted.
_ACCOUNT = """
local n = redis.call('STRLEN', KEYS[1])
if n == 0 then return 0 end
if redis.call('HSETNX', KEYS[3], ARGV[1], n) == 1 then redis.call('INCRBY', KEYS[4], n) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local evicted = 0
while total > tonumber(ARGV[3]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  local size = tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0')
  redis.call('DEL', ARGV[4] .. oldest[1])
  redis.call('ZREM', KEYS[2], oldest[1])
  redis.call('HDEL', KEYS[3], oldest[1])
  total = redis.call('DECRBY', KEYS[4], size)
  evicted = evicted + 1
end
return evicted
"""

# KEYS: blob, lru, sizes, total. ARGV: sha. Drop one blob (corrupt or purged) and its accounting.
_REMOVE = """
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then redis.call('DECRBY', KEYS[4], size) end
return size
"""


class HotCache:
    """Blobs by sha256 in Redis within `max_bytes` (0 disables it); LRU across every reader."""

    def __init__(self, client: Any, prefix: str, max_bytes: int) -> None:
        assert max_bytes >= 0, "max_bytes must be >= 0"
        self.redis = client
        self.max_bytes = max_bytes
        base = f"{prefix}:hot"
        self.blob_prefix = f"{base}:blob:"
        self.lru_key, self.sizes_key, self.total_key = f"{base}:lru", f"{base}:sizes", f"{base}:bytes"
        self._account = client.register_script(_ACCOUNT)
        self._remove = client.register_script(_REMOVE)

    @property
    def is_enabled(self) -> bool:
        return self.max_bytes > 0

    def _keys(self, sha256: str) -> list[str]:
        return [self.blob_prefix + sha256, self.lru_key, self.sizes_key, self.total_key]

    def get_many(self, shas: list[str]) -> dict[str, bytes]:
        """{sha: bytes} for the blobs present (one round trip); marks them recently used."""
        if not self.is_enabled or not shas:
            return {}
        with unavailable_as_error(self.redis, "hot cache (read)"):
            pipe = self.redis.pipeline(transaction=False)
            for sha in shas:
                pipe.get(self.blob_prefix + sha)
            pipe.zadd(self.lru_key, {sha: time.time() for sha in shas}, xx=True)
            *blobs, _ = pipe.execute()
        return {sha: blob for sha, blob in zip(shas, blobs, strict=True) if blob is not None}

    def can_put(self, num_bytes: int) -> bool:
        return 0 < num_bytes <= self.max_bytes

    def put(self, sha256: str, data: bytes) -> bool:
        """Cache `data` (whose sha256 the caller has verified); False if it cannot fit the budget at all."""
        if not self.can_put(len(data)):
            return False
        with unavailable_as_error(self.redis, "hot cache (write)"):
            # MULTI/EXEC: the blob and its accounting land together; the bytes never pass through Lua.
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.blob_prefix + sha256, data, nx=True)
            self._account(keys=self._keys(sha256), args=[sha256, time.time(), self.max_bytes, self.blob_prefix],
                          client=pipe)
            pipe.execute()
        return True

    def remove(self, sha256: str) -> None:
        with unavailable_as_error(self.redis, "hot cache (remove)"):
            self._remove(keys=self._keys(sha256), args=[sha256])

    def num_bytes(self) -> int:
        with unavailable_as_error(self.redis, "hot cache (size)"):
            return int(self.redis.get(self.total_key) or 0)
