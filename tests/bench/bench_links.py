"""Linked sessions through a real fleet: the sender's cost, delivery latency A -> B, catch-up.

    python tests/bench/bench_links.py [--calls 300] [--messages 300] [--backlog 10000]
                                      [--set link_spool_sync=full] [--set link_early_notify=false]

Starts a fleet under real supervisord (tests/fleet.py: router + 2 instances) on a fresh database
(EXAI_TEST_DATABASE_URL, dropped afterwards) and EXAI_TEST_REDIS_URL (a fresh key prefix), with
real MCP clients through the router. Measured:

1. the sender's cost: what a group event adds to the tool call that makes it. Side by side, in
   the same rounds: `task_create(scope="group")` vs the same call session-scoped, and
   `link_send` vs `version` (a no-op tool). Both as the instance timed the tool itself (the
   `duration_ms` it records for every call, read from Postgres afterwards: no HTTP noise) and
   as the client saw it. The cost is the difference of the p50s. For contrast: what the old
   synchronous path cost (one Postgres transaction per event, common/links.append);
2. delivery latency: A calls link_send -> B's client has the `notifications/resources/updated`
   for the group's inbox (the spool append, the member's notification log in Redis, the
   router-held stream, SSE to B; with EXAI_LINK_EARLY_NOTIFY=false also the flusher's
   Postgres commit); one message at a time, 25 ms apart. B's SDK client runs in a process of
   its own (tests/bench/link_listener.py) and stamps the wall-clock moment its message handler
   ran; A's call start is stamped here. (Until 2026-11-27 B's client ran in this process, where
   its parsing of the notification waited while A's client parsed A's answer, which arrives at
   about the same moment.) Also the part of it after A's call
   answered, A's own round trip, and where the time goes (call start -> the tool made the
   event -> the publish on B's channel, seen by a subscriber of the bench's own -> B's
   client), and the instances' own mean of call -> notification queued;
3. catch-up: B missed `--backlog` events (written straight into Postgres, not measured); time
   for B to read and acknowledge them all with link_inbox(limit=1000) through the router.

4. the same delivery over the raw wire (tests/bench/rawwire.py): A writes one prebuilt
   2026-07-28 tools/call link_send on a plain socket, B reads its `subscriptions/listen`
   stream's bytes and splits the frames itself; from A's request written to B's frame read.
   No client library on either side: the fleet's own delivery latency, printed beside the
   SDK clients' (whose own cost is most of the difference). The publish moments come from a
   subscriber in a process of its own, so the bench process's work does not delay them. The
   SDK clients of this process (A, C) leave the group before this phase, so they do not parse
   the same notifications in the process that times B's frame (until 2026-11-27 they did).

Targets: sender <= 0.2 ms, delivery p50 <= 5 ms, catch-up of 10,000 events <= 1 s.
Prints a table and saves JSON to tests/bench/results/links-<timestamp>.json.
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
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import links as db  # noqa: E402
from common.keys import Keys  # noqa: E402
from common.migrate import migrate  # noqa: E402
from instance.storage.spool import Spool  # noqa: E402
from tests.bench.bench_router import add_set_option, set_settings  # noqa: E402
from tests.bench.rawwire import RawCaller, RawListen  # noqa: E402
from tests.fleet import BENCH_SETTINGS, Fleet  # noqa: E402
from tests.router.conftest import ROUTER_TEST_SETTINGS, mcp_client, status_of  # noqa: E402

GAP = 0.025  # seconds between two timed deliveries


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


_WATCH = """
import sys, time, redis
r = redis.Redis.from_url(sys.argv[1])
ps = r.pubsub()
ps.subscribe(sys.argv[2])
for msg in ps.listen():
    if msg["type"] == "subscribe":
        print("ready", flush=True)
    elif msg["type"] == "message":
        print(repr(time.time()), flush=True)
"""


class PublishWatch:
    """The wall-clock moments of the publishes on one session channel, seen by a subscriber in a
    process of its own (so what the bench process is busy with, e.g. an SDK client parsing an
    answer, does not delay it)."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.times: list[float] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PublishWatch:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WATCH, self.redis_url, self.channel, stdout=asyncio.subprocess.PIPE
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 20)
        assert line.strip() == b"ready", line
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            self.times.append(float(line))

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.2)  # the last lines
        assert self._proc is not None and self._task is not None
        self._proc.kill()
        await self._proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def first_after(self, t: float, before: float) -> float:
        """The first publish in [t, before), or 0."""
        return next((x for x in self.times if t <= x < before), 0.0)


def parts(
    marks: list[tuple[str, float, float]], made: dict[str, float], watch: PublishWatch
) -> dict[str, Any]:
    """Where delivery's time went: (body, A's request start (wall), B has it (wall)) per message,
    the event's created_at by body -> call start -> made -> published -> B."""
    to_tool, to_publish, hop = [], [], []
    for i, (body, start, got) in enumerate(marks):
        created = made.get(body)
        nxt = marks[i + 1][1] if i + 1 < len(marks) else float("inf")
        published = watch.first_after(start, nxt)
        if created is None or not published or published > got:
            continue
        to_tool.append((created - start) * 1000)
        to_publish.append((published - created) * 1000)
        hop.append((got - published) * 1000)
    if not hop:
        return {}
    return {
        "call_start_to_event_made": summary(to_tool),
        "event_made_to_published": summary(to_publish),
        "pubsub_hop_published_to_b": summary(hop),
    }


async def created_by_body(dsn: str, group: str, like: str) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            r["body"]: r["created_at"].timestamp()
            for r in await conn.fetch(
                "SELECT body, created_at FROM link_events WHERE group_name = $1 AND body LIKE $2", group, like
            )
        }
    finally:
        await conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc, Linux), 0 if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fleet_cpu(fleet: Fleet) -> dict[str, float]:
    """CPU seconds so far of the router and of the instances (summed), by role."""
    out = {"router": 0.0, "instances": 0.0}
    for proc in fleet.processes():
        if proc.pid and proc.state == "RUNNING":
            out["router" if "router" in proc.name else "instances"] += cpu_seconds(proc.pid)
    return out


async def raw_delivery(fleet: Fleet, dsn: str, group: str, messages: int) -> dict[str, Any]:
    """Delivery over the raw wire: A writes a tools/call link_send (2026-07-28, one prebuilt
    request on a plain socket) -> B's `subscriptions/listen` frame for the inbox is read (its
    bytes, parsed here). No client library on either side: the fleet's own latency."""
    inbox = db.inbox_uri(group)
    a = RawCaller(fleet.mcp_url, "raw-a")
    b = RawCaller(fleet.mcp_url, "raw-b")
    listen = RawListen(fleet.mcp_url, "raw-b", [inbox])
    try:
        b_sid = (await b.call("status", {}))["session"]
        await a.call("status", {})
        for c in (a, b):
            await c.call("link_join", {"group": group})
        await b.call("link_inbox", {"group": group, "limit": 1000})
        await listen.start()
        for i in range(20):  # warm-up
            await a.call("link_send", {"group": group, "body": f"rw{i}"})
            await a.call("version", {})
        await asyncio.sleep(0.5)
        lat: list[float] = []
        answer: list[float] = []
        marks: list[tuple[str, float, float]] = []
        noop_ms: list[float] = []
        send_ms: list[float] = []
        redis_url = fleet.settings.redis_url or ""
        async with PublishWatch(redis_url, fleet.keys.session_channel(b_sid)) as watch:
            await asyncio.sleep(0.3)
            cpu0 = await asyncio.to_thread(fleet_cpu, fleet)
            for i in range(messages):
                req = a.request("link_send", {"group": group, "body": f"r{i}"})
                listen.frames.clear()
                listen.arrived.clear()
                wall0 = time.time()
                written, _ = await a.send(req)
                answered = time.perf_counter()
                await asyncio.wait_for(listen.arrived.wait(), 10)
                got = listen.frames[0][0]
                assert db.inbox_uri(group).encode() in listen.frames[0][1]
                lat.append((got - written) * 1000)
                answer.append((answered - written) * 1000)
                marks.append((f"r{i}", wall0, wall0 + (got - written)))
                send_ms.append((answered - written) * 1000)
                await asyncio.sleep(GAP)
                w, _ = await a.send(a.request("version", {}))
                noop_ms.append((time.perf_counter() - w) * 1000)
                await asyncio.sleep(GAP)
            cpu1 = await asyncio.to_thread(fleet_cpu, fleet)
        made = await created_by_body(dsn, group, "r%")
        status = await a.call("status", {})
        stages, notes = status.get("link_stages"), status.get("links")
        out: dict[str, Any] = {
            "delivery": summary(lat),
            "sender_answer": summary(answer),
            "noop_answer": summary(noop_ms),
            "link_send_minus_noop_p50": round(statistics.median(send_ms) - statistics.median(noop_ms), 3),
            "instance_stages": stages,  # the sender's instance's own timings (status link_stages)
            # CPU per round (one link_send delivered + one version call), by role: the work,
            # which the machine's load does not inflate as it does latency.
            "cpu_ms_per_round": {k: round((cpu1[k] - cpu0[k]) * 1000 / messages, 3) for k in cpu0},
            "instance_links": notes,
        }
        if p := parts(marks, made, watch):
            out["delivery_parts"] = p
        await b.call("link_inbox", {"group": group, "limit": 1000})
        return out
    finally:
        await listen.close()
        await a.close()
        await b.close()


async def call(client: Any, tool: str, args: dict[str, Any]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    result = await client.call_tool(tool, args)
    ms = (time.perf_counter() - t0) * 1000
    assert not result.is_error, result
    return dict(result.structured_content), ms


class Listener:
    """B's SDK client in a process of its own (tests/bench/link_listener.py): the wall-clock
    moments its message handler had an inbox notification, read from its stdout."""

    def __init__(self, url: str, group: str, name: str) -> None:
        self.args = (url, group, name)
        self.sid = ""
        self.times: list[float] = []
        self.arrived = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("link_listener.py")), *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 60)
        assert line.startswith(b"ready "), line
        self.sid = line.split()[1].decode()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            self.times.append(float(line))
            self.arrived.set()

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None and self._task is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def bench(fleet: Fleet, dsn: str, calls: int, messages: int, backlog: int) -> dict[str, Any]:
    group = "bench"
    results: dict[str, Any] = {"calls": calls, "messages": messages, "backlog": backlog}

    await fleet.wait_instances(2)
    a_sent = [0.0]  # wall clock: A's client is about to send its last HTTP request

    def a_sends(request: Any) -> None:
        a_sent[0] = time.time()

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="bench-a", on_request=a_sends) as a,
        mcp_client(fleet.mcp_url, "legacy", name="bench-c") as c,
        Listener(fleet.mcp_url, group, "bench-b") as b,
    ):
        a_sid, c_sid = (await status_of(a))["session"], (await status_of(c))["session"]
        for client in (a, c):
            await call(client, "link_join", {"group": group})
        for _ in range(20):  # warm up every path (pools, caches, the flusher)
            await call(a, "link_send", {"group": group, "body": "warm"})
            await call(c, "task_create", {"name": "warm"})
            await call(a, "task_create", {"name": "warm", "scope": "group", "group": group})
        seen: dict[str, list[float]] = {k: [] for k in ("group_task", "session_task", "link_send", "noop")}
        for i in range(calls):  # interleaved, so both sides see the same machine load
            seen["group_task"].append(
                (await call(a, "task_create", {"name": f"g{i}", "scope": "group", "group": group}))[1]
            )
            seen["session_task"].append((await call(c, "task_create", {"name": f"s{i}"}))[1])
            seen["link_send"].append((await call(a, "link_send", {"group": group, "body": f"m{i}"}))[1])
            seen["noop"].append((await call(a, "version", {}))[1])
        results["client_ms"] = {k: summary(v) for k, v in seen.items()}

        # Delivery with the SDK clients: one message at a time, A's call start -> B's client has
        # the notification. B's client runs in a process of its own and stamps the moment its
        # message handler ran (wall clock, one machine), so B's parsing does not wait behind A's
        # client parsing A's answer in this process. Where the time goes: the call start -> the
        # tool made the event (its created_at) -> the notification published on B's session
        # channel (seen by a subscriber in a process of its own) -> B's client has it (the
        # pub/sub hop: router wake-up, SSE, the client's parsing).
        await asyncio.sleep(0.5)
        b.times.clear()
        lat: list[float] = []
        from_sent: list[float] = []
        after_answer: list[float] = []
        answer: list[float] = []
        marks: list[tuple[str, float, float]] = []  # (body, call start, arrived), wall clock
        async with PublishWatch(fleet.settings.redis_url or "", fleet.keys.session_channel(b.sid)) as watch:
            await asyncio.sleep(1.0)
            for i in range(messages):
                b.arrived.clear()
                seen_before = len(b.times)
                wall0 = time.time()
                t0 = time.perf_counter()
                await call(a, "link_send", {"group": group, "body": f"d{i}", "to": None})
                answered = wall0 + (time.perf_counter() - t0)
                while len(b.times) == seen_before:
                    await asyncio.wait_for(b.arrived.wait(), 10)
                    b.arrived.clear()
                got = b.times[seen_before]
                lat.append((got - wall0) * 1000)
                from_sent.append((got - a_sent[0]) * 1000)
                answer.append((answered - wall0) * 1000)
                after_answer.append((got - answered) * 1000)  # < 0: B heard before A's answer
                # Spaced out, as messages between agents are: what one message leaves to do in the
                # background (its store, stream entry, counters) is not charged to the next.
                await asyncio.sleep(GAP)
                marks.append((f"d{i}", wall0, got))
        results["delivery_b_process"] = "B's SDK client in a process of its own (bench/link_listener.py)"
        results["delivery"] = summary(lat)
        # The same from A's HTTP request about to be sent (httpx's request hook): without A's
        # client building and queueing its call.
        results["delivery_from_a_request"] = summary(from_sent)
        results["delivery_after_answer"] = summary(after_answer)
        results["sender_answer"] = summary(answer)
        redis = aioredis.Redis.from_url(fleet.settings.redis_url or "", decode_responses=True)
        try:  # the instances' own count: the sender's call -> the members' notification queued
            stats = await redis.hgetall(fleet.keys.link_stats())  # type: ignore[misc]
        finally:
            await redis.aclose()
        if p := parts(marks, await created_by_body(dsn, group, "d%"), watch):
            results["delivery_parts"] = p
        count = float(stats.get("publish_lag_count", 0) or 0)
        results["publish_lag_mean_ms"] = (
            round(float(stats.get("publish_lag_seconds_sum", 0)) / count * 1000, 3) if count else None
        )
        results["instance_links_stats"] = (await status_of(a)).get("links")
        # The raw phase times B's frame in this process: the SDK clients here leave the group
        # first, so their parsing of the same notifications does not delay it (B's client, in
        # its own process, stays a member).
        for client in (a, c):
            await call(client, "link_leave", {"group": group})
        results["raw"] = await raw_delivery(fleet, dsn, group, messages)

        # Catch-up: a member's client in this process (joined now) misses `backlog` events.
        async with mcp_client(fleet.mcp_url, "legacy", name="bench-b-reader") as b:
            await call(b, "link_join", {"group": group})
            while (await call(b, "link_inbox", {"group": group, "limit": 1000}))[0]["more"]:
                pass

            conn = await asyncpg.connect(dsn)
            try:
                async with conn.transaction():
                    head = await conn.fetchval(
                        "SELECT seq FROM link_groups WHERE name = $1 FOR UPDATE", group
                    )
                    await conn.execute(
                        "INSERT INTO link_events (group_name, id, kind, sender, body) "
                        "SELECT $1, $2 + g, 'message', $3, 'backlog ' || g FROM generate_series(1, $4) g",
                        group, head, a_sid, backlog,
                    )  # fmt: skip
                    await conn.execute(
                        "UPDATE link_groups SET seq = seq + $2 WHERE name = $1", group, backlog
                    )
            finally:
                await conn.close()
            t0 = time.perf_counter()
            got = 0
            last = 0
            while True:
                page, _ = await call(b, "link_inbox", {"group": group, "limit": 1000})
                for e in page["events"]:
                    assert e["id"] > last
                    last = e["id"]
                got += page["count"]
                if not page["more"]:
                    break
            seconds = time.perf_counter() - t0
            assert got == backlog, (got, backlog)
            results["catchup"] = {
                "events": got,
                "seconds": round(seconds, 3),
                "events_per_second": round(got / seconds),
            }

    # The tools' own durations as the instances recorded them (write-behind: wait for the rows).
    await asyncio.sleep(2.0)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT session_id, tool_name, duration_ms FROM tool_calls "
            "WHERE tool_name IN ('task_create', 'link_send', 'version') AND status = 'success'"
        )
        server: dict[str, list[float]] = {k: [] for k in seen}
        for r in rows:
            name, sid = r["tool_name"], r["session_id"]
            key = {
                ("task_create", a_sid): "group_task",
                ("task_create", c_sid): "session_task",
                ("link_send", a_sid): "link_send",
                ("version", a_sid): "noop",
            }.get((name, sid))
            if key is not None:
                server[key].append(float(r["duration_ms"]))
        # The old synchronous path, for contrast: one Postgres transaction per event.
        sync: list[float] = []
        for i in range(calls):
            t0 = time.perf_counter()
            await db.append(conn, group, "message", sender=a_sid, body=f"sync {i}")
            sync.append((time.perf_counter() - t0) * 1000)
    finally:
        await conn.close()
    results["server_ms"] = {k: summary(v) for k, v in server.items() if v}
    results["spool_append_floor"] = await spool_floor(calls)
    try:
        results["spool_append_floor_normal"] = await spool_floor(calls, sync="normal")
    except TypeError:  # a spool without sync modes (the code before EXAI_LINK_SPOOL_SYNC)
        pass
    results["old_sync_store"] = summary(sync)
    for side in ("server_ms", "client_ms"):
        r = results[side]
        results[f"sender_cost_{side}"] = {
            "group_task_minus_session_task_p50": round(
                r["group_task"]["p50_ms"] - r["session_task"]["p50_ms"], 3
            ),
            "link_send_minus_noop_p50": round(r["link_send"]["p50_ms"] - r["noop"]["p50_ms"], 3),
        }
    return results


async def spool_floor(n: int, sync: str = "full") -> dict[str, float]:
    """What one durable spool append (one fsync, this disk, this load) costs on its own: the
    floor under a link_send that answers only once its event is durable (sync="normal": once
    the OS has it, EXAI_LINK_SPOOL_SYNC=normal)."""
    with tempfile.TemporaryDirectory(prefix="bench-links-spool-") as tmp:
        spool = Spool(Path(tmp), max_bytes=1 << 30)
        await spool.open()
        kw: dict[str, Any] = {"sync": sync} if sync != "full" else {}
        try:
            ms = []
            for i in range(n):
                t0 = time.perf_counter()
                await spool.append("link_event", {"uuid": str(i), "body": f"m{i}"}, urgent=True, **kw)
                ms.append((time.perf_counter() - t0) * 1000)
        finally:
            await spool.close()
    return summary(ms)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300, help="rounds of the four sender calls")
    ap.add_argument("--messages", type=int, default=300, help="messages timed A -> B")
    ap.add_argument("--backlog", type=int, default=10_000)
    add_set_option(ap, "link_spool_sync=full or link_early_notify=false")
    args = ap.parse_args()
    admin_dsn = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    name = f"bench_links_{secrets.token_hex(4)}"
    extra = set_settings(args)
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
    prefix = f"bench-links-{secrets.token_hex(4)}"
    try:
        await migrate(dsn)
        with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
            fleet = Fleet(
                Path(tmp),
                database_url=dsn,
                redis_url=redis_url,
                redis_prefix=prefix,
                instances=2,
                max_instances=2,
                overrides={**BENCH_SETTINGS, **ROUTER_TEST_SETTINGS, "log_level": "WARNING", **extra},
            )
            await asyncio.to_thread(fleet.start)
            try:
                results = await bench(fleet, dsn, args.calls, args.messages, args.backlog)
                results["settings"] = extra
            finally:
                await asyncio.to_thread(fleet.stop)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        redis = aioredis.Redis.from_url(redis_url)
        async for key in redis.scan_iter(Keys(prefix).pattern()):
            await redis.delete(key)
        await redis.aclose()
    print(f"{'measure':44} {'p50 ms':>9} {'p99 ms':>9} {'n':>6}")
    for side in ("server_ms", "client_ms"):
        for key, r in results[side].items():
            print(
                f"{side.removesuffix('_ms') + ' ' + key:44} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {r['n']:6}"
            )
    for label, key in (
        ("delivery A -> B (B's client in its own process)", "delivery"),
        ("  from A's HTTP request sent (httpx hook)", "delivery_from_a_request"),
        ("  of it after A's call answered", "delivery_after_answer"),
        ("A's link_send answered (client)", "sender_answer"),
        ("old sync store (contrast)", "old_sync_store"),
        ("spool append alone (fsync floor)", "spool_append_floor"),
        ("spool append alone, sync=normal", "spool_append_floor_normal"),
    ):
        if key not in results:
            continue
        r = results[key]
        print(f"{label:44} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {r['n']:6}")
    for key, r in results.get("delivery_parts", {}).items():
        print(f"{'  part: ' + key:44} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {r['n']:6}")
    raw = results["raw"]
    for label, key in (
        ("RAW WIRE delivery A -> B (request written -> frame read)", "delivery"),
        ("raw: A's link_send answered", "sender_answer"),
        ("raw: A's version (no-op) answered", "noop_answer"),
    ):
        r = raw[key]
        print(f"{label:44} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {r['n']:6}")
    for key, r in raw.get("delivery_parts", {}).items():
        print(f"{'  raw part: ' + key:44} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {r['n']:6}")
    print(f"raw: link_send - version, p50: {raw['link_send_minus_noop_p50']:+.3f} ms")
    if "cpu_ms_per_round" in raw:
        print(f"raw: CPU ms per round (link_send delivered + version): {raw['cpu_ms_per_round']}")
    print(f"raw: sender's instance links stats: {raw.get('instance_links')}")
    for key, r in (raw.get("instance_stages") or {}).items():
        print(f"{'  instance stage: ' + key:44} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {r['count']:6}")
    for side in ("server_ms", "client_ms"):
        cost = results[f"sender_cost_{side}"]
        group_cost, send_cost = cost["group_task_minus_session_task_p50"], cost["link_send_minus_noop_p50"]
        print(
            f"sender cost ({side.removesuffix('_ms')}, p50 diff): group task {group_cost:+.3f} ms,"
            f" link_send vs no-op {send_cost:+.3f} ms"
        )
    print(f"write-behind lag (call -> notification queued, mean): {results['publish_lag_mean_ms']} ms")
    c = results["catchup"]
    print(f"catch-up of {c['events']} events: {c['seconds']:.3f} s ({c['events_per_second']}/s)")
    out = ROOT / "tests" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"links-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    path.write_text(json.dumps(results, indent=2))
    print(f"load average at the end: {results['load_average']}")
    print(f"saved {path}")


if __name__ == "__main__":
    asyncio.run(main())
