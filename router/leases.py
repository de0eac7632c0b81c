"""Exclusive instance leases in Redis: one session per instance, atomically, across routers.

A lease is `SET lease:{instance} {session} NX PX ttl`; the holder renews it while the session
lives. Renewal and release compare the value first (in Lua), so a router never extends or
frees a lease another router won after this one's expired.

Every new lease also gets a fencing token, the instance's lease generation (a counter per
instance). The router hands it to the instance with each request; the instance keeps the
token of the session it serves and refuses a reset that does not carry it, so a router whose
view of the leases is wrong (Redis lost them) cannot take a busy instance away.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis

from common.keys import Keys

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# Renew a lease only while the session's record still names this instance, and say how it
# stands. KEYS: lease, session record. ARGV: session id, ttl ms, instance id. Returns the
# record's version (renewed), 0 (the record names the instance but the lease is not the
# session's), -1 (the record is gone), -2 (the record names another instance, or none).
_RENEW_BOUND = """
local bound = redis.call('hget', KEYS[2], 'instance_id')
if not bound then return -1 end
if bound ~= ARGV[3] then return -2 end
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
return tonumber(redis.call('hget', KEYS[2], 'ver') or '1')
"""

RECORD_GONE = -1
RECORD_MOVED = -2
LEASE_LOST = 0

_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('incr', KEYS[2])
end
return 0
"""

# The first free instance among candidates, as a Lua function shared by `_ACQUIRE_FIRST` and
# the opening script (router/opening.py): the first candidate that is registered, ready, not
# draining, bound to no other session and unleased gets the lease and a new fencing token.
# `pick(k, ids, sid, ttl)`: KEYS[k] is the draining set, then per id in `ids` its instance
# hash, lease and lease generation. Returns (id, fence, index of its hash in KEYS); or
# ('', id) at the first unleased instance naming another session (a lost lease to reconcile,
# or a reset that never happened: the caller's slower path deals with it, in the same order);
# or '' when none qualifies.
PICK_LUA = """
local function pick(k, ids, sid, ttl)
  for n = 1, #ids do
    local id = ids[n]
    local i = k + 1 + (n - 1) * 3
    if redis.call('sismember', KEYS[k], id) == 0 then
      local row = redis.call('hmget', KEYS[i], 'state', 'session', 'port')
      local ready = row[1] == false or row[1] == 'ready'
      local owner = row[2]
      if row[3] and ready then
        if owner == false or owner == '' or owner == sid then
          if redis.call('set', KEYS[i + 1], sid, 'NX', 'PX', ttl) then
            return id, redis.call('incr', KEYS[i + 2]), i
          end
        elseif redis.call('exists', KEYS[i + 1]) == 0 then
          return '', id
        end
      end
    end
  end
  return ''
end
"""

# One round trip for a new lease (`pick` above). KEYS[1] = the draining set, then per
# candidate: instance hash, lease, lease generation. ARGV: session id, ttl ms, candidate ids.
# Returns {instance id, fence, instance hash as a flat list}; or {'', 0, {}, {id}} (`pick`'s
# instance to reconcile first); or {'', 0, {}, {}}.
_ACQUIRE_FIRST = (
    PICK_LUA
    + """
local ids = {}
for n = 3, #ARGV do ids[#ids + 1] = ARGV[n] end
local id, fence, i = pick(1, ids, ARGV[1], ARGV[2])
if id ~= '' then return {id, fence, redis.call('hgetall', KEYS[i])} end
if fence then return {'', 0, {}, {fence}} end
return {'', 0, {}, {}}
"""
)


# Move a lease from the session holding it straight to another one, with a fencing token above
# the holder's: the instance lets the new session take it over on its first request, without a
# reset in between (instance/runtime.py `take_over`). The token is the instance's lease
# generation as always, raised past the holder's if Redis lost the counter (so "higher" holds).
# KEYS: lease, lease generation, draining set, instance hash. ARGV: holder, new session, ttl ms,
# the holder's token, instance id. Returns the new token, or 0 with nothing changed (the lease
# is not the holder's, or the instance is unregistered, not ready or draining).
_TRANSFER = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('sismember', KEYS[3], ARGV[5]) == 1 then return 0 end
local row = redis.call('hmget', KEYS[4], 'state', 'port')
if not row[2] or (row[1] and row[1] ~= 'ready') then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
local fence = redis.call('incr', KEYS[2])
local floor = tonumber(ARGV[4]) or 0
if fence <= floor then
  fence = floor + 1
  redis.call('set', KEYS[2], fence)
end
return fence
"""


def candidate_keys(keys: Keys, instance_ids: Iterable[str]) -> list[str]:
    """`pick`'s KEYS: the draining set, then each candidate's hash, lease and lease generation."""
    out = [keys.draining()]
    for iid in instance_ids:
        out += [keys.instance(iid), keys.lease(iid), keys.lease_generation(iid)]
    return out


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Leases:
    def __init__(self, redis: Redis, keys: Keys, ttl: float) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = int(ttl * 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._renew_bound = redis.register_script(_RENEW_BOUND)
        self._acquire_first = redis.register_script(_ACQUIRE_FIRST)
        self._transfer = redis.register_script(_TRANSFER)

    async def acquire(self, instance_id: str, session_id: str) -> int:
        """Take a free instance: its new fencing token, or 0 if another session holds it."""
        keys = [self.keys.lease(instance_id), self.keys.lease_generation(instance_id)]
        return int(await self._acquire(keys=keys, args=[session_id, self.ttl_ms]))

    async def acquire_first(
        self, instance_ids: list[str], session_id: str
    ) -> tuple[str, int, dict[str, str]] | list[str]:
        """In one round trip, lease the first of `instance_ids` that is registered, ready, not
        draining, bound to no other session and unleased: (id, fencing token, registry hash).

        Otherwise a list: [] when none qualifies, or [id] of the first unleased instance that
        names another session, before any free one (it may need a reconcile or a reset first:
        the caller's slower path, which looks at the instances in the same order).
        """
        if not instance_ids:
            return []
        keys = candidate_keys(self.keys, instance_ids)
        got = await self._acquire_first(keys=keys, args=[session_id, self.ttl_ms, *instance_ids])
        iid, fence, flat = got[0], got[1], got[2]
        if not iid:
            return [str(i) for i in got[3]] if len(got) > 3 and got[3] else []
        row = {str(flat[k]): str(flat[k + 1]) for k in range(0, len(flat), 2)}
        return str(iid), int(fence), row

    async def transfer(self, instance_id: str, holder: str, session_id: str, fence: int) -> int:
        """Move `holder`'s lease of the instance (token `fence`) to `session_id`: the new token,
        higher than `fence`; 0 if the lease is not `holder`'s or the instance is not ready."""
        keys = [
            self.keys.lease(instance_id),
            self.keys.lease_generation(instance_id),
            self.keys.draining(),
            self.keys.instance(instance_id),
        ]
        args: list[str | int] = [holder, session_id, self.ttl_ms, fence, instance_id]
        return int(await self._transfer(keys=keys, args=args))

    async def reacquire(self, instance_id: str, session_id: str) -> bool:
        """Restore a lost lease for the session that still holds the instance (same token)."""
        return bool(await self.redis.set(self.keys.lease(instance_id), session_id, nx=True, px=self.ttl_ms))

    async def holder(self, instance_id: str) -> str | None:
        value = await self.redis.get(self.keys.lease(instance_id))
        return str(value) if value is not None else None

    async def holders(self, instance_ids: list[str]) -> dict[str, str | None]:
        if not instance_ids:
            return {}
        values = await self.redis.mget([self.keys.lease(i) for i in instance_ids])
        return {i: (str(v) if v is not None else None) for i, v in zip(instance_ids, values, strict=True)}

    async def renew(self, bindings: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """Renew (instance, session) leases; False where the lease is no longer this session's."""
        pairs = list(bindings)
        if not pairs:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid, sid in pairs:
                await self._renew(keys=[self.keys.lease(iid)], args=[sid, self.ttl_ms], client=pipe)
            results = await pipe.execute()
        return {pair: bool(r) for pair, r in zip(pairs, results, strict=True)}

    async def renew_bound(self, bindings: list[tuple[str, str]]) -> list[int]:
        """Compare-and-renew (instance, session) leases against the session records in one
        round trip: a router never keeps a lease alive for a binding the record no longer
        names. One result per pair, as `_RENEW_BOUND` returns them."""
        if not bindings:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for iid, sid in bindings:
                keys = [self.keys.lease(iid), self.keys.session(sid)]
                await self._renew_bound(keys=keys, args=[sid, self.ttl_ms, iid], client=pipe)
            results = await pipe.execute()
        return [int(r) for r in results]

    async def release(self, instance_id: str, session_id: str) -> bool:
        return bool(await self._release(keys=[self.keys.lease(instance_id)], args=[session_id]))
