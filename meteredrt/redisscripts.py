"""
The Lua scripts of the cluster: each is one atomic step in Redis and one
round trip for the node.

Key and message layout: L{meteredrt.clusterwire}. Scripts name keys they
build from their arguments, which a single Redis server allows (a Redis
Cluster would not: meteredrt needs one Redis server, or a primary with
replicas).

  - L{JOIN}: add a membership, announce C{joined} if new, return the
    version and, when asked, the snapshot (presence); L{SNAPSHOT}: the
    same read alone.
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
  - L{MARK_ARRIVED}, L{MARK_GOING}, L{MARK_SWEEP}, L{MARK_STORED},
    L{MARK_RESTORE}: the webhook marks shared by the nodes
    (L{meteredrt.webhooks.redismarks}).

The presence scripts also return the transitions they made, for the
node's presence observer (the webhooks): see C{note} below.
"""

from __future__ import annotations

from meteredrt.redisclient import Script

# Shared functions, prepended to the scripts that need them.
_LIB = """
local function announce(app, channel, prefix, version, joined, left, exclude)
  redis.call('PUBLISH', 'mrt:' .. app .. ':c:' .. channel,
    prefix .. app .. '|' .. version .. '|["p",' .. cjson.encode(channel) .. ',' .. joined .. ',' .. left .. ',' .. exclude .. ']')
end

-- A transition for the node's presence observer (webhooks): five fields,
-- {tag, app, channel or peer, peer, metadata JSON}, appended to tr. Tags:
-- P+ / P- a peer's first connection anywhere / its last one gone; C+ / C-
-- a channel's first member / its last one gone; J / L a member joined /
-- left (exactly when the joined / left delta is announced).
local function note(tr, tag, app, name, peer, meta)
  table.insert(tr, tag)
  table.insert(tr, app)
  table.insert(tr, name)
  table.insert(tr, peer or '')
  table.insert(tr, meta or '')
end

local function entry(peer, meta)
  return '[[' .. cjson.encode(peer) .. ',' .. meta .. ']]'
end

local function join(app, channel, peer, conn, meta, prefix, tr)
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
  if redis.call('EXISTS', members) == 0 then
    note(tr, 'C+', app, channel)
  end
  local version = redis.call('INCR', 'mrt:version')
  redis.call('HSET', members, peer, version .. '|' .. meta)
  announce(app, channel, prefix, version, entry(peer, meta), '[]', cjson.encode(conn))
  note(tr, 'J', app, channel, peer, meta)
  return 1, version
end

local function leave(app, channel, peer, conn, prefix, out, tr)
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
  note(tr, 'L', app, channel, peer, meta)
  if redis.call('EXISTS', members) == 0 then
    note(tr, 'C-', app, channel)
  end
end

local function drop(app, peer, conn, node, prefix, out, tr)
  local held = 'mrt:cs:' .. conn
  local channels = redis.call('SMEMBERS', held)
  table.sort(channels)
  redis.call('DEL', held)
  for _, channel in ipairs(channels) do
    leave(app, channel, peer, conn, prefix, out, tr)
  end
  local registry = 'mrt:' .. app .. ':r:' .. peer
  if redis.call('HDEL', registry, conn) == 1 and redis.call('EXISTS', registry) == 0 then
    note(tr, 'P-', app, peer)
  end
  redis.call('HDEL', 'mrt:nc:' .. node, conn)
end

-- Register a live connection; a peer's first connection anywhere is a P+.
local function register(app, peer, conn, node, tr)
  local registry = 'mrt:' .. app .. ':r:' .. peer
  if redis.call('HSET', registry, conn, node) == 1 and redis.call('HLEN', registry) == 1 then
    note(tr, 'P+', app, peer)
  end
  redis.call('HSET', 'mrt:nc:' .. node, conn, app .. ':' .. peer)
end
"""

#: ARGV: app, channel, peer, conn, metadata JSON, message prefix, snapshot
#: ("1": return the members; "0": not, which keeps a join's cost and reply
#: independent of the channel's size).
#: Returns {first (0/1), version, HGETALL of the members hash or {},
#: transitions}.
JOIN = Script(
    _LIB
    + """
local tr = {}
local first, version = join(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tr)
local members = {}
if ARGV[7] == '1' then
  members = redis.call('HGETALL', 'mrt:' .. ARGV[1] .. ':m:' .. ARGV[2])
end
return {first, version, members, tr}
"""
)

#: ARGV: app, channel. Returns {version, HGETALL of the members hash}.
SNAPSHOT = Script(
    """
return {tonumber(redis.call('GET', 'mrt:version') or '0'), redis.call('HGETALL', 'mrt:' .. ARGV[1] .. ':m:' .. ARGV[2])}
"""
)

#: ARGV: app, channel, peer, conn, message prefix.
#: Returns {lefts, transitions}: lefts is {} or {channel, version, metadata
#: JSON} when the peer left.
LEAVE = Script(
    _LIB
    + """
redis.call('SREM', 'mrt:cs:' .. ARGV[4], ARGV[2])
local out, tr = {}, {}
leave(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], out, tr)
return {out, tr}
"""
)

#: ARGV: app, peer, conn, node. Returns the transitions (a P+ when this
#: is the peer's first connection anywhere).
CONNECT = Script(
    _LIB
    + """
local tr = {}
register(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tr)
redis.call('SADD', 'mrt:nodes', ARGV[4])
return tr
"""
)

#: ARGV: app, peer, conn, node, message prefix.
#: Returns {lefts, transitions}; lefts flat: {channel, version, metadata, ...}.
DISCONNECT = Script(
    _LIB
    + """
local out, tr = {}, {}
drop(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], out, tr)
return {out, tr}
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
#: Returns {live connection count, transitions}: what the differences mean
#: cluster-wide (a peer reaped while this node was cut off is connected
#: again, a connection that closed meanwhile may have been the peer's last).
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
local out, tr = {}, {}
local held = redis.call('HGETALL', 'mrt:nc:' .. node)
for k = 1, #held, 2 do
  local conn, owner = held[k], held[k + 1]
  if not live[conn] then
    local colon = string.find(owner, ':', 1, true)
    drop(string.sub(owner, 1, colon - 1), string.sub(owner, colon + 1), conn, node, prefix, out, tr)
  end
end
for _, w in ipairs(wanted) do
  local conn, app, peer, meta, channels = w[1], w[2], w[3], w[4], w[5]
  register(app, peer, conn, node, tr)
  for _, channel in ipairs(redis.call('SMEMBERS', 'mrt:cs:' .. conn)) do
    if not channels[channel] then
      redis.call('SREM', 'mrt:cs:' .. conn, channel)
      leave(app, channel, peer, conn, prefix, out, tr)
    end
  end
  for channel in pairs(channels) do
    join(app, channel, peer, conn, meta, prefix, tr)
  end
end
return {#wanted, tr}
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
#: Returns nil when not claimed, else {the app id of every removed
#: connection (for the connection counts the node held), transitions}: the
#: reaping node tells its observer, so each is told exactly once.
REAP = Script(
    _LIB
    + """
local dead, prefix = ARGV[1], ARGV[2]
if redis.call('EXISTS', 'mrt:lease:' .. dead) == 1 or redis.call('SREM', 'mrt:nodes', dead) == 0 then
  return false
end
local held = redis.call('HGETALL', 'mrt:nc:' .. dead)
local apps, out, tr = {}, {}, {}
for k = 1, #held, 2 do
  local conn, owner = held[k], held[k + 1]
  local colon = string.find(owner, ':', 1, true)
  local app = string.sub(owner, 1, colon - 1)
  drop(app, string.sub(owner, colon + 1), conn, dead, prefix, out, tr)
  table.insert(apps, app)
end
redis.call('DEL', 'mrt:nc:' .. dead)
for _, app in ipairs(redis.call('SMEMBERS', 'mrt:ca:' .. dead)) do
  redis.call('HDEL', 'mrt:' .. app .. ':cc', dead)
end
redis.call('DEL', 'mrt:ca:' .. dead)
redis.call('SET', 'mrt:reaped:' .. dead, '1', 'EX', 86400)
return {apps, tr}
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

# Webhook marks (L{meteredrt.webhooks.redismarks}): which peers and
# channels the backend was told are present, going-away announcements
# waiting out their grace, and announcements under way to an outbox.
#   mrt:{app}:wm  hash {kind}:{name} -> state: '1' (announced present and
#                 stored), or {sign}{event id}|{timestamp ms}|{then}: an
#                 announcement being stored ('+' present, '-' gone); then is
#                 '1' when the opposite is due as soon as it is stored (it
#                 came back, or its grace ran out, meanwhile)
#   mrt:wp        sorted set {app}:{kind}:{name} by going-away deadline (ms)
#   mrt:wf        sorted set {app}:{kind}:{name} by when an announcement
#                 under way is made again unless its node confirmed it (ms)
# Every announcement a script returns is six fields: app, kind, name, sign
# ('+' or '-'), event id, timestamp (ms).
_MARKS_LIB = """
local function split(member)
  local a = string.find(member, ':', 1, true)
  local b = string.find(member, ':', a + 1, true)
  return string.sub(member, 1, a - 1), string.sub(member, a + 1, b - 1), string.sub(member, b + 1)
end

local function parse(state)
  local sign = string.sub(state, 1, 1)
  if sign == '1' then
    return sign
  end
  local a = string.find(state, '|', 2, true)
  local b = string.find(state, '|', a + 1, true)
  return sign, string.sub(state, 2, a - 1), string.sub(state, a + 1, b - 1), string.sub(state, b + 1)
end

-- Whether presence holds the peer (a registered connection) or the channel
-- (a member) right now, on any node.
local function present(app, kind, name)
  if kind == 'peer' then
    return redis.call('EXISTS', 'mrt:' .. app .. ':r:' .. name) == 1
  end
  return redis.call('EXISTS', 'mrt:' .. app .. ':m:' .. name) == 1
end

local function set_then(key, field, state, flag)
  redis.call('HSET', key, field, string.sub(state, 1, -2) .. flag)
end

local function claim(app, kind, name, sign, evt, ts, retry_at, out)
  redis.call('HSET', 'mrt:' .. app .. ':wm', kind .. ':' .. name, sign .. evt .. '|' .. ts .. '|0')
  redis.call('ZADD', 'mrt:wf', retry_at, app .. ':' .. kind .. ':' .. name)
  for _, v in ipairs({app, kind, name, sign, evt, ts}) do
    table.insert(out, v)
  end
end
"""

#: ARGV: app, kind, name, now (ms), a new event id, claim (ms).
#: Something arrived: cancels its pending going-away; announces it present
#: (under way, with this id) unless the backend already knows it, or, when
#: its going-away is being stored, has it announced again after that.
#: Returns the announcements.
MARK_ARRIVED = Script(
    _MARKS_LIB
    + """
local app, kind, name, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key, field = 'mrt:' .. app .. ':wm', kind .. ':' .. name
redis.call('ZREM', 'mrt:wp', app .. ':' .. field)
local state = redis.call('HGET', key, field)
local out = {}
if not state then
  claim(app, kind, name, '+', ARGV[5], now, tonumber(now) + tonumber(ARGV[6]), out)
elseif string.sub(state, 1, 1) == '-' then
  set_then(key, field, state, '1')
elseif string.sub(state, 1, 1) == '+' then
  set_then(key, field, state, '0')
end
return out
"""
)

#: ARGV: app, kind, name, deadline (ms).
#: Something's last presence is gone: its going-away is announced at the
#: deadline unless it arrives first (the earliest pending deadline stays).
MARK_GOING = Script(
    _MARKS_LIB
    + """
local app, kind, name = ARGV[1], ARGV[2], ARGV[3]
local key, field = 'mrt:' .. app .. ':wm', kind .. ':' .. name
local state = redis.call('HGET', key, field)
if not state then
  return 0
end
if string.sub(state, 1, 1) == '-' then
  set_then(key, field, state, '0')
  return 0
end
redis.call('ZADD', 'mrt:wp', 'NX', ARGV[4], app .. ':' .. field)
return 1
"""
)

#: ARGV: now (ms), claim (ms), event id prefix, limit.
#: Claims, for the calling node, announcements under way whose node did not
#: confirm them in time (again, with the same id and timestamp), and due
#: going-aways of things still absent everywhere (new ids: the prefix and a
#: counter; timestamp: the deadline). A going-away of something whose
#: arrival is still being stored follows once that is stored. At most
#: C{limit} of each. Returns {announcements, 1 when there may be more due}.
MARK_SWEEP = Script(
    _MARKS_LIB
    + """
local now, claim_ms, prefix, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local out, made = {}, 0
local stale = redis.call('ZRANGEBYSCORE', 'mrt:wf', '-inf', now, 'LIMIT', 0, limit)
for _, member in ipairs(stale) do
  local app, kind, name = split(member)
  local state = redis.call('HGET', 'mrt:' .. app .. ':wm', kind .. ':' .. name)
  local sign, evt, ts = 'none'
  if state then
    sign, evt, ts = parse(state)
  end
  if sign == '+' or sign == '-' then
    redis.call('ZADD', 'mrt:wf', now + claim_ms, member)
    for _, v in ipairs({app, kind, name, sign, evt, ts}) do
      table.insert(out, v)
    end
  else
    redis.call('ZREM', 'mrt:wf', member)
  end
end
local due = redis.call('ZRANGEBYSCORE', 'mrt:wp', '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #due, 2 do
  local member, deadline = due[i], due[i + 1]
  local app, kind, name = split(member)
  local key, field = 'mrt:' .. app .. ':wm', kind .. ':' .. name
  local state = redis.call('HGET', key, field)
  redis.call('ZREM', 'mrt:wp', member)
  if state and not present(app, kind, name) then
    if state == '1' then
      made = made + 1
      claim(app, kind, name, '-', prefix .. string.format('%08x', made), deadline, now + claim_ms, out)
    elseif string.sub(state, 1, 1) == '+' then
      set_then(key, field, state, '1')
    end
  end
end
local more = 0
if #stale >= limit or #due >= 2 * limit then
  more = 1
end
return {out, more}
"""
)

#: ARGV: now (ms), claim (ms), event id prefix, then app, kind, name, event
#: id of each announcement this node stored. An arrival becomes a plain
#: mark, or is followed by its going-away (now) when its grace ran out
#: meanwhile; a going-away clears the mark, or is followed by a new arrival
#: when the thing is back meanwhile (either under way, for this node).
#: Announcements already confirmed are left alone. Returns the new
#: announcements.
MARK_STORED = Script(
    _MARKS_LIB
    + """
local now, claim_ms, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out, made = {}, 0
for i = 4, #ARGV, 4 do
  local app, kind, name, evt = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key, field = 'mrt:' .. app .. ':wm', kind .. ':' .. name
  local state = redis.call('HGET', key, field)
  if state then
    local sign, held, _, after = parse(state)
    if held == evt then
      redis.call('ZREM', 'mrt:wf', app .. ':' .. field)
      local here = present(app, kind, name)
      if sign == '+' and after == '1' and not here then
        made = made + 1
        claim(app, kind, name, '-', prefix .. string.format('%08x', made), now, tonumber(now) + claim_ms, out)
      elseif sign == '+' then
        redis.call('HSET', key, field, '1')
      elseif after == '1' or here then
        made = made + 1
        claim(app, kind, name, '+', prefix .. string.format('%08x', made), now, tonumber(now) + claim_ms, out)
      else
        redis.call('HDEL', key, field)
      end
    end
  end
end
return out
"""
)

#: ARGV: app, kind, name, deadline (ms) of each mark an outbox holds.
#: Marks Redis does not know (it lost them, or they are an earlier run's)
#: are set again, going away at their deadline unless they arrive first (or
#: are present: the sweep checks).
MARK_RESTORE = Script(
    """
for i = 1, #ARGV, 4 do
  local app, kind, name = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HSETNX', 'mrt:' .. app .. ':wm', kind .. ':' .. name, '1') == 1 then
    redis.call('ZADD', 'mrt:wp', 'NX', ARGV[i + 3], app .. ':' .. kind .. ':' .. name)
  end
end
return 1
"""
)

#: The scripts of the webhook marks.
MARKS = (MARK_ARRIVED, MARK_GOING, MARK_SWEEP, MARK_STORED, MARK_RESTORE)

#: Every script, for L{meteredrt.redisclient.RedisClient.register}.
ALL = (
    JOIN, SNAPSHOT, LEAVE, CONNECT, DISCONNECT, DIRECT, RESYNC, TICK, REAP, ADMIT, RELEASE, RECOUNT,
    USAGE_SHARE, USAGE_READ,
)  # fmt: skip
