"""The instance's side of notification streams: publish a session's notifications to Redis.

Server-to-client notifications that answer no request in flight (a resource changed, the
tool list changed, a linked session said something) do not go to the client directly: the
client's stream is held by the router, which may outlive this process. They go to the
session's event log in Redis (common/notifications.py), keyed by the router's session id
(the X-Exai-Session header), and the router writes them to the session's streams.

Publishing never blocks or fails a tool call. Events wait in a bounded in-memory queue and
one sender task appends them in order, everything queued at that moment in one round trip
(one Lua script: a group event for several members, or several events, cost one); while
Redis is unreachable the sender retries with backoff, and the queue holds up to
EXAI_NOTIFY_BUFFER events. Beyond that the oldest queued event is dropped, counted and logged
(notifications are level triggers: a later event of the same kind says at least as much).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from common.notifications import EventLog, notification
from common.redis import REDIS_DOWN_ERRORS
from common.redis_line import DirectLine

log = logging.getLogger(__name__)

MAX_BACKOFF = 5.0
SEND_BATCH = 200  # most notifications appended in one round trip


class Notifier:
    """Queue of (session id, notification) pairs and the task that appends them to the log."""

    def __init__(self, events: EventLog | None, *, buffer: int) -> None:
        self.events = events
        self.buffer = buffer
        self.published = 0
        self.dropped = 0
        self.failures = 0
        self.batches = 0  # round trips that appended them
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        # Live announcements of group events are written on a line of their own, at once.
        self.line = DirectLine(events.redis) if events is not None else None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def publish(self, session_id: str | None, method: str, params: dict[str, Any] | None = None) -> None:
        """Queue a notification for the session's streams; returns at once, never raises for Redis."""
        if not session_id or self.events is None:
            return
        message = notification(method, params)
        if len(self._queue) >= self.buffer:
            lost_sid, lost = self._queue.popleft()
            self.dropped += 1
            log.warning(
                "notification buffer full (%d, EXAI_NOTIFY_BUFFER): dropped %s for session %s "
                "(%d dropped so far; Redis unreachable?)",
                self.buffer, lost.get("method"), lost_sid[:8], self.dropped,
            )  # fmt: skip
        self._queue.append((session_id, message))
        self._drained.clear()
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return {"published": self.published, "pending": self.pending, "dropped": self.dropped}

    async def _send_all(self) -> None:
        assert self.events is not None
        backoff = 0.05
        down_since: float | None = None
        loop = asyncio.get_running_loop()
        while self._queue:
            # Everything queued now (up to SEND_BATCH) in one round trip, in order.
            batch = list(itertools.islice(self._queue, SEND_BATCH))
            try:
                if len(batch) == 1:
                    await self.events.append(*batch[0])
                else:
                    await self.events.append_many(batch)
            except REDIS_DOWN_ERRORS as exc:
                self.failures += 1
                if down_since is None:
                    down_since = loop.time()
                    log.warning(
                        "cannot publish notifications (Redis unreachable: %s); holding %d, retrying",
                        exc, len(self._queue),
                    )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            # Some of the batch may have been dropped meanwhile (buffer full, oldest first):
            # pop only what was sent.
            for _, message in batch:
                if self._queue and self._queue[0][1] is message:
                    self._queue.popleft()
            self.published += len(batch)
            self.batches += 1
            if down_since is not None:
                log.info("notifications flowing again after %.1fs", loop.time() - down_since)
                down_since, backoff = None, 0.05
        self._drained.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._send_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notification sender failed; retrying")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until the queue is empty (shutdown); False if events were still queued."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)
        return not self._queue

    @contextlib.asynccontextmanager
    async def running(self, *, flush_timeout: float = 2.0) -> AsyncIterator[Notifier]:
        """Run the sender for the lifespan of the instance; give queued events a moment at the end."""
        if self.events is None:
            yield self
            return
        self._task = asyncio.create_task(self._run(), name="notifier")
        if self.line is not None:
            self.line.start()
        try:
            yield self
        finally:
            if self.line is not None:
                await self.line.close()
            if not await self.flush(flush_timeout):
                log.warning("shutting down with %d notifications unpublished", len(self._queue))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
