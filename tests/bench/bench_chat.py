"""The fleet's own overhead on a `chat` call, with Postgres normal, slowed and cut.

    python tests/bench/bench_chat.py [--calls 240] [--rounds 12] [--provider-delay 0.05] [--pg-delay 0.2]
        [--conditions normal,slowed,cut] [--sessions 1,5] [--think 0] [--label NAME]
        [--chat-spool-sync normal] [--direct] [--client raw[,aiohttp]] [--client-processes own|shared]
        [--set FIELD=VALUE]

Starts a fleet under real supervisord (tests/fleet.py: five instances and the router) whose
Postgres connections go through a loopback forwarder (tests/fakes/tcp_proxy.py, in a process of
its own since 2026-11-29: tests/fakes/tcp_proxy_process.py), so the bench
can slow Postgres down (every answer held --pg-delay seconds), cut it (connections refused) or,
with `--conditions ...,silent`, make it a black hole (connections accepted, nothing answered:
the instance's first operation to time out marks Postgres silent, and the rest fail at once;
instance/storage/pool.py). Each session calls
`chat` over the raw 2026-07-28 wire from a process of its own (as separate agents do),
continuing its own thread (so every call loads the
thread and appends two turns), from a plain socket: the time runs from the request's write to
its answer's last byte read, so a client library's own work is not counted as the fleet's
(`--client raw,aiohttp` also times an aiohttp ClientSession on the same sessions, call by call,
the measure until 2026-11-29). Overhead per call = client-observed latency minus the time the
fake provider itself reports it spent on that request: from the moment the request's first
bytes reached its HTTP server (its parsing, ASGI dispatch and routing included), through
reading the body, the --provider-delay and counting tokens, to the answer's last byte handed to
its server (tests/fakes/provider.py, `arrived` to `sent`). Also printed from its handler's start
("from handler", `received` to `sent`), the measure until 2026-11-28, which counted the fake
server's own handling of the request as the fleet's.
The fake runs in a process of its own (tests/fakes/provider_process.py), as a provider on the
internet does: in this process its server thread would hold the GIL the callers need.
Also printed against the fake's handler time alone (`started` to `finished`: the delay and the
token count, without reading the request or streaming the answer), the measure before
2026-11-27, which counted the fake's own HTTP work as the fleet's.
Measured at 1 and 5 concurrent sessions for each Postgres condition; the conditions take turns
(--rounds, 12 by default: this machine's speed drifts by up to 1.3x within minutes, and a
block of 20 calls is short enough that every condition sees the same drift), so the ratios
between them compare like with like. After a cut, the next block starts
once every instance reaches Postgres again with an empty spool (their /internal/metrics gauges;
the wait is printed): until then an instance still counts Postgres down (chats go without what
only Postgres has) and drains the cut's backlog, and the first read after it opens a connection
through the slowed link (0.8 s in a `slowed` block), which is recovery, not the condition.
Target: <= 3 ms p50, and unchanged (<= 1.05x) with Postgres slowed or cut.

Also prints the instances' own stage breakdown (the `status` tool's chat_stages, instance/timing.py:
from the request's arrival at the instance through the SDK, the tool's stages and the provider
call to the answer's last byte) for each run, and splits the overhead into the instance's own
share and the rest (router, loopback HTTP, the fake provider's HTTP handling), and the CPU time
the instance processes used per measured call (/proc; steadier than latency on a loaded machine).
Saves JSON to tests/bench/results/chat-<timestamp>.json.
Uses EXAI_TEST_DATABASE_URL / EXAI_TEST_REDIS_URL (default: the local servers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.migrate import migrate  # noqa: E402
from common.protocol import INTERNAL_METRICS, INTERNAL_TOKEN_HEADER  # noqa: E402
from instance.timing import CHAT_STAGES  # noqa: E402
from tests.bench.bench_router import (  # noqa: E402
    HEADERS,
    _body,
    _num,
    _stats,
    _with_db,
    add_set_option,
    direct_headers,
    fake_provider_overrides,
    set_settings,
)
from tests.bench.rawwire import build_request, read_answer  # noqa: E402
from tests.fakes.provider import Behaviour, Hit  # noqa: E402
from tests.fakes.provider_process import FakeProviderProcess  # noqa: E402
from tests.fakes.tcp_proxy_process import TcpProxyProcess  # noqa: E402
from tests.fleet import BENCH_SETTINGS, Fleet, run_bench  # noqa: E402


class ChatCaller:
    """One session calling chat on its own thread over one keep-alive connection.

    `wire`: "raw" writes each prebuilt request on a plain asyncio socket and reads the answer
    by its Content-Length (or chunks), timing from just before the write to the answer's last
    byte read, so what a client library spends building and parsing stays out of the fleet's
    overhead; "aiohttp" times an aiohttp ClientSession's `post` and `read`, the measure until
    2026-11-29, which counted the client library's own work (about 0.5 ms a call here) as the
    fleet's. Several callers of one client name are one session (the router keys a stateless
    session by clientInfo.name), so `--client raw,aiohttp` alternates both on one thread."""

    def __init__(self, url: str, client: str, extra: dict[str, str] | None = None, wire: str = "raw") -> None:
        self.url = url
        self.client = client
        self.wire = wire
        self.extra = extra or {}  # the router's internal headers, for calling an instance directly
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2))
        self.rid = 0
        self.cid: str | None = None
        self._io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, tool: str, args: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        self.rid += 1
        body = json.dumps(_body(tool, args, self.client, self.rid)).encode()
        headers = {**HEADERS, **self.extra, "Content-Type": "application/json", "Mcp-Method": "tools/call"}
        headers["Mcp-Name"] = tool
        if self.wire == "raw":  # (rawwire's request adds Accept, Content-Type and the version)
            routing = {**self.extra, "Mcp-Method": "tools/call", "Mcp-Name": tool}
            elapsed, status, payload = await self._raw(build_request(self.url, body, routing))
        else:
            started = time.perf_counter()
            async with self.http.post(self.url, data=body, headers=headers) as r:
                payload = await r.read()
            elapsed = time.perf_counter() - started
            status = r.status
        answer = json.loads(payload)
        result = answer.get("result") or {}
        if status != 200 or result.get("isError") or "error" in answer:
            raise RuntimeError(f"{tool}: {status} {payload[:300]!r}")
        return elapsed, dict(result.get("structuredContent") or {})

    async def _raw(self, data: bytes) -> tuple[float, int, bytes]:
        """One prebuilt request on the raw socket: (seconds from the write to its answer's last
        byte, status, body)."""
        u = urlsplit(self.url)
        if self._io is None:
            self._io = await asyncio.open_connection(u.hostname, u.port or 80)
        reader, writer = self._io
        started = time.perf_counter()
        writer.write(data)
        status, payload = await read_answer(reader)
        return time.perf_counter() - started, status, payload

    async def chat(self, prompt: str) -> float:
        args: dict[str, Any] = {"prompt": prompt}
        if self.cid:
            args["continuation_id"] = self.cid
        elapsed, out = await self.call("chat", args)
        # A thread holds 20 turns: start a new one before it is full.
        self.cid = out.get("continuation_id") if out.get("status") == "continuation_available" else None
        return elapsed

    async def close(self, *, end: bool = True) -> None:
        if self._io is not None:
            self._io[1].close()
            self._io = None
        if end and not self.extra:  # (a direct caller's session is the router's to end)
            async with self.http.delete(self.url, headers=HEADERS) as r:
                await r.read()
        await self.http.close()


async def _wait_postgres_back(fleet: Fleet, instances: int, *, timeout: float = 60.0) -> float:
    """Seconds until every instance reaches Postgres again and its spool is empty (its
    /internal/metrics gauges), after the proxy is restored: the next block then measures its own
    condition, not the instances still finding Postgres down or draining what the cut left."""
    started = time.perf_counter()
    headers = {INTERNAL_TOKEN_HEADER: fleet.internal_token}
    urls = [f"http://127.0.0.1:{fleet.instance_port(n)}{INTERNAL_METRICS}" for n in range(1, instances + 1)]
    async with aiohttp.ClientSession(headers=headers) as http:
        while True:
            back = 0
            for url in urls:
                try:
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                        text = await r.text()
                except (aiohttp.ClientError, TimeoutError):  # restarting: not back yet
                    continue
                gauges = dict(
                    line.split(" ", 1) for line in text.splitlines() if line.startswith("exai_instance_")
                )
                if (
                    gauges.get("exai_instance_postgres_connected") == "1"
                    and gauges.get("exai_instance_spool_rows") == "0"
                ):
                    back += 1
            waited = time.perf_counter() - started
            if back == len(urls):
                return waited
            if waited > timeout:
                raise TimeoutError(
                    f"only {back} of {len(urls)} instances reach Postgres with an empty spool "
                    f"after {timeout:g}s"
                )
            await asyncio.sleep(0.1)


def _provider_seconds(hits: list[Hit], *, part: str = "whole") -> dict[str, float]:
    """Last user message -> seconds the fake provider spent on that request. `part`: "whole",
    from the request's first bytes reaching the fake's server to the answer's last byte handed
    to it (`arrived` to `sent`: the fake's HTTP server, reading the request and streaming the
    answer included); "from_handler", the same from its handler's start (`received` to `sent`,
    the measure until 2026-11-28, which counted the fake server's parsing and routing of the
    request as the fleet's); "handler", its handler's time alone (`started` to `finished`, the
    measure before 2026-11-27)."""
    spent: dict[str, float] = {}
    for hit in hits:
        msgs = hit.messages
        if not msgs:
            continue
        key = str(msgs[-1].get("content", ""))
        if part == "handler":
            if hit.finished is not None:
                spent[key] = hit.finished - hit.started
        elif hit.sent is not None:
            start = hit.received if part == "from_handler" else (hit.arrived or hit.received)
            if start is not None:
                spent[key] = hit.sent - start
    return spent


async def _session_warm(url: str, client: str, wires: tuple[str, ...]) -> dict[str, Any]:
    """A session's first calls, not measured: bind it, open its thread; its `status` (which
    instance serves it) and its thread, for the measured calls that follow."""
    c = ChatCaller(url, client, wire=wires[0])
    others = [ChatCaller(url, client, wire=w) for w in wires[1:]]
    try:
        for k in range(3):
            await c.chat(f"warm {k} {client}")
        for o in others:
            o.cid = c.cid
            await o.chat(f"warm {o.wire} {client}")
            c.cid = o.cid
        _, st = await c.call("status", {})
        return {"cid": c.cid, "status": st}
    finally:
        for o in others:
            await o.close(end=False)
        await c.close(end=False)


async def _session_calls(
    url: str,
    client: str,
    wires: tuple[str, ...],
    calls: int,
    think: float,
    cid: str | None,
    direct: tuple[str, dict[str, str]] | None,
) -> dict[str, Any]:
    """One session's measured calls (its client's latency by prompt), on connections of its own:
    each is opened by one call that is not measured. `wires`: the first is the measure, each
    other one takes the thread's next turn after it; `direct`: the session's instance (its URL
    and the router's internal headers), called for the turn after those."""
    c = ChatCaller(url, client, wire=wires[0])
    c.cid = cid
    others = [ChatCaller(url, client, wire=w) for w in wires[1:]]
    d = ChatCaller(direct[0], client, direct[1], wire=wires[0]) if direct else None
    latency: dict[str, float] = {}
    other_latency: dict[str, dict[str, float]] = {w: {} for w in wires[1:]}
    direct_latency: dict[str, float] = {}

    async def turn(caller: ChatCaller, prompt: str) -> float:
        caller.cid = c.cid
        elapsed = await caller.chat(prompt)
        c.cid = caller.cid
        return elapsed

    try:
        for caller in [c, *others, *([d] if d else [])]:  # its connection open before the measure
            await turn(caller, f"open {caller.wire} {client} {secrets.token_hex(3)}")
        for k in range(calls):
            prompt = f"q {k} {client} {secrets.token_hex(3)}"
            latency[prompt] = await c.chat(prompt)
            for o in others:  # the same thread's next turn, through another client
                prompt = f"{o.wire} {k} {client} {secrets.token_hex(3)}"
                other_latency[o.wire][prompt] = await turn(o, prompt)
            if d is not None:  # the same thread, next turn, straight to the session's instance
                prompt = f"d {k} {client} {secrets.token_hex(3)}"
                direct_latency[prompt] = await turn(d, prompt)
            if think:  # a client reading the answer before its next call
                await asyncio.sleep(think)
    finally:
        for caller in [*others, *([d] if d else [])]:
            await caller.close(end=False)
        await c.close(end=False)
    return {"latency": latency, "other": other_latency, "direct": direct_latency}


def _in_own_process(fn: Any, *args: Any) -> Any:
    """`fn(*args)` on a loop of its own: what a worker process of the client pool runs."""
    return asyncio.run(fn(*args))


async def _run(
    fleet: Fleet,
    provider: FakeProviderProcess,
    sessions: int,
    calls: int,
    tag: str,
    think: float = 0.0,
    direct: bool = False,
    clients: tuple[str, ...] = ("raw",),
    pool: ProcessPoolExecutor | None = None,
) -> dict[str, Any]:
    """One block of calls at one condition: the raw samples, for `_combine` to pool over rounds.
    `clients`: the wire of each session's calls through the router (the first is the measure;
    each other one takes the thread's next turn after it, on the same session). `pool`: each
    session's client in a process of its own (as separate agents are), else all of them on
    this process's loop."""
    names = [f"chat-{tag}-{sessions}-{i}-{secrets.token_hex(2)}" for i in range(sessions)]
    loop = asyncio.get_running_loop()

    async def each(fn: Any, *args: Any) -> Any:
        if pool is None:
            return await fn(*args)
        return await loop.run_in_executor(pool, _in_own_process, fn, *args)

    warmed = await asyncio.gather(*(each(_session_warm, fleet.mcp_url, n, clients) for n in names))
    directs: list[tuple[str, dict[str, str]] | None] = []
    for name, w in zip(names, warmed, strict=True):
        st = w["status"]
        url = f"http://127.0.0.1:{fleet.instance_port(_num(st['instance_id']))}/mcp"
        directs.append((url, direct_headers(fleet, st["session"], "stateless", name)) if direct else None)
    cpu_before = await asyncio.to_thread(_instances_cpu, fleet)
    done = await asyncio.gather(
        *(
            each(_session_calls, fleet.mcp_url, n, clients, calls, think, w["cid"], dr)
            for n, w, dr in zip(names, warmed, directs, strict=True)
        )
    )
    cpu = await asyncio.to_thread(_instances_cpu, fleet) - cpu_before
    first = ChatCaller(fleet.mcp_url, names[0])
    _, st = await first.call("status", {})
    await first.close(end=False)
    for name in names:
        await ChatCaller(fleet.mcp_url, name).close()  # the session ended at the router
    latency = {p: lat for d in done for p, lat in d["latency"].items()}
    direct_latency = {p: lat for d in done for p, lat in d["direct"].items()}
    other_latency = {w: {p: lat for d in done for p, lat in d["other"][w].items()} for w in clients[1:]}
    hits = await provider.asnapshot()
    spent = _provider_seconds(hits, part="handler")
    whole = _provider_seconds(hits)
    from_handler = _provider_seconds(hits, part="from_handler")
    return {
        "latency": list(latency.values()),
        "overhead": [lat - whole[p] for p, lat in latency.items() if p in whole],
        "from_handler": [lat - from_handler[p] for p, lat in latency.items() if p in from_handler],
        "vs_handler": [lat - spent[p] for p, lat in latency.items() if p in spent],
        "direct": [lat - whole[p] for p, lat in direct_latency.items() if p in whole],
        "other_clients": {
            w: [lat - whole[p] for p, lat in lats.items() if p in whole] for w, lats in other_latency.items()
        },
        "fake_whole": [whole[p] for p in latency if p in whole],
        "cpu": cpu,
        "calls": len(latency) + len(direct_latency) + sum(len(v) for v in other_latency.values()),
        "stages": st.get("chat_stages"),
        "gc": st.get("gc"),  # that instance's collector: collections and pauses so far
    }


def _combine(tag: str, sessions: int, think: float, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the table from a condition's blocks in every round."""
    calls = sum(b["calls"] for b in blocks)
    return {
        "sessions": sessions,
        "think_s": think,
        "postgres": tag,
        "blocks": len(blocks),
        "latency": _stats([x for b in blocks for x in b["latency"]]),
        "overhead": _stats([x for b in blocks for x in b["overhead"]]),
        "overhead_from_handler": _stats([x for b in blocks for x in b.get("from_handler", [])]),
        "overhead_vs_handler": _stats([x for b in blocks for x in b["vs_handler"]]),
        "overhead_direct": _stats(d) if (d := [x for b in blocks for x in b["direct"]]) else None,
        "overhead_other_clients": {
            w: _stats([x for b in blocks for x in b.get("other_clients", {}).get(w, [])])
            for w in blocks[0].get("other_clients", {})
        },
        "fake_whole": _stats([x for b in blocks for x in b.get("fake_whole", [])]),
        "instance_stages": blocks[-1]["stages"],
        "instance_gc": blocks[-1].get("gc"),
        "instances_cpu_per_call_ms": round(sum(b["cpu"] for b in blocks) / max(1, calls) * 1000, 3),
    }


def _instances_cpu(fleet: Fleet) -> float:
    """CPU seconds (user + system) the fleet's instance processes have used so far: per call,
    the instances' own cost, which a loaded machine stretches far less than their latency."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for proc in fleet.supervisor.instances():
        if not proc.pid:
            continue
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--calls",
        type=int,
        default=240,
        help="chat calls per session and condition (the p50 of each condition, and so its ratio to "
        "normal, needs a few hundred: with 40 in 3 rounds the ratios moved by 0.15 between runs)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=12,
        help="the conditions take turns this many times, --calls split between the turns, so a "
        "drift of the machine's load spreads over all of them rather than landing on one",
    )
    ap.add_argument("--provider-delay", type=float, default=0.05, help="fake provider's answer time (s)")
    ap.add_argument("--pg-delay", type=float, default=0.2, help="Postgres slowdown (s)")
    ap.add_argument(
        "--conditions",
        default="normal,slowed,cut",
        help="Postgres conditions to run, in this order: normal, slowed (--pg-delay on every answer), "
        "cut (connections refused), silent (a black hole: connections accepted, nothing answered)",
    )
    ap.add_argument("--sessions", default="1,5", help="concurrent sessions per condition")
    ap.add_argument(
        "--think",
        default="0",
        help="seconds each session waits after an answer before its next call; a comma-separated "
        "list runs each value in turn, e.g. 0,0.05 (what the instance does after an answer, "
        "such as notes and telemetry, then competes with the next call only at 0)",
    )
    ap.add_argument("--label", default="", help="a name for this run, kept in the JSON (e.g. before/after)")
    ap.add_argument(
        "--chat-spool-sync", choices=["full", "normal"], help="the instances' EXAI_CHAT_SPOOL_SYNC"
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to wait after the fleet is up, so start-up work (tokenizer loads) is not measured",
    )
    ap.add_argument(
        "--direct",
        action="store_true",
        help="each session's calls alternate between the router and its instance directly (the "
        "router's internal headers), on the same thread: the router's share of the overhead",
    )
    ap.add_argument(
        "--client",
        default="raw",
        help="the client of the measured calls: raw (a plain socket, the answer read by its length: "
        "the client library's own work left out) or aiohttp (a ClientSession, the measure until "
        "2026-11-29); a comma-separated list alternates them call by call on each session's "
        "thread, the first being the measure, e.g. raw,aiohttp",
    )
    ap.add_argument(
        "--client-processes",
        choices=("own", "shared"),
        default="own",
        help="own: each session's client runs in a process of its own, as separate agents do "
        "(the default since 2026-11-29); shared: all sessions' clients on this process's one "
        "loop, the measure until then, where an answer that arrives while the loop handles "
        "another session's waits, and that wait counted as the fleet's (measured in turns, "
        "2026-11-29: 3.87 / 4.07 ms p50 at 5 sessions own, 3.90 shared; no difference at 1)",
    )
    add_set_option(ap)
    args = ap.parse_args()
    clients = tuple(c.strip() for c in args.client.split(",") if c.strip())
    if not clients or set(clients) - {"raw", "aiohttp"} or len(set(clients)) != len(clients):
        ap.error("--client: raw, aiohttp or both, comma-separated")
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if not conditions or set(conditions) - {"normal", "slowed", "cut", "silent"}:
        ap.error("--conditions: a comma-separated list of normal, slowed, cut, silent")
    sessions = [int(n) for n in args.sessions.split(",") if n.strip()]
    thinks = [float(t) for t in args.think.split(",") if t.strip()] or [0.0]

    pg = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    dbname = f"exai_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    await migrate(_with_db(pg, dbname))
    parts = urlsplit(pg)
    proxy = TcpProxyProcess(parts.hostname or "127.0.0.1", parts.port or 5432)
    state = Path(os.environ.get("TMPDIR", "/tmp")) / f"exai-bench-{secrets.token_hex(4)}"
    state.mkdir(parents=True)
    results: dict[str, Any] = {"runs": []}
    load_before = [round(x, 2) for x in os.getloadavg()]
    pool = (
        ProcessPoolExecutor(max(sessions), mp_context=multiprocessing.get_context("spawn"))
        if args.client_processes == "own"
        else None
    )
    with (
        proxy.running(),
        FakeProviderProcess(Behaviour(delay=args.provider_delay)).running() as provider,
        pool or contextlib.nullcontext(),
    ):
        netloc = f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"
        dsn = _with_db(parts._replace(netloc=netloc).geturl(), dbname)
        fleet = Fleet(
            state,
            database_url=dsn,
            redis_url=redis_url,
            redis_prefix=f"exaibench{secrets.token_hex(3)}",
            instances=5,
            max_instances=5,
            overrides={
                **BENCH_SETTINGS,
                **fake_provider_overrides(provider),
                **({"chat_spool_sync": args.chat_spool_sync} if args.chat_spool_sync else {}),
                **set_settings(args),
            },
        )
        try:
            await asyncio.to_thread(fleet.start)
            await fleet.wait_instances(5)
            await asyncio.sleep(args.settle)
            outages = {"cut": (proxy.down, proxy.up), "silent": (proxy.hang, proxy.unhang)}
            outage: str | None = None  # the one in force
            recoveries: list[float] = []
            blocks: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
            rounds = max(1, min(args.rounds, args.calls))
            for r in range(rounds):
                per_round = args.calls // rounds + (1 if r < args.calls % rounds else 0)
                for tag in conditions:
                    proxy.delay = args.pg_delay if tag == "slowed" else 0.0
                    wanted = tag if tag in outages else None
                    if wanted != outage:
                        if outage is not None:
                            outages[outage][1]()
                        if wanted is not None:
                            outages[wanted][0]()
                        ended, outage = outage is not None, wanted
                        if ended and outage is None:  # measure the condition, not the recovery from it
                            recoveries.append(await _wait_postgres_back(fleet, 5))
                    for n in sessions:
                        for think in thinks:
                            await provider.areset(Behaviour(delay=args.provider_delay))
                            block = await _run(
                                fleet, provider, n, per_round, tag, think, args.direct, clients, pool
                            )
                            blocks.setdefault((tag, n, think), []).append(block)
                            await fleet.end_all_sessions()
            results["runs"] = [_combine(tag, n, t, b) for (tag, n, t), b in blocks.items()]
            results["recoveries_s"] = recoveries
            if outage is not None:
                outages[outage][1]()
        finally:
            await provider.aclose()
            await asyncio.to_thread(fleet.stop)
            admin = await asyncpg.connect(pg)
            await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            await admin.close()

    load = [round(x, 2) for x in os.getloadavg()]
    results["meta"] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "load_after": load,
        "provider_delay_s": args.provider_delay,
        "pg_delay_s": args.pg_delay,
        "calls": args.calls,
        "rounds": args.rounds,
        "label": args.label,
        "think_s": thinks,
        "clients": list(clients),
        "client_processes": args.client_processes,
        "settings": set_settings(args),
        "chat_spool_sync": args.chat_spool_sync or "default",
        "settle_s": args.settle,
        "load_before": load_before,
        "targets": {"overhead_p50_ms": "<= 3", "slowed_or_cut_vs_normal": "<= 1.05x"},
    }
    print(f"\nfleet overhead on `chat` = client latency - fake provider's own time (ms), {clients[0]} client")
    print("  (the fake's time: the request's first bytes at its server to the answer's last byte handed")
    print("   over; from handler: the fake's time taken from its handler's start, the measure until")
    print("   2026-11-28; vs handler: less only the fake's handler time, the measure before 2026-11-27;")
    print("   instance: its own `fleet` stage, request arrival to last byte less its provider call;")
    print("   outside: overhead p50 - instance: router, loopback HTTP, the instance's provider client)")
    think_col = len(thinks) > 1
    print(
        f"{'postgres':>8} {'sessions':>8}{'  think s' if think_col else ''}"
        f"  {'overhead p50':>12} {'p99':>8}   {'latency p50':>11}"
        f"  {'from handler':>12}  {'vs handler':>10}  {'instance':>8} {'outside':>8}  {'inst cpu/call':>13}"
    )
    for r in results["runs"]:
        o, lat, old = r["overhead"], r["latency"], r["overhead_vs_handler"]
        was = (r.get("overhead_from_handler") or {}).get("p50_ms", float("nan"))
        own = (r.get("instance_stages") or {}).get("fleet", {}).get("p50_ms")
        tail = f"  {own:>8.2f} {o['p50_ms'] - own:>8.2f}" if own is not None else ""
        tail += f"  {r['instances_cpu_per_call_ms']:>13.2f}"
        think = f"  {r['think_s']:>7.3f}" if think_col else ""
        print(
            f"{r['postgres']:>8} {r['sessions']:>8}{think}  {o['p50_ms']:>12.2f} {o['p99_ms']:>8.2f}"
            f"   {lat['p50_ms']:>11.2f}  {was:>12.2f}  {old['p50_ms']:>10.2f}{tail}"
        )
    normal = {
        (r["sessions"], r["think_s"]): r["overhead"]["p50_ms"]
        for r in results["runs"]
        if r["postgres"] == "normal"
    }
    ratios = []
    for r in results["runs"]:
        base = normal.get((r["sessions"], r["think_s"]))
        if r["postgres"] != "normal" and base:
            think = f" think {r['think_s']}" if think_col else ""
            ratios.append(f"{r['postgres']} x{r['sessions']}{think} {r['overhead']['p50_ms'] / base:.2f}x")
    if ratios:
        print("overhead p50 vs normal (target <= 1.05x): " + ", ".join(ratios))
    if results.get("recoveries_s"):
        waits = ", ".join(f"{w:.1f}" for w in results["recoveries_s"])
        print(
            "  after each outage, until every instance reached Postgres with an empty spool "
            f"(not measured): {waits} s"
        )
    for r in results["runs"]:
        if r.get("overhead_direct"):
            d = r["overhead_direct"]["p50_ms"]
            print(
                f"  {r['postgres']} x{r['sessions']}: straight to the instance {d:.2f} ms p50, so the "
                f"router's share {r['overhead']['p50_ms'] - d:+.2f} ms"
            )
    for r in results["runs"]:
        for wire, o in (r.get("overhead_other_clients") or {}).items():
            print(
                f"  {r['postgres']} x{r['sessions']}: through the {wire} client (the same sessions' "
                f"next turns) {o['p50_ms']:.2f} ms p50, p99 {o['p99_ms']:.2f}: "
                f"{o['p50_ms'] - r['overhead']['p50_ms']:+.2f} ms against the {clients[0]} client"
            )
    for r in results["runs"]:
        call_ms = ((r.get("instance_stages") or {}).get("provider") or {}).get("p50_ms")
        fake_ms = (r.get("fake_whole") or {}).get("p50_ms")
        if call_ms is not None and fake_ms is not None:
            print(
                f"  {r['postgres']} x{r['sessions']}: the instance's provider call {call_ms:.2f} ms p50 "
                f"against the fake's own {fake_ms:.2f}: its client and loopback HTTP about "
                f"{call_ms - fake_ms:+.2f} ms (part of `outside`)"
            )
    print("\ninstance stages (p50 ms, in call order; cumulative per instance, from one session's instance):")
    for r in results["runs"]:
        stages = r.get("instance_stages") or {}
        order = [k for k in CHAT_STAGES if k in stages] + [k for k in stages if k not in CHAT_STAGES]
        row = "  ".join(f"{k} {stages[k]['p50_ms']:.2f}" for k in order)
        think = f" think {r['think_s']}" if think_col else ""
        print(f"  {r['postgres']:>6} x{r['sessions']}{think}: {row}")
        gens = (r.get("instance_gc") or {}).get("generations")
        if gens:
            print(
                "    its garbage collector so far: "
                + ", ".join(
                    f"gen{g} {x['collections']} x, longest {x['longest_pause_ms']:.2f} ms"
                    for g, x in enumerate(gens)
                )
            )
    out = ROOT / "tests" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    path = out / f"chat-{time.strftime('%Y%m%d-%H%M%S')}{label}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT)} (load average before {load_before}, after {load})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
