"""Which instance serves which session: bind, park, resume, fail over, evict, end.

A session is the durable unit, an instance the worker that serves it while it works. A
session with nothing in flight for EXAI_SESSION_PARK_AFTER is *parked*: its instance is reset
with the lease's fencing token and freed, and the session keeps everything else (principal,
client, era, the handshake's `initialize`, counters). Its next request binds it to any free
instance again, replaying `initialize` + `notifications/initialized` in the handshake era:
the same path as a failover after an instance died.

Leases in Redis make a binding exclusive across routers; the registry is the cross-check
when Redis has lost lease keys: an instance whose entry names a live session that is bound to
it gets its lease back instead of being handed to someone else (`reconcile`), and the
instance itself refuses a reset or another session without the right token.

With several routers, the session record in Redis decides: a router whose cached copy is
stale takes the record's view when the change notice or its lease round says so
(`moved_elsewhere`, router/sessions.py), and frees a lease it still holds for a binding the
record no longer names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from common import protocol as p
from common.errors import ExaiError, InstanceLost, SessionNotFound
from common.redis import REDIS_DOWN_ERRORS
from router.allocation import Allocator
from router.leases import Leases
from router.metrics import Metrics
from router.opening import GONE, Bound, Opened, Opening
from router.registry import Instance, Registry
from router.sessions import FLUSH_SECONDS, Session, SessionTable, binding_of

if TYPE_CHECKING:
    from router.streams import Hub

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=3)
# While a session waits for an instance, bound sessions idle this long are parked at once
# (not only after EXAI_SESSION_PARK_AFTER): an idle session must never cause a 503. The grace
# keeps a client's back-to-back requests (initialize, then its first call) on one instance.
PRESSURE_GRACE = 0.2
FLUSH_LAG = FLUSH_SECONDS + 0.5  # how late another router's calls may reach a record (and a margin)


@dataclass
class Eviction:
    """What taking the sessions off one instance did (for `exai scale` and the admin API)."""

    instance: str
    parked: list[str] = field(default_factory=list)
    cut: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"instance": self.instance, "parked": self.parked, "cut": self.cut}


class Bindings:
    """Owns the session -> instance map and every change to it."""

    def __init__(
        self,
        *,
        http: aiohttp.ClientSession,
        table: SessionTable,
        registry: Registry,
        leases: Leases,
        allocator: Allocator,
        metrics: Metrics,
        internal_token: str,
    ) -> None:
        self.http = http
        self.table = table
        self.registry = registry
        self.leases = leases
        self.allocator = allocator
        self.metrics = metrics
        self.internal_token = internal_token
        self.opening = Opening(table, leases)  # lease + record in one round trip
        self.targets: dict[str, Instance] = {}  # session id -> instance it is bound to
        # Sessions ended while Redis was down: (session, instance, persisted, reason) by id.
        self.unfinished_ends: dict[str, tuple[Session, Instance | None, bool, str]] = {}
        self.notifications: Hub | None = None  # told when a session ends (router/streams.py)
        # Told (session, reason) when an opened session ends, whatever Redis does (link handoff).
        self.on_end: list[Callable[[Session, str], None]] = []
        # Whether other router processes are alive (router/routers.py; set by the app).
        self.others_alive: Callable[[], bool] = lambda: False
        table.on_drop.append(self._dropped)
        table.on_pressure.append(self.relieve)
        self.relieving: asyncio.Task[None] | None = None

    def _dropped(self, sess: Session) -> None:
        """Another router ended `sess`: forget where it was bound here."""
        self.targets.pop(sess.id, None)
        self.allocator.notify_freed()

    async def moved_elsewhere(self, sess: Session, iid: str) -> None:
        """The record says `sess` no longer uses `iid` (another router parked or moved it):
        take the record's view, and free `iid` if this router's lease on it is left over."""
        fence = sess.fence
        async with sess.lock:
            if sess.ended or sess.instance_id != iid:
                return
            if not await self.table.refresh(sess) or sess.instance_id == iid:
                return
            self.targets.pop(sess.id, None)
            if await self.leases.holder(iid) == sess.id:
                inst = await self.registry.get(iid)
                if inst is not None:
                    await self.reset_instance(inst, sess.id, fence)
                await self.leases.release(iid, sess.id)
                self.allocator.notify_freed()
                log.info("session %s is served elsewhere now: left-over lease on %s freed", sess.id[:8], iid)

    # --- binding ---------------------------------------------------------------------------
    def bind(self, sess: Session, inst: Instance, fence: int) -> None:
        sess.instance_id = inst.id
        sess.fence = fence
        self.targets[sess.id] = inst

    def opened(self, sess: Session, got: Opened) -> None:
        """router/opening.py has bound `sess` and written its record: take that on here."""
        sess.instance_id = got.instance_id
        sess.fence = got.fence
        if got.instance is not None:
            self.targets[sess.id] = got.instance
        else:
            self.targets.pop(sess.id, None)  # read from the registry at first use
        self.table.adopt(sess, got.ver)

    async def undo_open(self, sess: Session, exc: BaseException) -> None:
        """An opening failed: free the instance the slow path leased for `sess`; and when the
        opening script's answer may have been lost (not a Redis outage: cancelled, say), drop
        the record it may have written (a lease it took then expires, never renewed, and its
        instance never saw the session)."""
        if sess.instance_id:
            await self.end(sess, "failed-open", persisted=False)
        if not isinstance(exc, REDIS_DOWN_ERRORS):
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.table.remove(sess)

    async def target(self, sess: Session) -> Instance | None:
        """The instance serving `sess`, or None (parked, or its instance left the registry)."""
        inst = self.targets.get(sess.id)
        if inst is not None and inst.id == sess.instance_id:
            return inst
        if not sess.instance_id:
            return None
        inst = await self.registry.get(sess.instance_id)
        if inst is not None:
            self.targets[sess.id] = inst
        return inst

    async def reopen(self, sess: Session, failed: Instance) -> None:
        """An initialize could not be delivered: give the unsaved session another instance."""
        await self.leases.release(failed.id, sess.id)
        self.bind(sess, *await self.allocator.allocate(sess.id))

    async def check_and_rebind(self, sess: Session, generation: int, target: Instance) -> None:
        """After a lost response: move the session only if the instance process really is gone."""
        try:
            async with self.http.get(
                target.base_url + p.INTERNAL_HEALTH,
                headers={p.INTERNAL_TOKEN_HEADER: self.internal_token},
                timeout=aiohttp.ClientTimeout(total=2),
            ) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        self.registry.mark_suspect(target)
        with contextlib.suppress(ExaiError):
            await self.rebind(sess, generation, "instance died")

    async def rebind(self, sess: Session, generation: int, reason: str, *, keep: bool = False) -> None:
        """Bind `sess` to a working instance once, however many requests noticed the need.

        A parked session comes through here too: that is resuming, counted apart from failovers.
        """
        started = time.perf_counter()
        async with sess.lock:
            if sess.generation != generation or sess.ended:
                return
            if keep:
                # The instance no longer knows the session: reset by a park, or another router
                # moved or resumed the session meanwhile (the lease names the session whichever
                # router bound it). The record says which; only a binding it still names is kept.
                bound = (sess.instance_id, sess.fence)
                if not await self.table.refresh(sess):
                    raise SessionNotFound("Session not found (it was ended).")
                if (sess.instance_id, sess.fence) != bound:
                    self.targets.pop(sess.id, None)
                    if sess.instance_id:
                        log.info("session %s moved to %s by another router", sess.id[:8], sess.instance_id)
                        return
                    keep = False  # parked meanwhile: resumed below
            resuming = not sess.instance_id and bool(sess.parked_at)
            old = self.targets.get(sess.id)
            old_id = sess.instance_id
            inst: Instance | None = None
            fence = sess.fence
            if keep and old is not None and await self.leases.holder(old.id) == sess.id:
                inst = await self.registry.get(old.id) or old
            elif old_id:
                # Unbound here from now on, so that lease renewal skips it while this session
                # waits for an instance. The old lease is freed once the record names the new
                # binding (`_moved_off`): until then another router may bind the session
                # there again, under a lease that names the session all the same.
                sess.instance_id = ""
                self.targets.pop(sess.id, None)
            # No initialize to replay: lease and record update in one round trip when a known
            # instance is free; else the allocator's slow path, then the record on its own.
            one_trip = inst is None and sess.stored and not (sess.era == "handshake" and sess.upstream_sid)
            found = binding_of(old_id, fence)  # the record's binding as this router knows it
            for _ in range(2 if one_trip else 0):  # a second try only after another router parked it
                changes: dict[str, Any] = {"generation": sess.generation + 1}
                if resuming:
                    changes.update(parked_at=0.0, resumes=sess.resumes + 1)
                got = await self.opening.bind(sess, self.allocator.known(), changes, found=found)
                if got is GONE:
                    self.table.drop(sess)
                    raise SessionNotFound("Session not found (it was ended).")
                if isinstance(got, Opened):
                    await self._took(sess, got, changes, old_id)
                    self._rebound(sess, resuming, started, old_id, reason)
                    return
                if not isinstance(got, Bound):
                    break  # none free: the allocator's slow path
                # Another router resumed, moved or parked it meanwhile (a client's requests
                # spread over several routers): take the record's binding rather than a second one.
                if not await self.table.refresh(sess):
                    raise SessionNotFound("Session not found (it was ended).")
                if sess.instance_id:
                    self.targets.pop(sess.id, None)
                    log.info("session %s was bound to %s by another router", sess.id[:8], sess.instance_id)
                    return
                found, resuming = "", True  # parked by the record after all: bind it from there
            seen = sess.ver  # a change notice read while this waits: another router bound it
            for _ in range(MAX_ATTEMPTS):
                if inst is None:
                    leased = await self.allocator.allocate(
                        sess.id, known_first=not one_trip, abandon=lambda: sess.ended or sess.ver != seen
                    )
                    if leased is None:
                        break
                    inst, fence = leased
                try:
                    if sess.era == "handshake" and sess.upstream_sid:
                        sess.upstream_sid = await self._replay_initialize(sess, inst, fence)
                    break
                except (aiohttp.ClientError, TimeoutError, InstanceLost) as exc:
                    log.warning("replaying initialize on %s failed: %s", inst.id, exc)
                    self.registry.mark_suspect(inst)
                    await self.leases.release(inst.id, sess.id)
                    inst = None
            if inst is None:
                if sess.ended:
                    raise SessionNotFound("Session not found (it was ended).")
                if sess.ver == seen:
                    raise InstanceLost("No instance could take over this session.")
                # The record changed while this router waited for an instance: another router
                # resumed, moved or parked the session. Its binding is taken; parked, the
                # request's next attempt resumes it again.
                self.targets.pop(sess.id, None)
                log.info("session %s was bound to %s by another router", sess.id[:8], sess.instance_id or "-")
                return
            if sess.stored:
                # The record names the new binding only if it still names the one found, as in
                # the one-round-trip path: another router may have resumed, moved or parked the
                # session while this one replayed its initialize.
                replayed = sess.upstream_sid
                for _ in range(2):  # a second try only after another router parked it
                    changes = {"generation": sess.generation + 1, "upstream_sid": replayed}
                    if resuming:
                        changes.update(parked_at=0.0, resumes=sess.resumes + 1)
                    got = await self.opening.bind(sess, (), changes, found=found, given=(inst, fence))
                    if isinstance(got, Opened):
                        await self._took(sess, got, changes, old_id, inst)
                        self._rebound(sess, resuming, started, old_id, reason)
                        return
                    if got is GONE or not await self.table.refresh(sess):
                        await self._give_back(sess, inst, fence)
                        self.table.drop(sess)
                        raise SessionNotFound("Session not found (it was ended).")
                    if sess.instance_id:
                        break
                    found, resuming = "", True  # parked by the record after all: bind it from there
                if sess.instance_id != inst.id:
                    await self._give_back(sess, inst, fence)
                # else the other router bound it to this same instance: the lease is its own now
                # (a failover that kept its instance takes the lease the session holds).
                self.targets.pop(sess.id, None)
                log.info("session %s was bound to %s by another router", sess.id[:8], sess.instance_id or "-")
                return
            self.bind(sess, inst, fence)
            sess.generation += 1
            if not await self.table.save(sess, create=True):
                # Ended through another router meanwhile: give the new instance back.
                self.targets.pop(sess.id, None)
                await self._give_back(sess, inst, fence)
                raise SessionNotFound("Session not found (it was ended).")
            await self._moved_off(sess, old_id)
            self._rebound(sess, resuming, started, old_id, reason)

    async def _took(
        self, sess: Session, got: Opened, changes: dict[str, Any], old_id: str, given: Instance | None = None
    ) -> None:
        """The opening script wrote the record with `changes` and the new binding: take them on
        here, and free the session's lease of the instance it left (`given`: the instance the
        allocator leased, which the script's answer does not carry)."""
        for name, value in changes.items():
            setattr(sess, name, value)
        self.opened(sess, got)
        if given is not None:
            self.targets[sess.id] = given
        await self._moved_off(sess, old_id)

    async def _moved_off(self, sess: Session, old_id: str) -> None:
        """The record names the session's new binding: free its lease of the instance it left."""
        if old_id and old_id != sess.instance_id:
            await self.leases.release(old_id, sess.id)
            self.allocator.notify_freed()

    async def _give_back(self, sess: Session, inst: Instance, fence: int) -> None:
        """Free an instance leased for `sess` that the record did not take."""
        await self.reset_instance(inst, sess.id, fence)
        await self.leases.release(inst.id, sess.id)
        self.allocator.notify_freed()

    def _rebound(self, sess: Session, resuming: bool, started: float, old_id: str, reason: str) -> None:
        if resuming:
            self.metrics.sessions_resumed.inc()
            self.metrics.resume_seconds.observe(time.perf_counter() - started)
            log.info("session %s resumed on %s", sess.id[:8], sess.instance_id)
        else:
            self.metrics.failovers.inc()
            log.info("session %s moved %s -> %s (%s)", sess.id[:8], old_id or "-", sess.instance_id, reason)

    async def _replay_initialize(self, sess: Session, inst: Instance, fence: int) -> str:
        """Open the session again on `inst` with the client's own initialize."""
        headers = {
            p.INTERNAL_TOKEN_HEADER: self.internal_token,
            p.SESSION_HEADER: sess.id,
            p.PRINCIPAL_HEADER: sess.principal,
            p.ERA_HEADER: sess.era,
            p.FENCE_HEADER: str(fence),
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        if sess.client:
            headers[p.CLIENT_HEADER] = sess.client
        url = inst.base_url + p.MCP_PATH
        async with self.http.post(
            url, data=sess.init_body.encode(), headers=headers, timeout=CONTROL_TIMEOUT
        ) as r:
            await r.read()
            upstream_sid = r.headers.get(p.MCP_SESSION_ID)
            if r.status != 200 or not upstream_sid:
                raise InstanceLost(f"Instance {inst.id} refused the replayed initialize ({r.status}).")
        headers[p.MCP_SESSION_ID] = upstream_sid
        if sess.protocol_version:
            headers[p.MCP_PROTOCOL_VERSION] = sess.protocol_version
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        async with self.http.post(url, data=note, headers=headers, timeout=CONTROL_TIMEOUT) as r:
            await r.read()
        return upstream_sid

    # --- fencing and reconciliation --------------------------------------------------------
    async def reset_instance(self, inst: Instance, session_id: str, fence: int | str) -> bool:
        """Reset `inst`, naming the binding it should have; False if it serves someone else."""
        headers = {p.INTERNAL_TOKEN_HEADER: self.internal_token, p.SESSION_HEADER: session_id}
        if fence:
            headers[p.FENCE_HEADER] = str(fence)
        try:
            async with self.http.post(
                inst.base_url + p.INTERNAL_RESET, headers=headers, timeout=CONTROL_TIMEOUT
            ) as r:
                await r.read()
                if r.status == 409:
                    log.warning("instance %s refused a reset for session %s", inst.id, session_id[:8])
                    return False
        except (aiohttp.ClientError, TimeoutError):
            pass  # gone or unreachable: nothing of another session's to protect there
        return True

    async def reconcile(self, inst: Instance) -> bool:
        """True if `inst` (no lease in Redis) still serves a live session: its lease is restored.

        Redis can lose lease keys (expired during an outage, deleted, restored from an old
        snapshot). Their absence proves nothing while the instance's registry entry names a
        session whose record says it is bound there.
        """
        if not inst.session:
            return False
        owner = await self.table.fetch(inst.session)
        if owner is None or owner.ended or owner.instance_id != inst.id:
            return False
        if await self.leases.reacquire(inst.id, owner.id):
            self.metrics.leases_reconciled.inc()
            log.warning("lease of %s for session %s was missing: restored", inst.id, owner.id[:8])
        return True

    # --- parking ---------------------------------------------------------------------------
    async def park(self, sess: Session, reason: str) -> bool:
        """Give the session's instance back; False if it is working or not bound."""
        async with sess.lock:
            if sess.ended or not sess.instance_id or sess.inflight:
                return False
            return await self._release(sess, reason)

    async def _release(self, sess: Session, reason: str) -> bool:
        """Unbind (caller holds sess.lock): record first, then reset, then free the lease;
        False if the record was ended or moved by another router meanwhile."""
        parked = await self._park_record(sess)
        if parked is not None:
            await self._free(sess, *parked, reason)
        return parked is not None

    async def _park_record(self, sess: Session) -> tuple[Instance | None, str, int] | None:
        """Unbind the session here and in its record (caller holds sess.lock): the instance
        (None if it is no longer registered), its id and the session's fencing token; None if
        the record is gone (ended through another router, which reset and freed the instance)
        or no longer names this binding (another router moved, resumed or parked the session
        meanwhile: the instance is not this router's to free, and `sess` takes the record's view)."""
        inst = self.targets.pop(sess.id, None)
        iid, fence = sess.instance_id, sess.fence
        sess.instance_id = ""
        sess.parked_at = time.time()
        sess.parks += 1
        if not await self.table.save(sess, create=False, expect=(iid, fence)):  # any router resumes it now
            return None
        if inst is None or inst.id != iid:
            inst = await self.registry.get(iid)
        return inst, iid, fence

    async def _free(self, sess: Session, inst: Instance | None, iid: str, fence: int, reason: str) -> None:
        """Reset the parked session's instance, then free its lease."""
        if inst is not None:
            await self.reset_instance(inst, sess.id, fence)
        await self.leases.release(iid, sess.id)
        self.allocator.notify_freed()
        self.metrics.sessions_parked.inc(reason=reason)
        log.info("session %s parked (%s), instance %s freed", sess.id[:8], reason, iid)

    async def _hand_over(self, sess: Session, session_id: str) -> tuple[Instance, int] | bool:
        """Park the idle `sess` and move its lease straight to `session_id`: (instance, new
        fencing token). The instance resets itself when the new session's first request shows
        the higher token (instance/runtime.py `take_over`), so neither the reset's HTTP round
        trip nor the lease's release and new acquisition are in the waiting session's way.
        Where the lease cannot move (the instance is draining or gone, the lease was lost), the
        session is parked the usual way and this returns True; False if it was not parked."""
        async with sess.lock:
            if sess.ended or not sess.instance_id or sess.inflight:
                return False
            parked = await self._park_record(sess)
            if parked is None:
                return True  # ended or moved by another router meanwhile: the allocator looks again
            inst, iid, fence = parked
            new_fence = 0 if inst is None else await self.leases.transfer(iid, sess.id, session_id, fence)
            if inst is None or not new_fence:
                await self._free(sess, inst, iid, fence, "pressure")
                return True
        self.metrics.sessions_parked.inc(reason="pressure")
        self.metrics.handovers.inc()
        log.info(
            "session %s parked (pressure), instance %s handed to session %s", sess.id[:8], iid, session_id[:8]
        )
        return inst, new_fence

    async def _quiet_elsewhere(self, sess: Session, cutoff: float) -> bool:
        """True if the record in Redis was not touched after `cutoff` either: another router
        may serve the session now (even one this router served before), and each flushes its
        last-seen times (a call in flight counts as now) into the record.

        A call through another router reaches the record only with that router's next flush
        (FLUSH_SECONDS later at most), so while other routers are alive the record must have
        been quiet that much longer (FLUSH_LAG): with EXAI_SESSION_PARK_AFTER near the flush
        interval, or for a waiting session's PRESSURE_GRACE, one router would otherwise park a
        session another is serving call after call, and the two would take its instance
        from each other."""
        seen = await self.table.redis.hget(self.table.keys.session(sess.id), "last_seen")  # type: ignore[misc]
        if seen is not None and float(seen) > sess.last_seen:
            sess.last_seen = float(seen)
        if sess.last_seen > cutoff:
            return False
        return seen is None or not self.others_alive() or float(seen) <= cutoff - FLUSH_LAG

    async def park_idle(self, park_after: float) -> int:
        """Park every bound session of this router idle for `park_after` seconds."""
        cutoff = time.time() - park_after
        idle = [
            s
            for s in list(self.table.by_id.values())
            if s.instance_id and not s.ended and not s.inflight and s.last_seen <= cutoff
        ]
        parked = 0
        for sess in idle:
            if not await self._quiet_elsewhere(sess, cutoff):
                continue
            if sess.last_seen <= cutoff and await self.park(sess, "idle"):
                parked += 1
        return parked

    async def _idle_now(self) -> AsyncIterator[Session]:
        """This router's bound sessions idle for PRESSURE_GRACE, longest-idle first, that it may
        park for a waiting session: served here (another router may be serving one of the others
        right now; only park_idle's check applies to those) and quiet in the record too."""
        cutoff = time.time() - PRESSURE_GRACE
        idle = sorted(
            (s for s in self.table.by_id.values() if s.instance_id and not s.ended and not s.inflight),
            key=lambda s: s.last_seen,
        )
        for sess in idle:
            if sess.last_seen > cutoff:
                return
            if sess.routed_here and await self._quiet_elsewhere(sess, cutoff):
                yield sess

    async def reclaim(self, session_id: str) -> tuple[Instance, int] | None:
        """An instance for `session_id`, which is waiting for one, from the longest-idle bound
        session: that session is parked and its instance handed over (`_hand_over`), or, where
        the lease cannot move, freed and then allocated as usual. None if no session is idle."""
        async for sess in self._idle_now():
            got = await self._hand_over(sess, session_id)
            if isinstance(got, tuple):
                return got
            if got:  # parked and freed the usual way
                return await self.allocator.try_once(session_id)
        return None

    def relieve(self) -> None:
        """Another router's session waits for an instance (router/sessions.py `on_pressure`):
        park this router's longest-idle session by the same rule as `reclaim`, so that its
        instance comes free for the waiter (which looks again at once: it polls). Only the
        router serving a session parks it this soon, so without this a waiter could not have
        the instance of a session idle behind another router until EXAI_SESSION_PARK_AFTER."""
        if self.relieving is None or self.relieving.done():
            self.relieving = asyncio.create_task(self._relieve(), name="relieve pressure")

    async def _relieve(self) -> None:
        try:
            async for sess in self._idle_now():
                if await self.park(sess, "pressure"):
                    return
        except REDIS_DOWN_ERRORS as exc:
            log.info("could not park a session for another router's waiter: %s", exc)
        except Exception:
            log.exception("parking a session for another router's waiter failed")

    async def evict(self, instance_id: str, wait: float) -> Eviction:
        """Park every session bound to `instance_id` (being stopped): wait up to `wait` seconds
        for their calls in flight, then cut what is left, each with an error that says so."""
        result = Eviction(instance_id)
        deadline = time.monotonic() + wait
        while True:
            bound = [s for s in self.table.by_id.values() if s.instance_id == instance_id and not s.ended]
            if not bound:
                return result
            for sess in bound:
                if not sess.inflight and await self.park(sess, "evicted"):
                    result.parked.append(sess.id)
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for sess in [s for s in self.table.by_id.values() if s.instance_id == instance_id and not s.ended]:
            async with sess.lock:
                if sess.instance_id != instance_id or sess.ended:
                    continue
                for call in list(sess.calls.values()):
                    result.cut.append({"session": sess.id, "call": call.describe()})
                    call.cut = True
                    self.metrics.calls_cut.inc()
                    if call.task is not None:
                        call.task.cancel()
                await self._release(sess, "evicted")
                result.parked.append(sess.id)
        return result

    # --- ending ----------------------------------------------------------------------------
    async def end(self, sess: Session, reason: str, *, persisted: bool = True) -> None:
        """Forget the session, reset its instance, then free the lease (in that order)."""
        if sess.ended:
            return
        sess.ended = True
        for hook in self.on_end if persisted else ():  # not for a session that never opened
            try:
                hook(sess, reason)
            except Exception:
                log.exception("a session-end hook failed for %s", sess.id[:8])
        inst = self.targets.pop(sess.id, None)
        try:
            await self._forget(sess, inst, persisted)
        except REDIS_DOWN_ERRORS as exc:
            # The session is over for clients now; its record and lease go when Redis returns.
            self.unfinished_ends[sess.id] = (sess, inst, persisted, reason)
            log.warning(
                "session %s ended (%s); Redis unreachable (%s), finishing later", sess.id[:8], reason, exc
            )
            return
        self._ended(sess, reason)

    async def _forget(self, sess: Session, inst: Instance | None, persisted: bool) -> None:
        if persisted:
            await self.table.remove(sess)
        if self.notifications is not None:
            await self.notifications.session_ended(sess.id)
        if inst is None and sess.instance_id:
            inst = await self.registry.get(sess.instance_id)
        if inst is not None:
            await self.reset_instance(inst, sess.id, sess.fence)
        if sess.instance_id:
            await self.leases.release(sess.instance_id, sess.id)

    def _ended(self, sess: Session, reason: str) -> None:
        self.allocator.notify_freed()
        self.metrics.sessions_ended.inc(reason=reason)
        log.info("session %s ended (%s), instance %s freed", sess.id[:8], reason, sess.instance_id or "-")

    async def finish_ends(self) -> None:
        """Finish the ends (DELETE, expiry, admin) that Redis was down for; raises while it still is."""
        for sid, (sess, inst, persisted, reason) in list(self.unfinished_ends.items()):
            await self._forget(sess, inst, persisted)
            del self.unfinished_ends[sid]
            self._ended(sess, reason)
