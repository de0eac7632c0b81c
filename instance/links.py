"""The instance's side of link groups: take an event, store it behind, then tell the members.

Messages, group task and note changes and reservation events are written behind: the tool call
checks membership (cached per group), gives the event a uuid and appends it to the instance's
durable spool (instance/storage/spool.py), which is all the caller waits for. The flusher
(instance/storage/writebehind.py) stores it in Postgres with the group's next id
(common/links.store_spooled: per-group ids 1, 2, 3, ..., gapless, committed in order, a replay
skipped by uuid), and after the commit `Links.flushed` adds it to the group's bounded Redis
stream. Each member it concerns gets `notifications/resources/updated` for
`exai://link/{group}/inbox` in its own notification log (-> the router-held streams): as soon
as the event is in the spool (`_announce_early`, with an in-flight mark that link_inbox waits
on, so the woken member reads it), or after the commit for whoever that missed. Joins and
leaves (and reservations themselves, which need an answer) stay synchronous in Postgres. So
delivery follows each member's session wherever it is and never needs the member's instance
to be alive; a kill -9 after the call answered loses nothing (the spool is replayed on
restart); while Postgres is down events wait in the spool, while Redis is down the
notifications wait in the instance; catch-up reads Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from common import links as db
from common.errors import ExaiError, NotLinked, StorageUnavailable
from common.keys import Keys
from common.link_members import MemberWatch, members_changed
from common.notifications import notification
from common.protocol import ADMIN_PRINCIPAL, CLIENT_HEADER
from common.redis import REDIS_DOWN_ERRORS
from instance.after_answer import AfterAnswer, after_answer, after_answer_of, current_answer
from instance.runtime import Runtime, header
from instance.storage.writebehind import KIND_LINK_EVENT
from instance.timing import Stages

T = TypeVar("T")
log = logging.getLogger(__name__)

UPDATED = "notifications/resources/updated"
GROUP_SCOPE_PREFIX = "link:"
LINK_GROUP_HEADER = "exai-link-group"  # connect-time linking (X-Exai-* headers stay at the router)
CHAT_OPT_IN_TTL = 30.0  # seconds before a session's cached chat_context opt-ins are re-read
CHAT_OPT_IN_WAIT = 0.5  # longest a chat waits for Postgres to read them (then: none this call)
GROUP_CONTEXT_MESSAGES = 50  # newest group messages considered for a chat's group context
OUTBOX_PAGE = 500  # group task events the relay stores per statement
OUTBOX_MARGIN = 600.0  # seconds the relay looks back before the last round that found none pending
EARLY_MARK_SECONDS = 5.0  # how long readers may wait for an early-announced event to be stored
INFLIGHT_WAIT = 1.0  # longest a link_inbox read waits for early-announced events (then: as is)
INFLIGHT_POLL = 0.003  # how often it looks
GIVEN_IDS_MAX = 10_000  # caller-chosen event ids remembered per process (older retries: the store)
GIVEN_ID_NAMESPACE = uuid.UUID("6f3b0e52-7c1a-4f0e-9d6b-2a8c5e4f1b37")  # for `given_event_id`
EARLY_MAX = 10_000  # early announcements awaiting their store, at most (beyond: after the store)
LINK_STAGES = (
    "spool_commit",
    "sender_spool_wait",
    "announce_to_send",
    "announce_to_published",
    "answer_after_commit",
)


HEADER_REFUSED = "refused: "  # a header join's field in the session record, when refused
# The refusal's words in the session's record, only while the record exists (it expires with
# the session; without a record, no router, there is nothing to keep them in).
_MARK_HEADER_REFUSED = """
if redis.call('exists', KEYS[1]) == 1 then redis.call('hset', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""
# 1 if the session's record exists and had no such field (set now), or if there is no record.
_MARK_HEADER_JOIN = """
if redis.call('exists', KEYS[1]) == 0 then return 1 end
return redis.call('hsetnx', KEYS[1], ARGV[1], '1')
"""


@dataclass(slots=True)
class _Early:
    """An event announced as soon as it was durable in the spool, before Postgres stored it."""

    group: str
    at: float = field(default_factory=time.monotonic)
    done: bool = False  # the announcement went out (or failed)
    told: frozenset[str] = frozenset()  # the sessions it reached
    stored: tuple[db.LinkEvent, list[str]] | None = None  # stored before the announcement was done
    retracted: bool = False  # the spool refused the event after it was announced (never stored)


def _best_effort_reply(reply: asyncio.Future[Any]) -> None:
    """A best-effort command's reply: an error (Redis went away, a wrong type) is only logged."""
    if not reply.cancelled() and (exc := reply.exception()) is not None:
        log.debug("best-effort Redis bookkeeping of link events failed: %s", exc)


def group_scope_id(group: str) -> str:
    """The session id under which a group's tasks and notes are stored (scope='group')."""
    return GROUP_SCOPE_PREFIX + db.check_group(group)


def given_event_id(group: str, sender: str, message_id: str) -> str:
    """The uuid of the event a sender emits in a group under its own id (a UUID)."""
    return str(uuid.uuid5(GIVEN_ID_NAMESPACE, f"{group}\n{sender}\n{message_id}"))


class Links:
    """Link-group operations for the tools and resources of one instance."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.keys = Keys(runtime.settings.redis_prefix)
        self.events = 0
        self.notified = 0
        self.catch_ups = 0
        self.caught_up_events = 0
        self.spooled = 0
        self.task_spooled = 0  # group task events spooled after their call answered
        self.task_relayed = 0  # ... or stored by the outbox relay (their change's instance died first)
        self._outbox_clear_at: float | None = None  # when the relay last found nothing more pending
        self._header_joins: set[tuple[str, str]] = set()
        self._members: dict[str, tuple[float, frozenset[str]]] = {}  # group -> (read at, sessions)
        self._member_epoch = 0  # bumped by every dropped copy: a read begun before stores nothing
        self.member_watch: MemberWatch | None = None  # follows membership changes (started by the app)
        self.refused = 0  # spooled events the store refused (group deleted, sender not a member)
        self._chat_groups: dict[str, tuple[float, list[str]]] = {}  # session -> (read at, groups)
        self._chat_rereads: set[str] = set()  # sessions whose opt-ins are being re-read
        self._chat_changes = 0  # opt-ins remembered or forgotten on this instance, ever
        self._early: dict[str, _Early] = {}  # event uuid -> its early announcement
        # Events emitted under a caller's id (`emit_once`), newest last: uuid -> the attempt.
        self._given: OrderedDict[str, asyncio.Future[str]] = OrderedDict()
        self.replayed = 0
        self.early = 0  # events announced before they were stored
        self.early_direct = 0
        # Where a group event's time goes in this instance: `spool_commit` (the tool hands the
        # event to the spool -> its row is committed, kill -9 safe), `sender_spool_wait` (-> the
        # sender's call resumes: with sync=full, after the fsync), `announce_to_send` (the
        # announcement starts: as the row goes to be committed, or with sync=full after the
        # sender resumed -> it is written on the direct Redis line, or handed to redis-py while
        # that line is down), `announce_to_published` (-> Redis answered: the members'
        # notifications are logged and published), `answer_after_commit` (the sender's call resumed -> its
        # answer written; the flusher holds the event's store until then; counted only when
        # the call has an answer to wait for).
        self.stages = Stages(LINK_STAGES)

    def stats(self) -> dict[str, int]:
        return {
            "events": self.events,
            "notified": self.notified,
            "catch_ups": self.catch_ups,
            "caught_up_events": self.caught_up_events,
            "spooled": self.spooled,
            "refused": self.refused,  # answered, then refused by the store (told to the sender)
            "early": self.early,
            "early_direct": self.early_direct,  # of them, written on the direct Redis line
            "task_spooled": self.task_spooled,
            "task_relayed": self.task_relayed,
            "replayed": self.replayed,  # sends under a message_id answered from an earlier attempt
        }

    def stage_stats(self) -> dict[str, dict[str, Any]]:
        """Recent timings of the sender's path, p50/p99 in ms (the `status` tool's `link_stages`)."""
        return self.stages.summary()

    async def run(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, what: str, write: bool = False
    ) -> T:
        return await self.runtime.require_storage().db.run(fn, idempotent=not write, what=what)

    def caller(self, headers: Mapping[str, str]) -> tuple[str, str | None, str | None, bool]:
        """(session, principal, client name, may cross principals) of the calling session."""
        rt = self.runtime
        principal = rt.principal_for(headers)
        client = header(headers, CLIENT_HEADER) or (rt.binding.client if rt.binding else None)
        crosses = not rt.scoped or principal == ADMIN_PRINCIPAL
        return rt.session_for(headers), principal, client, crosses

    # --- membership, cached per group -----------------------------------------------------
    async def _members_of(self, group: str, *, fresh: bool = False) -> frozenset[str]:
        """The group's member sessions: cached for EXAI_LINK_MEMBER_CACHE_TTL seconds, refreshed
        on a miss; if Postgres is down, the last list read (so link_send keeps working)."""
        cached = self._members.get(group)
        ttl = self.runtime.settings.link_member_cache_ttl
        if cached is not None and not fresh and time.monotonic() - cached[0] < ttl:
            return cached[1]

        async def read(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch("SELECT session_id FROM link_members WHERE group_name = $1", group)
            return [r["session_id"] for r in rows]

        epoch = self._member_epoch
        try:
            sessions = frozenset(await self.run(read, what=f"reading the members of link group {group!r}"))
        except StorageUnavailable:
            if cached is None:
                raise
            log.info("Postgres is down: using the cached members of link group %r", group)
            return cached[1]
        if epoch == self._member_epoch:  # no change was announced while it was being read
            self.remember_members(group, sessions)
        return sessions

    def forget_members(self, group: str | None) -> None:
        """A membership change was announced (common/link_members.py): drop the group's copy,
        or every copy (None: the channel was (re)subscribed, so changes may have been missed).
        Kept while Postgres is down, as the only list there is (the store checks it later)."""
        self._member_epoch += 1
        if self._postgres_down():
            return
        if group is None:
            self._members.clear()
        else:
            self._members.pop(group, None)

    def start_member_watch(self) -> MemberWatch | None:
        """Follow the membership channel (the app calls this once Redis is set up)."""
        if self.runtime.redis is None or self.member_watch is not None:
            return self.member_watch
        self.member_watch = MemberWatch(self.runtime.redis, self.keys, self.forget_members)
        self.member_watch.start()
        return self.member_watch

    def members_changed(self, group: str) -> None:
        """Tell the other instances that `group`'s members changed here (after the commit)."""
        redis = self.runtime.redis
        if redis is not None:
            self.runtime.background(members_changed(redis, self.keys, group), what="announcing a leave")

    def remember_members(self, group: str, sessions: Any) -> None:
        """Joins and leaves through this instance set the cached list (others age out)."""
        self._members[group] = (time.monotonic(), frozenset(sessions))

    async def check_member(self, group: str, session: str) -> None:
        """NotLinked unless `session` is in `group` (outsiders see nothing). Cheap when cached."""
        db.check_group(group)
        if session in await self._members_of(group):
            return
        if session not in await self._members_of(group, fresh=True):
            raise NotLinked(
                f"this session is not a member of link group {group!r} (it never joined, it left, "
                "the admin removed it, or the group was deleted), so nothing was sent or changed",
                hint="link_status() lists your groups; join with link_join, or ask the admin to "
                "link this session (exai links add GROUP SESSION)",
            )

    async def emit(
        self,
        group: str,
        kind: str,
        sender: str,
        *,
        recipient: str | None = None,
        subject: str | None = None,
        thread: str | None = None,
        body: str = "",
        data: dict[str, Any] | None = None,
        event_id: str | None = None,
    ) -> str:
        """Take one event (the sender must be a member) and return its uuid once it is durable.

        `event_id`: the uuid to store it under (default: a new one); the store skips a uuid it
        holds already, so an event emitted twice under one uuid is stored and delivered once.

        The event goes to the write-behind spool (fsync'd there, with whatever else is being
        appended at that moment); the flusher gives it its group id in Postgres and then
        `flushed` publishes it. So the caller pays a spool append, not a Postgres transaction,
        and the event survives a kill -9 of this instance and Postgres being down.
        """
        await self.check_member(group, sender)
        if recipient is not None:
            members = await self._members_of(group)
            if recipient not in members and recipient not in await self._members_of(group, fresh=True):
                raise NotLinked(
                    f"{recipient!r} is not a member of link group {group!r}",
                    hint="Send to a member's session id (see link_status) or omit `to` for all.",
                )
        storage = self.runtime.require_storage()
        event_id = str(uuid.uuid4()) if event_id is None else event_id
        created = time.time()
        payload = {
            "uuid": event_id,
            "group": group,
            "kind": kind,
            "sender": sender,
            "recipient": recipient,
            "subject": subject,
            "thread": thread,
            "body": body,
            "data": data or {},
            "created_at": created,
        }
        started = time.perf_counter()
        committed = [0.0]
        strict = self.runtime.settings.link_spool_sync == "full"

        pending = current_answer.get()  # the sender's request (the announcement runs outside it)

        def announce() -> None:  # on the loop
            self._announce_early(group, event_id, sender, recipient, created, None, pending)

        def mark_commit() -> None:
            committed[0] = time.perf_counter()

        # The store of the event (the flusher's Postgres round trip and what follows it) waits
        # until this call's answer is written: the members are told during the commit, and the
        # sender's answer does not share the loop with that work (bounded: Flusher.hold).
        release = storage.flusher.hold()
        try:
            await storage.spool.append(
                KIND_LINK_EVENT,
                payload,
                urgent=True,
                sync=self.runtime.settings.link_spool_sync,
                # Default: announced as the row goes to be committed (delivery first: Redis, the
                # router and the members' clients do their part during the commit; a woken
                # reader waits for the event's store, which needs the commit, so it never reads
                # ahead of it). Strict (sync=full): the sender asked for its fsync; it resumes
                # first and the announcement follows its step, as before (announcing first made
                # it 1-3 ms slower here: Redis, the router and the members' clients woke up
                # beside it).
                before_commit=None if strict else announce,
                on_commit=mark_commit,
            )  # the flusher takes it from the spool's memory (no waiting for a batch)
        except BaseException as exc:
            release()
            if not strict and isinstance(exc, Exception):  # refused: announced, never taken
                self._retract(event_id)  # (cancelled: the row may still be committed; kept)
            raise
        self.spooled += 1
        done = time.perf_counter()

        deferred = False

        def answered() -> None:  # the sender's answer is written: the flusher may store it now
            if deferred:
                self.stages.add("answer_after_commit", time.perf_counter() - done)
            release()

        deferred = after_answer(answered)
        if strict:
            asyncio.get_running_loop().call_soon(announce)
        self.stages.add("spool_commit", committed[0] - started)
        self.stages.add("sender_spool_wait", done - started)
        return event_id

    async def emit_once(
        self, message_id: str, group: str, kind: str, sender: str, **fields: Any
    ) -> tuple[str, bool]:
        """`emit` under a caller-chosen id (a UUID): a retried call (its answer lost) is stored
        and delivered once. (The event's uuid, whether this process had taken it already.)

        The uuid is derived from the group, the sender and the id (`given_event_id`), so two
        senders choosing the same id never meet. A retry in this process while the first is
        still being taken waits for it; once it was taken, the retry returns its uuid and
        writes nothing. A retry elsewhere (the session moved to another instance) is spooled
        again under the same uuid and skipped by the store, which keeps the first."""
        event_id = given_event_id(group, sender, message_id)
        earlier = self._given.get(event_id)
        if earlier is not None:
            if not earlier.done():
                await asyncio.wait({earlier})
            if not earlier.cancelled() and earlier.exception() is None:
                self.replayed += 1
                return event_id, True
        taken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._given[event_id] = taken
        self._given.move_to_end(event_id)
        while len(self._given) > GIVEN_IDS_MAX:
            self._given.popitem(last=False)
        try:
            await self.emit(group, kind, sender, event_id=event_id, **fields)
        except BaseException:
            if self._given.get(event_id) is taken:
                del self._given[event_id]
            taken.cancel()  # a retry waiting for this attempt makes its own
            raise
        taken.set_result(event_id)
        return event_id, False

    def _announce_early(
        self,
        group: str,
        event_id: str,
        sender: str,
        recipient: str | None,
        created: float,
        since: float | None = None,
        pending: AfterAnswer | None = None,
    ) -> None:
        """Tell the members (as this instance knows them) now that the event goes to the spool
        (with sync=normal, while its row is being committed there; with sync=full, once it is
        fsync'd and the sender resumed), without waiting for Postgres to store it and give it
        its id, nor for the spool's fsync, nor for the sender's call to resume.

        The inbox notification carries no event, so what a member then reads must have it: the
        same atomic Redis step marks the event in flight for its group (Keys.link_inflight), and
        a link_inbox read first waits for marked events to be stored (`_wait_inflight`). After
        the store, `flushed` clears the mark and tells the members this one missed (joined
        meanwhile, or the announcement failed: Redis down), so nobody is told twice or never.
        """
        settings = self.runtime.settings
        notifier = self.runtime.notifier
        cached = self._members.get(group)
        if since is None:
            since = time.perf_counter()
        if (
            not settings.link_early_notify
            or notifier is None
            or notifier.events is None
            or cached is None
            or not self._early_room()
        ):
            return
        targets = [s for s in cached[1] if s != sender and (recipient is None or s == recipient)]
        if not targets:
            return
        state = self._early[event_id] = _Early(group)
        events = notifier.events
        message = notification(UPDATED, {"uri": db.inbox_uri(group)})

        now = time.time()
        marked = (
            self.keys.link_inflight(group),
            event_id,
            (now + EARLY_MARK_SECONDS) * 1000,
            now * 1000,
            [(sid, message) for sid in targets],
        )

        def finish(ok: bool) -> None:
            if ok:
                state.told = frozenset(targets)
                self.early += 1
                self.stages.add("announce_to_published", time.perf_counter() - since)
                lag = max(0.0, time.time() - created)
                # A Redis round trip of its own: not beside the sender's answer, after it.
                count = lambda: self._count(publish_lag_seconds_sum=lag, publish_lag_count=1)  # noqa: E731
                after_answer_of(pending, count)
            state.done = True
            if state.retracted:  # the spool refused it meanwhile: no reader should wait for it
                self._early.pop(event_id, None)
                if ok:
                    self._clear_inflight({group: [event_id]})
                return
            if state.stored is not None:  # the store came first and left the rest to us
                self._early.pop(event_id, None)
                self._after_store(*state.stored, early=state)
                self._clear_inflight({group: [event_id]})  # only now: after our mark was made

        async def send() -> None:  # the ordinary path, through redis-py
            try:
                await events.append_marked(*marked)
            except Exception as exc:  # Redis down or anything else: announced after the store
                log.debug("early announcement of a link event failed: %s", exc)
                finish(False)
            else:
                finish(True)

        def slow() -> None:
            self.runtime.background(send(), what="announcing a link event early")

        def replied(reply: asyncio.Future[Any]) -> None:
            if not reply.cancelled() and reply.exception() is None:
                self.early_direct += 1
                finish(True)
            else:  # not loaded yet (NOSCRIPT) or the line broke: again the ordinary way (if the
                slow()  # script did run and only its reply was lost, members get a second wake-up)

        # Written on the direct line now, in this callback (redis-py would first yield to the
        # loop, where the sender's answer is being built); while that line is down, redis-py.
        line = getattr(notifier, "line", None)
        sent = line.send(*events.append_marked_command(*marked)) if line is not None else None
        self.stages.add("announce_to_send", time.perf_counter() - since)
        if sent is None:
            slow()
        else:
            sent.add_done_callback(replied)

    def _retract(self, event_id: str) -> None:
        """The spool did not take an event announced before its commit (a disk error, the
        spool closing): its members had a wake-up that reads nothing new; clear its in-flight
        mark so their reads do not wait for it (at once, or when the announcement finishes)."""
        state = self._early.get(event_id)
        if state is None:
            return
        state.retracted = True
        if state.done:
            del self._early[event_id]
            if state.told:
                self._clear_inflight({state.group: [event_id]})

    def _early_room(self) -> bool:
        """Room for one more early announcement (EARLY_MAX): entries whose event will never be
        stored (its group deleted, its row refused) are forgotten after a minute."""
        if len(self._early) < EARLY_MAX:
            return True
        cutoff = time.monotonic() - 60.0
        for key in [k for k, e in self._early.items() if e.done and e.at < cutoff]:
            del self._early[key]
        return len(self._early) < EARLY_MAX

    async def _wait_inflight(self, group: str) -> None:
        """Before a read of the inbox: wait (up to INFLIGHT_WAIT) until the group's events that
        were announced early are stored, so a member woken by one finds it."""
        redis = self.runtime.redis
        if redis is None or not self.runtime.settings.link_early_notify:
            return
        try:
            marked = await redis.zrangebyscore(self.keys.link_inflight(group), time.time() * 1000, "+inf")
        except REDIS_DOWN_ERRORS:
            return
        if not marked:
            return
        wanted = [str(m.decode() if isinstance(m, bytes) else m) for m in marked]
        deadline = time.monotonic() + INFLIGHT_WAIT

        async def stored(conn: asyncpg.Connection) -> int:
            return int(
                await conn.fetchval("SELECT count(*) FROM link_events WHERE uuid = ANY($1::uuid[])", wanted)
            )

        while await self.run(stored, what="waiting for link events in flight") < len(wanted):
            if time.monotonic() >= deadline:
                log.info("reading link group %r with %d event(s) still in flight", group, len(wanted))
                return
            await asyncio.sleep(INFLIGHT_POLL)

    def task_event_written(self, event: db.TaskEventWrite, task: Any) -> None:
        """A group task write committed with its audit row naming the group (`event.written`):
        spool its event (uuid: the audit row's id) once the call's answer is written, off the
        sender's call; the flusher then stores it with the group's next id and announces it,
        as any spooled event (`flushed`; a sender no longer a member, or a deleted group, is
        told as for any refused event). Not waited for: if it never reaches the spool (a kill
        -9 before, a spool that refuses it), the outbox relay stores it (`relay_outbox`)."""
        if not event.written:
            return
        payload = db.task_event_payload(event, task)
        after_answer(lambda: self._spool_task_event(payload))

    def _spool_task_event(self, payload: dict[str, Any]) -> None:
        """On the loop, once the call's answer is written: the event to the spool, announced as
        its row goes to be committed (as `emit` does, EXAI_LINK_EARLY_NOTIFY; with
        EXAI_LINK_SPOOL_SYNC=full after its store)."""
        storage = self.runtime.storage
        event_id = str(payload["uuid"])
        early = self.runtime.settings.link_spool_sync != "full"
        try:
            if storage is None:
                raise StorageUnavailable("storage is closed")
            sync = self.runtime.settings.link_spool_sync
            if early:
                group, sender = str(payload["group"]), str(payload["sender"])
                try:
                    self._announce_early(group, event_id, sender, None, float(payload["created_at"]))
                except Exception:  # the members are told after the store instead
                    log.exception("announcing a group task's link event failed")
            committed = storage.spool.submit(KIND_LINK_EVENT, payload, urgent=True, sync=sync)
            if committed is None:  # a full spool: its policy (wait for room, or refuse), in the background
                committed = asyncio.ensure_future(
                    storage.spool.append(KIND_LINK_EVENT, payload, urgent=True, sync=sync)
                )
        except Exception as exc:
            self._retract(event_id)
            log.warning(
                "the link event of a group task change in %r was not spooled (%s); the outbox relay "
                "will store it",
                payload["group"],
                exc,
            )
            return
        self.task_spooled += 1

        def spooled(done: asyncio.Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                self._retract(event_id)  # announced, never taken: the relay stores it later
                log.warning(
                    "the link event of a group task change in %r was not spooled (%s); the outbox "
                    "relay will store it",
                    payload["group"],
                    "cancelled" if done.cancelled() else done.exception(),
                )
            else:
                self.spooled += 1

        committed.add_done_callback(spooled)

    async def relay_outbox(self) -> int:
        """Store the events of group task changes that committed without their event ever
        reaching a spool (common/links.outbox_relay), announce them; how many were stored."""
        settings = self.runtime.settings
        horizon = settings.link_outbox_horizon
        if self._outbox_clear_at is not None:  # nothing was pending then: look back a little before it
            horizon = min(horizon, time.time() - self._outbox_clear_at + OUTBOX_MARGIN)
        started = time.time()

        async def relay(conn: asyncpg.Connection) -> list[db.StoredOrRefused]:
            return await db.outbox_relay(
                conn, grace_s=settings.link_outbox_grace, horizon_s=horizon, limit=OUTBOX_PAGE
            )

        written = await self.run(relay, what="relaying group task events")
        if len(written) < OUTBOX_PAGE:
            self._outbox_clear_at = started - settings.link_outbox_grace
        if written:
            stored = sum(1 for w in written if not isinstance(w, db.RefusedEvent))
            self.task_relayed += stored
            log.warning(
                "stored %d group task event(s) whose change committed without its event reaching "
                "a spool (an instance stopped or lost its Postgres reply in between)",
                len(written),
            )
            self.flushed(written)
        return len(written)

    async def run_outbox_relay(self) -> None:
        """Every EXAI_LINK_OUTBOX_INTERVAL seconds, `relay_outbox` (first soon after start, for a
        previous run's); Postgres being down only skips a round."""
        interval = self.runtime.settings.link_outbox_interval
        await asyncio.sleep(min(interval, 1.0))
        while True:
            try:
                while await self.relay_outbox() >= OUTBOX_PAGE:  # a full page: more may be waiting
                    pass
            except (StorageUnavailable, asyncpg.PostgresError, OSError) as exc:
                log.debug("the group task event relay skipped a round: %s", exc)
            except Exception:
                log.exception("the group task event relay failed a round")
            await asyncio.sleep(interval)

    def _count_spooled(self, committed: asyncio.Future[None]) -> None:
        if not committed.cancelled() and committed.exception() is None:
            self.spooled += 1

    def flushed(self, written: Sequence[db.StoredOrRefused]) -> None:
        """The flusher stored these events (ids given, in order): tell the members, add them to
        the groups' Redis streams, count the write-behind lag. Those it refused are told to
        their senders (`_refused`)."""
        stored = [w for w in written if not isinstance(w, db.RefusedEvent)]
        if len(stored) != len(written):
            self._refused([w for w in written if isinstance(w, db.RefusedEvent)])
        if stored:
            self._flushed(stored)

    def _refused(self, refused: Sequence[db.RefusedEvent]) -> None:
        """Events answered to their senders but refused by the store: each sender gets a notice
        with its next tool answer (and a log notification now); the members woken for one early
        read nothing new and need not wait for it; this group's copy is read again."""
        for r in refused:
            self.refused += 1
            self.forget_members(r.group)
            self._retract(r.uuid)
            if r.sender:
                self.runtime.notices.add(
                    r.sender, "link_event_refused", r.words(), group=r.group, event=r.uuid, reason=r.reason
                )

    def _flushed(self, written: list[tuple[db.LinkEvent, list[str]]]) -> None:
        now = datetime.now(UTC)
        lag = 0.0
        cleared: dict[str, list[str]] = {}
        early_count = 0
        for event, sessions in written:
            self.remember_members(event.group, sessions)
            early = self._early.get(event.uuid or "")
            if early is None:
                self.announce(event, sessions)
                lag += max(0.0, (now - event.created_at).total_seconds())
                continue
            early_count += 1
            if early.done:
                del self._early[event.uuid or ""]
                self._after_store(event, sessions, early=early)
                cleared.setdefault(event.group, []).append(event.uuid or "")
            else:  # its announcement finishes the job (and clears the mark after making it)
                early.stored = (event, sessions)
        late = len(written) - early_count  # the early ones counted their own lag
        if late:
            self._count(publish_lag_seconds_sum=lag, publish_lag_count=late)
        self._stream(written)
        if cleared:
            self._clear_inflight(cleared)

    def _after_store(self, event: db.LinkEvent, sessions: list[str], *, early: _Early) -> None:
        """An early-announced event is stored: tell whoever the announcement did not reach; all
        of them again if the store came later than a woken reader waits for it (Postgres was
        slow or down), so nobody is left with a wake-up that read nothing."""
        late = time.monotonic() - early.at > INFLIGHT_WAIT
        self.announce(event, sessions, told=frozenset() if late else early.told)

    def _clear_inflight(self, cleared: dict[str, list[str]]) -> None:
        """Stored now: readers need not wait for these any more (the marks also expire)."""
        redis = self.runtime.redis
        if redis is None:
            return
        commands: list[tuple[Any, ...]] = [
            ("ZREM", self.keys.link_inflight(group), *uuids) for group, uuids in cleared.items()
        ]

        async def clear() -> None:
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for group, uuids in cleared.items():
                        pipe.zrem(self.keys.link_inflight(group), *uuids)
                    await pipe.execute()
            except REDIS_DOWN_ERRORS:
                pass  # the marks expire; a reader checks Postgres for them meanwhile

        self._best_effort(commands, clear, what="clearing link events in flight")

    def _stream(self, written: list[tuple[db.LinkEvent, list[str]]]) -> None:
        """XADD each event to its group's bounded Redis stream (a live tail; Postgres keeps all)."""
        redis = self.runtime.redis
        if redis is None:
            return
        maxlen = self.runtime.settings.link_stream_maxlen
        entries = [
            (self.keys.link_stream(event.group), event.id, json.dumps(event.to_dict(), separators=(",", ":")))
            for event, _ in written
        ]
        commands: list[tuple[Any, ...]] = [
            ("XADD", key, "MAXLEN", "~", maxlen, "*", "id", event_id, "event", data)
            for key, event_id, data in entries
        ]

        async def add() -> None:
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for key, event_id, data in entries:
                        pipe.xadd(key, {"id": event_id, "event": data}, maxlen=maxlen, approximate=True)
                    await pipe.execute()
            except REDIS_DOWN_ERRORS:
                pass  # the stream is a tail for live readers; catch-up reads Postgres

        self._best_effort(commands, add, what="adding link events to their streams")

    def _best_effort(
        self, commands: list[tuple[Any, ...]], fallback: Callable[[], Awaitable[None]], *, what: str
    ) -> None:
        """Redis bookkeeping that may be lost when Redis is (counters, the streams' live tail,
        in-flight marks that expire): written at once on the notifier's direct line (one write,
        no task, no pool; about a tenth of the CPU of a redis-py pipeline), and after any
        in-flight mark it clears, which went on that line before it. While the line is down,
        `fallback` runs in the background through redis-py."""
        line = getattr(self.runtime.notifier, "line", None)
        sent = line.send_many(commands) if line is not None and commands else None
        if sent is None:
            self.runtime.background(fallback(), what=what)
            return
        for fut in sent:
            fut.add_done_callback(_best_effort_reply)

    def announce(
        self, event: db.LinkEvent, sessions: list[str], *, told: frozenset[str] = frozenset()
    ) -> None:
        """Queue the inbox update for every member the event concerns (never the sender), but
        those `told` already (announced early)."""
        self.events += 1
        uri = db.inbox_uri(event.group)
        notified = len(told)
        for sid in sessions:
            if sid == event.sender or (event.recipient is not None and sid != event.recipient) or sid in told:
                continue
            self.runtime.notify(sid, UPDATED, {"uri": uri})
            notified += 1
        self.notified += notified
        self._count(events=1, notified=notified)

    def _count(self, **fields: float) -> None:
        """Add to the fleet-wide counters in Redis (router /metrics), off the call's path."""
        redis = self.runtime.redis
        if redis is None:
            return
        commands: list[tuple[Any, ...]] = [
            ("HINCRBYFLOAT", self.keys.link_stats(), name, amount) for name, amount in fields.items()
        ]

        async def add() -> None:
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for name, amount in fields.items():
                        pipe.hincrbyfloat(self.keys.link_stats(), name, amount)
                    await pipe.execute()
            except REDIS_DOWN_ERRORS:
                pass  # counters are best effort; the events themselves are in Postgres

        self._best_effort(commands, add, what="counting link events")

    async def presence(self, sessions: list[str]) -> dict[str, str]:
        """'active' (on an instance), 'parked' (no instance), 'ended' or 'unknown' (Redis down),
        from the router's session table."""
        redis = self.runtime.redis
        if redis is None:
            return dict.fromkeys(sessions, "unknown")
        out: dict[str, str] = {}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for sid in sessions:
                    pipe.hget(self.keys.session(sid), "instance_id")
                    pipe.exists(self.keys.session(sid))
                replies = await pipe.execute()
        except REDIS_DOWN_ERRORS:
            return dict.fromkeys(sessions, "unknown")
        for i, sid in enumerate(sessions):
            instance, exists = replies[2 * i], replies[2 * i + 1]
            out[sid] = "active" if instance else ("parked" if exists else "ended")
        return out

    async def inbox(
        self, group: str, session: str, *, limit: int, ack: bool
    ) -> tuple[list[db.LinkEvent], int, bool]:
        """Unread events (oldest first, at most `limit`), the cursor after acknowledging them (if
        `ack`), and whether more unread events are left after them."""

        async def read(conn: asyncpg.Connection) -> tuple[list[db.LinkEvent], int, bool]:
            if not ack:
                return await unread(conn)
            # Reading and acknowledging are one step per member: two reads of one session at
            # once (a client pipelining link_inbox) would otherwise both return the same events.
            async with conn.transaction():
                await db.member(conn, group, session, lock=True)
                return await unread(conn)

        async def unread(conn: asyncpg.Connection) -> tuple[list[db.LinkEvent], int, bool]:
            # The head first: ids commit in order, so every event up to it is visible now and
            # those not returned were for others; later ones are covered by the last returned.
            head = int(await conn.fetchval("SELECT seq FROM link_groups WHERE name = $1", group) or 0)
            events = await db.unread(conn, group, session, limit=limit + 1)  # one more: is there?
            more = len(events) > limit
            del events[limit:]
            cursor = int((await db.member(conn, group, session))["read_upto"])
            if ack:
                upto = events[-1].id if events else head
                if not more:
                    upto = max(upto, head)
                cursor = await db.ack(conn, group, session, upto)
            return events, cursor, more

        await self._wait_inflight(group)
        events, cursor, more = await self.run(
            read, what=f"reading the inbox of link group {group!r}", write=ack
        )
        if events:
            self.catch_ups += 1
            self.caught_up_events += len(events)
            if ack:  # delivery lag: from the event stored to its member reading it
                now = datetime.now(UTC)
                lag = sum((now - e.created_at).total_seconds() for e in events)
                self._count(
                    catchups=1, caught_up_events=len(events), lag_seconds_sum=lag, lag_count=len(events)
                )
        return events, cursor, more

    async def require_member(self, group: str | None, session: str) -> str:
        """The group-scope id for tasks and notes of `group`, once `session` is shown a member."""
        if not group:
            from common.errors import InvalidArgument

            raise InvalidArgument(
                "scope='group' needs group", hint="Pass the link group's name (link_status lists yours)."
            )
        await self.check_member(group, session)
        return group_scope_id(group)

    async def group_context(
        self, group: str, session: str, *, budget_chars: int
    ) -> tuple[str, dict[str, Any]]:
        """A prompt block with the group's recent messages, group notes and the other members'
        in-progress tasks, newest cut first to stay within `budget_chars`; and what it holds."""
        storage = self.runtime.require_storage()

        async def read(conn: asyncpg.Connection) -> tuple[list[db.LinkEvent], list[dict[str, Any]]]:
            await db.member(conn, group, session)
            return await db.recent(conn, group, session, limit=GROUP_CONTEXT_MESSAGES), await db.members(
                conn, group
            )

        events, members = await self.run(read, what=f"reading the context of link group {group!r}")
        notes = await storage.notes.list(scope="session", scope_id=group_scope_id(group))
        sections: list[tuple[str, list[str]]] = [
            ("Group notes", [f"- {n.key} ({n.kind}): {n.body}" for n in notes]),
            ("In progress", []),
            ("Recent messages", []),
        ]
        for m in members:
            if m["session"] == session:
                continue
            working = await storage.tasks.list(session_id=m["session"], scope="session", state="IN_PROGRESS")
            who = m["client"] or m["session"][:8]
            sections[1][1].extend(f"- {who}: {t.to_dict()['name']}" for t in working)
        group_tasks = await storage.tasks.list(
            session_id=group_scope_id(group), scope="session", state="IN_PROGRESS"
        )
        sections[1][1].extend(f"- group task: {t.to_dict()['name']}" for t in group_tasks)
        for e in reversed(events):  # newest first, so the budget cuts the oldest
            if e.kind == "message":
                sections[2][1].append(
                    f"- {e.sender and e.sender[:8]}: {e.subject + ': ' if e.subject else ''}{e.body}"
                )
        header = f"[Context shared by link group {group!r}]\n"
        used = len(header)
        kept: dict[str, list[str]] = {}
        truncated = False
        for title, lines in sections:
            for line in lines:
                if used + len(line) + 1 > budget_chars:
                    truncated = True
                    break
                kept.setdefault(title, []).append(line)
                used += len(line) + 1
        if "Recent messages" in kept:
            kept["Recent messages"].reverse()  # back to oldest first
        text = header + "\n".join(f"{title}:\n" + "\n".join(lines) for title, lines in kept.items())
        summary = {
            "group": group,
            "notes": len(kept.get("Group notes", [])),
            "tasks": len(kept.get("In progress", [])),
            "messages": len(kept.get("Recent messages", [])),
            "chars": len(text) if kept else 0,
            "truncated": truncated,
        }
        return (text if kept else ""), summary

    async def join_from_header(self, headers: Mapping[str, str]) -> None:
        """Connect-time linking: a client that sends `Exai-Link-Group: <group>` on its requests
        joins that group on its first tool call (same principal rules as link_join)."""
        group = headers.get(LINK_GROUP_HEADER) or headers.get(LINK_GROUP_HEADER.title())
        if not group:
            return
        session, principal, client, crosses = self.caller(headers)
        if (session, group) in self._header_joins:
            return
        self._header_joins.add((session, group))
        if not await self._first_header_join(session, group):
            return  # joined by the header before, on another instance: a leave since stands

        async def join(conn: asyncpg.Connection) -> tuple[db.LinkEvent | None, list[str]]:
            _, event = await db.join(conn, group, session, principal=principal, client=client, admin=crosses)
            return event, [m["session"] for m in await db.members(conn, group)]

        try:
            db.check_group(group)
            event, sessions = await self.run(join, what=f"joining link group {group!r}", write=True)
        except ExaiError as exc:
            log.warning(
                "session %s could not join link group %r from its header: %s", session[:8], group, exc
            )
            if isinstance(exc, StorageUnavailable):  # Postgres down: a later call tries again
                self._header_joins.discard((session, group))
                await self._unmark_header_join(session, group)
            else:  # refused for good: said in this call's answer and kept for link_status
                await self._header_refused(session, group, exc)
            return
        self.remember_members(group, sessions)
        if event is not None:
            self.announce(event, sessions)

    async def _first_header_join(self, session: str, group: str) -> bool:
        """Whether the header joins `session` to `group` now: only the first time in the
        session's life (marked in its router record, which ends with it), so a session that
        left or that the admin removed is not put back when it moves to another instance.
        Without a record (no router) or with Redis down: yes, as before (joining is idempotent)."""
        redis = self.runtime.redis
        if redis is None:
            return True
        try:
            first = await redis.eval(
                _MARK_HEADER_JOIN, 1, self.keys.session(session), Keys.link_header_field(group)
            )
        except REDIS_DOWN_ERRORS:
            return True
        return bool(first)

    async def _header_refused(self, session: str, group: str, exc: ExaiError) -> None:
        words = (
            f"The Exai-Link-Group header asked to put this session in link group {group!r}, and "
            f"that was refused: [{exc.code}] {exc} This session is not in that group."
            " Fix the header in the client's MCP server configuration (a group of your own "
            "principal, 1-100 letters, digits, '.', '_' or '-'), or ask the admin to link this "
            "session (exai links add GROUP SESSION)."
        )
        self.runtime.notices.add(session, "link_header_refused", words, group=group, reason=exc.code)
        redis = self.runtime.redis
        if redis is not None:  # link_status shows it, on any instance, for the session's life
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await redis.eval(
                    _MARK_HEADER_REFUSED,
                    1,
                    self.keys.session(session),
                    Keys.link_header_field(group),
                    f"{HEADER_REFUSED}{words}",
                )

    async def header_joins(self, session: str) -> list[dict[str, Any]]:
        """What the Exai-Link-Group header did for `session` (from its router record): each
        group it named, and whether it joined or the words of its refusal."""
        redis = self.runtime.redis
        if redis is None:
            return []
        try:
            record = await redis.hgetall(self.keys.session(session))
        except REDIS_DOWN_ERRORS:
            return []
        prefix = Keys.link_header_field("")
        out = []
        for name, value in sorted((record or {}).items()):
            name = name.decode() if isinstance(name, bytes) else str(name)
            value = value.decode() if isinstance(value, bytes) else str(value)
            if not name.startswith(prefix):
                continue
            group = name[len(prefix) :]
            if value.startswith(HEADER_REFUSED):
                out.append({"group": group, "joined": False, "refused": value[len(HEADER_REFUSED) :]})
            else:
                out.append({"group": group, "joined": True})
        return out

    async def _unmark_header_join(self, session: str, group: str) -> None:
        redis = self.runtime.redis
        if redis is not None:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await redis.hdel(self.keys.session(session), Keys.link_header_field(group))

    async def chat_groups(self, session: str) -> list[str]:
        """The groups `session` opted into for chat context, cached per session (set at once by
        link_join through this instance), so a chat does not wait for Postgres each time: a
        copy older than CHAT_OPT_IN_TTL seconds is still used, and re-read in the background.
        On a miss Postgres gets CHAT_OPT_IN_WAIT seconds, none when it is known to be down;
        slower or down: no group context this call."""
        cached = self._chat_groups.get(session)
        if cached is not None:
            if time.monotonic() - cached[0] >= CHAT_OPT_IN_TTL:
                self._reread_chat_groups(session)
            return cached[1]
        if self._postgres_down():
            return []
        try:
            async with asyncio.timeout(CHAT_OPT_IN_WAIT):
                groups = await self._read_chat_groups(session)
        except (StorageUnavailable, TimeoutError) as exc:
            log.info("chat of %s without its opted-in group context: %s", session[:8], exc or "timeout")
            return []
        self.remember_chat_groups(session, groups)
        return groups

    async def _read_chat_groups(self, session: str) -> list[str]:
        return await self.run(lambda conn: db.chat_groups(conn, session), what="reading chat opt-ins")

    def _postgres_down(self) -> bool:
        storage = self.runtime.storage
        return storage is not None and storage.db.last_error is not None and not storage.db.connected

    def _reread_chat_groups(self, session: str) -> None:
        """Refresh one session's opt-ins off the call's path (one re-read at a time per session).
        A result is kept only if no opt-in changed on this instance meanwhile (a link_join or
        link_leave through it is newer than what the re-read may have seen)."""
        if session in self._chat_rereads or self._postgres_down():
            return
        changes = self._chat_changes

        async def reread() -> None:
            try:
                groups = await self._read_chat_groups(session)
            except StorageUnavailable:
                return
            finally:
                self._chat_rereads.discard(session)
            if self._chat_changes == changes:
                self.remember_chat_groups(session, groups)

        self._chat_rereads.add(session)
        self.runtime.background(reread(), what="re-reading chat opt-ins")

    def forget_chat_groups(self, session: str) -> None:
        self._chat_changes += 1
        self._chat_groups.pop(session, None)

    def remember_chat_groups(self, session: str, groups: list[str]) -> None:
        self._chat_changes += 1
        self._chat_groups[session] = (time.monotonic(), groups)
        if len(self._chat_groups) > 10_000:  # bounded: drop the oldest entries
            for sid in sorted(self._chat_groups, key=lambda k: self._chat_groups[k][0])[:1000]:
                del self._chat_groups[sid]

    async def chat_context(
        self, requested: str | None, session: str, *, budget_chars: int
    ) -> tuple[list[str], dict[str, Any] | None]:
        """The group context blocks for a chat call, and what they hold (None: nothing asked).

        `requested` is the call's include_group_context: a group name (that group, this call),
        "" (none, this call), or None (the groups this member opted into with chat_context).
        """
        if requested == "":
            return [], None
        if requested:
            block, summary = await self.group_context(requested, session, budget_chars=budget_chars)
            return ([block] if block else []), {**summary, "source": "call"}
        groups = await self.chat_groups(session)
        if not groups:
            return [], None
        blocks, summaries = [], []
        share = budget_chars // len(groups)
        for group in groups:
            block, summary = await self.group_context(group, session, budget_chars=share)
            if block:
                blocks.append(block)
            summaries.append({**summary, "source": "group opt-in"})
        if len(summaries) == 1:
            return blocks, summaries[0]
        return blocks, {"groups": summaries, "source": "group opt-in"}
