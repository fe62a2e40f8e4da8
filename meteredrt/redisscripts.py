"""
The Lua scripts of the cluster: each is one atomic step in Redis and one
round trip for the node.

Key and message layout: L{meteredrt.clusterwire}. Scripts name keys they
build from their arguments, which a single Redis server allows (a Redis
Cluster would not: meteredrt needs one Redis server, or a primary with
replicas).

  - L{JOIN}: add a membership, announce C{joined} if new, return the
    snapshot and version (presence); L{SNAPSHOT}: the same read alone.
  - L{LEAVE}: end one membership, announce C{left} if it was the last.
  - L{CONNECT}, L{DISCONNECT}: register a connection; end all of one's
    memberships and registrations.
  - L{DIRECT}: find a peer's nodes and publish to their inboxes; returns
    the number of connections (directs and kicks).
  - L{RESYNC}: make Redis agree with a node's live connections after an
    outage or a fence.
  - L{TICK}, L{REAP}: renew this node's lease and list dead nodes; claim
    and remove a dead node (its connections and its connection counts).
  - L{ADMIT}, L{RELEASE}, L{RECOUNT}: the cluster-wide concurrent
    connection count of an app (L{meteredrt.clustercount}).
  - L{USAGE_SHARE}, L{USAGE_READ}: every node's live connections of each
    app and the sampled cluster-wide peaks, for usage reports
    (L{meteredrt.clusterusage}).
"""

from __future__ import annotations

from meteredrt.redisclient import Script

# Shared functions, prepended to the scripts that need them.
_LIB = """
local function announce(app, channel, prefix, version, joined, left, exclude)
  redis.call('PUBLISH', 'mrt:' .. app .. ':c:' .. channel,
    prefix .. app .. '|' .. version .. '|["p",' .. cjson.encode(channel) .. ',' .. joined .. ',' .. left .. ',' .. exclude .. ']')
end

local function entry(peer, meta)
  return '[[' .. cjson.encode(peer) .. ',' .. meta .. ']]'
end

local function join(app, channel, peer, conn, meta, prefix)
  local base = 'mrt:' .. app .. ':'
  redis.call('SADD', base .. 'k:' .. #channel .. ':' .. channel .. ':' .. peer, conn)
  redis.call('SADD', 'mrt:cs:' .. conn, channel)
  local members = base .. 'm:' .. channel
  local stored = redis.call('HGET', members, peer)
  if stored then
    local bar = string.find(stored, '|', 1, true)
    redis.call('HSET', members, peer, string.sub(stored, 1, bar) .. meta)
    return 0, tonumber(redis.call('GET', 'mrt:version') or '0')
  end
  local version = redis.call('INCR', 'mrt:version')
  redis.call('HSET', members, peer, version .. '|' .. meta)
  announce(app, channel, prefix, version, entry(peer, meta), '[]', cjson.encode(conn))
  return 1, version
end

local function leave(app, channel, peer, conn, prefix, out)
  local base = 'mrt:' .. app .. ':'
  local refs = base .. 'k:' .. #channel .. ':' .. channel .. ':' .. peer
  if redis.call('SREM', refs, conn) == 0 or redis.call('SCARD', refs) > 0 then
    return
  end
  local members = base .. 'm:' .. channel
  local stored = redis.call('HGET', members, peer)
  if not stored then
    return
  end
  redis.call('HDEL', members, peer)
  local meta = string.sub(stored, string.find(stored, '|', 1, true) + 1)
  local version = redis.call('INCR', 'mrt:version')
  announce(app, channel, prefix, version, '[]', entry(peer, meta), 'null')
  table.insert(out, channel)
  table.insert(out, version)
  table.insert(out, meta)
end

local function drop(app, peer, conn, node, prefix, out)
  local held = 'mrt:cs:' .. conn
  local channels = redis.call('SMEMBERS', held)
  table.sort(channels)
  redis.call('DEL', held)
  for _, channel in ipairs(channels) do
    leave(app, channel, peer, conn, prefix, out)
  end
  redis.call('HDEL', 'mrt:' .. app .. ':r:' .. peer, conn)
  redis.call('HDEL', 'mrt:nc:' .. node, conn)
end
"""

#: ARGV: app, channel, peer, conn, metadata JSON, message prefix.
#: Returns {first (0/1), version, HGETALL of the members hash}.
JOIN = Script(
    _LIB
    + """
local first, version = join(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return {first, version, redis.call('HGETALL', 'mrt:' .. ARGV[1] .. ':m:' .. ARGV[2])}
"""
)

#: ARGV: app, channel. Returns {version, HGETALL of the members hash}.
SNAPSHOT = Script(
    """
return {tonumber(redis.call('GET', 'mrt:version') or '0'), redis.call('HGETALL', 'mrt:' .. ARGV[1] .. ':m:' .. ARGV[2])}
"""
)

#: ARGV: app, channel, peer, conn, message prefix.
#: Returns {} or {channel, version, metadata JSON} when the peer left.
LEAVE = Script(
    _LIB
    + """
redis.call('SREM', 'mrt:cs:' .. ARGV[4], ARGV[2])
local out = {}
leave(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], out)
return out
"""
)

#: ARGV: app, peer, conn, node.
CONNECT = Script(
    """
redis.call('HSET', 'mrt:' .. ARGV[1] .. ':r:' .. ARGV[2], ARGV[3], ARGV[4])
redis.call('HSET', 'mrt:nc:' .. ARGV[4], ARGV[3], ARGV[1] .. ':' .. ARGV[2])
redis.call('SADD', 'mrt:nodes', ARGV[4])
return 1
"""
)

#: ARGV: app, peer, conn, node, message prefix.
#: Returns the lefts, flat: {channel, version, metadata, ...}.
DISCONNECT = Script(
    _LIB
    + """
local out = {}
drop(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], out)
return out
"""
)

#: ARGV: app, peer, this node, the sending connection (or ""), message.
#: Publishes the message once to each other node holding a connection of
#: the peer; returns how many such connections there are, the sender's
#: excluded.
DIRECT = Script(
    """
local registry = redis.call('HGETALL', 'mrt:' .. ARGV[1] .. ':r:' .. ARGV[2])
local count, nodes = 0, {}
for i = 1, #registry, 2 do
  local conn, node = registry[i], registry[i + 1]
  if conn ~= ARGV[4] and node ~= ARGV[3] then
    count = count + 1
    nodes[node] = true
  end
end
for node in pairs(nodes) do
  redis.call('PUBLISH', 'mrt:n:' .. node, ARGV[5])
end
return count
"""
)

#: ARGV: node, message prefix, version floor, then for each live
#: connection: conn, app, peer, metadata JSON, channel count, channels...
#: Drops what Redis holds for this node's connections that are gone, and
#: registers the live ones with exactly their memberships, announcing the
#: differences (with an origin every node delivers, its own included).
RESYNC = Script(
    _LIB
    + """
local node, prefix = ARGV[1], ARGV[2]
local floor = tonumber(ARGV[3])
if redis.call('EXISTS', 'mrt:version') == 0 then
  -- Redis came back empty: keep versions above any a subscriber has seen.
  redis.call('SET', 'mrt:version', floor + 1000000)
end
local live, i = {}, 4
local wanted = {}
while i <= #ARGV do
  local conn, app, peer, meta, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  local channels = {}
  for j = 1, n do
    channels[ARGV[i + 4 + j]] = true
  end
  live[conn] = true
  table.insert(wanted, {conn, app, peer, meta, channels})
  i = i + 5 + n
end
local out = {}
local held = redis.call('HGETALL', 'mrt:nc:' .. node)
for k = 1, #held, 2 do
  local conn, owner = held[k], held[k + 1]
  if not live[conn] then
    local colon = string.find(owner, ':', 1, true)
    drop(string.sub(owner, 1, colon - 1), string.sub(owner, colon + 1), conn, node, prefix, out)
  end
end
for _, w in ipairs(wanted) do
  local conn, app, peer, meta, channels = w[1], w[2], w[3], w[4], w[5]
  redis.call('HSET', 'mrt:' .. app .. ':r:' .. peer, conn, node)
  redis.call('HSET', 'mrt:nc:' .. node, conn, app .. ':' .. peer)
  for _, channel in ipairs(redis.call('SMEMBERS', 'mrt:cs:' .. conn)) do
    if not channels[channel] then
      redis.call('SREM', 'mrt:cs:' .. conn, channel)
      leave(app, channel, peer, conn, prefix, out)
    end
  end
  for channel in pairs(channels) do
    join(app, channel, peer, conn, meta, prefix)
  end
end
return #wanted
"""
)

#: ARGV: node, lease in milliseconds.
#: Renews the lease; returns {state, dead nodes}: state 1 when the lease
#: was held, 0 when it had lapsed (or Redis is new), 2 when the node was
#: reaped meanwhile (fenced: it must register its connections again).
TICK = Script(
    """
local node = ARGV[1]
local lease = 'mrt:lease:' .. node
local state = 0
if redis.call('EXISTS', 'mrt:reaped:' .. node) == 1 then
  redis.call('DEL', 'mrt:reaped:' .. node)
  state = 2
elseif redis.call('EXISTS', lease) == 1 then
  state = 1
end
redis.call('SET', lease, '1', 'PX', ARGV[2])
redis.call('SADD', 'mrt:nodes', node)
local dead = {}
for _, other in ipairs(redis.call('SMEMBERS', 'mrt:nodes')) do
  if redis.call('EXISTS', 'mrt:lease:' .. other) == 0 then
    table.insert(dead, other)
  end
end
return {state, dead}
"""
)

#: ARGV: dead node, message prefix (origin: everyone).
#: Claims the node if its lease is still gone and nobody claimed it first,
#: then removes its connections, announcing each last-connection C{left}.
#: Returns {} when not claimed, else the app id of every removed
#: connection (for the connection counts the node held).
REAP = Script(
    _LIB
    + """
local dead, prefix = ARGV[1], ARGV[2]
if redis.call('EXISTS', 'mrt:lease:' .. dead) == 1 or redis.call('SREM', 'mrt:nodes', dead) == 0 then
  return false
end
local held = redis.call('HGETALL', 'mrt:nc:' .. dead)
local apps, out = {}, {}
for k = 1, #held, 2 do
  local conn, owner = held[k], held[k + 1]
  local colon = string.find(owner, ':', 1, true)
  local app = string.sub(owner, 1, colon - 1)
  drop(app, string.sub(owner, colon + 1), conn, dead, prefix, out)
  table.insert(apps, app)
end
redis.call('DEL', 'mrt:nc:' .. dead)
for _, app in ipairs(redis.call('SMEMBERS', 'mrt:ca:' .. dead)) do
  redis.call('HDEL', 'mrt:' .. app .. ':cc', dead)
end
redis.call('DEL', 'mrt:ca:' .. dead)
redis.call('SET', 'mrt:reaped:' .. dead, '1', 'EX', 86400)
return apps
"""
)

#: ARGV: app, node, cap, whether to admit over the cap (0/1).
#: Sums the app's connections over all nodes and, when the sum is below the
#: cap or the node allows overage, counts one more for this node. Returns
#: {admitted (0/1), the sum before this connection}.
ADMIT = Script(
    """
local counts = 'mrt:' .. ARGV[1] .. ':cc'
local total = 0
for _, n in ipairs(redis.call('HVALS', counts)) do
  total = total + tonumber(n)
end
if total < tonumber(ARGV[3]) or ARGV[4] == '1' then
  redis.call('HINCRBY', counts, ARGV[2], 1)
  redis.call('SADD', 'mrt:ca:' .. ARGV[2], ARGV[1])
  return {1, total}
end
return {0, total}
"""
)

#: ARGV: app, node. Counts one connection of this node less.
RELEASE = Script(
    """
local counts = 'mrt:' .. ARGV[1] .. ':cc'
if redis.call('HINCRBY', counts, ARGV[2], -1) <= 0 then
  redis.call('HDEL', counts, ARGV[2])
  redis.call('SREM', 'mrt:ca:' .. ARGV[2], ARGV[1])
end
return 1
"""
)

#: ARGV: node, then app, count pairs: this node's live counted connections.
#: Makes Redis hold exactly these counts for the node (after a fence, or a
#: Redis restarted empty); apps not listed count zero.
RECOUNT = Script(
    """
local node = ARGV[1]
local wanted = {}
for i = 2, #ARGV, 2 do
  wanted[ARGV[i]] = tonumber(ARGV[i + 1])
end
for _, app in ipairs(redis.call('SMEMBERS', 'mrt:ca:' .. node)) do
  if not wanted[app] then
    redis.call('HDEL', 'mrt:' .. app .. ':cc', node)
  end
end
redis.call('DEL', 'mrt:ca:' .. node)
for app, n in pairs(wanted) do
  if n > 0 then
    redis.call('HSET', 'mrt:' .. app .. ':cc', node, n)
    redis.call('SADD', 'mrt:ca:' .. node, app)
  else
    redis.call('HDEL', 'mrt:' .. app .. ':cc', node)
  end
end
return 1
"""
)

# Shared by the usage scripts: the sum of an app's live connections over
# the nodes that hold a lease (and this node), forgetting the others'.
_LIVE_SUM = """
local alive = {}
local function live_sum(app, node, include_node)
  local shares = 'mrt:' .. app .. ':live'
  local flat = redis.call('HGETALL', shares)
  local total = 0
  for k = 1, #flat, 2 do
    local other = flat[k]
    if other == node then
      if include_node then
        total = total + tonumber(flat[k + 1])
      end
    else
      if alive[other] == nil then
        alive[other] = redis.call('EXISTS', 'mrt:lease:' .. other) == 1
      end
      if alive[other] then
        total = total + tonumber(flat[k + 1])
      else
        redis.call('HDEL', shares, other)
      end
    end
  end
  return total
end
"""

#: ARGV: node, number of apps gone, those apps, then app, live
#: connections, period start, seconds to keep the peak for each app the node
#: holds connections of. Writes the node's share of each app's live
#: connections (and removes it for the apps gone), samples each app's
#: cluster-wide sum into its period's peak and returns the peaks, in order.
USAGE_SHARE = Script(
    _LIVE_SUM
    + """
local node = ARGV[1]
local gone = tonumber(ARGV[2])
for i = 3, 2 + gone do
  redis.call('HDEL', 'mrt:' .. ARGV[i] .. ':live', node)
end
local peaks = {}
for i = 3 + gone, #ARGV, 4 do
  local app = ARGV[i]
  redis.call('HSET', 'mrt:' .. app .. ':live', node, ARGV[i + 1])
  local total = live_sum(app, node, true)
  local key = 'mrt:' .. app .. ':pk:' .. ARGV[i + 2]
  local peak = tonumber(redis.call('GET', key) or '0')
  if total > peak then
    peak = total
    redis.call('SET', key, peak)
  end
  redis.call('EXPIRE', key, ARGV[i + 3])
  table.insert(peaks, peak)
end
return peaks
"""
)

#: ARGV: app, node, period start. Returns {the app's live connections on
#: the other live nodes as they last shared them, the period's sampled
#: cluster-wide peak}.
USAGE_READ = Script(
    _LIVE_SUM
    + """
return {live_sum(ARGV[1], ARGV[2], false), tonumber(redis.call('GET', 'mrt:' .. ARGV[1] .. ':pk:' .. ARGV[3]) or '0')}
"""
)

#: Every script, for L{meteredrt.redisclient.RedisClient.register}.
ALL = (
    JOIN, SNAPSHOT, LEAVE, CONNECT, DISCONNECT, DIRECT, RESYNC, TICK, REAP, ADMIT, RELEASE, RECOUNT,
    USAGE_SHARE, USAGE_READ,
)  # fmt: skip
