"""The Lua scripts cluster mode runs in Redis (mqchat/bridge/cluster.py): each one is atomic,
so a check and its update cannot interleave with another node's."""

# KEYS: devices hash of the user, the node's device set, last-seen key. ARGV: device, node:epoch,
# node, limit, member, now. The device is registered unless the user already has ``limit`` other
# devices connected. Returns {allowed, devices before}; last seen moves when the user comes online.
REGISTER = """
local before = redis.call('HLEN', KEYS[1])
local others = before
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then others = others - 1 end
if others >= tonumber(ARGV[4]) then return {0, before} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[5])
if before == 0 then redis.call('SET', KEYS[3], ARGV[6]) end
return {1, before}
"""

# KEYS: devices hash, the node's device set, last-seen key. ARGV: device, node:epoch, member, now.
# Removes the device only if this connection still holds it. Returns devices left (-1: not ours).
UNREGISTER = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('SREM', KEYS[2], ARGV[3])
  return -1
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
local left = redis.call('HLEN', KEYS[1])
if left == 0 then redis.call('SET', KEYS[3], ARGV[4]) end
return left
"""

# KEYS: devices hash, last-seen key. ARGV: device, dead node. Clears a device of a dead node.
REAP = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held or string.sub(held, 1, string.len(ARGV[2]) + 1) ~= ARGV[2] .. ':' then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
local left = redis.call('HLEN', KEYS[1])
if left == 0 then redis.call('SET', KEYS[2], ARGV[3]) end
return left
"""

# KEYS: devices hash, the node's device set, last-seen key. ARGV: device, node:epoch, epoch, member,
# now. Records again a device this node holds (Redis came back empty, or a survivor reaped this node
# while it was cut off), unless a newer connection of it holds it elsewhere; no limit: it is
# connected already. Returns 0 if the user came online with it, 1 if not, -1 if a newer one holds it.
REJOIN = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held == ARGV[2] then return 1 end
if held and (tonumber(string.match(held, ':(%d+)$')) or 0) > tonumber(ARGV[3]) then return -1 end
local before = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
if before == 0 then
  redis.call('SET', KEYS[3], ARGV[5])
  return 0
end
return 1
"""

# KEYS: devices hash, the node's device set, last-seen key. ARGV: device, node:epoch as read, member,
# now, node. Removes a device that left this node while Redis could not hear it, if that connection
# still holds it; keeps the set's member if another connection of it on this node holds it now.
# Returns devices left (-1: not that connection's any more).
FORGET = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held ~= ARGV[2] then
  if not held or string.sub(held, 1, string.len(ARGV[5]) + 1) ~= ARGV[5] .. ':' then
    redis.call('SREM', KEYS[2], ARGV[3])
  end
  return -1
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
local left = redis.call('HLEN', KEYS[1])
if left == 0 then redis.call('SET', KEYS[3], ARGV[4]) end
return left
"""

# KEYS: the epoch counter. ARGV: an epoch in use. A Redis that came back empty counts from 1 again;
# new connections must still be newer than the ones held, or a takeover would not close the old one.
EPOCH_FLOOR = """
if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: one bucket per key. ARGV: now, then rate, burst for each key, then the number of
# requests, then for each request the indexes (1-based) of its buckets, 0-terminated.
# A request passes only if every one of its buckets has a token; returns, per request, 0
# or the seconds until it would pass (as a string, Lua numbers lose the fraction).
BUCKETS = """
local now = tonumber(ARGV[1])
local nkeys = #KEYS
local level, stamp, rate, burst = {}, {}, {}, {}
for i = 1, nkeys do
  rate[i] = tonumber(ARGV[2 * i]); burst[i] = tonumber(ARGV[2 * i + 1])
  local held = redis.call('HMGET', KEYS[i], 't', 'at')
  local tokens = tonumber(held[1]) or burst[i]
  local at = tonumber(held[2]) or now
  level[i] = math.min(burst[i], tokens + math.max(0, now - at) * rate[i])
end
local pos = 2 * nkeys + 2
local count = tonumber(ARGV[pos]); pos = pos + 1
local out = {}
for r = 1, count do
  local wait = 0
  local mine = {}
  while tonumber(ARGV[pos]) ~= 0 do
    local i = tonumber(ARGV[pos]); mine[#mine + 1] = i; pos = pos + 1
    if level[i] < 1 then wait = math.max(wait, (1 - level[i]) / rate[i]) end
  end
  pos = pos + 1
  if wait == 0 then for _, i in ipairs(mine) do level[i] = level[i] - 1 end end
  out[r] = tostring(wait)
end
for i = 1, nkeys do
  redis.call('HSET', KEYS[i], 't', tostring(level[i]), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[i], math.ceil(burst[i] / rate[i]) + 1)
end
return out
"""

# KEYS: the user's sorted set of device ids. ARGV: device, now, window, limit.
NEW_DEVICE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""

# KEYS: attempt sets (sorted by time). ARGV: now, window, member, then a limit per key. If every
# key has room, the attempt (member) is counted in all of them; returns the wait before one more
# may be made (0: counted now), so concurrent attempts cannot all pass.
ATTEMPTS = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 + i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  if count >= limit then
    local oldest = redis.call('ZRANGE', KEYS[i], count - limit, count - limit, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now)
  end
end
if wait > 0 then return tostring(wait) end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[3])
  redis.call('EXPIRE', KEYS[i], math.ceil(window))
end
return '0'
"""
