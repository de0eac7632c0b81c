"""The instance's storage layer: one facade over the pool, the spool, the flusher and the stores.

    async with Storage.open(settings, instance_id="i-01", redis=redis) as storage:
        cid = await storage.history.new_thread(session_id=sid, tool_name="chat", model="glm-4.6")
        await storage.history.append(cid, "user", "hello")
        task = await storage.tasks.create(session_id=sid, name="write tests")

History and telemetry are write-behind (durable in a local spool on return, in Postgres shortly
after); tasks and notes go to Postgres directly. The instance starts even when Postgres is down:
the pool connects on first use, and the spool takes writes meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from common.keys import Keys
from common.redis import create_redis
from common.settings import Settings
from instance.storage.cache import RedisGuard
from instance.storage.history import HistoryStore
from instance.storage.models import Message, Note, Task, TaskEvent, TaskNode
from instance.storage.notes import NoteStore
from instance.storage.notes_cache import NotesCache
from instance.storage.pool import Database
from instance.storage.spool import Spool
from instance.storage.tasks import UNCHANGED, TaskStore
from instance.storage.tracking import Tracker
from instance.storage.validation import check_optional_int, check_text, new_id
from instance.storage.writebehind import KIND_LINK_EVENT, KIND_SESSION, KIND_TOOL_CALL, Flusher

__all__ = [
    "UNCHANGED",
    "HistoryStore",
    "Message",
    "Note",
    "NoteStore",
    "Storage",
    "Task",
    "TaskEvent",
    "TaskNode",
    "TaskStore",
]

log = logging.getLogger(__name__)

DEFAULT_CLOSE_FLUSH_TIMEOUT = 10.0
LINK_HOT_MAX = 1000  # link events the spool keeps in memory for the flusher (beyond: from the file)


def spool_dir_for(settings: Settings, instance_id: str) -> Path:
    """Where an instance keeps its spool; stable across restarts so a crash is replayed."""
    return settings.state_dir / "spool" / instance_id


def _float8(value: float | None) -> float | str | None:
    """A float for a spooled float8 field: a non-finite one as Postgres spells it ("NaN",
    "Infinity"), since the flusher's rows go to Postgres as JSON, which has no such numbers."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class Storage:
    """Everything an instance persists. Build it with `Storage.open(...)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        instance_id: str,
        db: Database,
        spool: Spool,
        flusher: Flusher,
        cache: RedisGuard,
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.db = db
        self.spool = spool
        self.flusher = flusher
        self.cache = cache
        keys = Keys(settings.redis_prefix)
        # Held thread and note copies are trusted while Redis reports no change (tracking.py).
        self.tracker = Tracker(cache.redis) if settings.redis_tracking else None
        self.history = HistoryStore(
            tracker=self.tracker,
            db=db,
            spool=spool,
            cache=cache,
            keys=keys,
            cache_turns=settings.history_cache_turns,
            spool_sync=settings.chat_spool_sync,
        )
        # Chat turns spooled before their position came from Redis get it before they are stored.
        flusher.prepare = self.history.place_batch
        flusher.flushed = self.history.flushed
        self.tasks = TaskStore(db)
        self.notes = NoteStore(db, max_bytes=settings.note_max_bytes)
        self.notes.cache = NotesCache(
            cache,
            keys,
            lambda scope, scope_id: self.notes.list(scope=scope, scope_id=scope_id),
            postgres_down=lambda: db.last_error is not None and not db.connected,
            tracker=self.tracker,
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        *,
        instance_id: str,
        redis: Redis | None = None,
        spool_dir: Path | None = None,
        close_flush_timeout: float = DEFAULT_CLOSE_FLUSH_TIMEOUT,
        on_flushed: Callable[[Any], None] | None = None,
    ) -> AsyncIterator[Storage]:
        """Open the spool and start the flusher; on exit flush (bounded) and close everything.

        Postgres is not contacted here (beyond one non-fatal attempt), so an instance starts
        while Postgres is down. Without `redis`, a client is made from REDIS_URL if set.
        """
        check_text(instance_id, "instance_id", min_len=1, max_len=200)
        db = Database(settings)
        spool = Spool(
            spool_dir or spool_dir_for(settings, instance_id),
            max_bytes=settings.spool_max_bytes,
            full_policy=settings.spool_full_policy,
            block_timeout=settings.spool_block_timeout,
            fsync_window_ms=settings.fsync_window_ms,
            hot_kinds=(KIND_LINK_EVENT,),  # live link events: the flusher takes them from memory
            hot_max=LINK_HOT_MAX,
            fault_file=Path(settings.test_spool_fault_file) if settings.test_spool_fault_file else None,
        )
        own_redis = redis is None and bool(settings.redis_url)
        if own_redis:
            redis = create_redis(settings.redis_url)
        await spool.open()
        flusher = Flusher(
            spool,
            db,
            batch_size=settings.flush_batch_size,
            interval_s=settings.flush_interval_ms / 1000.0,
            after_write=on_flushed,  # link events: publish them once stored (instance/links.py)
        )
        storage = cls(
            settings,
            instance_id=instance_id,
            db=db,
            spool=spool,
            flusher=flusher,
            cache=RedisGuard(redis, line=True),
        )
        storage.cache.start()  # a chat's own Redis commands go out on its direct line
        if storage.tracker is not None:
            storage.tracker.start()
        try:
            with contextlib.suppress(Exception):
                await db.connect()  # warm the pool if Postgres is up; later uses retry if not
            flusher.start()
            storage.history.start()
            yield storage
        finally:
            await storage.aclose(flush_timeout=close_flush_timeout)
            if own_redis and redis is not None:
                with contextlib.suppress(Exception):
                    await redis.aclose()

    async def aclose(self, *, flush_timeout: float) -> None:
        await self.history.stop()
        if self.notes.cache is not None:
            await self.notes.cache.stop()
        try:
            if self.spool.rows and not await self.flush(flush_timeout):
                log.warning(
                    "closing with %d rows still in the spool %s; they will be flushed on the next start",
                    self.spool.rows,
                    self.spool.path,
                )
        finally:
            await self.flusher.stop()
            await self.spool.close()
            await self.db.close()
            await self.cache.close()
            if self.tracker is not None:
                await self.tracker.close()

    # --- write-behind telemetry ------------------------------------------------------------
    async def record_tool_call(
        self,
        *,
        session_id: str | None,
        instance_id: str | None,
        tool_name: str,
        status: str,
        duration_ms: float | None,
        model: str | None = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        error: str | None = None,
    ) -> None:
        """Spool one `tool_calls` row (returns once it is committed locally).

        Committed without waiting for its fsync (`sync="normal"`: kill -9 safe, the fsync follows
        on its own thread): telemetry is not worth a power-loss guarantee, and an fsync'd commit
        would hold the spool's thread just as the client's next call wants it."""
        check_text(tool_name, "tool_name", min_len=1, max_len=200)
        check_text(status, "status", min_len=1, max_len=50)
        payload: dict[str, Any] = {
            "id": new_id(),
            "session_id": session_id,
            "instance_id": instance_id or self.instance_id,
            "tool_name": tool_name,
            "status": status,
            "duration_ms": _float8(duration_ms),
            "model": model,
            "tokens_in": check_optional_int(tokens_in, "tokens_in"),
            "tokens_out": check_optional_int(tokens_out, "tokens_out"),
            "error": error[:4000] if error else None,
            "created_at": time.time(),
        }
        await self.spool.append(KIND_TOOL_CALL, payload, sync="normal")

    async def touch_session(
        self, *, session_id: str, principal: str | None, client_name: str | None, era: str | None
    ) -> None:
        """Spool an upsert of the `sessions` row (last_seen_at only moves forward); without
        waiting for its fsync, as telemetry (`record_tool_call`)."""
        check_text(session_id, "session_id", min_len=1, max_len=200)
        payload = {
            "id": session_id,
            "principal": principal,
            "client_name": client_name,
            "era": era,
            "seen_at": time.time(),
        }
        await self.spool.append(KIND_SESSION, payload, sync="normal")

    # --- operations ------------------------------------------------------------------------
    async def flush(self, timeout: float) -> bool:
        """Drain the spool into Postgres now (SIGTERM path); False if rows remain after `timeout`."""
        return await self.flusher.flush(timeout)

    def backlog(self) -> dict[str, Any]:
        out = self.spool.stats()
        out.update(self.flusher.stats())
        return out

    def pool_stats(self) -> dict[str, Any]:
        return self.db.stats()
