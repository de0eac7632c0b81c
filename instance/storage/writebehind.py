"""The flusher: moves spooled rows into Postgres in batches, and never loses or doubles one.

Rows are sent oldest first, grouped by table, one `INSERT ... SELECT FROM json_to_recordset(...)`
per table, all of them in a single statement (each table's INSERT a data-modifying CTE: one
round trip, no BEGIN/COMMIT), `ON CONFLICT DO NOTHING` on the client-generated ids: a batch
that was committed but not yet acknowledged in the spool (kill -9 between the two) is simply
replayed. A table's rows go as their spooled JSON, joined into one array, and Postgres parses
them: the flusher does no per-row work in Python (no decode, no re-encode, no column arrays).
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
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
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


def _ts_sql(col: str) -> str:
    """A spooled timestamp (`col`, a JSON value) as timestamptz: ISO 8601 text, or Unix seconds
    (a JSON number) rounded to the microsecond as Python's datetime.fromtimestamp rounds them
    (half to even on the fraction; Postgres's to_timestamp rounds the whole differently)."""
    secs = f"({col}::text::float8)"
    return (
        f"CASE json_typeof({col}) WHEN 'number' THEN to_timestamp(trunc({secs}))"
        f" + round(({secs} - trunc({secs})) * 1e6) * interval '1 microsecond'"
        f" ELSE ({col} #>> '{{}}')::timestamptz END"
    )


def _from_json(columns: str) -> str:
    """The FROM clause of one kind's rows: $1 is their spooled JSON objects as one JSON array
    (UTF-8 bytes, as the spool stores them), which Postgres parses; a key the object lacks, or
    a JSON null, is SQL NULL. Numbered in spool order (`r.ordinality`)."""
    return (
        "FROM ROWS FROM (json_to_recordset(convert_from($1::bytea, 'UTF8')::json)\n"
        f"                AS ({columns})) WITH ORDINALITY AS r"
    )


# Each kind's fields as its spool payloads name them, typed as their columns (timestamps as JSON,
# for _ts_sql); fields a payload has beyond these are ignored.
_CONVERSATION_COLUMNS = (
    "id uuid, session_id text, tool_name text, model text, created_at json, metadata jsonb, principal text"
)
_MESSAGE_COLUMNS = (
    "id uuid, continuation_id uuid, seq bigint, role text, content text, session_id text,"
    " tool_name text, model text, files jsonb, tokens_in int, tokens_out int, created_at json,"
    " metadata jsonb, pos bigint"
)
_TOOL_CALL_COLUMNS = (
    "id uuid, session_id text, instance_id text, tool_name text, status text, duration_ms float8,"
    " model text, tokens_in int, tokens_out int, error text, created_at json"
)

# Each kind's INSERT takes its rows' JSON and keeps one row per id, the newest (DISTINCT ON ...
# ordinality DESC): an upsert may not touch a row twice in one statement (sessions), and the
# other tables keep the batch's newest row as well, rather than whichever comes first.
_CONVERSATIONS_SQL = f"""
INSERT INTO conversations (id, session_id, tool_name, model, created_at, metadata, principal)
SELECT DISTINCT ON (r.id) r.id, r.session_id, r.tool_name, r.model, {_ts_sql("r.created_at")},
       COALESCE(r.metadata, '{{}}'::jsonb), r.principal
{_from_json(_CONVERSATION_COLUMNS)}
ORDER BY r.id, r.ordinality DESC
ON CONFLICT (id) DO NOTHING
"""

_MESSAGES_SQL = f"""
INSERT INTO messages (id, conversation_id, seq, role, content, session_id, tool_name, model, files,
                      tokens_in, tokens_out, created_at, metadata, pos)
SELECT DISTINCT ON (r.id) r.id, r.continuation_id, r.seq, r.role, r.content, r.session_id,
       r.tool_name, r.model, COALESCE(r.files, '[]'::jsonb), r.tokens_in, r.tokens_out,
       {_ts_sql("r.created_at")}, COALESCE(r.metadata, '{{}}'::jsonb), r.pos
{_from_json(_MESSAGE_COLUMNS)}
ORDER BY r.id, r.ordinality DESC
ON CONFLICT (id) DO NOTHING
"""

_CACHE_MARKS_SQL = f"""
INSERT INTO thread_cache_marks (id, conversation_id)
SELECT DISTINCT ON (r.id) r.id, r.conversation_id
{_from_json("id uuid, conversation_id uuid")}
ORDER BY r.id, r.ordinality DESC
ON CONFLICT (id) DO NOTHING
"""

_TOOL_CALLS_SQL = f"""
INSERT INTO tool_calls (id, session_id, instance_id, tool_name, status, duration_ms, model,
                        tokens_in, tokens_out, error, created_at)
SELECT DISTINCT ON (r.id) r.id, r.session_id, r.instance_id, r.tool_name, r.status, r.duration_ms,
       r.model, r.tokens_in, r.tokens_out, r.error, {_ts_sql("r.created_at")}
{_from_json(_TOOL_CALL_COLUMNS)}
ORDER BY r.id, r.ordinality DESC
ON CONFLICT (id) DO NOTHING
"""

# Sessions are upserted (last_seen_at only moves forward), so a replay changes nothing.
_SESSIONS_SQL = f"""
INSERT INTO sessions (id, principal, client_name, era, created_at, last_seen_at)
SELECT u.id, u.principal, u.client_name, u.era, u.seen, u.seen
FROM (SELECT DISTINCT ON (r.id) r.id, r.principal, r.client_name, r.era, {_ts_sql("r.seen_at")} AS seen
      {_from_json("id text, principal text, client_name text, era text, seen_at json")}
      ORDER BY r.id, r.ordinality DESC) AS u
ON CONFLICT (id) DO UPDATE SET
    principal = COALESCE(EXCLUDED.principal, sessions.principal),
    client_name = COALESCE(EXCLUDED.client_name, sessions.client_name),
    era = COALESCE(EXCLUDED.era, sessions.era),
    last_seen_at = GREATEST(sessions.last_seen_at, EXCLUDED.last_seen_at)
"""


def _json_array(entries: Sequence[SpoolEntry]) -> bytes:
    """The rows' spooled JSON objects as one JSON array, bytes as stored: nothing decoded."""
    return b"[" + b",".join([e.blob for e in entries]) + b"]"


async def write_entries(conn: asyncpg.Connection, entries: Sequence[SpoolEntry]) -> list[Any]:
    """Insert a batch of spooled rows in one transaction (idempotent).

    Each table's rows go as their spooled JSON, which Postgres parses (json_to_recordset): the
    flusher neither decodes nor re-encodes a row (link events aside). Returns the link-group
    events stored now (with their group ids and members), for the instance to publish after
    the commit; a replayed event is not among them.
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
            args.append(_json_array(by_kind[kind]))
    sql = _batch_sql(tuple(kinds))
    if KIND_LINK_EVENT not in by_kind:
        # One statement, atomic by itself: no BEGIN and COMMIT round trips around it.
        await conn.execute(sql, *args)
        return []
    async with conn.transaction():
        await conn.execute(sql, *args)
        return await link_store.store_spooled(conn, [e.payload for e in by_kind[KIND_LINK_EVENT]])


# The tables a batch writes, in this order; each kind's statement (one parameter: its rows' JSON).
_TABLE_ORDER = (KIND_CONVERSATION, KIND_MESSAGE, KIND_CACHE_MARK, KIND_TOOL_CALL, KIND_SESSION)
_TABLES: dict[str, str] = {
    KIND_CONVERSATION: _CONVERSATIONS_SQL,
    KIND_MESSAGE: _MESSAGES_SQL,
    KIND_CACHE_MARK: _CACHE_MARKS_SQL,
    KIND_TOOL_CALL: _TOOL_CALLS_SQL,
    KIND_SESSION: _SESSIONS_SQL,
}


@functools.cache
def _batch_sql(kinds: tuple[str, ...]) -> str:
    """One statement writing every table in `kinds`: each table's INSERT as a data-modifying
    CTE, the last one the main statement, its parameter numbered on ($1 the first table's
    rows, $2 the next's...). A statement commits whole or not at all, and a chat's exchange
    (its two turns and the call's record) takes one round trip instead of BEGIN, an INSERT per
    table and COMMIT. At most 31 variants, each prepared once per connection (asyncpg's
    statement cache)."""
    parts = [_TABLES[kind].strip().replace("$1", f"${i + 1}") for i, kind in enumerate(kinds)]
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
        # Given each batch before it is written, returns the batch to write: chat turns spooled
        # before Redis gave their exchange its position get it here (HistoryStore.place_batch),
        # waiting for it if need be; told each batch once Postgres holds it (`flushed`).
        self.prepare: Callable[[list[SpoolEntry]], Awaitable[list[SpoolEntry]]] | None = None
        self.flushed: Callable[[list[SpoolEntry]], None] | None = None
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
        self._full.set()  # a batch waiting for its time trigger goes now
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
                if self.prepare is not None:
                    batch = await self.prepare(batch)
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
                if self.flushed is not None:
                    try:
                        self.flushed(batch)
                    except Exception:
                        log.exception("a flushed-batch callback failed (the rows are stored)")

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
