"""The router's aiohttp Application: resources opened and closed by cleanup contexts.

One Redis client and one bounded upstream HTTP pool per process (router/upstream.py);
notification streams are held by the router itself (router/streams.py), never relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from common.keys import Keys
from common.notifications import EventLog
from common.redis import REDIS_DOWN_ERRORS, create_redis
from common.settings import Settings
from router import admin
from router.allocation import Allocator
from router.leases import LEASE_LOST, RECORD_GONE, RECORD_MOVED, Leases
from router.links import EndHandoffs
from router.metrics import Labels, Metrics
from router.middleware import route_errors
from router.proxy import Proxy
from router.registry import Registry
from router.routers import Routers
from router.security import Guard
from router.sessions import FLUSH_SECONDS, SessionTable
from router.spares import Spares
from router.streams import Hub
from router.upstream import Upstream

log = logging.getLogger(__name__)

SETTINGS_KEY = web.AppKey("settings", Settings)


SHUTDOWN_GRACE = 5.0  # background rounds get this long to stop when the router shuts down
POOL_PRUNE_INTERVAL = 30.0  # seconds between drops of connection pools of departed instances
HANDOFF_POLL = 2.0  # seconds between looks for session ends other routers left (this one's go at once)


async def _every(
    interval: float, name: str, fn: Callable[[], Awaitable[None]], *, wake: asyncio.Event | None = None
) -> None:
    """Run `fn` until cancelled; a failing round is logged and retried next time, never fatal.
    With `wake`, a round also starts as soon as the event is set (and clears it)."""
    task = asyncio.current_task()
    while True:
        if task is not None and task.cancelling():
            # A round swallowed the cancellation (a client library caught it): stop anyway,
            # or the router's shutdown would wait for this loop forever.
            raise asyncio.CancelledError
        if wake is None:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()
            wake.clear()
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except REDIS_DOWN_ERRORS as exc:
            log.warning("%s: Redis unreachable (%s)", name, exc)
        except Exception:
            log.exception("%s failed", name)


class Maintenance:
    """Background rounds: lease renewal, counter flush, parking, expiry."""

    def __init__(self, proxy: Proxy, settings: Settings) -> None:
        self.proxy = proxy
        self.settings = settings

    async def renew_leases(self) -> None:
        """Renew this router's leases where the session records still name the binding, and
        check every cached session against its record (the fallback for missed notices)."""
        table = self.proxy.table
        bindings = self.proxy.bindings
        cached = [s for s in table.by_id.values() if s.stored and not s.ended]
        bound = [s for s in cached if s.instance_id]
        unbound = [s for s in cached if not s.instance_id]
        pairs = [(s.instance_id, s.id) for s in bound]
        results = await self.proxy.leases.renew_bound(pairs)
        for sess, (iid, sid), code in zip(bound, pairs, results, strict=True):
            if sess.ended or sess.instance_id != iid or sess.lock.locked():
                continue  # changed meanwhile, or being rebound here right now
            if code == RECORD_GONE:
                table.drop(sess)  # ended through another router
                await self.proxy.leases.release(iid, sid)
            elif code == RECORD_MOVED:
                await bindings.moved_elsewhere(sess, iid)
            elif code == LEASE_LOST:
                if await self.proxy.leases.reacquire(iid, sid):
                    self.proxy.metrics.leases_reconciled.inc()  # Redis had lost it; restored
                else:
                    # Another session owns the instance now: rebind on this session's next request.
                    log.warning("session %s lost its lease on %s", sid[:8], iid)
                    sess.instance_id = ""
                    bindings.targets.pop(sid, None)
            elif code > sess.ver:
                await table.refresh(sess)
        for sess, ver in zip(unbound, await table.versions(unbound), strict=True):
            if sess.ended or sess.lock.locked():
                continue
            if ver < 0:
                table.drop(sess)
            elif ver > sess.ver:
                await table.refresh(sess)

    async def refresh_registry(self) -> None:
        """Read the instance registry: a new session's one-round-trip opening (router/opening.py)
        leases among the instances the router knows, and supervisord starts the router before
        its instances (spares and restarted hosts come later still), so nothing else would make
        it look before the first session paid for the allocator's slow path."""
        await self.proxy.registry.instances()

    async def prune_pools(self) -> None:
        """Forget upstream connection pools of instances that left the registry."""
        proxy = self.proxy
        live = {(i.host, i.port) for i in (await proxy.registry.instances()).values()}
        live |= {(t.host, t.port) for t in proxy.bindings.targets.values()}
        dropped = proxy.relay.prune(live)
        if dropped:
            log.info("dropped the connection pools of %d instance address(es) no longer registered", dropped)

    async def park_idle(self) -> None:
        await self.proxy.bindings.park_idle(self.settings.session_park_after)

    async def sweep_idle(self) -> None:
        """Expiry: forget sessions without requests for EXAI_SESSION_IDLE_TIMEOUT."""
        table = self.proxy.table
        await table.flush()
        cutoff = time.time() - self.settings.session_idle_timeout
        for sid in await table.idle_ids(cutoff):
            sess = await table.fetch(sid)
            if sess is None:
                await table.redis.zrem(table.keys.sessions(), sid)
                continue
            if sess.inflight:
                table.touch(sess)
                continue
            await self.proxy.bindings.end(sess, "expired")


def _sweep_interval(settings: Settings) -> float:
    """Seconds between expiry sweeps."""
    return max(0.2, min(30.0, settings.session_idle_timeout / 4))


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[route_errors, admin.admin_auth]
    )
    app[SETTINGS_KEY] = settings
    metrics = Metrics()
    app[admin.METRICS_KEY] = metrics

    async def resources(app: web.Application) -> AsyncIterator[None]:
        redis = create_redis(settings.redis_url, max_connections=64)
        keys = Keys(settings.redis_prefix)
        upstream = Upstream.create(settings.max_instances)
        registry = Registry(redis, keys)
        leases = Leases(redis, keys, settings.lease_ttl)

        async def registered() -> set[str]:
            return set(await registry.instances())

        spares = Spares(settings.supervisor_socket, cap=registry.cap, registered=registered)
        # A record outlives the idle timeout by a few sweep rounds, so the expiry sweep ends the
        # session (resets its instance, frees the lease, counts it) before Redis forgets it; a
        # record that expired first was dropped as "ended elsewhere" and never counted.
        table = SessionTable(
            redis, keys, expire_after=settings.session_idle_timeout + 3 * _sweep_interval(settings)
        )
        allocator = Allocator(
            settings,
            registry,
            leases,
            metrics,
            start_spare=spares.start_one,
            working=lambda: sum(1 for s in table.by_id.values() if s.inflight and not s.ended),
        )
        proxy = Proxy(
            http=upstream.calls,
            relay=upstream.relay,
            table=table,
            registry=registry,
            leases=leases,
            allocator=allocator,
            guard=Guard.from_settings(settings),
            metrics=metrics,
            internal_token=settings.internal_token or "",
            max_body_bytes=settings.max_body_bytes,
            read_timeout=settings.upstream_read_timeout,
            body_timeout=settings.body_timeout,
        )
        allocator.reset = proxy.bindings.reset_instance
        allocator.reconcile = proxy.bindings.reconcile
        allocator.reclaim = proxy.bindings.reclaim
        app[admin.PROXY_KEY] = proxy
        events = EventLog(redis, keys, maxlen=settings.notify_log_maxlen, ttl=settings.session_idle_timeout)
        hub = Hub(
            redis=redis, keys=keys, events=events, table=table, metrics=metrics,
            keepalive=settings.stream_keepalive, per_session=settings.streams_per_session,
            retry_ms=settings.stream_retry_ms, session_ttl=settings.session_idle_timeout,
        )  # fmt: skip
        proxy.notifications = proxy.bindings.notifications = hub
        handoffs = EndHandoffs(settings, hub, redis, keys)  # an ended session leaves its link groups
        proxy.bindings.on_end.append(handoffs.ended)
        _wire_gauges(metrics, proxy, upstream)
        with contextlib.suppress(*REDIS_DOWN_ERRORS):  # else loaded at its first use
            await proxy.bindings.opening.load()
        try:
            loaded = await table.load()
            if loaded:
                log.info("restored %d sessions from Redis", loaded)
        except REDIS_DOWN_ERRORS as exc:
            log.warning("could not restore sessions (Redis unreachable: %s)", exc)
        maint = Maintenance(proxy, settings)
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await maint.renew_leases()

        async def adopted() -> None:  # sessions a dead router left: renew their leases, park the idle
            await maint.renew_leases()
            await maint.park_idle()

        routers = Routers(
            redis, keys, table, registry, metrics,
            ttl=settings.heartbeat_ttl, interval=settings.heartbeat_interval, adopted=adopted,
        )  # fmt: skip  # this router's heartbeat; the others' bound sessions adopted when theirs expires
        proxy.bindings.others_alive = lambda: routers.others_alive

        async def ask_others() -> None:  # a waiter's turn: another router may have idle sessions
            if routers.others_alive:
                await table.ask_for_instance()

        allocator.ask_others = ask_others
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await routers.beat()
        sweep = _sweep_interval(settings)
        park = max(0.1, min(5.0, settings.session_park_after / 4))
        renew = min(2.0, settings.lease_ttl / 3)  # also the check of cached sessions against Redis
        tasks = [
            asyncio.create_task(_every(renew, "lease renewal", maint.renew_leases), name="lease renewal"),
            asyncio.create_task(
                _every(1.0, "session change notices", table.watch), name="session change notices"
            ),
            asyncio.create_task(_every(FLUSH_SECONDS, "session flush", table.flush), name="session flush"),
            asyncio.create_task(
                _every(1.0, "unfinished session ends", proxy.bindings.finish_ends),
                name="unfinished session ends",
            ),
            asyncio.create_task(_every(park, "parking", maint.park_idle), name="parking"),
            asyncio.create_task(
                _every(settings.heartbeat_interval, "registry refresh", maint.refresh_registry),
                name="registry refresh",
            ),
            asyncio.create_task(
                _every(settings.heartbeat_interval, "router heartbeat", routers.round),
                name="router heartbeat",
            ),
            asyncio.create_task(_every(sweep, "expiry sweep", maint.sweep_idle), name="expiry sweep"),
            asyncio.create_task(hub.run(), name="notification hub"),
            asyncio.create_task(_every(sweep, "stream sessions", hub.keep_sessions), name="stream sessions"),
            asyncio.create_task(
                # At once for an end here; every few seconds for ends other routers left and retries.
                _every(HANDOFF_POLL, "link handoffs", handoffs.run_pending, wake=handoffs.woken),
                name="link handoffs",
            ),
            asyncio.create_task(
                _every(POOL_PRUNE_INTERVAL, "upstream pools", maint.prune_pools), name="upstream pools"
            ),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
            for task in stuck:  # never seen since _every checks; a shutdown must not hang on one
                log.warning("background task %s did not stop when cancelled", task.get_name())
            await routers.close()
            await handoffs.close()
            await proxy.close()
            await spares.close()
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await table.flush()
            await upstream.close()
            await redis.aclose()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(_close_streams)
    admin.add_routes(app)

    async def mcp(request: web.Request) -> web.StreamResponse:
        return await request.app[admin.PROXY_KEY].handle(request)

    for path in ("/mcp", "/mcp/", "/mcp/s/{name}"):
        app.router.add_route("*", path, mcp)
    return app


async def _close_streams(app: web.Application) -> None:
    """Drop held notification streams first on shutdown, so clients move to the next router."""
    hub = app[admin.PROXY_KEY].notifications
    if hub is not None:
        await hub.close()


def _wire_gauges(metrics: Metrics, proxy: Proxy, upstream: Upstream) -> None:
    def sessions() -> dict[Labels, float]:
        out: dict[Labels, float] = {(("era", "handshake"),): 0, (("era", "stateless"),): 0}
        for s in proxy.table.by_id.values():
            if not s.ended:
                out[(("era", s.era),)] += 1
        return out

    def by_state() -> dict[Labels, float]:
        out: dict[Labels, float] = {(("state", st),): 0 for st in ("working", "idle", "parked")}
        for s in proxy.table.by_id.values():
            if not s.ended:
                out[(("state", s.state),)] += 1
        return out

    def instances() -> dict[Labels, float]:
        out: dict[Labels, float] = {}
        busy = {s.instance_id for s in proxy.table.by_id.values() if not s.ended}
        for inst in proxy.registry.last.values():
            state = "busy" if inst.id in busy else inst.state
            out[(("state", state),)] = out.get((("state", state),), 0) + 1
        return out

    def inflight() -> dict[Labels, float]:
        return {(): float(sum(s.inflight for s in proxy.table.by_id.values()))}

    metrics.gauge("exai_router_sessions", "Open sessions known to this router, by era.", sessions)
    metrics.gauge(
        "exai_router_sessions_by_state",
        "Open sessions known to this router: working (a call in flight), idle (bound), parked.",
        by_state,
    )
    metrics.gauge(
        "exai_router_process", "This router process (one of EXAI_ROUTER_PROCESSES), by pid.",
        lambda: {(("pid", str(os.getpid())),): 1.0},
    )  # fmt: skip
    metrics.gauge("exai_router_instances", "Live instances by state (busy = bound to a session).", instances)
    metrics.gauge("exai_router_requests_inflight", "Requests being proxied right now.", inflight)
    metrics.gauge(
        "exai_router_upstream_stale_dropped",
        "Pooled connections dropped before reuse because the instance had closed them.",
        lambda: {(): float(upstream.stale_dropped)},
    )

    def pooled() -> dict[Labels, float]:
        pools = upstream.relay.pools.values()
        idle = sum(1 for pool in pools for conn in pool.idle if not conn.closed)
        busy = sum(pool.busy for pool in pools)
        return {(("state", "idle"),): float(idle), (("state", "busy"),): float(busy)}

    metrics.gauge(
        "exai_router_upstream_connections",
        "Pooled connections to instances: idle (ready for the next call) and busy (a call or "
        "the end of an answer being read on it).",
        pooled,
    )
    metrics.gauge(
        "exai_router_allocation_waiters", "Sessions waiting for a free instance.",
        lambda: {(): float(proxy.allocator.waiters)},
    )  # fmt: skip
