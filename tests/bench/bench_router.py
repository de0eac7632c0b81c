"""Router overhead and session isolation, measured side by side in one run.

    python tests/bench/bench_router.py [--calls 400] [--chat-calls 25]

Starts a fleet under real supervisord (tests/fleet.py: five `exai-instance` processes and
`exai-router`, the `exai up` path; fake LLM provider on loopback answering in 200 ms), then
measures with a raw HTTP client speaking the 2026-07-28
wire (one POST = one tools/call, JSON answer), so the numbers are the fleet's, not a client
library's:

1. overhead: the `version` tool through the router vs. directly to the instance (with the
   router's internal headers), interleaved call by call, with 1 and with 5 concurrent sessions;
2. isolation: the `chat` tool (provider answers in 200 ms) with 1 session busy vs. 5 sessions
   busy at once, through the router. Ratio = p50(5 busy) / p50(1 busy); 1.00 is perfect.
3. resume: the first `version` call after the session was parked (POST /admin/sessions/{id}/park)
   vs. a call on the same session while bound, interleaved, for both eras (the handshake era
   replays `initialize` + `notifications/initialized` on the new instance). Target: <= 15 ms p50.
4. sessions served per instance: N sessions that each call `chat` (200 ms) and then think for
   THINK_S seconds, over 5 instances, parking after 1 s idle; for growing N, how many calls
   got 503 and the call latency. Sessions per instance = N / 5 at the largest N without 503.

Prints a table and saves JSON to tests/bench/results/router-<timestamp>.json.
Uses EXAI_TEST_DATABASE_URL / EXAI_TEST_REDIS_URL (default: the local servers).
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import protocol as p  # noqa: E402
from common.fleet.supervisor import router_names  # noqa: E402
from common.migrate import migrate  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.fakes.provider import Behaviour, FakeProvider  # noqa: E402
from tests.fakes.provider_process import FakeProviderProcess  # noqa: E402
from tests.fleet import BENCH_SETTINGS, Fleet, run_bench  # noqa: E402

VERSION = "2026-07-28"
HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": VERSION}


def _body(tool: str, args: dict[str, Any], client: str, rid: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {
            "name": tool,
            "arguments": args,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": VERSION,
                "io.modelcontextprotocol/clientInfo": {"name": client, "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }


class Caller:
    """One session's worth of calls over one keep-alive connection."""

    def __init__(self, url: str, client: str, extra: dict[str, str] | None = None) -> None:
        self.url = url
        self.client = client
        self.headers = {**HEADERS, **(extra or {})}
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        self.rid = 0

    async def call(self, tool: str, args: dict[str, Any]) -> float:
        self.rid += 1
        body = json.dumps(_body(tool, args, self.client, self.rid)).encode()
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "Mcp-Method": "tools/call",
            "Mcp-Name": tool,
        }
        started = time.perf_counter()
        async with self.http.post(self.url, data=body, headers=headers) as r:
            payload = await r.read()
        elapsed = time.perf_counter() - started
        if r.status != 200 or b'"isError":true' in payload:
            raise RuntimeError(f"{tool} via {self.url}: {r.status} {payload[:300]!r}")
        return elapsed

    async def close(self) -> None:
        await self.http.close()


class HandshakeCaller:
    """A handshake-era session (initialize, Mcp-Session-Id) over one keep-alive connection."""

    def __init__(self, url: str, client: str, extra: dict[str, str] | None = None) -> None:
        self.url = url
        self.client = client
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        self.headers.update(extra or {})
        self.rid = 0
        self.session = ""

    async def open(self) -> None:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": self.client},
            },
        }
        async with self.http.post(self.url, data=json.dumps(init), headers=self.headers) as r:
            await r.read()
            self.session = r.headers[p.MCP_SESSION_ID]
        self.headers.update({p.MCP_SESSION_ID: self.session, p.MCP_PROTOCOL_VERSION: "2025-11-25"})
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
        async with self.http.post(self.url, data=note, headers=self.headers) as r:
            await r.read()

    async def call(self, tool: str, args: dict[str, Any]) -> float:
        self.rid += 1
        body = {
            "jsonrpc": "2.0",
            "id": self.rid,
            "method": "tools/call",
            "params": {"name": tool, "arguments": args},
        }
        started = time.perf_counter()
        async with self.http.post(self.url, data=json.dumps(body), headers=self.headers) as r:
            payload = await r.read()
        elapsed = time.perf_counter() - started
        if r.status != 200 or b'"isError":true' in payload:
            raise RuntimeError(f"{tool}: {r.status} {payload[:300]!r}")
        return elapsed

    async def close(self) -> None:
        with contextlib.suppress(aiohttp.ClientError):
            async with self.http.delete(self.url, headers=self.headers) as r:
                await r.read()
        await self.http.close()


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def _cpu_seconds(pid: int) -> float:
    """CPU time a process's threads have used so far (Linux /proc): the scheduler's count in
    nanoseconds per thread (schedstat), else user + system time in clock ticks (10 ms: at a
    few hundred calls, one tick is 0.03 ms a call). A thread that ended is missing from the
    first: measure windows over which the process keeps its threads."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
        if total:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Nginx:
    """nginx as a plain keep-alive reverse proxy, one listening port per instance."""

    BIN = Path("/usr/sbin/nginx")

    def __init__(self, state: Path, fleet: Fleet, count: int) -> None:
        self.dir = state / "nginx"
        self.ports = {n: _free_port() for n in range(1, count + 1)}
        servers = "\n".join(
            f"upstream inst{n} {{ server 127.0.0.1:{fleet.instance_port(n)}; keepalive 16; }}\n"
            f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://inst{n};"
            ' proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } }'
            for n, port in self.ports.items()
        )
        self.conf = (
            "worker_processes 1; daemon on; pid nginx.pid; error_log error.log;\n"
            "events { worker_connections 1024; }\n"
            "http { access_log off; client_body_temp_path tmp; proxy_temp_path tmp;\n"
            f"{servers}\n}}\n"
        )

    async def __aenter__(self) -> Nginx:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.dir / "nginx.conf").write_text(self.conf)
        proc = await asyncio.create_subprocess_exec(str(self.BIN), "-p", str(self.dir), "-c", "nginx.conf")
        await proc.wait()
        await asyncio.sleep(0.3)
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = await asyncio.create_subprocess_exec(
            str(self.BIN), "-p", str(self.dir), "-c", "nginx.conf", "-s", "stop"
        )
        await proc.wait()

    @property
    def master_pid(self) -> int:
        return int((self.dir / "nginx.pid").read_text().strip())

    def worker_cpu(self) -> float:
        children = Path(f"/proc/{self.master_pid}/task/{self.master_pid}/children").read_text().split()
        return sum(_cpu_seconds(int(c)) for c in children)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _overhead(
    fleet: Fleet, sessions: int, calls: int, era: str = "stateless", nginx: Nginx | None = None
) -> dict[str, Any]:
    """Each session alternates router, nginx and direct calls to the same instance, concurrently."""
    routed: list[Caller | HandshakeCaller] = []
    nums: set[int] = set()
    direct: list[Caller | HandshakeCaller] = []
    proxied: list[Caller | HandshakeCaller] = []
    for i in range(sessions):
        client = f"bench-{era}-{sessions}-{i}"
        r: Caller | HandshakeCaller
        if era == "stateless":
            r = Caller(fleet.mcp_url, client)
        else:
            r = HandshakeCaller(fleet.mcp_url, client)
            await r.open()
        routed.append(r)
        await r.call("version", {})  # binds the session
        status = await _status(r)
        num = _num(status["instance_id"])
        nums.add(num)
        extra = direct_headers(fleet, status["session"], era, client)
        urls = [f"http://127.0.0.1:{fleet.instance_port(num)}/mcp"]
        if nginx is not None:
            urls.append(f"http://127.0.0.1:{nginx.ports[num]}/mcp")
        for url, into in zip(urls, (direct, proxied), strict=False):
            c: Caller | HandshakeCaller
            if era == "stateless":
                c = Caller(url, client, extra)
            else:
                c = HandshakeCaller(url, client, extra)
                await c.open()
            into.append(c)
    via_router: list[float] = []
    to_instance: list[float] = []
    via_nginx: list[float] = []
    router_pids = [fleet.process(name).pid for name in router_names(fleet.settings)]
    cpu: dict[str, float] = {}

    async def run(i: int) -> None:
        r, d = routed[i], direct[i]
        n = proxied[i] if proxied else None
        for _ in range(20):  # warm every path
            await r.call("version", {})
            await d.call("version", {})
            if n is not None:
                await n.call("version", {})
        for _ in range(calls):
            via_router.append(await r.call("version", {}))
            to_instance.append(await d.call("version", {}))
            if n is not None:
                via_nginx.append(await n.call("version", {}))

    cpu["router0"] = sum(_cpu_seconds(pid) for pid in router_pids)
    instance_pids = [fleet.process(fleet.instance_id(n)).pid for n in sorted(nums)]
    cpu["instances0"] = sum(_cpu_seconds(p) for p in instance_pids)
    cpu["nginx0"] = nginx.worker_cpu() if nginx is not None else 0.0
    await asyncio.gather(*(run(i) for i in range(sessions)))
    router_cpu = sum(_cpu_seconds(pid) for pid in router_pids) - cpu["router0"]
    instance_cpu = sum(_cpu_seconds(p) for p in instance_pids) - cpu["instances0"]
    nginx_cpu = (nginx.worker_cpu() - cpu["nginx0"]) if nginx is not None else 0.0
    for c in (*routed, *direct, *proxied):
        await c.close()
    router_s, direct_s = _stats(via_router), _stats(to_instance)
    out: dict[str, Any] = {
        "era": era,
        "sessions": sessions,
        "router": router_s,
        "direct": direct_s,
        "added_p50_ms": round(router_s["p50_ms"] - direct_s["p50_ms"], 3),
        "added_p99_ms": round(router_s["p99_ms"] - direct_s["p99_ms"], 3),
        # includes the warm-up calls (20 per session) and the router's own housekeeping
        "router_cpu_ms_per_call": round(router_cpu * 1000 / ((calls + 20) * sessions), 3),
        # every call reaches an instance (routed, direct and through nginx alike)
        "instance_cpu_ms_per_call": round(
            instance_cpu * 1000 / ((calls + 20) * sessions * (2 + (nginx is not None))), 3
        ),
    }
    if nginx is not None:
        nginx_s = _stats(via_nginx)
        out["nginx"] = nginx_s
        out["nginx_added_p50_ms"] = round(nginx_s["p50_ms"] - direct_s["p50_ms"], 3)
        out["nginx_cpu_ms_per_call"] = round(nginx_cpu * 1000 / ((calls + 20) * sessions), 3)
    return out


async def _stage_sums(fleet: Fleet, router_url: str | None = None) -> tuple[float, float]:
    """The router's `exai_router_call_stage_seconds_sum` for stage "router" (its own time) and
    "instance" (waiting on the instance), in seconds (`router_url`: another router's)."""
    status, text = await fleet.admin("GET", "/metrics", router_url=router_url)
    if status != 200:
        raise RuntimeError(f"/metrics: {status}")
    sums = {"router": 0.0, "instance": 0.0}
    for line in str(text).splitlines():
        for stage in sums:
            if line.startswith(f'exai_router_call_stage_seconds_sum{{stage="{stage}"}}'):
                sums[stage] = float(line.rsplit(" ", 1)[1])
    return sums["router"], sums["instance"]


async def _first_call(fleet: Fleet, samples: int, *, free: bool) -> dict[str, Any]:
    """A new 2026-07-28 session's first call (allocation, lease, session record) vs. its second.

    Besides the client-observed latency, the router's own time on each call (its stage
    histogram's sum, read before and after the call: untimed) is less sensitive to a loaded
    machine's scheduling of the client and the instance.

    free=True: every session is ended (untimed) before the next one opens, so a free instance
    waits for each new session: the new-session path itself. free=False: the sessions stay
    (idle), so once the five instances are taken every new session first parks an idle one
    (reset of that instance, its record saved): the cost of opening a session on a full fleet.
    """
    first: list[float] = []
    second: list[float] = []
    own_first: list[float] = []
    own_second: list[float] = []
    inst_first: list[float] = []
    inst_second: list[float] = []
    for i in range(samples):
        c = Caller(fleet.mcp_url, f"first-{i}-{secrets.token_hex(2)}")
        # Open the client's keep-alive connection first (untimed): the client's own connect and
        # name lookup are not the router's cost of a new session.
        async with c.http.get(fleet.mcp_url.rsplit("/mcp", 1)[0] + "/healthz") as r:
            await r.read()
        s0 = await _stage_sums(fleet)
        first.append(await c.call("version", {}))
        s1 = await _stage_sums(fleet)
        second.append(await c.call("version", {}))
        s2 = await _stage_sums(fleet)
        own_first.append(s1[0] - s0[0])
        own_second.append(s2[0] - s1[0])
        inst_first.append(s1[1] - s0[1])
        inst_second.append(s2[1] - s1[1])
        await c.close()
        if free:
            await fleet.end_all_sessions()
    a, b = _stats(first), _stats(second)
    oa, ob = _stats(own_first), _stats(own_second)
    return {
        "first": a,
        "bound": b,
        "added_p50_ms": round(a["p50_ms"] - b["p50_ms"], 3),
        "router_own_first": oa,
        "router_own_bound": ob,
        "router_own_added_p50_ms": round(oa["p50_ms"] - ob["p50_ms"], 3),
        "instance_first": _stats(inst_first),
        "instance_bound": _stats(inst_second),
        "free_instance": free,
    }


async def _rate(fleet: Fleet, clients: int, seconds: float, rounds: int = 3) -> dict[str, Any]:
    """Calls/s of `version` with `clients` concurrent clients calling back to back, spread over
    five sessions (one per instance), through the router and straight to the instances.

    The two take turns in `rounds` windows each (router, direct, direct, router, ...: each one
    first as often as second), `seconds` split between them, with each side's connections kept
    open across its windows, so a drift of the machine's load lands on both sides alike."""
    anchors = [Caller(fleet.mcp_url, f"rate-{i}") for i in range(5)]
    bound = []
    for a in anchors:
        await a.call("version", {})
        bound.append(await _status(a))

    def callers_for(direct: bool) -> list[Caller]:
        out: list[Caller] = []
        for i in range(clients):
            st = bound[i % len(bound)]
            client = f"rate-{i % len(bound)}"
            out.append(direct_caller(fleet, st, client) if direct else Caller(fleet.mcp_url, client))
        return out

    async def window(callers: list[Caller], length: float) -> tuple[int, int]:
        done = errors = 0
        stop = time.monotonic() + length

        async def run(c: Caller) -> None:
            nonlocal done, errors
            while time.monotonic() < stop:
                try:
                    await c.call("version", {})
                    done += 1
                except RuntimeError:
                    errors += 1
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(run(c) for c in callers))
        return done, errors

    sides = {False: callers_for(False), True: callers_for(True)}
    for callers in sides.values():  # connections opened before the clock runs
        await asyncio.gather(*(c.call("version", {}) for c in callers))
    length = seconds / max(1, rounds)
    totals = {False: [0, 0, 0.0], True: [0, 0, 0.0]}
    shares: list[float] = []
    for r in range(max(1, rounds)):
        order = (False, True) if r % 2 == 0 else (True, False)
        got: dict[bool, float] = {}
        for direct in order:
            started = time.monotonic()
            keep = asyncio.create_task(_keep_bound(anchors)) if direct else None
            try:
                done, errors = await window(sides[direct], length)
            finally:
                if keep is not None:
                    keep.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keep
            spent = time.monotonic() - started
            t = totals[direct]
            t[0], t[1], t[2] = t[0] + done, t[1] + errors, t[2] + spent
            got[direct] = done / spent
        shares.append(round(got[False] / max(got[True], 1e-9), 3))
    for callers in sides.values():
        for c in callers:
            await c.close()
    for a in anchors:
        await a.close()

    def rate_of(direct: bool) -> dict[str, Any]:
        done, errors, spent = totals[direct]
        return {"calls_per_s": round(done / max(spent, 1e-9), 1), "errors": errors}

    through, straight = rate_of(False), rate_of(True)
    return {
        "clients": clients,
        "router": through,
        "direct": straight,
        "router_share": round(through["calls_per_s"] / max(straight["calls_per_s"], 1e-9), 3),
        "router_share_by_round": shares,
    }


async def _keep_bound(anchors: list[Caller], every: float = 0.25) -> None:
    """While the direct side runs, a call through the router on each session every `every`
    seconds: otherwise the router parks the sessions (EXAI_SESSION_PARK_AFTER is 1 s in this
    fleet) and the direct callers, which bypass it, bind the freed instances behind its back,
    so that its next calls find them taken (409, 503), more so with several router processes."""
    while True:
        await asyncio.gather(*(a.call("version", {}) for a in anchors), return_exceptions=True)
        await asyncio.sleep(every)


def _num(instance_id: str) -> int:
    return int(instance_id.rsplit("_", 1)[1])


async def _status(c: Caller | HandshakeCaller) -> dict[str, Any]:
    c.rid += 1
    if isinstance(c, HandshakeCaller):
        msg: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": c.rid,
            "method": "tools/call",
            "params": {"name": "status", "arguments": {}},
        }
        headers = dict(c.headers)
    else:
        msg = _body("status", {}, c.client, c.rid)
        headers = {**c.headers, "Content-Type": "application/json", "Mcp-Method": "tools/call"}
        headers["Mcp-Name"] = "status"
    async with c.http.post(c.url, data=json.dumps(msg).encode(), headers=headers) as r:
        raw = (await r.read()).decode()
    if r.headers.get("Content-Type", "").startswith("text/event-stream"):
        raw = [line[5:].strip() for line in raw.splitlines() if line.startswith("data:")][-1]
    return dict(json.loads(raw)["result"]["structuredContent"])


async def _isolation(fleet: Fleet, calls: int) -> dict[str, Any]:
    async def busy(n: int) -> list[float]:
        callers = [Caller(fleet.mcp_url, f"iso-{n}-{i}") for i in range(n)]
        samples: list[float] = []

        async def run(c: Caller) -> None:
            await c.call("version", {})
            for k in range(calls):
                samples.append(await c.call("chat", {"prompt": f"question {k} from {c.client}"}))

        await asyncio.gather(*(run(c) for c in callers))
        for c in callers:
            await c.close()
        return samples

    one = _stats(await busy(1))
    await fleet.end_all_sessions()
    five = _stats(await busy(5))
    await fleet.end_all_sessions()
    return {"one_busy": one, "five_busy": five, "ratio_p50": round(five["p50_ms"] / one["p50_ms"], 4)}


async def _bridge_overhead(fleet: Fleet, calls: int) -> dict[str, Any]:
    """`version` through exai-bridge (a stdio line in, a line out) vs. an HTTP client posting
    to the router directly, both in the same session (same X-Exai-Session-Key), interleaved."""
    name = "bench-bridge"
    bridge = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "exai-bridge"),
        fleet.mcp_url,
        "--session",
        name,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        limit=64 * 1024 * 1024,
    )
    assert bridge.stdin is not None and bridge.stdout is not None
    stdin, stdout = bridge.stdin, bridge.stdout
    direct = Caller(fleet.mcp_url, name, {p.SESSION_KEY_HEADER: name})
    rid = 0

    async def via_bridge() -> float:
        nonlocal rid
        rid += 1
        line = json.dumps(_body("version", {}, name, rid)).encode() + b"\n"
        started = time.perf_counter()
        stdin.write(line)
        await stdin.drain()
        answer = await stdout.readline()
        elapsed = time.perf_counter() - started
        if b'"result"' not in answer:
            raise RuntimeError(f"version via exai-bridge: {answer[:300]!r}")
        return elapsed

    bridged: list[float] = []
    straight: list[float] = []
    try:
        for _ in range(20):  # warm both paths (and bind the session)
            await via_bridge()
            await direct.call("version", {})
        for _ in range(calls):
            bridged.append(await via_bridge())
            straight.append(await direct.call("version", {}))
    finally:
        await direct.close()
        stdin.close()
        await asyncio.wait_for(bridge.wait(), 30)
    bridge_s, direct_s = _stats(bridged), _stats(straight)
    return {
        "bridge": bridge_s,
        "direct_http": direct_s,
        "added_p50_ms": round(bridge_s["p50_ms"] - direct_s["p50_ms"], 3),
        "added_p99_ms": round(bridge_s["p99_ms"] - direct_s["p99_ms"], 3),
        "exit_code": bridge.returncode,
    }


async def _park(fleet: Fleet, session: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fleet.router_url}/admin/sessions/{session}/park", headers=fleet.admin_headers()) as r,
    ):
        if r.status != 200:
            raise RuntimeError(f"park {session}: {r.status} {await r.text()}")


async def _resume(fleet: Fleet, samples: int) -> dict[str, Any]:
    """Per era: a call on a bound session vs. the first call after parking it."""
    out: dict[str, Any] = {}
    stateless = Caller(fleet.mcp_url, "resume-stateless")
    handshake = HandshakeCaller(fleet.mcp_url, "resume-handshake")
    await handshake.open()
    await stateless.call("version", {})
    sid = {"stateless": (await _status(stateless))["session"], "handshake": handshake.session}
    for era, caller in (("stateless", stateless), ("handshake", handshake)):
        bound: list[float] = []
        resumed: list[float] = []
        for _ in range(5):  # warm
            await caller.call("version", {})
        for _ in range(samples):
            await caller.call("version", {})
            bound.append(await caller.call("version", {}))
            await _park(fleet, sid[era])
            resumed.append(await caller.call("version", {}))
        b, r = _stats(bound), _stats(resumed)
        out[era] = {"bound": b, "resumed": r, "added_p50_ms": round(r["p50_ms"] - b["p50_ms"], 3)}
    await stateless.close()
    await handshake.close()
    return out


THINK_S = 2.0


async def _served_once(fleet: Fleet, n: int, seconds: float) -> dict[str, Any]:
    callers = [Caller(fleet.mcp_url, f"served-{n}-{i}") for i in range(n)]
    latencies: list[float] = []
    refused = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def run(c: Caller, offset: float) -> None:
        nonlocal refused
        await asyncio.sleep(offset)  # spread the sessions' phases over one think time
        while loop.time() < end:
            try:
                latencies.append(await c.call("chat", {"prompt": "a question"}))
            except RuntimeError as exc:
                if " 503 " not in str(exc):
                    raise
                refused += 1
            await asyncio.sleep(THINK_S)

    await asyncio.gather(*(run(c, THINK_S * i / n) for i, c in enumerate(callers)))
    for c in callers:
        await c.close()
    await fleet.end_all_sessions()
    row: dict[str, Any] = {"sessions": n, "per_instance": n / 5, "calls": len(latencies), "refused": refused}
    if latencies:
        row["latency"] = _stats(latencies)
    return row


async def _served(fleet: Fleet, counts: list[int], seconds: float) -> list[dict[str, Any]]:
    """N sessions each doing chat (200 ms) + THINK_S of thinking, for `seconds`."""
    return [await _served_once(fleet, n, seconds) for n in counts]


def direct_headers(fleet: Fleet, session: str, era: str, client: str) -> dict[str, str]:
    """The internal headers the router adds, for calling an instance directly."""
    return {
        p.INTERNAL_TOKEN_HEADER: fleet.internal_token,
        p.SESSION_HEADER: session,
        p.PRINCIPAL_HEADER: "local",
        p.ERA_HEADER: era,
        p.CLIENT_HEADER: client,
    }


def direct_caller(fleet: Fleet, st: dict[str, Any], client: str) -> Caller:
    """A Caller straight to the instance serving stateless session `st` (what the router sends)."""
    extra = direct_headers(fleet, st["session"], "stateless", client)
    return Caller(f"http://127.0.0.1:{fleet.instance_port(_num(st['instance_id']))}/mcp", client, extra)


def _with_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def scratch_database(pg: str, prefix: str) -> str:
    """A new database on `pg`'s server with the schema applied; its DSN."""
    dbname = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    dsn = _with_db(pg, dbname)
    await migrate(dsn)
    return dsn


async def drop_scratch_database(pg: str, dsn: str) -> None:
    """Drop a database `scratch_database` made (its name is `dsn`'s path)."""
    admin = await asyncpg.connect(pg)
    await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path.lstrip("/")}" WITH (FORCE)')
    await admin.close()


def _setting(item: str) -> tuple[str, str]:
    """One --set value: a field of common/settings.py's Settings and its value. Settings ignores
    names it does not know, so a misspelt one is refused here rather than measured as a no-op."""
    field, sep, value = item.partition("=")
    field = field.strip()
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"{item!r}: expected FIELD=VALUE, e.g. instance_nice=5")
    if field not in Settings.model_fields:
        raise argparse.ArgumentTypeError(
            f"{field!r} is not a setting (the field names of common/settings.py's Settings, "
            "e.g. instance_nice or link_spool_sync)"
        )
    return field, value


def add_set_option(ap: argparse.ArgumentParser, example: str = "instance_nice=5") -> None:
    """`--set FIELD=VALUE` (repeatable): a fleet setting for the bench's fleet; `set_settings`."""
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        type=_setting,
        metavar="FIELD=VALUE",
        help=f"a setting of the fleet (a common/settings.py field), e.g. {example}; repeatable",
    )


def set_settings(args: argparse.Namespace) -> dict[str, str]:
    """The --set settings, as fleet overrides."""
    return dict(args.set)


def fake_provider_overrides(provider: FakeProvider | FakeProviderProcess) -> dict[str, Any]:
    """Fleet settings for a bench: GLM on the fake provider, no retries, no spares, quiet logs."""
    return {
        "log_level": "WARNING",
        "glm_api_key": "fake-key",
        "glm_api_url": provider.glm_url,
        "provider_max_retries": 0,
        "autostart_spares": False,
        "allocation_deadline": 10.0,
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400, help="version calls per session and path")
    ap.add_argument("--chat-calls", type=int, default=25, help="chat calls per session")
    ap.add_argument("--resume-samples", type=int, default=60, help="park/resume pairs per era")
    ap.add_argument("--served", default="10,25,40,60", help="session counts for the work-rate run")
    ap.add_argument("--served-seconds", type=float, default=20.0, help="duration of each work-rate run")
    ap.add_argument(
        "--parts",
        default="overhead,first,rate,isolation,resume,served,bridge",
        help="comma-separated parts to run (overhead,first,rate,isolation,resume,served,bridge)",
    )
    ap.add_argument("--first-samples", type=int, default=60, help="new sessions for the first-call part")
    ap.add_argument(
        "--rate-seconds",
        type=float,
        default=10.0,
        help="seconds of calls/s per side (router, direct) and client count, in three alternating windows",
    )
    ap.add_argument(
        "--router-processes",
        type=int,
        default=1,
        help="router processes sharing the port (EXAI_ROUTER_PROCESSES; their CPU is added up). "
        "The first-call part reads one router's metrics, so it runs only with 1",
    )
    ap.add_argument(
        "--loop-stall-ms",
        type=float,
        default=100.0,
        help="the fleet's event loop watchdog threshold (EXAI_LOOP_STALL_MS; 0 turns it off)",
    )
    add_set_option(ap)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.router_processes > 1 and "first" in parts:
        print("--router-processes > 1: the first-call part is left out (it reads one router's metrics)")
        parts.discard("first")

    pg = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    dsn = await scratch_database(pg, "exai_bench")
    state = Path(os.environ.get("TMPDIR", "/tmp")) / f"exai-bench-{secrets.token_hex(4)}"
    state.mkdir(parents=True)
    prefix = f"exaibench{secrets.token_hex(3)}"
    results: dict[str, Any] = {"settings": set_settings(args)}
    with FakeProvider(default=Behaviour(delay=0.2)).running() as provider:
        fleet = Fleet(
            state,
            database_url=dsn,
            redis_url=redis_url,
            redis_prefix=prefix,
            instances=5,
            max_instances=5,
            overrides={
                **BENCH_SETTINGS,
                **fake_provider_overrides(provider),
                "session_park_after": 1.0,
                "loop_stall_ms": args.loop_stall_ms,
                "router_processes": args.router_processes,
                **set_settings(args),
            },
        )
        try:
            await asyncio.to_thread(fleet.start)
            await fleet.wait_instances(5)
            if "overhead" in parts:
                async with contextlib.AsyncExitStack() as stack:
                    nginx = None
                    if Nginx.BIN.exists():
                        nginx = await stack.enter_async_context(Nginx(state, fleet, 5))
                    else:
                        print(f"nginx not found at {Nginx.BIN}: the nginx column is skipped")
                    for era in ("stateless", "handshake"):
                        for n in (1, 5):
                            results[f"overhead_{era}_{n}"] = await _overhead(fleet, n, args.calls, era, nginx)
                            await fleet.end_all_sessions()
            if "first" in parts:
                await fleet.end_all_sessions()
                results["first_call"] = await _first_call(fleet, args.first_samples, free=True)
                results["first_call_full_fleet"] = await _first_call(fleet, args.first_samples, free=False)
                await fleet.end_all_sessions()
            if "rate" in parts:
                results["rate"] = [await _rate(fleet, n, args.rate_seconds) for n in (32, 64)]
                await fleet.end_all_sessions()
            if "isolation" in parts:
                results["isolation"] = await _isolation(fleet, args.chat_calls)
            if "resume" in parts:
                results["resume"] = await _resume(fleet, args.resume_samples)
                await fleet.end_all_sessions()
            if "served" in parts:
                counts = [int(x) for x in args.served.split(",") if x]
                results["served"] = await _served(fleet, counts, args.served_seconds)
                await fleet.end_all_sessions()
            if "bridge" in parts:
                results["bridge_overhead"] = await _bridge_overhead(fleet, args.calls)
        finally:
            await asyncio.to_thread(fleet.stop)
            await drop_scratch_database(pg, dsn)

    results["meta"] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "wire": f"MCP {VERSION} JSON over HTTP/1.1 keep-alive, one call per POST",
        "provider_delay_s": 0.2,
        "targets": {"added_p50_ms": "< 1", "isolation_ratio_p50": "<= 1.05", "resume_added_p50_ms": "<= 15"},
        "served": {"instances": 5, "park_after_s": 1.0, "think_s": THINK_S, "chat_s": 0.2},
    }
    _print(results)
    out = ROOT / "tests" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"router-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT)}")
    return 0


def _print(r: dict[str, Any]) -> None:
    print("\nrouter overhead: `version` tool, router vs direct to the same instance (ms)")
    cols = ("sessions", "router p50", "direct p50", "added", "router p99", "direct p99")
    print(f"{cols[0]:>8}  {cols[1]:>10} {cols[2]:>10} {cols[3]:>7}   {cols[4]:>10} {cols[5]:>10}")
    for key in [k for k in r if k.startswith("overhead_")]:
        o = r[key]
        nginx = (
            f"   nginx p50 {o['nginx']['p50_ms']:.3f} (+{o['nginx_added_p50_ms']:.3f}, "
            f"cpu {o['nginx_cpu_ms_per_call']:.3f} ms/call)"
            if "nginx" in o
            else ""
        )
        print(
            f"{o['era'][:5]:>5} {o['sessions']:>2}  {o['router']['p50_ms']:>10.3f} "
            f"{o['direct']['p50_ms']:>10.3f} "
            f"{o['added_p50_ms']:>7.3f}   {o['router']['p99_ms']:>10.3f} {o['direct']['p99_ms']:>10.3f}"
            f"   router cpu {o['router_cpu_ms_per_call']:.3f} ms/call"
            f"   instance cpu {o['instance_cpu_ms_per_call']:.3f} ms/call{nginx}"
        )
    if "first_call" in r:
        f = r["first_call"]
        print(
            f"\nnew session's first call, free instance: p50 {f['first']['p50_ms']:.3f} vs bound "
            f"{f['bound']['p50_ms']:.3f} (added {f['added_p50_ms']:.3f}; target <= 1); the router's own "
            f"time {f['router_own_first']['p50_ms']:.3f} vs {f['router_own_bound']['p50_ms']:.3f}, waiting "
            f"on the instance {f['instance_first']['p50_ms']:.3f} vs {f['instance_bound']['p50_ms']:.3f}"
        )
    if "first_call_full_fleet" in r:
        f = r["first_call_full_fleet"]
        print(
            f"new session's first call, full fleet (parks an idle session): p50 {f['first']['p50_ms']:.3f}"
            f" vs bound {f['bound']['p50_ms']:.3f} (added {f['added_p50_ms']:.3f}); the router's own time "
            f"{f['router_own_first']['p50_ms']:.3f} vs {f['router_own_bound']['p50_ms']:.3f}"
        )
    for row in r.get("rate", []):
        print(
            f"calls/s with {row['clients']} clients over 5 sessions: router {row['router']['calls_per_s']}"
            f" direct {row['direct']['calls_per_s']} (router/direct {row['router_share']:.2f}; target >= 0.8;"
            f" by round {', '.join(f'{x:.2f}' for x in row.get('router_share_by_round', []))})"
        )
    if "isolation" in r:
        _print_isolation(r)
    if "resume" in r:
        _print_resume(r)
    if "served" in r:
        _print_served(r)
    if "bridge_overhead" in r:
        _print_bridge(r)


def _print_isolation(r: dict[str, Any]) -> None:
    i = r["isolation"]
    print("\nisolation: `chat` with the provider answering in 200 ms, through the router (ms)")
    print(f"  1 session busy : p50 {i['one_busy']['p50_ms']:.1f}  p99 {i['one_busy']['p99_ms']:.1f}")
    print(f"  5 sessions busy: p50 {i['five_busy']['p50_ms']:.1f}  p99 {i['five_busy']['p99_ms']:.1f}")
    print(f"  ratio p50 (5 busy / 1 busy): {i['ratio_p50']:.3f}  (target <= 1.05)\n")


def _print_resume(r: dict[str, Any]) -> None:
    print("resume: `version` on a bound session vs. the first call after a park (ms)")
    for era, x in r["resume"].items():
        print(
            f"  {era:<9} bound p50 {x['bound']['p50_ms']:.2f} p99 {x['bound']['p99_ms']:.2f}   "
            f"resumed p50 {x['resumed']['p50_ms']:.2f} p99 {x['resumed']['p99_ms']:.2f}   "
            f"added p50 {x['added_p50_ms']:.2f}  (target <= 15)"
        )


def _print_served(r: dict[str, Any]) -> None:
    print(f"\nsessions served by 5 instances: chat (200 ms) then {THINK_S:g} s thinking, park after 1 s")
    for row in r["served"]:
        lat = row.get("latency", {})
        print(
            f"  {row['sessions']:>3} sessions ({row['per_instance']:.0f}/instance): {row['calls']} calls, "
            f"{row['refused']} refused (503), "
            f"p50 {lat.get('p50_ms', 0):.0f} ms, p99 {lat.get('p99_ms', 0):.0f} ms"
        )
    print()


def _print_bridge(r: dict[str, Any]) -> None:
    if "bridge_overhead" in r:
        b = r["bridge_overhead"]
        print("exai-bridge overhead: `version` via stdio -> exai-bridge -> router vs HTTP -> router (ms)")
        print(f"  bridge p50 {b['bridge']['p50_ms']:.3f}  p99 {b['bridge']['p99_ms']:.3f}")
        print(f"  direct p50 {b['direct_http']['p50_ms']:.3f}  p99 {b['direct_http']['p99_ms']:.3f}")
        print(f"  added  p50 {b['added_p50_ms']:.3f}  p99 {b['added_p99_ms']:.3f}\n")


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
