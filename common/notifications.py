"""A session's server-to-client notifications: a bounded durable log plus a wake-up channel.

Instances (and the admin API) append; routers read. One Lua script appends the event to the
session's Redis stream (trimmed to about EXAI_NOTIFY_LOG_MAXLEN entries, expiring with the
session) and publishes the new entry on the session's channel, so an event is never announced
without being in the log. The publish carries `<previous id> <id> <message>`: a router whose
stream has written exactly up to the previous id writes the message at once (no read of the
log); any other router, or any doubt, reads the log after the last id it delivered, which
makes delivery ordered and duplicate-free however many times it is woken, and lets it catch
up after Redis or the router itself was away (see `carried`). The entry ids (`<ms>-<seq>`,
increasing) are the SSE event ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common.errors import InvalidArgument
from common.keys import Keys

END = "end"
"""Published on a session's channel when the session ends: its streams close."""

FIRST_ID = "0-0"

_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = last[1] and last[1][1] or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', KEYS[2], prev .. ' ' .. id .. ' ' .. ARGV[2])
return id
"""


# The same for several events at once (one round trip): KEYS = log, channel, log, channel, ...
# after `skip` leading keys; ARGV = maxlen, ttl, then the messages after `askip` leading args
# (one message per pair of keys, appended in order).
_APPEND_EACH = """
for i = 1, (#KEYS - skip) / 2 do
    local log, chan = KEYS[skip + 2 * i - 1], KEYS[skip + 2 * i]
    local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
    local prev = last[1] and last[1][1] or '0-0'
    local id = redis.call('XADD', log, 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[askip + i])
    redis.call('EXPIRE', log, ARGV[2])
    redis.call('PUBLISH', chan, prev .. ' ' .. id .. ' ' .. ARGV[askip + i])
    ids[i] = id
end
return ids
"""
_APPEND_MANY = "local ids, skip, askip = {}, 0, 2\n" + _APPEND_EACH
# The same, after marking `member` in the sorted set KEYS[1] with score ARGV[4] (dropping members
# scored below ARGV[5]): ARGV = maxlen, ttl, member, score, now, messages...
_APPEND_MARKED = (
    """
local ids, skip, askip = {}, 1, 5
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], 3600)
"""
    + _APPEND_EACH
)


@dataclass(frozen=True, slots=True)
class Event:
    """One logged notification: its stream id and the JSON-RPC notification object."""

    id: str
    message: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.message.get("method", ""))

    @property
    def params(self) -> dict[str, Any] | None:
        params = self.message.get("params")
        return params if isinstance(params, dict) else None


def notification(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-RPC notification object, checked enough that a client can always parse it."""
    if not isinstance(method, str) or not method.startswith("notifications/"):
        raise InvalidArgument(
            f"{method!r} is not a notification method (it must start with 'notifications/')."
        )
    if params is not None and not isinstance(params, dict):
        raise InvalidArgument("Notification params must be a JSON object.")
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


def parse_id(value: str | None) -> tuple[int, int] | None:
    """(ms, seq) of a stream id such as '1732620000000-3', or None if it is not one."""
    if not value:
        return None
    ms, sep, seq = value.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        return None
    return int(ms), int(seq)


def carried(data: str) -> tuple[str, Event] | None:
    """(previous id, the event) from a publish on a session's channel, or None when it carries
    no event (END, a bare id from an older writer, anything unexpected: read the log then)."""
    prev, sep, rest = data.partition(" ")
    event_id, sep2, text = rest.partition(" ")
    if not sep or not sep2 or parse_id(prev) is None or parse_id(event_id) is None:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return (prev, Event(event_id, message)) if isinstance(message, dict) else None


def newer(a: str, b: str) -> bool:
    """True if stream id `a` comes after `b` (both valid ids)."""
    pa, pb = parse_id(a), parse_id(b)
    return pa is not None and pb is not None and pa > pb


class EventLog:
    """Append to and read from sessions' notification logs (see the module docstring)."""

    def __init__(self, redis: Redis, keys: Keys, *, maxlen: int, ttl: float) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self.ttl = max(1, int(ttl))
        self._append = redis.register_script(_APPEND)
        self._append_many = redis.register_script(_APPEND_MANY)
        self._append_marked = redis.register_script(_APPEND_MARKED)

    async def append(self, session_id: str, message: dict[str, Any]) -> str:
        """Log `message` for the session and wake its readers; returns the event id."""
        data = json.dumps(message, separators=(",", ":"))
        keys = [self.keys.events(session_id), self.keys.session_channel(session_id)]
        return str(await self._append(keys=keys, args=[self.maxlen, data, self.ttl]))

    async def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Log several (session, message) pairs in one round trip, in order; their event ids."""
        if not items:
            return []
        keys: list[str] = []
        args: list[Any] = [self.maxlen, self.ttl]
        for session_id, message in items:
            keys += [self.keys.events(session_id), self.keys.session_channel(session_id)]
            args.append(json.dumps(message, separators=(",", ":")))
        return [str(i) for i in await self._append_many(keys=keys, args=args)]

    async def append_marked(
        self, marker: str, member: str, score: float, now: float, items: list[tuple[str, dict[str, Any]]]
    ) -> list[str]:
        """`append_many`, in the same atomic step as adding `member` to the sorted set `marker`
        (scored `score`; members scored below `now` are dropped): a reader woken by one of
        these events already finds the mark."""
        keys, args = self._marked(marker, member, score, now, items)
        return [str(i) for i in await self._append_marked(keys=keys, args=args)]

    def append_marked_command(
        self, marker: str, member: str, score: float, now: float, items: list[tuple[str, dict[str, Any]]]
    ) -> tuple[Any, ...]:
        """`append_marked` as a raw EVALSHA command (for a connection that writes it at once,
        common/redis_line.py); a NOSCRIPT reply means: call `append_marked` (it loads it)."""
        keys, args = self._marked(marker, member, score, now, items)
        return ("EVALSHA", self._append_marked.sha, len(keys), *keys, *args)

    def _marked(
        self, marker: str, member: str, score: float, now: float, items: list[tuple[str, dict[str, Any]]]
    ) -> tuple[list[str], list[Any]]:
        keys: list[str] = [marker]
        args: list[Any] = [self.maxlen, self.ttl, member, score, now]
        for session_id, message in items:
            keys += [self.keys.events(session_id), self.keys.session_channel(session_id)]
            args.append(json.dumps(message, separators=(",", ":")))
        return keys, args

    async def after(self, session_id: str, cursor: str, *, count: int = 200) -> list[Event]:
        """Up to `count` events logged after `cursor`, oldest first."""
        rows = await self.redis.xrange(self.keys.events(session_id), f"({cursor}", "+", count=count)
        out = []
        for entry_id, fields in rows or ():
            try:
                message = json.loads(str((fields or {}).get("m", "")))
            except ValueError:
                continue  # not written by EventLog.append; skip rather than break the stream
            if isinstance(message, dict):
                out.append(Event(str(entry_id), message))
        return out

    async def tail(self, session_id: str) -> str:
        """The id of the newest event (FIRST_ID for an empty log): where a new stream starts."""
        rows = await self.redis.xrevrange(self.keys.events(session_id), "+", "-", count=1)
        return str(rows[0][0]) if rows else FIRST_ID

    async def trimmed_after(self, session_id: str, cursor: str) -> bool:
        """True if events newer than `cursor` were already trimmed away (a resume with a gap)."""
        try:
            info = await self.redis.xinfo_stream(self.keys.events(session_id))
        except ResponseError:  # no such key: nothing was ever trimmed
            return False
        deleted = str(info.get("max-deleted-entry-id") or FIRST_ID)
        return newer(deleted, cursor)

    async def end(self, session_id: str, *, linger: int = 60) -> None:
        """The session is over: close its streams on every router (they write what is left in
        the log first), and let the log go `linger` seconds later."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.expire(self.keys.events(session_id), linger)
            pipe.publish(self.keys.session_channel(session_id), END)
            await pipe.execute()
