"""The Redis scripts of a thread's cache, and the shape of their arguments and answers.

A thread's cache is a Redis list of its recent turns (JSON, `Message.to_dict`) and a hash of
metadata (who created it, how many turns were ever pushed, the Redis run it was last checked
on). The scripts below are the only writers and the thread read; instance/storage/history.py
(the store), positions.py (the append, which also gives an exchange its position) and held.py
(the decoded copies a read continues) send them.
"""

from __future__ import annotations

from typing import Any

from common.keys import Keys

CACHE_TTL_MS = 7 * 24 * 3600 * 1000

POS_PLACEHOLDER = '{"pos":null'
"""The head of a turn's JSON before its exchange has a position (the append script fills it)."""
UNPLACED = b'{"pos":null,"id":"'  # the head of a spooled turn whose exchange has no position yet

# KEYS: list, meta, pos counter, recent exchange ids. ARGV: floor, cached turns, ttl ms, then one
# JSON turn each starting with '{"pos":null,"id":"<its id>"'. Takes the thread's next position
# (past `floor`, the highest the caller has seen: a lost counter restarts from there) and extends
# the cache, if it exists, with the turns carrying it, in one atomic step. Returns {position,
# the list's length once extended if it still holds every turn ever pushed (never trimmed),
# else -1}; the position is -1 if the counter is missing and the caller knows no floor
# (floor = -1). Idempotent as long as the counter lives (both expire CACHE_TTL_MS after the
# thread's last append): the same exchange (its first turn's id) sent again, by a client
# library retrying after a connection was lost with the reply or by an instance recovering
# turns it spooled before their position came back, gets the position it got, and nothing is
# appended twice. The list and its metadata are read after they are last written: sent on a
# tracking connection (instance/storage/tracking.py), the script leaves that connection tracking
# both keys, so any later change by another client is reported to it (a key's write ends its
# tracking, for the writer too, and only a read starts it again).
APPEND_LUA = """
local xid = string.match(ARGV[4] or '', '^{"pos":null,"id":"([^"]+)"')
if xid then
  local given = redis.call('HGET', KEYS[4], xid)
  if given then return {tonumber(given), -1} end
end
local cur = tonumber(redis.call('GET', KEYS[3]) or '-1')
local floor = tonumber(ARGV[1])
if cur < 0 and floor < 0 then return {-1, -1} end
if floor > cur then cur = floor end
local pos = cur + 1
local listed = -1
redis.call('SET', KEYS[3], pos, 'PX', ARGV[3])
if tonumber(ARGV[2]) > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  for i = 4, #ARGV do
    redis.call('RPUSH', KEYS[1], '{"pos":' .. pos .. string.sub(ARGV[i], 12))
  end
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
  redis.call('HINCRBY', KEYS[2], 'turns', #ARGV - 3)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  local turns = tonumber(redis.call('HGET', KEYS[2], 'turns'))
  local len = redis.call('LLEN', KEYS[1])
  if len == turns then listed = len end
end
if xid then
  redis.call('HSET', KEYS[4], xid, pos)
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return {pos, listed}
"""

_RUN_ID_LUA = "string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')"

# KEYS: list, meta. ARGV: ttl ms, then field/value pairs. Creates the cache of a new thread once,
# stamped with the run_id of the Redis process that holds it.
CREATE_LUA = f"""
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'run', {_RUN_ID_LUA}, unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS: meta, list. ARGV: the run_id the caller's decoded copy of the list was read on ('' for
# none), and that copy's length. Returns {} on a miss, else {meta as field/value list, turns,
# current run_id, index of the first turn returned}. The turns start past the caller's copy
# only when that copy is still a prefix of the list: read on this same Redis run (a restart may
# have lost a suffix that later appends replaced), and the list never trimmed (its length is
# still the count of turns ever pushed, so index i is still the i-th turn pushed). A dropped
# cache is a miss, and a dropped cache is never recreated (only a brand-new id gets one).
READ_LUA = f"""
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {{}} end
local run = {_RUN_ID_LUA}
local from = 0
if ARGV[1] == run then
  local held = tonumber(ARGV[2])
  local turns = tonumber(redis.call('HGET', KEYS[1], 'turns') or '-1')
  if turns == redis.call('LLEN', KEYS[2]) and turns >= held then from = held end
end
return {{meta, redis.call('LRANGE', KEYS[2], from, -1), run, from}}
"""

# KEYS: meta. ARGV: run_id. Records that the cache was checked against Postgres on this run.
STAMP_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'run', ARGV[1]) end
return 1
"""


def append_args(keys: Keys, turns: int, cid: str, floor: int, blobs: list[str]) -> tuple[Any, ...]:
    """`APPEND_LUA`'s key count, keys and arguments for one exchange (`turns`: the cache's size)."""
    return (
        4, keys.thread(cid), keys.thread_meta(cid), keys.thread_pos(cid), keys.thread_xids(cid),
        floor, turns, CACHE_TTL_MS, *blobs,
    )  # fmt: skip


def create_args(keys: Keys, cid: str, create: list[str]) -> tuple[Any, ...]:
    """The EVAL of `CREATE_LUA` for a new thread's cache with these metadata fields."""
    return (
        "EVAL", CREATE_LUA, 2, keys.thread(cid), keys.thread_meta(cid),
        CACHE_TTL_MS, *create,
    )  # fmt: skip


def appended(answer: Any) -> tuple[int, int]:
    """`APPEND_LUA`'s answer: (position, the cache list's length or -1)."""
    pos, listed = answer
    return int(pos), int(listed)
