"""The admin API (JSON, bearer EXAI_ADMIN_TOKEN) and the unauthenticated probes.

/healthz says the process runs; /readyz says it can route (Redis answers, an instance is
registered); /metrics is Prometheus text. Everything under /admin needs the admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
from aiohttp import web

from common import protocol as p
from common.errors import BadRequest, ExaiError, InvalidArgument, NotFound, SessionBusy, StorageUnavailable
from common.notifications import notification
from common.redis import REDIS_DOWN_ERRORS
from router.metrics import Metrics
from router.openapi import OPENAPI
from router.proxy import CONTROL_TIMEOUT, Proxy
from router.registry import Instance

PROXY_KEY = web.AppKey("proxy", Proxy)
METRICS_KEY = web.AppKey("metrics", Metrics)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _error(exc: ExaiError) -> web.Response:
    return web.json_response(exc.to_dict(), status=exc.http_status)


@web.middleware
async def admin_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/admin"):
        try:
            request.app[PROXY_KEY].guard.check_admin(request)
        except ExaiError as exc:
            return _error(exc)
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except ExaiError as exc:
        return _error(exc)


async def list_sessions(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    ids = await proxy.table.redis.zrange(proxy.table.keys.sessions(), 0, -1)
    out = []
    for sid in ids:
        sess = await proxy.table.fetch(str(sid))
        if sess is not None and not sess.ended:
            out.append(sess.public())
    out.sort(key=lambda s: s["created"])
    counts = {state: sum(1 for s in out if s["state"] == state) for state in ("working", "idle", "parked")}
    return _json({"sessions": out, "counts": counts})


async def get_session(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    sess = await proxy.table.fetch(request.match_info["id"])
    if sess is None or sess.ended:
        raise NotFound(f"No session {request.match_info['id']!r}.")
    return _json(sess.public())


async def end_session(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    sess = await proxy.table.fetch(request.match_info["id"])
    if sess is None or sess.ended:
        raise NotFound(f"No session {request.match_info['id']!r}.")
    await proxy.bindings.end(sess, "admin")
    return _json({"ended": sess.id})


async def notify_session(request: web.Request) -> web.Response:
    """Publish a notification to a session's streams, as an instance would (tests, operators)."""
    proxy = request.app[PROXY_KEY]
    sess = await proxy.table.fetch(request.match_info["id"])
    if sess is None or sess.ended or proxy.notifications is None:
        raise NotFound(f"No session {request.match_info['id']!r}.")
    try:
        body = await request.json()
    except ValueError:
        raise InvalidArgument(
            'The body must be JSON: {"method": "notifications/...", "params": {...}}.'
        ) from None
    if not isinstance(body, dict):
        raise InvalidArgument('The body must be a JSON object: {"method": ..., "params": ...}.')
    message = notification(str(body.get("method", "")), body.get("params"))
    try:
        event_id = await proxy.notifications.events.append(sess.id, message)
    except REDIS_DOWN_ERRORS as exc:
        raise StorageUnavailable(
            f"Redis is unreachable ({exc}); the notification was not published.",
            hint="Retry once Redis is up.",
        ) from None
    return _json({"session": sess.id, "id": event_id})


async def park_session(request: web.Request) -> web.Response:
    """Give the session's instance back now (its next request binds it again)."""
    proxy = request.app[PROXY_KEY]
    sess = await proxy.table.fetch(request.match_info["id"])
    if sess is None or sess.ended:
        raise NotFound(f"No session {request.match_info['id']!r}.")
    if sess.state == "parked":
        return _json({"parked": sess.id})
    if not await proxy.bindings.park(sess, "admin"):
        raise SessionBusy(f"Session {sess.id!r} has {sess.inflight} request(s) in flight; not parked.")
    return _json({"parked": sess.id})


async def instances_view(proxy: Proxy) -> list[dict[str, Any]]:
    instances = await proxy.registry.instances()
    holders = await proxy.leases.holders(list(instances))
    draining = await proxy.registry.draining()
    return [
        {
            "id": inst.id,
            "host": inst.host,
            "port": inst.port,
            "pid": inst.pid,
            "state": "draining" if inst.id in draining and inst.state == "ready" else inst.state,
            "draining": inst.id in draining,
            "session": holders.get(inst.id),
            "heartbeat_age": round(inst.heartbeat_age, 3),
        }
        for inst in sorted(instances.values(), key=lambda i: (i.port, i.id))
    ]


async def list_instances(request: web.Request) -> web.Response:
    return _json({"instances": await instances_view(request.app[PROXY_KEY])})


async def drain_instance(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    iid = request.match_info["id"]
    inst = await proxy.registry.get(iid)
    if inst is None:
        raise NotFound(f"No live instance {iid!r}.")
    await proxy.registry.set_draining(iid)
    await _tell_instance(proxy, inst, "POST")
    return _json({"draining": iid})


async def undrain_instance(request: web.Request) -> web.Response:
    """Undo a drain: the instance takes new sessions again."""
    proxy = request.app[PROXY_KEY]
    iid = request.match_info["id"]
    was_draining = await proxy.registry.clear_draining(iid)
    inst = await proxy.registry.get(iid)
    if inst is None and not was_draining:
        raise NotFound(f"No live instance {iid!r}.")
    if inst is not None:
        await _tell_instance(proxy, inst, "DELETE")
    proxy.allocator.notify_freed()
    return _json({"undrained": iid, "was_draining": was_draining})


async def _tell_instance(proxy: Proxy, inst: Instance, method: str) -> None:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with proxy.http.request(
            method,
            inst.base_url + p.INTERNAL_DRAIN,
            headers={p.INTERNAL_TOKEN_HEADER: proxy.internal_token},
            timeout=CONTROL_TIMEOUT,
        ) as r:
            await r.read()


async def evict_instance(request: web.Request) -> web.Response:
    """Before an instance is stopped: no new sessions there, and park the ones it serves."""
    proxy = request.app[PROXY_KEY]
    iid = request.match_info["id"]
    try:
        wait = float(request.query.get("wait", "20"))
    except ValueError:
        raise BadRequest("Query parameter 'wait' must be a number of seconds.") from None
    if not 0 <= wait <= 600:
        raise BadRequest("Query parameter 'wait' must be between 0 and 600 seconds.")
    await proxy.registry.set_draining(iid)
    result = await proxy.bindings.evict(iid, wait)
    return _json(result.to_dict())


async def openapi(request: web.Request) -> web.Response:
    return _json(OPENAPI)


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "time": time.time()})


async def readyz(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    try:
        await proxy.table.redis.ping()
        instances = await proxy.registry.instances()
    except REDIS_DOWN_ERRORS as exc:
        body = {"ready": False, "reason": f"Redis unreachable: {exc}"}
        return web.json_response(body, status=503, headers={"Retry-After": "2"})
    draining = await proxy.registry.draining()
    # Only instances that can take a session count: ready (not starting, draining or stopping),
    # not drained by an operator.
    usable = [i for i in instances.values() if i.state == "ready" and i.id not in draining]
    if not usable:
        reason = "no instance can take a session" if instances else "no instance registered"
        return _json(
            {"ready": False, "reason": reason, "instances": 0, "registered": len(instances)}, status=503
        )
    holders = await proxy.leases.holders([i.id for i in usable])
    free = sum(1 for i in usable if holders.get(i.id) is None)
    return _json({"ready": True, "instances": len(usable), "unbound": free, "registered": len(instances)})


CHAT_STAGE_METRIC = "exai_instance_chat_stage_seconds"  # instance/timing.py renders it
STAGES_TIMEOUT = 1.0  # seconds an instance has to give its chat stages to a /metrics scrape


async def _instance_stages(proxy: Proxy, instances: list[Instance]) -> str:
    """Every live instance's chat stage timings (its /internal/metrics), each sample labelled
    with the instance, so a chat call's whole breakdown is on the router's /metrics beside the
    router's own stage. An instance that does not answer in time is left out of this scrape."""

    async def one(inst: Instance) -> list[str]:
        try:
            async with proxy.http.get(
                inst.base_url + p.INTERNAL_METRICS,
                headers={p.INTERNAL_TOKEN_HEADER: proxy.internal_token},
                timeout=aiohttp.ClientTimeout(total=STAGES_TIMEOUT),
            ) as r:
                if r.status != 200:
                    return []
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return []
        label = 'instance="' + inst.id.replace("\\", "\\\\").replace('"', '\\"') + '",'
        return [
            line.replace("{", "{" + label, 1)
            for line in text.splitlines()
            if line.startswith(CHAT_STAGE_METRIC) and "{" in line
        ]

    found = await asyncio.gather(*(one(inst) for inst in instances))
    return (
        "\n".join(
            [
                f"# HELP {CHAT_STAGE_METRIC} A chat call's time per stage on each instance "
                "(from its /internal/metrics; fleet = request - provider).",
                f"# TYPE {CHAT_STAGE_METRIC} summary",
                *(line for lines in found for line in lines),
            ]
        )
        + "\n"
    )


async def metrics(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    with contextlib.suppress(*REDIS_DOWN_ERRORS):
        await proxy.registry.instances()  # fresh instance gauges
    from router.links import refresh_metrics

    await refresh_metrics(request)  # fleet-wide link-group counters
    stages = await _instance_stages(proxy, list(proxy.registry.last.values()))
    return web.Response(
        text=request.app[METRICS_KEY].render() + stages, content_type="text/plain", charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )  # fmt: skip


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/openapi.json", openapi)
    app.router.add_get("/admin/sessions", list_sessions)
    app.router.add_get("/admin/sessions/{id}", get_session)
    app.router.add_delete("/admin/sessions/{id}", end_session)
    app.router.add_post("/admin/sessions/{id}/notify", notify_session)
    app.router.add_post("/admin/sessions/{id}/park", park_session)
    app.router.add_get("/admin/instances", list_instances)
    app.router.add_post("/admin/instances/{id}/drain", drain_instance)
    app.router.add_delete("/admin/instances/{id}/drain", undrain_instance)
    app.router.add_post("/admin/instances/{id}/evict", evict_instance)
    from router import links

    links.add_routes(app)
