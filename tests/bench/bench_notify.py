"""Router-held notification streams: delivery latency, fan-out and Last-Event-ID catch-up.

    python tests/bench/bench_notify.py [--events 300] [--sessions 50] [--backlog 1000]

Runs the router in this process (its aiohttp app on a free port, Redis from
EXAI_TEST_REDIS_URL, default the local server, under a fresh key prefix) with handshake-era
sessions written straight into its session table, and publishes the way instances do
(common/notifications.EventLog). Measured side by side in one run:

1. latency: publish (the append returned) -> the SSE frame read by a client on the session's
   GET stream, with 1 stream open vs. `--sessions` streams open (one per session, all fed by
   the router's single pub/sub connection; every session gets an event each round);
2. catch-up: a stream resumed with Last-Event-ID `--backlog` events back: time until the
   last one arrived, events per second.

Prints a table and saves JSON to tests/bench/results/notify-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.keys import Keys  # noqa: E402
from common.notifications import EventLog, notification  # noqa: E402
from common.settings import load_settings  # noqa: E402
from router.app import create_app  # noqa: E402
from router.sessions import Session, SessionTable  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.router.sse import frames  # noqa: E402

UPDATED = "notifications/resources/updated"


@contextlib.asynccontextmanager
async def running_router(redis_url: str, prefix: str) -> AsyncIterator[str]:
    settings = load_settings(
        redis_url=redis_url, redis_prefix=prefix, router_port=free_port(), internal_token="bench"
    )
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", settings.router_port).start()
        yield f"http://127.0.0.1:{settings.router_port}/mcp"
    finally:
        await runner.cleanup()


class Stream:
    """One GET stream; records when each event (by uri) arrived."""

    def __init__(self, http: aiohttp.ClientSession, url: str, sid: str) -> None:
        self.http, self.url, self.sid = http, url, sid
        self.arrived: dict[str, float] = {}
        self.ids: list[str] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def open(self, last_event_id: str | None = None) -> Stream:
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": self.sid}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        resp = await self.http.get(self.url, headers=headers)
        assert resp.status == 200, await resp.text()

        async def read() -> None:
            async for f in frames(resp):
                if f.data is not None:
                    self.arrived[f.data["params"]["uri"]] = time.perf_counter()
                    self.ids.append(f.id or "")
                    self.wake.set()

        self.task = asyncio.create_task(read())
        return self

    async def wait(self, uri: str) -> float:
        while uri not in self.arrived:
            self.wake.clear()
            await asyncio.wait_for(self.wake.wait(), 30)
        return self.arrived[uri]

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await self.task


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(events: EventLog, streams: list[Stream], rounds: int) -> list[float]:
    """Per round: one event to every session, then wait for all; latency of each event."""
    out: list[float] = []
    for n in range(rounds):
        sent: list[tuple[Stream, str, float]] = []
        for s in streams:
            uri = f"bench://{n}"
            await events.append(s.sid, notification(UPDATED, {"uri": uri}))
            sent.append((s, uri, time.perf_counter()))
        for s, uri, t0 in sent:
            out.append((await s.wait(uri)) - t0)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300, help="rounds for the latency runs")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--backlog", type=int, default=1000)
    args = ap.parse_args()
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"benchnotify{secrets.token_hex(3)}"
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    events = EventLog(redis, keys, maxlen=max(1000, args.backlog + 10), ttl=600)
    table = SessionTable(redis, keys)
    sids = [f"bench-{i}" for i in range(args.sessions)]
    for sid in sids:
        await table.save(Session(id=sid, era="handshake", principal="local", upstream_sid="x"))
    results: dict[str, Any] = {"events": args.events, "sessions": args.sessions, "backlog": args.backlog}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with running_router(redis_url, prefix) as url, aiohttp.ClientSession(timeout=timeout) as http:
            one = [await Stream(http, url, sids[0]).open()]
            await asyncio.sleep(0.5)
            lat1 = await latency(events, one, args.events)
            await one[0].close()
            many = [await Stream(http, url, sid).open() for sid in sids]
            await asyncio.sleep(0.5)
            latn = await latency(events, many, max(1, args.events // 10))
            for s in many:
                await s.close()

            # Catch-up: the backlog is published while nobody listens, then one resume.
            sid = sids[0]
            start_id = await events.tail(sid)
            for n in range(args.backlog):
                await events.append(sid, notification(UPDATED, {"uri": f"backlog://{n}"}))
            t0 = time.perf_counter()
            resumed = await Stream(http, url, sid).open(last_event_id=start_id)
            t_last = await resumed.wait(f"backlog://{args.backlog - 1}")
            catchup_s = t_last - t0
            in_order = len(resumed.ids) == args.backlog and len(set(resumed.ids)) == args.backlog
            await resumed.close()
        for name, vals in (("latency_1_stream", lat1), (f"latency_{args.sessions}_streams", latn)):
            results[name] = {
                "n": len(vals),
                "p50_ms": statistics.median(vals) * 1000,
                "p99_ms": _pct(vals, 0.99) * 1000,
            }
        results["catchup"] = {
            "events": args.backlog,
            "seconds": catchup_s,
            "events_per_s": args.backlog / catchup_s,
            "all_once_in_order": in_order,
        }
    finally:
        async for key in redis.scan_iter(match=keys.pattern(), count=500):
            await redis.delete(key)
        await redis.aclose()

    l1, ln = results["latency_1_stream"], results[f"latency_{args.sessions}_streams"]
    print(f"publish -> SSE frame, 1 stream:            p50 {l1['p50_ms']:.2f} ms  p99 {l1['p99_ms']:.2f} ms")
    print(
        f"publish -> SSE frame, {args.sessions} streams:           "
        f"p50 {ln['p50_ms']:.2f} ms  p99 {ln['p99_ms']:.2f} ms  (ratio p50 {ln['p50_ms'] / l1['p50_ms']:.2f})"
    )
    c = results["catchup"]
    print(
        f"Last-Event-ID catch-up of {c['events']} events: {c['seconds'] * 1000:.0f} ms "
        f"({c['events_per_s']:.0f} events/s), all once in order: {c['all_once_in_order']}"
    )
    out = ROOT / "tests" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"notify-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
