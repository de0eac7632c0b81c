"""A session's binding written in one Redis round trip: key check, lease and record together.

Opening a 2026-07-28 session used to take four sequential round trips (look the key up, lease
a free instance, claim the key, write the record); resuming a parked one two or three (lease,
record, key mapping). Here one Lua script does all of it atomically:

- a new session: if its stateless key already names another session, nothing is written and
  the caller serves that one; otherwise the first free instance among the candidates is
  leased with a new fencing token (router/leases.py `pick`, the same rule as the allocator's
  one-round-trip path), the key is claimed and the record written;
- a stored session that needs an instance (resume after park, failover): if its record is
  gone (ended through another router), nothing is leased; if it names another instance than
  the router found there (another router resumed or moved it meanwhile: a client's requests
  spread over several routers), nothing is leased either and the router takes that binding;
  otherwise the same lease, and the record updated and announced on the sessions channel.

When no candidate is free (the fleet is full, an instance's lease needs reconciling, or this
router has not read the registry yet) nothing is written either, and the caller takes the slow
path: router/allocation.py (reconcile, park an idle session, wait, start spares), then the same
script with the instance it got (`given`), so the key claim and the record stay one round trip A
handshake-era session that resumes or moves takes that path too (its `initialize` is replayed
on the new instance before the record names it), and its record is then written by the same
script with the same check of the binding found: of two routers resuming it at once, one
binding wins and the other router gives its instance back.

A new record is not announced: no other router caches a session before its record exists, and
each finds it in Redis when the client reaches it.

The script is loaded when the router starts and called by its SHA (EVALSHA); redis-py loads it
again if Redis answers NOSCRIPT (a restarted or flushed Redis).

The script goes out on a Redis connection of the opening's own (common/redis_line.py), written
the moment it is asked for: redis-py takes a pooled connection and yields to the event loop
before writing, which costs a new session's first call about 0.1 ms of the router's time (and
more behind a busy loop). While that line is down, for a NOSCRIPT answer, and when the line
breaks with the script in flight, the script goes through redis-py as before (after a broken
line that is a second run, which is what redis-py's own retry of a failed connection does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common.redis_line import DirectLine
from router.leases import PICK_LUA, Leases, candidate_keys
from router.registry import Instance
from router.sessions import Session, SessionTable

# KEYS: 1 record, 2 sessions zset, 3 sessions channel, 4 stateless key mapping (the record's
# key again when there is none), then `pick`'s: 5 draining set, per candidate its instance
# hash, lease and lease generation.
# ARGV: 1 session id, 2 mode ('new' or 'bind'), 3 lease ttl ms, 4 record expiry ms,
# 5 last_seen, 6 total, 7 router id, 8 keyed ('1'/'0'), 9 given instance ('' to pick one),
# 10 given fence, 11 candidate count n, 12 the binding the caller found the record naming
# (router/sessions.py `binding_of`: instance id ':' fence, '' parked; bind only), 13 .. 12+n
# candidate ids, then structural field/value pairs (instance_id and fence are set from the lease).
# Returns {'taken', session id} (new: the key names another session), {'gone'} (bind: the
# record was deleted), {'bound', instance id, version} (bind: the record names another binding
# than the caller found, another router bound it meanwhile; nothing written), {'none', id or
# ''} (no free candidate; `pick`'s instance to reconcile), or {'ok', instance id, fence,
# instance hash as a flat list ({} when given), version}.
_OPEN = (
    PICK_LUA
    + """
local sid, mode = ARGV[1], ARGV[2]
local keyed = ARGV[8] == '1'
local exists = redis.call('exists', KEYS[1]) == 1
if mode == 'new' then
  if keyed then
    local owner = redis.call('get', KEYS[4])
    if owner and owner ~= sid then return {'taken', owner} end
  end
elseif not exists then
  return {'gone'}
else
  local row = redis.call('hmget', KEYS[1], 'instance_id', 'fence', 'ver')
  local bound = row[1] or ''
  if (bound == '' and '' or bound .. ':' .. (row[2] or '0')) ~= ARGV[12] then
    return {'bound', bound, tonumber(row[3] or '0')}
  end
end
local n = tonumber(ARGV[11])
local id, fence, row = ARGV[9], tonumber(ARGV[10]), {}
if id == '' then
  local ids = {}
  for j = 13, 12 + n do ids[#ids + 1] = ARGV[j] end
  local i
  id, fence, i = pick(5, ids, sid, ARGV[3])
  if id == '' then return {'none', fence or ''} end
  row = redis.call('hgetall', KEYS[i])
end
if not exists then redis.call('hset', KEYS[1], 'total', ARGV[6], 'last_seen', ARGV[5]) end
redis.call('hset', KEYS[1], unpack(ARGV, 13 + n))
redis.call('hset', KEYS[1], 'instance_id', id, 'fence', fence, 'router', ARGV[7])
local seen = redis.call('hget', KEYS[1], 'last_seen')
if tonumber(ARGV[5]) > tonumber(seen or '0') then
  redis.call('hset', KEYS[1], 'last_seen', ARGV[5])
  seen = ARGV[5]
end
local ver = redis.call('hincrby', KEYS[1], 'ver', 1)
redis.call('pexpire', KEYS[1], ARGV[4])
redis.call('zadd', KEYS[2], seen, sid)
if keyed then redis.call('set', KEYS[4], sid, 'PX', ARGV[4]) end
if exists then redis.call('publish', KEYS[3], sid .. ' ' .. ver .. ' ' .. ARGV[7]) end
return {'ok', id, fence, row, ver}
"""
)


@dataclass(frozen=True, slots=True)
class Opened:
    """The session is bound to `instance_id` with `fence`, its record at version `ver`.

    `instance` is the registry entry the script read (None when the caller gave the instance,
    or the entry is malformed: the router then reads it again when it first needs it)."""

    instance_id: str
    fence: int
    ver: int
    instance: Instance | None


@dataclass(frozen=True, slots=True)
class Taken:
    """The stateless key already names another session (opened by another router or process)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class NoneFree:
    """No candidate was free; nothing was written. `reconcile`: the instance (if any) whose
    lease looks lost, which the allocator's slow path looks at first."""

    reconcile: str


@dataclass(frozen=True, slots=True)
class Bound:
    """The stored session's record names `instance_id` ('' parked), not the instance the caller
    found there: another router resumed, moved or parked it meanwhile. Nothing was written;
    the caller re-reads the record."""

    instance_id: str
    ver: int


class Gone:
    """The stored session's record was deleted (another router ended it); nothing was leased."""


GONE = Gone()

Outcome = Opened | Taken | NoneFree | Bound | Gone


class Opening:
    def __init__(self, table: SessionTable, leases: Leases) -> None:
        self.table = table
        self.leases = leases
        self.redis: Redis = table.redis
        self._open = self.redis.register_script(_OPEN)
        self.line: DirectLine | None = None  # opened by `load` (see the module's doc)
        self.by_line = 0  # scripts that went out on the line (the rest: redis-py)

    async def load(self) -> None:
        """Load the script into Redis now (router start), so no new session pays for it, and
        open the line (it connects in the background)."""
        if self.line is None:
            self.line = DirectLine(self.redis)
            self.line.start()
        self._open.sha = str(await self.redis.script_load(_OPEN))

    async def close(self) -> None:
        if self.line is not None:
            await self.line.close()

    async def _call(self, keys: list[str], args: list[str | int]) -> Any:
        """The script's answer: on the line when it is up, else (or if it fails) via redis-py."""
        sent = self.line.send("EVALSHA", self._open.sha, len(keys), *keys, *args) if self.line else None
        if sent is not None:
            try:
                got = await sent
            except ResponseError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # Redis lost its scripts (restarted, flushed): load it again, then redis-py's run.
                self._open.sha = str(await self.redis.script_load(_OPEN))
            except RedisConnectionError:
                pass  # the line broke: redis-py runs it (again), as its own retry would
            else:
                self.by_line += 1
                return got
        return await self._open(keys=keys, args=args)

    async def open(
        self, sess: Session, candidates: Sequence[str], *, given: tuple[Instance, int] | None = None
    ) -> Outcome:
        """Write a new session: key claim (stateless era), lease and record in one round trip.
        Returns Opened, Taken or NoneFree; the session is cached here only when Opened."""
        return await self._run(sess, "new", candidates, given, {})

    async def bind(
        self,
        sess: Session,
        candidates: Sequence[str],
        changes: dict[str, Any],
        *,
        found: str,
        given: tuple[Instance, int] | None = None,
    ) -> Outcome:
        """Lease a free instance for a stored session (or take `given`, already leased) and
        update its record (with `changes` applied) in one round trip, if the record still
        names `found` (`binding_of`; '' parked: the binding this router is replacing). Returns Opened,
        NoneFree, Bound or GONE; with `given`, Opened, Bound or GONE."""
        return await self._run(sess, "bind", candidates, given, changes, found)

    async def _run(
        self,
        sess: Session,
        mode: str,
        candidates: Sequence[str],
        given: tuple[Instance, int] | None,
        changes: dict[str, Any],
        found: str = "",
    ) -> Outcome:
        table = self.table
        keys = table.keys
        record = keys.session(sess.id)
        if given is not None:
            candidates = ()
        mapping = keys.session_key(sess.key) if sess.key else record
        head = [record, keys.sessions(), keys.sessions_channel(), mapping]
        args: list[str | int] = [
            sess.id, mode, self.leases.ttl_ms, table.expire_ms, repr(sess.last_seen), sess.total,
            table.origin, "1" if sess.key else "0", given[0].id if given else "", given[1] if given else 0,
            len(candidates), found, *candidates,
        ]  # fmt: skip
        got = await self._call(
            [*head, *candidate_keys(keys, candidates)], [*args, *sess.structural(**changes)]
        )
        kind = str(got[0])
        if kind == "ok":
            iid, fence, flat, ver = str(got[1]), int(got[2]), got[3], int(got[4])
            if given is not None:
                inst: Instance | None = given[0]
            else:
                inst = Instance.from_hash({str(flat[k]): str(flat[k + 1]) for k in range(0, len(flat), 2)})
                if inst is not None and inst.id != iid:
                    inst = None
            return Opened(iid, fence, ver, inst)
        if kind == "taken":
            return Taken(str(got[1]))
        if kind == "none":
            return NoneFree(str(got[1]))
        if kind == "bound":
            return Bound(str(got[1]), int(got[2]))
        return GONE
