"""What the Redis job queue and its worker processes share: the key layout, the Lua scripts
that change a job atomically, and the field encoding."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pipeline.render.jobs import JobState

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------- redis backend
#
# Keys under ``prefix`` (one Redis/Valkey node; the scripts build job keys from ids):
#   <p>:job:<id>     hash, one JSON value per JobState field, plus "qmember" (the job's member
#                    in the queue) and "cancel" ("1" once a cancel is asked for); expires
#                    keep_finished_s after the job ends
#   <p>:queue        sorted set of queued jobs: score -priority, member "<seq:020d>:<id>", so
#                    equal scores pop in submission order
#   <p>:seq          submission counter
#   <p>:running      set of running job ids
#   <p>:hb:<id>      Redis server time of the last heartbeat of a running job's worker
#   <p>:workers      sorted set of worker ids by Redis server time last seen
#   <p>:events:<id>  channel: a message on every state change of the job
#   <p>:submitted    channel: a message on every submission (wakes idle workers)
# Times compared with each other (heartbeats) all come from the Redis server's clock.

_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_s = string.format('%.6f', now)
"""

LUA_SCRIPTS: dict[str, str] = {
    # KEYS: queue, seq, job. ARGV: max_queue, score, id, submitted channel, field, value...
    "submit": """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local seq = redis.call('INCR', KEYS[2])
local member = string.format('%020d:%s', seq, ARGV[3])
redis.call('HSET', KEYS[3], 'qmember', member, unpack(ARGV, 5))
redis.call('ZADD', KEYS[1], ARGV[2], member)
redis.call('PUBLISH', ARGV[4], ARGV[3])
return seq
""",
    # KEYS: queue, running, workers. ARGV: prefix, worker id, worker JSON, started JSON.
    # Returns {id, spec JSON} of the job now running, or nil.
    "claim": _LUA_NOW + """
redis.call('ZADD', KEYS[3], now_s, ARGV[2])
while true do
  local popped = redis.call('ZPOPMIN', KEYS[1])
  if #popped == 0 then return false end
  local id = string.sub(popped[1], 22)
  local job = ARGV[1] .. ':job:' .. id
  if redis.call('HGET', job, 'status') == '"queued"' then
    redis.call('HSET', job, 'status', '"running"', 'started', ARGV[4], 'worker', ARGV[3],
               'stage', '"starting"', 'percent', '0.0')
    redis.call('HDEL', job, 'cancel')
    redis.call('SET', ARGV[1] .. ':hb:' .. id, now_s)
    redis.call('SADD', KEYS[2], id)
    redis.call('PUBLISH', ARGV[1] .. ':events:' .. id, 'running')
    return {id, redis.call('HGET', job, 'spec')}
  end
end
""",
    # KEYS: workers. ARGV: worker id.
    "seen": _LUA_NOW + """
redis.call('ZADD', KEYS[1], now_s, ARGV[1])
return 1
""",
    # KEYS: job, hb, workers. ARGV: worker JSON, worker id. Returns {still mine, cancel asked}.
    "beat": _LUA_NOW + """
redis.call('ZADD', KEYS[3], now_s, ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= '"running"'
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return {0, 0}
end
redis.call('SET', KEYS[2], now_s)
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {1, 1} end
return {1, 0}
""",
    # KEYS: job, running, hb. ARGV: worker JSON, expire ms (0 = still running), events
    # channel, id, field, value... Applies only while the job runs on this worker.
    "update": """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"'
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[4])
  redis.call('DEL', KEYS[3])
end
redis.call('PUBLISH', ARGV[3], 'changed')
return 1
""",
    # KEYS: job, queue, running, hb. ARGV: worker JSON, events channel, id, submitted
    # channel. Puts a job this worker gives up (shutdown) back at its place in the queue;
    # 0 when it is not this worker's or a cancel was asked for.
    "requeue": """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"'
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'cancel') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', '"queued"', 'stage', '"queued"', 'percent', '0.0',
           'started', 'null', 'worker', 'null')
local priority = tonumber(redis.call('HGET', KEYS[1], 'priority'))
redis.call('ZADD', KEYS[2], -priority, redis.call('HGET', KEYS[1], 'qmember'))
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', ARGV[2], 'changed')
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
""",
    # KEYS: job, queue. ARGV: events channel, finished JSON, expire ms.
    # Returns 'cancelled' (was queued), 'running' (cancel flag set), 'ended' or nil.
    "cancel": """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == '"queued"' then
  redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'qmember'))
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'stage', '"cancelled"',
             'finished', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PUBLISH', ARGV[1], 'changed')
  return 'cancelled'
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  redis.call('PUBLISH', ARGV[1], 'cancel')
  return 'running'
end
return 'ended'
""",
    # KEYS: running, workers, queue. ARGV: prefix, heartbeat timeout s, finished JSON,
    # expire ms, error JSON, worker liveness window s. Fails running jobs whose worker
    # stopped beating; returns {queued, running, live workers, {lost ids}}.
    "sweep": _LUA_NOW + """
local lost = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local job = ARGV[1] .. ':job:' .. id
  if redis.call('HGET', job, 'status') ~= '"running"' then
    redis.call('SREM', KEYS[1], id)
  else
    local hb = redis.call('GET', ARGV[1] .. ':hb:' .. id)
    if (not hb) or now - tonumber(hb) > tonumber(ARGV[2]) then
      redis.call('HSET', job, 'status', '"failed"', 'stage', '"failed"', 'finished', ARGV[3],
                 'error', ARGV[5])
      redis.call('PEXPIRE', job, ARGV[4])
      redis.call('SREM', KEYS[1], id)
      redis.call('DEL', ARGV[1] .. ':hb:' .. id)
      redis.call('PUBLISH', ARGV[1] .. ':events:' .. id, 'changed')
      table.insert(lost, id)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.6f', now - tonumber(ARGV[6])))
return {redis.call('ZCARD', KEYS[3]), redis.call('SCARD', KEYS[1]),
        redis.call('ZCARD', KEYS[2]), lost}
""",
}

HEARTBEAT_TIMEOUT_S = 30.0
WORKER_SEEN_S = 5.0  # a worker not heard from for this long no longer counts in stats()
WORKER_LOST_ERROR = {
    "error": "worker_lost",
    "detail": "the worker running this job stopped responding; submit it again",
}


class RedisKeys:
    """Key and channel names under one prefix (see the table above)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue = f"{prefix}:queue"
        self.seq = f"{prefix}:seq"
        self.running = f"{prefix}:running"
        self.workers = f"{prefix}:workers"
        self.submitted = f"{prefix}:submitted"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def hb(self, job_id: str) -> str:
        return f"{self.prefix}:hb:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"


def encode_fields(values: Mapping[str, object]) -> list[str]:
    """Flat [field, JSON value, ...] for HSET."""
    out: list[str] = []
    for name, value in values.items():
        out += [name, json.dumps(value)]
    return out


def decode_state(fields: Mapping[str, str]) -> JobState | None:
    """The JobState of a job hash (None for a missing or unreadable one)."""
    if not fields or "status" not in fields:
        return None
    try:
        values = {
            f.name: json.loads(fields[f.name])
            for f in dataclasses.fields(JobState)
            if f.name in fields
        }
        return JobState.from_dict(values)
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable job record %s", fields.get("id"))
        return None


def expire_ms(keep_finished_s: float) -> int:
    return max(1, math.ceil(keep_finished_s * 1000))


def redact_url(url: str) -> str:
    """The URL without a password, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


