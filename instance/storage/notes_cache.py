"""A Redis copy of each note scope, so a chat reads its notes without waiting for Postgres.

Postgres stays the truth: notes are written there directly (instance/storage/notes.py), and
this copy is only what a chat call reads to build its notes block. Two keys per scope
(common/keys.py): the copy (the scope's rows as JSON, with the time they were read) and a
generation counter.

- A note write commits in Postgres, then bumps the scope's generation and deletes the copy, all
  before it returns: the next chat misses and reads Postgres, so a writer always sees its write.
- A reader that missed reads the generation, then Postgres, and stores its copy only if the
  generation is still the one it read (one Lua step). A write that committed after the read
  began has bumped it, so a read racing a write can never put the older rows back.
- A copy older than REFRESH_S is still served, and re-read from Postgres in the background (at
  most one re-read per scope at a time). That bounds how long a copy can be wrong in the cases
  the generation cannot catch: a writer that died between its commit and the bump, a bump
  lost with Redis (restart without its latest writes), a write made while Redis was unreachable.
- Without Redis, or when it is down, every read goes to Postgres, as before the copy existed.
- With a tracking connection (instance/storage/tracking.py), the copies this process read are
  kept decoded in memory and used without asking Redis while Redis reports no change to the
  scope's copy or generation since they were read. A write here drops this process's copy of the
  scope before its bump is sent, and no read already on its way can bring an older one back
  (`_written_at`), so the writer always sees its own write. A held copy older than REFRESH_S is
  re-read in the background as a Redis copy is; the re-read stores a new copy in Redis, whose
  invalidation makes the next read take it. A scope Redis answered "no copy" for is remembered
  the same way (Redis tracks a key read while it did not exist): until its keys change, the next
  read goes straight to Postgres without asking again, and while Postgres is down fails at once,
  so a session that began during an outage does not pay a Redis round trip on every chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from common.errors import StorageUnavailable
from common.keys import Keys
from instance.storage.cache import CacheDown, RedisGuard
from instance.storage.models import Note
from instance.storage.tracking import Stamp, Tracker, tracked

log = logging.getLogger(__name__)

REFRESH_S = 5.0
"""A copy older than this is served and re-read from Postgres in the background."""
COPY_TTL_MS = 24 * 3600 * 1000
GENERATION_TTL_MS = 7 * 24 * 3600 * 1000  # outlives every copy, so a copy never meets a reset counter

# KEYS: copy, generation. ARGV: the generation read before Postgres ('' = none), value, ttl ms.
_STORE_LUA = """
local g = redis.call('GET', KEYS[2]) or ''
if g ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: copy, generation. ARGV: generation ttl ms. After a committed write.
_BUMP_LUA = """
local g = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return g
"""

Scope = tuple[str, str]
HELD_SCOPES = 256
"""Note scopes whose rows this process keeps decoded (one session per instance: a few)."""
Reader = Callable[[str, str], Awaitable[list[Note]]]


def _note_from_dict(d: dict[str, Any]) -> Note:
    from instance.storage.models import parse_ts

    created, updated = parse_ts(d["created_at"]), parse_ts(d["updated_at"])
    assert created is not None and updated is not None
    return Note(
        id=str(d["id"]),
        scope=str(d["scope"]),
        scope_id=str(d["scope_id"]),
        key=str(d["key"]),
        body=str(d["body"]),
        kind=str(d["kind"]),
        importance=int(d["importance"]),
        version=int(d["version"]),
        created_at=created,
        updated_at=updated,
        source=str(d.get("source") or "manual"),
        source_turn=d.get("source_turn"),
    )


class NotesCache:
    """Per-scope copies of notes in Redis; `read_postgres(scope, scope_id)` is the truth."""

    def __init__(
        self,
        cache: RedisGuard,
        keys: Keys,
        read_postgres: Reader,
        *,
        postgres_down: Callable[[], bool] = lambda: False,
        refresh_s: float = REFRESH_S,
        tracker: Tracker | None = None,
    ) -> None:
        self._cache = cache
        self._keys = keys
        self._read = read_postgres
        self._postgres_down = postgres_down
        self.refresh_s = refresh_s
        self._refreshing: dict[Scope, asyncio.Task[None]] = {}
        self.hits_total = 0
        self.misses_total = 0
        self.refreshes_total = 0
        self.refused_total = 0  # copies not stored because a write committed meanwhile
        self._unbumped: set[Scope] = set()  # written here while Redis was unreachable
        self._tracker = tracker
        # Copies read from Redis, decoded: (stamp when asked for, writes count then, at, notes).
        self._held: dict[Scope, tuple[Stamp, int, float, list[Note]]] = {}
        # Scopes Redis had no copy of (stamp when asked, writes count then): while Redis reports
        # no change to their keys, asking again would get no copy again, so a read goes straight
        # to Postgres, or (Postgres down) fails at once, without the round trip.
        self._absent: dict[Scope, tuple[Stamp, int]] = {}
        self.absent_skips_total = 0  # scopes read without asking Redis, known to have no copy
        self._writes = 0  # note writes of this process, counted
        self._written_at: dict[Scope, int] = {}  # the count when the scope was last written here
        self.tracked_hits_total = 0  # scopes served from the held copy, no Redis round trip

    @property
    def enabled(self) -> bool:
        return self._cache.redis is not None

    # --- reading ---------------------------------------------------------------------------
    async def lists(self, scopes: Sequence[Scope]) -> list[list[Note]]:
        """The notes of each scope, from the copies where present; Postgres for the rest.

        Raises StorageUnavailable when a scope has no copy and Postgres cannot be read.
        """
        if not scopes:
            return []
        found: list[tuple[Any, Any]] = [(None, None)] * len(scopes)
        out: list[list[Note] | None] = [None] * len(scopes)
        now = time.time()
        ask = list(range(len(scopes)))
        absent: list[int] = []
        if self._tracker is not None and (self._held or self._absent):
            ask = []
            for i, scope in enumerate(scopes):
                notes = self._trusted(scope, now)
                if notes is not None:
                    out[i] = notes
                elif self._still_absent(scope):
                    absent.append(i)
                else:
                    ask.append(i)
        stamp, writes = None, self._writes
        if self.enabled and ask:
            names = [k for i in ask for k in (self._copy_key(scopes[i]), self._gen_key(scopes[i]))]
            try:  # on the tracking connection when it is up (its reply's stamp)
                values, stamp = await tracked(self._tracker, self._cache, "MGET", *names)
                for j, i in enumerate(ask):
                    found[i] = (values[2 * j], values[2 * j + 1])
            except CacheDown:
                stamp = None
        misses: list[int] = []
        for i in ask:
            scope, (raw, _) = scopes[i], found[i]
            copy = None if scope in self._unbumped else self._parse(scope, raw)
            if copy is None:
                if raw is None and stamp is not None and self._written_at.get(scope, -1) <= writes:
                    self._keep_absent(scope, stamp, writes)
                misses.append(i)
                continue
            at, notes = copy
            out[i] = notes
            self.hits_total += 1
            if stamp is not None and self._written_at.get(scope, -1) <= writes:
                self._keep(scope, (stamp, writes, at, notes))
            if now - at >= self.refresh_s:
                self._refresh_later(scope)
        if misses or absent:
            self.misses_total += len(misses) + len(absent)
            self.absent_skips_total += len(absent)
            read = await asyncio.gather(
                *(self._read_and_store(scopes[i], found[i][1]) for i in misses),
                *(self._read_and_store(scopes[i], None, known=False) for i in absent),
            )
            for i, notes in zip([*misses, *absent], read, strict=True):
                out[i] = notes
        return [notes or [] for notes in out]

    def _trusted(self, scope: Scope, now: float) -> list[Note] | None:
        """The held rows of `scope` if nothing changed its copy or generation since they were
        read and no write of this process came after that read; None: ask Redis."""
        held = self._held.get(scope)
        if held is None or self._tracker is None or scope in self._unbumped:
            return None
        stamp, writes, at, notes = held
        if self._written_at.get(scope, -1) > writes or not self._tracker.unchanged(
            stamp, self._copy_key(scope), self._gen_key(scope)
        ):
            self._held.pop(scope, None)
            return None
        self.hits_total += 1
        self.tracked_hits_total += 1
        if now - at >= self.refresh_s:
            self._refresh_later(scope)
        return notes

    def _still_absent(self, scope: Scope) -> bool:
        """Whether Redis had no copy of `scope` when last asked and nothing changed its keys since
        (nor did a write of this process)."""
        entry = self._absent.get(scope)
        if entry is None or self._tracker is None:
            return False
        stamp, writes = entry
        if (
            scope in self._unbumped
            or self._written_at.get(scope, -1) > writes
            or not self._tracker.unchanged(stamp, self._copy_key(scope), self._gen_key(scope))
        ):
            del self._absent[scope]
            return False
        return True

    def _keep_absent(self, scope: Scope, stamp: Stamp, writes: int) -> None:
        if len(self._absent) >= HELD_SCOPES and scope not in self._absent:
            self._absent.clear()
        self._absent[scope] = (stamp, writes)

    def _keep(self, scope: Scope, held: tuple[Stamp, int, float, list[Note]]) -> None:
        if len(self._held) >= HELD_SCOPES and scope not in self._held:
            self._held.clear()  # forgetting only costs the next reads a round trip
        self._held[scope] = held

    def _parse(self, scope: Scope, raw: Any) -> tuple[float, list[Note]] | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return float(data["at"]), [_note_from_dict(d) for d in data["notes"]]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed notes copy of %s %s: %s", scope[0], scope[1], exc)
            return None

    async def _read_and_store(self, scope: Scope, generation: Any, *, known: bool = True) -> list[Note]:
        """Read Postgres and store the copy if no write committed since `generation` was read
        (`known` False: the generation is taken here, unless Postgres is known to be down)."""
        if self._postgres_down():
            raise StorageUnavailable(f"Postgres is down: the {scope[0]} notes have no copy to serve")
        if not known and self.enabled:  # a background re-read, or a known miss: the generation now
            try:
                generation = await self._cache.call(lambda r: r.get(self._gen_key(scope)))
            except CacheDown:
                return await self._read(*scope)
        read_at = time.time()
        notes = await self._read(*scope)
        self._absent.pop(scope, None)  # the copy stored now (or refused) is asked for next time
        if scope in self._unbumped:
            await self.written(*scope)  # retried: the copy goes; the next read stores a new one
        elif self.enabled:
            await self._store(scope, generation, read_at, notes)
        return notes

    async def _store(self, scope: Scope, generation: Any, read_at: float, notes: list[Note]) -> None:
        gen = "" if generation is None else generation
        gen = gen.decode() if isinstance(gen, bytes) else str(gen)
        value = json.dumps(
            {"at": read_at, "notes": [n.to_dict() for n in notes]}, separators=(",", ":"), ensure_ascii=False
        )
        try:
            stored = await self._cache.call(
                lambda r: r.eval(
                    _STORE_LUA, 2, self._copy_key(scope), self._gen_key(scope), gen, value, COPY_TTL_MS
                )  # type: ignore[no-any-return]
            )
        except CacheDown:
            return
        if not stored:
            self.refused_total += 1

    def _refresh_later(self, scope: Scope) -> None:
        """Re-read one scope in the background, at most one re-read per scope at a time."""
        if scope in self._refreshing or self._postgres_down():
            return
        task = asyncio.create_task(self._refresh(scope), name="exai-notes-refresh")
        self._refreshing[scope] = task
        task.add_done_callback(lambda _: self._refreshing.pop(scope, None))

    async def _refresh(self, scope: Scope) -> None:
        self.refreshes_total += 1
        try:
            await self._read_and_store(scope, None, known=False)
        except StorageUnavailable:
            pass
        except Exception as exc:
            log.warning("re-reading the notes of %s %s failed: %s: %s", *scope, type(exc).__name__, exc)

    async def seed_empty(self, scope: str, scope_id: str) -> None:
        """Record that a scope nobody can know yet (a brand-new thread) has no notes."""
        if self.enabled:
            await self._store((scope, scope_id), None, time.time(), [])

    # --- writing ---------------------------------------------------------------------------
    async def written(self, scope: str, scope_id: str) -> None:
        """After a note write of the scope committed: older copies must not be served or stored."""
        key = (scope, scope_id)
        # Before the bump is sent: this process never again trusts a copy read before the write.
        self._forget(key)
        if not self.enabled:
            return
        try:
            await self._cache.call(
                lambda r: r.eval(_BUMP_LUA, 2, self._copy_key(key), self._gen_key(key), GENERATION_TTL_MS)  # type: ignore[no-any-return]
            )
            # And after it: a read sent meanwhile may have been answered before the bump, and its
            # invalidation may not have arrived yet when the writer reads next.
            self._forget(key)
        except CacheDown:
            # This instance reads the scope from Postgres until a bump gets through; elsewhere
            # the copy is re-read within REFRESH_S.
            self._unbumped.add(key)
            return
        self._unbumped.discard(key)

    def _forget(self, key: Scope) -> None:
        """No copy of `key` read before now is trusted again by this process."""
        self._writes += 1
        if len(self._written_at) > 50_000:
            self._written_at.clear()
            self._held.clear()
            self._absent.clear()
        self._written_at[key] = self._writes
        self._held.pop(key, None)
        self._absent.pop(key, None)

    async def stop(self) -> None:
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stats(self) -> dict[str, int]:
        return {
            "hits_total": self.hits_total,
            "misses_total": self.misses_total,
            "refreshes_total": self.refreshes_total,
            "refused_total": self.refused_total,
            "tracked_hits_total": self.tracked_hits_total,
            "absent_skips_total": self.absent_skips_total,
        }

    def _copy_key(self, scope: Scope) -> str:
        return self._keys.notes(*scope)

    def _gen_key(self, scope: Scope) -> str:
        return self._keys.notes_generation(*scope)
