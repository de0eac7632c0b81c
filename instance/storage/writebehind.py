"""The flusher: moves spooled rows into Postgres in batches, and never loses or doubles one.

Rows are sent oldest first, grouped by table, one `INSERT ... SELECT FROM unnest(...)` per table,
all of them in a single statement (each table's INSERT a data-modifying CTE: one round trip, no
BEGIN/COMMIT), `ON CONFLICT DO NOTHING` on the client-generated ids: a batch that was
committed but not yet acknowledged in the spool (kill -9 between the two) is simply replayed.
A batch is triggered by size (`flush_batch_size` rows) or time (`flush_interval_ms` after the
first pending row); link events go at once, taken from the spool's memory rather than its file
(Spool.hot_batch), and a batch of link events alone is one SQL statement per group, outside any
explicit transaction (one round trip). While Postgres is unreachable the flusher backs off
(capped, jittered) and the spool keeps accepting. A row that Postgres rejects for good (bad
data) is isolated and moved to the spool's `dead` table with the error, loudly, so it cannot
block everything behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from common import links as link_store
from common.errors import StorageUnavailable
from instance.storage.pool import Database
from instance.storage.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)

KIND_CONVERSATION = "conversation"
KIND_MESSAGE = "message"
KIND_TOOL_CALL = "tool_call"
KIND_SESSION = "session"
KIND_CACHE_MARK = "thread_cache_mark"
KIND_LINK_EVENT = "link_event"  # a link group's event; ids are given in Postgres (common/links.py)
HOLD_MAX = 0.05  # longest the flusher waits for a held sender's answer (Flusher.hold), seconds


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value))


def _jsonb(value: Any, default: str) -> str:
    return default if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_CONVERSATIONS_SQL = """
INSERT INTO conversations (id, session_id, tool_name, model, created_at, metadata, principal)
SELECT u.id, u.session_id, u.tool_name, u.model, u.created_at, u.metadata::jsonb, u.principal
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::text[])
     AS u(id, session_id, tool_name, model, created_at, metadata, principal)
ON CONFLICT (id) DO NOTHING
"""

_MESSAGES_SQL = """
INSERT INTO messages (id, conversation_id, seq, role, content, session_id, tool_name, model, files,
                      tokens_in, tokens_out, created_at, metadata, pos)
SELECT u.id, u.conversation_id, u.seq, u.role, u.content, u.session_id, u.tool_name, u.model,
       u.files::jsonb, u.tokens_in, u.tokens_out, u.created_at, u.metadata::jsonb, u.pos
FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::int[], $11::int[], $12::timestamptz[], $13::text[],
            $14::bigint[])
     AS u(id, conversation_id, seq, role, content, session_id, tool_name, model, files,
          tokens_in, tokens_out, created_at, metadata, pos)
ON CONFLICT (id) DO NOTHING
"""

_CACHE_MARKS_SQL = """
INSERT INTO thread_cache_marks (id, conversation_id)
SELECT * FROM unnest($1::uuid[], $2::uuid[])
ON CONFLICT (id) DO NOTHING
"""

_TOOL_CALLS_SQL = """
INSERT INTO tool_calls (id, session_id, instance_id, tool_name, status, duration_ms, model,
                        tokens_in, tokens_out, error, created_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[],
                     $7::text[], $8::int[], $9::int[], $10::text[], $11::timestamptz[])
ON CONFLICT (id) DO NOTHING
"""

# Sessions are upserted (last_seen_at only moves forward), so a replay changes nothing.
_SESSIONS_SQL = """
INSERT INTO sessions (id, principal, client_name, era, created_at, last_seen_at)
SELECT u.id, u.principal, u.client_name, u.era, u.seen, u.seen
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
     AS u(id, principal, client_name, era, seen)
ON CONFLICT (id) DO UPDATE SET
    principal = COALESCE(EXCLUDED.principal, sessions.principal),
    client_name = COALESCE(EXCLUDED.client_name, sessions.client_name),
    era = COALESCE(EXCLUDED.era, sessions.era),
    last_seen_at = GREATEST(sessions.last_seen_at, EXCLUDED.last_seen_at)
"""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[r[i] for r in rows] for i in range(width)]


def _dedupe(entries: Sequence[SpoolEntry], key: str = "id") -> list[dict[str, Any]]:
    """Keep one payload per id (the newest): Postgres refuses to touch a row twice per statement."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        out[str(e.payload[key])] = e.payload
    return list(out.values())


async def write_entries(conn: asyncpg.Connection, entries: Sequence[SpoolEntry]) -> list[Any]:
    """Insert a batch of spooled rows in one transaction (idempotent).

    Returns the link-group events stored now (with their group ids and members), for the
    instance to publish after the commit; a replayed event is not among them.
    """
    by_kind: dict[str, list[SpoolEntry]] = {}
    for e in entries:
        by_kind.setdefault(e.kind, []).append(e)
    known = {KIND_CONVERSATION, KIND_MESSAGE, KIND_TOOL_CALL, KIND_SESSION, KIND_CACHE_MARK, KIND_LINK_EVENT}
    unknown = set(by_kind) - known
    if unknown:
        raise asyncpg.DataError(f"unknown spool record kind(s): {sorted(unknown)}")
    if set(by_kind) == {KIND_LINK_EVENT}:  # live link events: one statement per group, no BEGIN/COMMIT
        return await link_store.store_spooled(conn, [e.payload for e in by_kind[KIND_LINK_EVENT]])
    kinds: list[str] = []
    args: list[Any] = []
    for kind in _TABLE_ORDER:
        if kind in by_kind:
            kinds.append(kind)
            args.extend(_columns(_ROWS[kind](_dedupe(by_kind[kind])), _TABLES[kind][1]))
    sql = _batch_sql(tuple(kinds))
    if KIND_LINK_EVENT not in by_kind:
        # One statement, atomic by itself: no BEGIN and COMMIT round trips around it.
        await conn.execute(sql, *args)
        return []
    async with conn.transaction():
        await conn.execute(sql, *args)
        return await link_store.store_spooled(conn, [e.payload for e in by_kind[KIND_LINK_EVENT]])


def _conversation_rows(payloads: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (p["id"], p.get("session_id"), p.get("tool_name"), p.get("model"), _ts(p["created_at"]),
         _jsonb(p.get("metadata"), "{}"), p.get("principal"))
        for p in payloads
    ]  # fmt: skip


def _message_rows(payloads: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (p["id"], p["continuation_id"], p["seq"], p["role"], p["content"], p.get("session_id"),
         p.get("tool_name"), p.get("model"), _jsonb(p.get("files"), "[]"), p.get("tokens_in"),
         p.get("tokens_out"), _ts(p["created_at"]), _jsonb(p.get("metadata"), "{}"), p.get("pos"))
        for p in payloads
    ]  # fmt: skip


def _cache_mark_rows(payloads: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(p["id"], p["conversation_id"]) for p in payloads]


def _tool_call_rows(payloads: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (p["id"], p.get("session_id"), p.get("instance_id"), p["tool_name"], p["status"],
         p.get("duration_ms"), p.get("model"), p.get("tokens_in"), p.get("tokens_out"),
         p.get("error"), _ts(p["created_at"]))
        for p in payloads
    ]  # fmt: skip


def _session_rows(payloads: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (p["id"], p.get("principal"), p.get("client_name"), p.get("era"), _ts(p["seen_at"])) for p in payloads
    ]


# The tables a batch writes, in this order; each kind's statement and its number of columns.
_TABLE_ORDER = (KIND_CONVERSATION, KIND_MESSAGE, KIND_CACHE_MARK, KIND_TOOL_CALL, KIND_SESSION)
_TABLES: dict[str, tuple[str, int]] = {
    KIND_CONVERSATION: (_CONVERSATIONS_SQL, 7),
    KIND_MESSAGE: (_MESSAGES_SQL, 14),
    KIND_CACHE_MARK: (_CACHE_MARKS_SQL, 2),
    KIND_TOOL_CALL: (_TOOL_CALLS_SQL, 11),
    KIND_SESSION: (_SESSIONS_SQL, 5),
}
_ROWS: dict[str, Callable[[list[dict[str, Any]]], list[tuple[Any, ...]]]] = {
    KIND_CONVERSATION: _conversation_rows,
    KIND_MESSAGE: _message_rows,
    KIND_CACHE_MARK: _cache_mark_rows,
    KIND_TOOL_CALL: _tool_call_rows,
    KIND_SESSION: _session_rows,
}
_PARAM = re.compile(r"\$(\d+)")


def _shifted(offset: int, match: re.Match[str]) -> str:
    return f"${int(match.group(1)) + offset}"


@functools.cache
def _batch_sql(kinds: tuple[str, ...]) -> str:
    """One statement writing every table in `kinds`: each table's INSERT as a data-modifying
    CTE, the last one the main statement, parameters numbered on. A statement commits whole or
    not at all, and a chat's exchange (its two turns and the call's record) takes one round
    trip instead of BEGIN, an INSERT per table and COMMIT. At most 31 variants, each prepared
    once per connection (asyncpg's statement cache)."""
    parts: list[str] = []
    offset = 0
    for kind in kinds:
        sql, width = _TABLES[kind]
        parts.append(_PARAM.sub(functools.partial(_shifted, offset), sql.strip()))
        offset += width
    if len(parts) == 1:
        return parts[0]
    ctes = ",\n".join(f"w{i} AS (\n{part}\n)" for i, part in enumerate(parts[:-1]))
    return f"WITH {ctes}\n{parts[-1]}"


class Flusher:
    """Background task draining the spool into Postgres; reports what it could not do yet."""

    def __init__(
        self,
        spool: Spool,
        db: Database,
        *,
        batch_size: int,
        interval_s: float,
        max_backoff_s: float = 5.0,
        writer: Callable[[asyncpg.Connection, Sequence[SpoolEntry]], Any] = write_entries,
        after_write: Callable[[Any], None] | None = None,
    ) -> None:
        self._spool = spool
        self._db = db
        self._batch_size = batch_size
        self._interval = interval_s
        self._max_backoff = max_backoff_s
        self._writer = writer
        self.after_write = after_write  # told what each committed batch wrote (link events)
        # Awaited before a batch is written (link events wait for the task write they name).
        self.gate: Callable[[list[SpoolEntry]], Awaitable[None]] | None = None
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Holds (`hold`): callers whose answer goes out before the store of what they spooled.
        self._holds = 0
        self._released = asyncio.Event()
        self._released.set()
        self.flushed_total = 0
        self.batches_total = 0
        self.last_error: str | None = None
        self.last_flush_at: float | None = None
        self._failing_since: float | None = None
        spool.on_commit = self._on_commit

    def _on_commit(self, rows: int, hot: bool = False) -> None:
        self._wake.set()
        if hot or rows >= self._batch_size:  # link events are live: no waiting for a batch
            self._full.set()

    def kick(self) -> None:
        """Flush what is spooled without waiting for the batch to fill (link events are live)."""
        self._wake.set()
        self._full.set()

    def hold(self) -> Callable[[], None]:
        """Keep the flusher from starting a batch until the returned release is called (at
        most HOLD_MAX): a sender's answer is written before the store of its event, whose work
        (a Postgres round trip, the stream entry, the spool's delete) would otherwise share the
        loop and the CPU with it. The event is announced at its spool commit either way; a
        `flush()` (shutdown, link_leave) does not wait for holds."""
        self._holds += 1
        self._released.clear()
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def release() -> None:
            nonlocal timer
            if timer is None:
                return  # released already
            timer.cancel()
            timer = None
            self._holds -= 1
            if self._holds <= 0:
                self._holds = 0
                self._released.set()

        timer = loop.call_later(HOLD_MAX, release)
        return release

    def start(self) -> None:
        if self._spool.rows:
            self._wake.set()
        self._task = asyncio.create_task(self._run(), name="exai-flusher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def flush(self, timeout: float) -> bool:
        """Drain what is spooled now, trying Postgres at once; False if rows remain at the deadline."""
        if self._spool.rows == 0:
            return True
        if self._task is None or self._task.done():
            return False
        self._urgent.set()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._spool.wait_empty()
            return True
        except TimeoutError:
            return self._spool.rows == 0
        finally:
            if self._spool.rows == 0:
                self._urgent.clear()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            if (
                self._spool.rows < self._batch_size
                and not self._urgent.is_set()
                and not self._spool.hot_ready
            ):
                # Time trigger: give the batch up to flush_interval_ms to fill up.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._full.wait()
            self._full.clear()
            self._wake.clear()
            if not self._released.is_set() and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):  # a sender's answer first (`hold`)
                    async with asyncio.timeout(HOLD_MAX):
                        await self._released.wait()
            while self._spool.rows > 0:
                # Link events first, from memory (in their append order); else the file's oldest.
                batch = self._spool.hot_batch(self._batch_size) or await self._spool.read_batch(
                    self._batch_size
                )
                if not batch:
                    break
                if self.gate is not None:
                    await self.gate(batch)
                try:
                    await self._flush_batch(batch)
                except StorageUnavailable as exc:
                    self._record_failure(exc.message)
                    delay = backoff * (0.5 + random.random())
                    backoff = min(backoff * 2, self._max_backoff)
                    # A flush() request cuts the wait short so a shutdown tries Postgres at once.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._urgent.wait()
                    if self._urgent.is_set():
                        await asyncio.sleep(min(delay, 0.2))
                    continue
                backoff = 0.1
                self._record_success(len(batch))

    async def _flush_batch(self, batch: list[SpoolEntry]) -> None:
        try:
            written = await self._db.run(lambda conn: self._writer(conn, batch), what="flushing the spool")
        except asyncpg.PostgresError as exc:
            log.error(
                "Postgres rejected a spool batch of %d rows (%s); isolating the bad rows", len(batch), exc
            )
            await self._isolate(batch)
            return
        self._written(written)
        await self._spool.ack(batch)

    def _written(self, written: Any) -> None:
        if self.after_write is not None and written:
            try:
                self.after_write(written)
            except Exception:
                log.exception("announcing a flushed batch failed (the rows are stored)")

    async def _write_one(self, entry: SpoolEntry, conn: asyncpg.Connection) -> Any:
        return await self._writer(conn, [entry])

    async def _isolate(self, batch: list[SpoolEntry]) -> None:
        """Write rows one by one; the ones Postgres refuses go to the spool's dead table, loudly."""
        for entry in batch:
            try:
                written = await self._db.run(
                    functools.partial(self._write_one, entry), what="flushing one spool row"
                )
            except asyncpg.PostgresError as exc:
                log.error(
                    "DEAD ROW: Postgres refuses spool row seq=%d kind=%s (%s: %s); kept in %s table 'dead'",
                    entry.seq,
                    entry.kind,
                    type(exc).__name__,
                    exc,
                    self._spool.path,
                )
                await self._spool.quarantine([entry], f"{type(exc).__name__}: {exc}")
                continue
            self._written(written)
            await self._spool.ack([entry])

    def _record_failure(self, message: str) -> None:
        self.last_error = message
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("write-behind paused: %s; %d rows stay in the spool", message, self._spool.rows)

    def _record_success(self, rows: int) -> None:
        self.flushed_total += rows
        self.batches_total += 1
        self.last_flush_at = time.time()
        if self._failing_since is not None:
            log.warning(
                "write-behind resumed after %.1fs; %d rows left in the spool",
                time.monotonic() - self._failing_since,
                self._spool.rows,
            )
            self._failing_since = None

    def stats(self) -> dict[str, Any]:
        return {
            "flushed_total": self.flushed_total,
            "batches_total": self.batches_total,
            "last_error": self.last_error,
            "failing": self._failing_since is not None,
            "last_flush_at": self.last_flush_at,
        }
