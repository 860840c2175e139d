"""The Lua scripts of RedisJobStore (core/store_redis.py): every read-modify-write on Redis.

A script runs atomically, however many API processes and workers share the Redis. Scripts that
change a job's status get the store's key prefix (ARGV[1], "dalle-farm:") and build the index
names from it; core/store_redis.py lists the keys.
"""

from __future__ import annotations

from core.job import JobStatus, can_move
from core.store import DEFAULT_MODEL
from core.store_redis_events import LOG_EVENT_LUA
from core.webhooks import WAITING_RECHECK_S

# The hash field of a job that holds its model, kept for the per-model queued index; not a
# JobRecord field, so reads skip it. A job without one (stored by an older version) counts as
# the default model's.
MODEL_FIELD = "_model"
# The hash field that holds the job's lane (core/lanes.py): its priority, or interactive once
# promoted. A job without one (stored before lanes) is in no lane index: no queue position.
LANE_FIELD = "_lane"

# Milliseconds by Redis' clock, to the microsecond: the time a job entered its lane (the lanes'
# scores). Scripts run one at a time and each takes microseconds, so jobs queued one after the
# other get rising scores (a double holds them exactly to a fraction of a microsecond).
_NOW_MS = """
local function now_ms()
    local time = redis.call('TIME')
    return tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
end
"""

# Every script that changes a job appends its events (core/store_redis_events.py) in the same
# atomic step. Scripts without the prefix in ARGV take it from the job's key, "{p}:job:{id}".
_EVENTS = (
    LOG_EVENT_LUA
    + """
local function key_prefix(job) return string.match(job, '^(.*)job:[^:]*$') end
local function final_kind(status)
    if status == 'succeeded' or status == 'failed' or status == 'canceled' then return 'done' end
    return 'status'
end
"""
)

_ALLOWED_MOVES = ", ".join(
    f'["{a.value}>{b.value}"] = true' for a in JobStatus for b in JobStatus if can_move(a, b)
)

# move(job key, counts key, prefix, to, fields...): set status and fields, and keep the
# per-status index, the per-model queued index, the lane indexes and the counts in step. A job
# that is queued again joins its lane's back. The caller checked that the move is allowed.
_MOVE = (
    _NOW_MS
    + f"""
local function move(job, counts, prefix, to, ...)
    local from = redis.call('HGET', job, 'status')
    local id = redis.call('HGET', job, 'id')
    local owner = redis.call('HGET', job, 'owner')
    redis.call('HSET', job, 'status', to, ...)
    local index = prefix .. 'jobs-by-status:'
    redis.call('ZREM', index .. from .. ':' .. owner, id)
    redis.call('ZADD', index .. to .. ':' .. owner, 0, id)
    redis.call('HINCRBY', counts, from, -1)
    redis.call('HINCRBY', counts, to, 1)
    if from == 'queued' or to == 'queued' then
        local hidden = redis.call('HMGET', job, '{MODEL_FIELD}', '{LANE_FIELD}')
        local model = hidden[1] or '{DEFAULT_MODEL}'
        local queued = prefix .. 'queued-by-model:' .. model
        if from == 'queued' then redis.call('ZREM', queued, id) end
        if to == 'queued' then redis.call('ZADD', queued, 0, id) end
        if hidden[2] then
            local lane = prefix .. 'queued-by-lane:' .. model .. ':' .. hidden[2]
            if from == 'queued' then
                redis.call('ZREM', lane, id)
                redis.call('ZREM', prefix .. 'promoted:' .. model, id)
            end
            if to == 'queued' then redis.call('ZADD', lane, now_ms(), id) end
        end
    end
end
"""
)

# KEYS: job, owner index, owner's status index, counts, idempotency (or the job key again),
# the model's queued index, the job's lane index,
# the owner's queued and running indexes, the job's webhook delivery, the deliveries due.
# ARGV: id, status, has idempotency key (1/0), fingerprint, most jobs queued or running for the
# owner (0: no limit), N, then N args of the job's fields (field, value, ...), then, if the job
# has a webhook, its delivery's fields (core/store_redis_webhooks.py), registered in this step.
CREATE_JOB = (
    _EVENTS
    + _NOW_MS
    + f"local WAITING_RECHECK_S = {WAITING_RECHECK_S}\n"
    + """
if ARGV[3] == '1' then
    local found = redis.call('HMGET', KEYS[5], 'job_id', 'fingerprint')
    if found[1] then
        if found[2] ~= ARGV[4] then return {'conflict'} end
        -- A write, so that the caller's WAIT confirms the first job too (replication keeps
        -- order): it may be a write no replica holds yet, answered again after a 503.
        redis.call('HINCRBY', KEYS[5], 'replays', 1)
        return {'existing', found[1]}
    end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local most = tonumber(ARGV[5])
if most > 0 then
    local active = redis.call('ZCARD', KEYS[8]) + redis.call('ZCARD', KEYS[9])
    if active >= most then return {'too-many', tostring(active)} end
end
local last = 6 + tonumber(ARGV[6])
redis.call('HSET', KEYS[1], unpack(ARGV, 7, last))
if #ARGV > last then  -- its webhook's delivery, rechecked until the job is final
    redis.call('HSET', KEYS[10], unpack(ARGV, last + 1))
    redis.call('ZADD', KEYS[11], now_ms() / 1000 + WAITING_RECHECK_S, ARGV[1])
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
if ARGV[2] == 'queued' then
    redis.call('ZADD', KEYS[6], 0, ARGV[1])
    redis.call('ZADD', KEYS[7], now_ms(), ARGV[1])
end
if ARGV[3] == '1' then
    redis.call('HSET', KEYS[5], 'job_id', ARGV[1], 'fingerprint', ARGV[4])
end
log_record(key_prefix(KEYS[1]), KEYS[1], final_kind(ARGV[2]))
return {'created'}
"""
)

# KEYS: job, counts. ARGV: prefix, to, field, value, ...
TRANSITION = (
    f"local ALLOWED = {{{_ALLOWED_MOVES}}}\n"
    + _EVENTS
    + _MOVE
    + """
local from = redis.call('HGET', KEYS[1], 'status')
if not from then return {'missing'} end
if not ALLOWED[from .. '>' .. ARGV[2]] then return {'refused'} end
move(KEYS[1], KEYS[2], ARGV[1], ARGV[2], unpack(ARGV, 3))
log_record(ARGV[1], KEYS[1], final_kind(ARGV[2]))
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""
)

# KEYS: job, counts. ARGV: prefix, finished_at (JSON).
REQUEST_CANCEL = (
    _EVENTS
    + _MOVE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status == 'queued' then
    move(KEYS[1], KEYS[2], ARGV[1], 'canceled', 'finished_at', ARGV[2])
    log_record(ARGV[1], KEYS[1], 'done')
elseif status == 'running' and redis.call('HGET', KEYS[1], 'cancel_requested') ~= 'true' then
    redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
    log_record(ARGV[1], KEYS[1], 'status')
end
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""
)

# KEYS: the model's queued index, counts.
# ARGV: prefix, job id bound (exclusive), limit, error (JSON), finished_at (JSON).
# Returns how many ids it looked at, then the ids it failed.
FAIL_QUEUED = (
    _EVENTS
    + _MOVE
    + """
local ids = redis.call('ZRANGEBYLEX', KEYS[1], '-', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local reply = {#ids}
for _, id in ipairs(ids) do
    local job = ARGV[1] .. 'job:' .. id
    if redis.call('HGET', job, 'status') == 'queued' then
        move(job, KEYS[2], ARGV[1], 'failed', 'error', ARGV[4], 'finished_at', ARGV[5])
        log_record(ARGV[1], job, 'done')
        table.insert(reply, id)
    else
        redis.call('ZREM', KEYS[1], id)
    end
end
return reply
"""
)

# KEYS: the model's bulk lane, its interactive lane, its promoted jobs (id → when promoted).
# ARGV: prefix, the bound in ms. Promotes the oldest bulk job once it has waited the bound,
# one at a time (core/lanes.py): none while a promoted job waits, unless that one has waited
# another bound since (then it is returned again, to be sent again). Returns the ids to send.
PROMOTE_BULK = (
    _NOW_MS
    + f"""
local now = now_ms()
local bound = tonumber(ARGV[2])
for _, id in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if redis.call('HGET', ARGV[1] .. 'job:' .. id, 'status') ~= 'queued' then
        redis.call('ZREM', KEYS[3], id)
    elseif now - tonumber(redis.call('ZSCORE', KEYS[3], id)) < bound then
        return {{}}
    else
        redis.call('ZADD', KEYS[3], now, id)
        return {{id}}
    end
end
for _ = 1, 100 do
    local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if #head == 0 or now - tonumber(head[2]) < bound then return {{}} end
    local id = head[1]
    local job = ARGV[1] .. 'job:' .. id
    redis.call('ZREM', KEYS[1], id)
    if redis.call('HGET', job, 'status') == 'queued' then
        redis.call('HSET', job, '{LANE_FIELD}', 'interactive')
        redis.call('ZADD', KEYS[2], now, id)
        redis.call('ZADD', KEYS[3], now, id)
        return {{id}}
    end
end
return {{}}
"""
)

# KEYS: job. ARGV: field, value, ... A change of progress logs a progress event, and preview
# keys new in `result` a preview event each.
UPDATE = (
    _EVENTS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local before = redis.call('HMGET', KEYS[1], 'progress_step', 'progress_total', 'result')
redis.call('HSET', KEYS[1], unpack(ARGV))
local after = redis.call(
    'HMGET', KEYS[1], 'id', 'owner', 'progress_step', 'progress_total', 'result')
local prefix = key_prefix(KEYS[1])
if before[1] ~= after[3] or before[2] ~= after[4] then
    log_event(prefix, after[1], after[2], 'progress', 'step', after[3], 'total', after[4])
end
local function previews(result)
    local ok, value = pcall(cjson.decode, result or 'null')
    if ok and type(value) == 'table' and type(value['previews']) == 'table' then
        return value['previews']
    end
    return {}
end
if before[3] ~= after[5] then
    local old = {}
    for _, key in ipairs(previews(before[3])) do old[key] = true end
    for _, key in ipairs(previews(after[5])) do
        if not old[key] then log_event(prefix, after[1], after[2], 'preview', 'key', key) end
    end
end
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""
)

# KEYS: lease. ARGV: worker, ttl in ms.
RENEW_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: worker.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: key id list. ARGV: key hash prefix, id or name. Returns how many keys matched.
REVOKE_KEY = """
local matched = 0
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    local key = ARGV[1] .. id
    if id == ARGV[2] or redis.call('HGET', key, 'name') == ARGV[2] then
        redis.call('HSET', key, 'revoked', '1')
        matched = matched + 1
    end
end
return matched
"""

# Workers' times use Redis' clock, so workers on machines whose clocks disagree still compare.
_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
"""

# KEYS: workers (worker → expiry), worker models (worker → "mini,mega"), models last served.
# ARGV: worker, ttl in s, retention in s, announce (1/0), models (comma-separated).
HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if ARGV[4] == '1' then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
    for model in string.gmatch(ARGV[5], '[^,]+') do redis.call('HSET', KEYS[3], model, now) end
end
local forgotten = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
for _, name in ipairs(forgotten) do redis.call('HDEL', KEYS[2], name) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
return 0
"""
)

# KEYS: as HEARTBEAT's. ARGV: worker. Its models were served until now.
WORKER_GONE = (
    _NOW
    + """
local models = redis.call('HGET', KEYS[2], ARGV[1])
if models then
    for model in string.gmatch(models, '[^,]+') do redis.call('HSET', KEYS[3], model, now) end
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
return 0
"""
)

# KEYS: workers, worker models. Returns the model lists of the live workers.
SERVED_MODELS = (
    _NOW
    + """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
if #live == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(live))
"""
)

# KEYS: workers.
WORKERS_ALIVE = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')\n"
