"""Lua scripts of the adapter registry: each registry change is one script, so it is atomic and its event
is published in the same step (no reader ever sees a version without its record, or misses its event)."""

from __future__ import annotations

# KEYS: seq. ARGV: floor. Next version number, at least floor + 1 (floor = highest version the object store holds).
ALLOCATE = """
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
return v
"""

# KEYS: seq. ARGV: floor. The version counter at least `floor` (a rebuild: numbers of damaged manifests stay used).
RAISE_SEQ = """
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: registry, versions, deleted, epoch, purging, marker. ARGV: id, version, record, epoch seen before the
# blobs were written, channel, event, now, purge grace seconds, refs key prefix, sha256...
# Returns {'ok'} | {'lost'} (no marker: Redis lost the registry, rebuild it first) | {'retry', why} (a purge may
# have deleted our blobs) | {'conflict', newer version}.
REGISTER = """
if redis.call('EXISTS', KEYS[6]) == 0 then return {'lost'} end
local epoch = redis.call('GET', KEYS[4]) or '0'
if epoch ~= ARGV[4] then return {'retry', 'a purge ran while the blobs were written'} end
local fresh = tonumber(ARGV[7]) - tonumber(ARGV[8])
for i = 10, #ARGV do
  local t = redis.call('ZSCORE', KEYS[5], ARGV[i])
  if t and tonumber(t) > fresh then return {'retry', 'blob ' .. ARGV[i] .. ' is being purged'} end
end
local v = tonumber(ARGV[2])
local newest = 0
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then newest = cjson.decode(cur)['version'] end
local tomb = redis.call('HGET', KEYS[3], ARGV[1])
if tomb then newest = math.max(newest, cjson.decode(tomb)['version']) end
if newest >= v then return {'conflict', tostring(newest)} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
local ref = ARGV[1] .. '@' .. ARGV[2]
for i = 10, #ARGV do redis.call('SADD', ARGV[9] .. ARGV[i], ref) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {'ok'}
"""

# KEYS: registry, deleted. ARGV: id, now, channel. Soft delete: versions and blobs stay. Returns the tombstone.
REMOVE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return false end
local v = cjson.decode(cur)['version']
redis.call('HDEL', KEYS[1], ARGV[1])
local tomb = cjson.encode({version = v, deleted = tonumber(ARGV[2])})
redis.call('HSET', KEYS[2], ARGV[1], tomb)
redis.call('PUBLISH', ARGV[3], cjson.encode({event = 'removed', adapter_id = ARGV[1], version = v}))
return tomb
"""

# KEYS: registry, versions, deleted, epoch, purging. ARGV: id, now, channel, refs key prefix.
# Drops every version of id and its blob references; returns the blobs no version references any more
# (marked 'purging' so a concurrent push of the same bytes re-writes them), or false if id is unknown.
BEGIN_PURGE = """
local all = redis.call('HGETALL', KEYS[2])
local live = redis.call('HGET', KEYS[1], ARGV[1])
if #all == 0 and not live and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return false end
redis.call('INCR', KEYS[4])
local freed = {}
for i = 1, #all, 2 do
  local ref = ARGV[1] .. '@' .. all[i]
  for _, f in pairs(cjson.decode(all[i + 1])['files']) do
    local refs = ARGV[4] .. f[1]
    redis.call('SREM', refs, ref)
    if redis.call('SCARD', refs) == 0 then freed[f[1]] = true end
  end
end
local out = {}
for sha, _ in pairs(freed) do
  redis.call('ZADD', KEYS[5], ARGV[2], sha)
  table.insert(out, sha)
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if live then
  local v = cjson.decode(live)['version']
  redis.call('PUBLISH', ARGV[3], cjson.encode({event = 'removed', adapter_id = ARGV[1], version = v}))
end
return out
"""

# KEYS: registry, versions, deleted, seq. ARGV: id, channel, refs key prefix, tombstone or '', then
# (version, record) pairs from the object store's manifests. Re-adds what Redis lost; never rolls back a
# newer version or delete that Redis still has. Returns the adapter's state afterwards: 'live' or 'deleted'.
RESTORE = """
local maxv, maxrec = 0, nil
for i = 5, #ARGV, 2 do
  local v = tonumber(ARGV[i])
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
  for _, f in pairs(cjson.decode(ARGV[i + 1])['files']) do
    redis.call('SADD', ARGV[3] .. f[1], ARGV[1] .. '@' .. ARGV[i])
  end
  if v > maxv then maxv, maxrec = v, ARGV[i + 1] end
end
if tonumber(redis.call('GET', KEYS[4]) or '0') < maxv then redis.call('SET', KEYS[4], maxv) end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local curv = 0
if cur then curv = cjson.decode(cur)['version'] end
local tomb = redis.call('HGET', KEYS[3], ARGV[1])
local tombv = 0
if tomb then tombv = cjson.decode(tomb)['version'] end
if ARGV[4] ~= '' and cjson.decode(ARGV[4])['version'] > tombv then
  tomb, tombv = ARGV[4], cjson.decode(ARGV[4])['version']
end
if curv >= maxv and curv > tombv then return 'live' end
if maxv > tombv then
  redis.call('HSET', KEYS[1], ARGV[1], maxrec)
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('PUBLISH', ARGV[2], cjson.encode({event = 'updated', adapter_id = ARGV[1], version = maxv}))
  return 'live'
end
redis.call('HDEL', KEYS[1], ARGV[1])
if tomb then redis.call('HSET', KEYS[3], ARGV[1], tomb) end
return 'deleted'
"""

# KEYS: recovery lock, marker, rebuilt. ARGV: token, marker value, ms to keep 'rebuilt'. Marks the registry
# complete only if this caller still holds the lock: a Redis restart during the rebuild drops the lock, so a
# half-rebuilt registry is never marked. 'rebuilt' tells lookups that missed during the rebuild to look again.
FINISH_RECOVERY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[3], '1', 'PX', ARGV[3]) end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: recovery lock. ARGV: token, ttl ms. Extends the lock if this caller holds it; 1 if it did.
KEEP_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: recovery lock. ARGV: token. Releases the lock if this caller holds it.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""
