"""Who is in a link group, kept fresh on every instance: a change is announced at once.

An instance caches each group's member list (instance/links.py) so that a group write
(`link_send`, a group task or note) does not wait for Postgres. Whoever changes a group's
membership publishes the group's name on `Keys.link_members_channel()` after the change is
committed: the admin API (add, remove, delete the group), the router when an ended session
leaves its groups, and `link_leave` on the instance it ran on. Every instance follows that
channel (`MemberWatch`) and drops its copy of the group, so its next write reads Postgres.

The channel is never trusted alone, because pub/sub forgets: a message published while an
instance was not subscribed is lost, so every (re)subscription drops all copies; while an
instance is not subscribed its copies age out as before (EXAI_LINK_MEMBER_CACHE_TTL); and what
a copy let through anyway (a publish that failed, a write racing the change) is checked where
the event is stored: the flusher refuses an event of a session that was no longer a member
when it made it, or of a group that no longer exists (common/links.store_spooled), and the
instance tells the sender (instance/link_notices.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from common.keys import Keys
from common.redis import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # the longest one wait for a message lasts (below the client's socket timeout)
PING_SECONDS = 10.0  # an idle subscription is pinged this often, so a dead connection is noticed
RETRY_MAX_SECONDS = 2.0  # the longest wait between two subscription attempts while Redis is down


async def members_changed(redis: Any, keys: Keys, group: str) -> bool:
    """Tell every instance that `group`'s members changed (after the change is committed).

    False when Redis did not take it: the instances' copies then age out, and the store of any
    event they let through checks Postgres (see the module's docstring)."""
    if redis is None:
        return False
    try:
        await redis.publish(keys.link_members_channel(), group)
    except REDIS_DOWN_ERRORS as exc:
        log.info("could not announce the membership change of link group %r (%s)", group, exc)
        return False
    return True


class MemberWatch:
    """Follows the membership channel for one instance: `forget(group)` on each change,
    `forget(None)` (every group) on each (re)subscription. `up` says whether it is subscribed."""

    def __init__(self, redis: Any, keys: Keys, forget: Callable[[str | None], None]) -> None:
        self.redis = redis
        self.channel = keys.link_members_channel()
        self.forget = forget
        self.up = False
        self.changes = 0  # membership changes heard
        self.subscriptions = 0  # successful (re)subscriptions
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.redis is not None:
            self._task = asyncio.create_task(self._run(), name="link-member-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.up = False

    async def _run(self) -> None:
        delay = 0.1
        while True:
            before = self.subscriptions
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarted: subscribe again
                if self.subscriptions != before:
                    log.info("link membership channel lost (%s); copies age out until it is back", exc)
            delay = 0.1 if self.subscriptions != before else min(delay * 2, RETRY_MAX_SECONDS)
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            pinged = asyncio.get_running_loop().time()
            while True:
                msg = await pubsub.get_message(timeout=POLL_SECONDS)
                now = asyncio.get_running_loop().time()
                if msg is None:
                    if now - pinged >= PING_SECONDS:
                        await pubsub.ping()
                        pinged = now
                    continue
                kind = msg.get("type")
                if kind == "subscribe":
                    # Anything published before this moment was missed: drop every copy.
                    self.subscriptions += 1
                    self.forget(None)
                    self.up = True
                elif kind == "message":
                    data = msg.get("data")
                    self.changes += 1
                    self.forget(data.decode() if isinstance(data, bytes) else str(data))
        finally:
            self.up = False
            with contextlib.suppress(Exception):
                await pubsub.aclose()
