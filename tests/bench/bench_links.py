"""Linked sessions through a real fleet: the sender's cost, delivery latency A -> B, catch-up.

    python tests/bench/bench_links.py [--calls 300] [--messages 300] [--backlog 10000] [--gap 25]
                                      [--set link_spool_sync=full] [--set link_early_notify=false]
                                      [--sender-only]

Starts a fleet under real supervisord (tests/fleet.py: router + 2 instances) on a fresh database
(EXAI_TEST_DATABASE_URL, dropped afterwards) and EXAI_TEST_REDIS_URL (a fresh key prefix), with
real MCP clients through the router. Measured:

1. the sender's cost: what a group event adds to the tool call that makes it, measured in pairs
   of calls on one session (A's): `task_create(scope="group")` against the same call
   session-scoped, and `link_send` against `version` (a no-op tool). `--calls` rounds; in each,
   a pair's two calls follow each other, which one goes first alternating from round to round,
   each call `--gap` ms after the previous one answered (as an agent's calls come: what a call
   leaves for after its answer, such as its event's store in Postgres, is then not charged to
   the next call). The cost is the median of the per-pair differences, with its spread: a
   bootstrap 95% interval of that median and the differences' interquartile range. A pair's
   two calls share the machine's load of that moment, so the drift of the load (other work on
   the cores) cancels within the pair; the difference of two p50s, printed alone before
   2026-11-27 (and still beside it), moved by about 0.3 ms from run to run. Both as the
   instance timed the tool itself (the `duration_ms` it records for every call, read from
   Postgres afterwards: A's rows in the order they were made are its calls in order; no HTTP
   noise) and as the client saw it. For contrast: what the old synchronous path cost (one
   Postgres transaction per event, common/links.append) and one spool append alone;
2. delivery latency: A calls link_send (and, up to 100 times, a group task_create) -> B's
   client has the `notifications/resources/updated`
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

`--sender-only` runs phase 1 alone (no delivery, raw wire, catch-up, nor the old sync store and
spool floors for contrast): for A/B rounds on the sender's cost, about a minute each.

Targets: sender <= 0.2 ms (the per-pair median, as the instance timed it), delivery p50 <= 5 ms,
catch-up of 10,000 events <= 1 s.
Prints a table and saves JSON to tests/bench/results/links-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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
from tests.fleet import BENCH_SETTINGS, Fleet, run_bench  # noqa: E402
from tests.router.conftest import ROUTER_TEST_SETTINGS, mcp_client, status_of  # noqa: E402

GAP = 0.025  # seconds between two timed deliveries
BOOTSTRAP = 2000  # resamples for the interval of a per-pair median
# The sender's cost, measured in pairs: (the call with a group event, the same without).
PAIRS = (("group_task", "session_task"), ("link_send", "noop"))


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


def paired(with_event: list[float | None], without: list[float | None]) -> dict[str, Any]:
    """The cost of the event from pairs of calls: (with, without) of one round each, None where
    a side is missing. The median of the per-pair differences, a bootstrap 95% interval of that
    median (percentile method, fixed seed) and the differences' interquartile range."""
    diffs = [a - b for a, b in zip(with_event, without, strict=True) if a is not None and b is not None]
    if not diffs:
        return {"n": 0}
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(BOOTSTRAP))
    q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else (diffs[0], 0.0, diffs[0])
    return {
        "n": len(diffs),
        "median_ms": round(statistics.median(diffs), 3),
        "ci95_ms": [round(pct(medians, 2.5), 3), round(pct(medians, 97.5), 3)],
        "iqr_ms": [round(q1, 3), round(q3, 3)],
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


async def bench(
    fleet: Fleet, dsn: str, calls: int, messages: int, backlog: int, gap: float, sender_only: bool = False
) -> dict[str, Any]:
    group = "bench"
    results: dict[str, Any] = {"calls": calls, "messages": messages, "backlog": backlog, "gap_ms": gap * 1000}

    await fleet.wait_instances(2)
    a_sent = [0.0]  # wall clock: A's client is about to send its last HTTP request

    def a_sends(request: Any) -> None:
        a_sent[0] = time.time()

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="bench-a", on_request=a_sends) as a,
        mcp_client(fleet.mcp_url, "legacy", name="bench-c") as c,
        Listener(fleet.mcp_url, group, "bench-b") as b,
    ):
        a_sid = (await status_of(a))["session"]
        for client in (a, c):  # C: a member besides B, so each event has two to tell
            await call(client, "link_join", {"group": group})
        sender_calls: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
            "group_task": ("task_create", lambda i: {"name": f"g{i}", "scope": "group", "group": group}),
            "session_task": ("task_create", lambda i: {"name": f"s{i}"}),
            "link_send": ("link_send", lambda i: {"group": group, "body": f"m{i}"}),
            "noop": ("version", lambda i: {}),
        }
        warm_up = list(sender_calls) * 20  # warm up every path (pools, caches, the flusher)
        for i, key in enumerate(warm_up):
            tool, args = sender_calls[key]
            await call(a, tool, args(i))
        # Every call on A's session, in pairs (PAIRS): a pair's two calls one after the other,
        # which one goes first alternating from round to round, so both see the same load. Each
        # call starts `gap` after the previous one answered, as an agent's calls do (it thinks
        # in between): what a call leaves for after its answer (its event's store in Postgres,
        # its telemetry record) is then not charged to the call that follows it.
        seen: dict[str, list[float | None]] = {k: [None] * calls for k in sender_calls}
        order: list[tuple[str, int]] = []  # (key, round) of each timed call, in order
        for i in range(calls):
            for pair in PAIRS:
                for key in pair if i % 2 == 0 else reversed(pair):
                    tool, args = sender_calls[key]
                    order.append((key, i))
                    await asyncio.sleep(gap)
                    seen[key][i] = (await call(a, tool, args(i)))[1]
        results["client_ms"] = {k: summary([x for x in v if x is not None]) for k, v in seen.items()}

        if not sender_only:  # --sender-only skips delivery, the raw wire and catch-up
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
            b_channel = fleet.keys.session_channel(b.sid)
            async with PublishWatch(fleet.settings.redis_url or "", b_channel) as watch:
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
            # A group task's event the same way: A's group task_create -> B's client has the
            # notification (stored with the task and announced after A's answer since 2026-11-28;
            # before, after the flusher's store).
            task_lat: list[float] = []
            for i in range(min(messages, 100)):
                b.arrived.clear()
                seen_before = len(b.times)
                wall0 = time.time()
                await call(a, "task_create", {"name": f"t{i}", "scope": "group", "group": group})
                while len(b.times) == seen_before:
                    await asyncio.wait_for(b.arrived.wait(), 10)
                    b.arrived.clear()
                task_lat.append((b.times[seen_before] - wall0) * 1000)
                await asyncio.sleep(GAP)
            results["task_delivery"] = summary(task_lat)
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
            async with mcp_client(fleet.mcp_url, "legacy", name="bench-b-reader") as reader:
                await call(reader, "link_join", {"group": group})
                while (await call(reader, "link_inbox", {"group": group, "limit": 1000}))[0]["more"]:
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
                    page, _ = await call(reader, "link_inbox", {"group": group, "limit": 1000})
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

    # The tools' own durations as A's instance recorded them (write-behind: wait for the rows).
    # A's calls are sequential and each is recorded once its answer is written, so its rows in
    # the order they were made are its calls in order: the warm-up's first, then the timed ones
    # (then the delivery phase's). A row whose tool is not its call's is left out (counted).
    tools = [sender_calls[key][0] for key in warm_up + [key for key, _ in order]]
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 15.0
        while True:
            rows = await conn.fetch(
                "SELECT tool_name, duration_ms FROM tool_calls WHERE session_id = $1"
                " AND tool_name = ANY($2::text[]) AND status = 'success' ORDER BY created_at",
                a_sid,
                sorted(set(tools)),
            )
            if len(rows) >= len(tools) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        server: dict[str, list[float | None]] = {k: [None] * calls for k in sender_calls}
        unmatched = 0
        for (key, i), r in zip(order, rows[len(warm_up) :], strict=False):
            if sender_calls[key][0] == r["tool_name"]:
                server[key][i] = float(r["duration_ms"])
            else:
                unmatched += 1
        results["server_rows_unmatched"] = unmatched + max(0, len(tools) - len(rows))
        # The old synchronous path, for contrast: one Postgres transaction per event.
        sync: list[float] = []
        for i in range(0 if sender_only else calls):
            t0 = time.perf_counter()
            await db.append(conn, group, "message", sender=a_sid, body=f"sync {i}")
            sync.append((time.perf_counter() - t0) * 1000)
    finally:
        await conn.close()
    results["server_ms"] = {
        k: summary(kept) for k, v in server.items() if (kept := [x for x in v if x is not None])
    }
    if not sender_only:
        results["spool_append_floor"] = await spool_floor(calls)
        try:
            results["spool_append_floor_normal"] = await spool_floor(calls, sync="normal")
        except TypeError:  # a spool without sync modes (the code before EXAI_LINK_SPOOL_SYNC)
            pass
        results["old_sync_store"] = summary(sync)
    for side, timed in (("server_ms", server), ("client_ms", seen)):
        r = results[side]
        results[f"sender_cost_{side}"] = {
            # The headline: medians of the per-pair differences, with their spread.
            "group_task_minus_session_task": paired(timed["group_task"], timed["session_task"]),
            "link_send_minus_noop": paired(timed["link_send"], timed["noop"]),
            # The difference of the p50s (what was printed before 2026-11-27), for comparison.
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
    ap.add_argument("--calls", type=int, default=300, help="rounds of the sender's two pairs of calls")
    ap.add_argument("--messages", type=int, default=300, help="messages timed A -> B")
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument(
        "--gap",
        type=float,
        default=GAP * 1000,
        help="ms between the sender's timed calls (0: back to back, each call then also pays for"
        " what the previous one left for after its answer)",
    )
    ap.add_argument(
        "--sender-only",
        action="store_true",
        help="measure only the sender's cost (phase 1): no delivery, raw wire, catch-up or contrasts",
    )
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
                results = await bench(
                    fleet, dsn, args.calls, args.messages, args.backlog, args.gap / 1000, args.sender_only
                )
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
        ("group task_create A -> B (B's client)", "task_delivery"),
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
    raw = results.get("raw")
    if raw is not None:  # not with --sender-only
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
        for label, key in (
            ("group task", "group_task_minus_session_task"),
            ("link_send", "link_send_minus_noop"),
        ):
            d = cost[key]
            if not d["n"]:
                continue
            print(
                f"sender cost ({side.removesuffix('_ms')}), {label}: median of {d['n']} pairs"
                f" {d['median_ms']:+.3f} ms, 95% CI [{d['ci95_ms'][0]:+.3f}, {d['ci95_ms'][1]:+.3f}],"
                f" IQR [{d['iqr_ms'][0]:+.3f}, {d['iqr_ms'][1]:+.3f}]"
                f" (difference of p50s {cost[key + '_p50']:+.3f})"
            )
    if results.get("server_rows_unmatched"):
        print(f"(instance-timed rows not matched to their call: {results['server_rows_unmatched']})")
    if "catchup" in results:  # not with --sender-only
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
    raise SystemExit(run_bench(main))
