"""The soak's clients: sessions of both protocol eras running a weighted mix of scenarios.

Each of `--clients` actors loops until the run ends: it opens a session through the router with
the SDK's own `Client` (handshake era `legacy`, or stateless `2026-07-28` on its own
`/mcp/s/<name>` path), runs one to three scenarios picked by weight with think times between
calls, then ends the session (DELETE) or, for a share of them, just goes away and leaves the
router's idle sweep to reclaim the instance. Handshake-era sessions keep the SDK's GET stream
(server-to-client notifications) open for their whole life.

The mix is pluggable: a scenario is `async def scenario(s: SoakSession) -> None` registered in
`SCENARIOS` under a name; `--mix name=weight,...` picks the weights (`DEFAULT_MIX` otherwise).
Session parking or linked-session traffic, once the fleet has them, are new entries here.

Every tool call is timed into the `CallLog` (op, era, ok, error text); every acknowledged write
goes to the `AckLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import mcp_types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fakes.provider import Behaviour, FakeProvider
from tests.soak.acks import AckLog

STATELESS = "2026-07-28"
CALL_TIMEOUT = 150.0
WORDS = (
    "router instance session lease spool flusher thread note task redis postgres stream review "
    "latency budget retry backoff cache schema index migration token context window model reply"
).split()


def text(rng: random.Random, size: int) -> str:
    """About `size` characters of words."""
    out: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


@dataclass
class RealisticProvider(FakeProvider):
    """The fake provider answering like a real one: 0.3-6 s (median ~1.2 s), 200 B to 6 KB, streamed."""

    seed: int = 0
    _rng: random.Random = field(default_factory=random.Random)

    def _next(self, provider: str) -> Behaviour:
        with self._lock:
            delay = min(6.0, max(0.3, self._rng.lognormvariate(0.2, 0.6)))
            size = int(min(6000, max(200, self._rng.lognormvariate(7.0, 0.8))))
            content = text(self._rng, size)
        return Behaviour(delay=delay, content=content, chunk_delay=0.02)


@dataclass
class Call:
    t: float  # start, seconds since the run started
    dur: float
    op: str
    era: str
    ok: bool
    error: str = ""


@dataclass
class CallLog:
    t0: float
    calls: list[Call] = field(default_factory=list)
    frozen: bool = False  # set once the run is over: calls cancelled on the way out are not results

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, started: float, op: str, era: str, ok: bool, error: str = "") -> None:
        if self.frozen:
            return
        self.calls.append(Call(started, self.now() - started, op, era, ok, error[:300]))


@dataclass
class Shared:
    """What all actors share: where to connect, the logs, threads open for continuation."""

    router_url: str
    calls: CallLog
    acks: AckLog
    think: float = 1.0  # scales think times
    threads: dict[str, int] = field(default_factory=dict)  # continuation_id -> remaining turns


class CallFailed(Exception):
    """A tool call failed (already recorded in the call log); the scenario stops."""


@dataclass
class SoakSession:
    shared: Shared
    client: Client
    era: str
    name: str
    rng: random.Random

    async def pause(self, low: float = 0.3, high: float = 3.0) -> None:
        await asyncio.sleep(self.rng.uniform(low, high) * self.shared.think)

    async def call(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """Call a tool; record it; return structuredContent or raise CallFailed."""
        log = self.shared.calls
        started = log.now()
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                result = await self.client.call_tool(tool, args)
        except (Exception, BaseExceptionGroup) as exc:
            log.add(started, tool, self.era, False, describe(exc))
            raise CallFailed(tool) from None
        if result.is_error:
            message = " ".join(getattr(c, "text", "") for c in result.content)
            log.add(started, tool, self.era, False, message)
            raise CallFailed(tool)
        log.add(started, tool, self.era, True)
        return dict(result.structured_content or {})


def leaf(exc: BaseException) -> BaseException:
    """The first real exception inside anyio's nested groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    exc = leaf(exc)
    return f"{type(exc).__name__}: {exc}"


class TerminationFailures(logging.Handler):
    """The SDK only logs a failed DELETE of a handshake-era session; count it as a failed 'end'."""

    def __init__(self, calls: CallLog) -> None:
        super().__init__(logging.WARNING)
        self.calls = calls

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Session termination failed"):
            self.calls.add(self.calls.now(), "end", "handshake", False, message)


Scenario = Callable[[SoakSession], Awaitable[None]]


# --- scenarios -------------------------------------------------------------------------------
async def _chat_turn(s: SoakSession, cid: str | None) -> str:
    prompt = f"[{secrets.token_hex(8)}] " + text(s.rng, int(s.rng.uniform(80, 3000)))
    args: dict[str, Any] = {"prompt": prompt}
    if cid:
        args["continuation_id"] = cid
    out = await s.call("chat", args)
    new_cid = str(out["continuation_id"])
    s.shared.acks.add("chat_turn", cid=new_cid, prompt=prompt)
    remaining = int((out.get("continuation_offer") or {}).get("remaining_turns", 0))
    if remaining >= 2:
        s.shared.threads[new_cid] = remaining
    return new_cid


async def chat(s: SoakSession) -> None:
    """A new thread of one to four turns."""
    cid: str | None = None
    for _ in range(s.rng.randint(1, 4)):
        if cid is not None and s.shared.threads.pop(cid, None) is None:
            break  # at its turn limit
        cid = await _chat_turn(s, cid)
        await s.pause()


async def continue_thread(s: SoakSession) -> None:
    """Continue a thread an earlier session started (any era, any instance)."""
    if not s.shared.threads:
        await chat(s)
        return
    cid = s.rng.choice(list(s.shared.threads))
    for _ in range(s.rng.randint(1, 2)):
        if s.shared.threads.pop(cid, None) is None:
            break  # another session took it, or it reached its turn limit
        cid = await _chat_turn(s, cid)
        await s.pause()


async def tasks(s: SoakSession) -> None:
    """Create a task, move it along with optimistic versions, list and read it."""
    out = await s.call(
        "task_create", {"name": f"soak {secrets.token_hex(4)}", "description": text(s.rng, 300)}
    )
    task = out["task"]
    s.shared.acks.add("task_create", id=task["id"], version=task["version"])
    for state in ("IN_PROGRESS", "COMPLETE")[: s.rng.randint(1, 2)]:
        await s.pause()
        out = await s.call(
            "task_update", {"task_id": task["id"], "expected_version": task["version"], "state": state}
        )
        task = out["task"]
        s.shared.acks.add("task_update", id=task["id"], version=task["version"])
    await s.pause()
    await s.call("task_list", {})
    await s.call("task_get", {"task_id": task["id"], "include_events": True})


async def notes(s: SoakSession) -> None:
    """Write session notes, overwrite one with its version, read, list, sometimes delete."""
    written: list[dict[str, Any]] = []
    for _ in range(s.rng.randint(1, 3)):
        body = text(s.rng, int(s.rng.uniform(50, 2000)))
        out = await s.call(
            "note_write", {"key": f"k-{secrets.token_hex(4)}", "body": body, "kind": "decision"}
        )
        note = out["note"]
        s.shared.acks.add(
            "note_write", scope=note["scope"], scope_id=note["scope_id"], key=note["key"], body=body
        )
        written.append(note)
        await s.pause()
    note = s.rng.choice(written)
    body = text(s.rng, 400)
    args = {"key": note["key"], "body": body, "expected_version": note["version"]}
    out = await s.call("note_write", args)
    s.shared.acks.add(
        "note_write", scope=note["scope"], scope_id=note["scope_id"], key=note["key"], body=body
    )
    await s.call("note_read", {"key": note["key"]})
    await s.call("note_list", {})
    if s.rng.random() < 0.3:
        await s.call("note_delete", {"key": note["key"]})
        s.shared.acks.add("note_delete", scope=note["scope"], scope_id=note["scope_id"], key=note["key"])


async def agent(s: SoakSession) -> None:
    """What an agent does: ask, keep a thread note, track the work as a task, ask again."""
    cid = await _chat_turn(s, None)
    s.shared.threads.pop(cid, None)
    await s.pause()
    body = text(s.rng, 300)
    out = await s.call("note_write", {"key": "plan", "body": body, "scope": "thread", "continuation_id": cid})
    note = out["note"]
    s.shared.acks.add("note_write", scope=note["scope"], scope_id=note["scope_id"], key="plan", body=body)
    out = await s.call("task_create", {"name": "follow up", "metadata": {"thread": cid}})
    s.shared.acks.add("task_create", id=out["task"]["id"], version=out["task"]["version"])
    await s.pause()
    await _chat_turn(s, cid)
    await s.call("note_list", {"scope": "thread", "continuation_id": cid})


async def info(s: SoakSession) -> None:
    """The quick ones a client sends at start: version, listmodels, status."""
    await s.call("version", {})
    await s.call("listmodels", {})
    await s.call("status", {})


SCENARIOS: dict[str, Scenario] = {
    "chat": chat,
    "continue": continue_thread,
    "tasks": tasks,
    "notes": notes,
    "agent": agent,
    "info": info,
}
DEFAULT_MIX: dict[str, float] = {"chat": 4, "continue": 2, "tasks": 2, "notes": 2, "agent": 2, "info": 1}


def parse_mix(spec: str | None) -> dict[str, float]:
    if not spec:
        return dict(DEFAULT_MIX)
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in SCENARIOS:
            raise SystemExit(f"--mix: unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
        mix[name.strip()] = float(weight or 1)
    return mix


# --- actors ----------------------------------------------------------------------------------
@dataclass
class Actor:
    shared: Shared
    mix: dict[str, float]
    index: int
    handshake_share: float = 0.5
    abandon_share: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    sessions: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sessions += 1
            await self.session()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rng.uniform(0.2, 3.0) * self.shared.think):
                    await stop.wait()

    async def session(self) -> None:
        era = "legacy" if self.rng.random() < self.handshake_share else STATELESS
        abandon = self.rng.random() < self.abandon_share
        name = f"soak-{self.index}-{self.sessions}-{secrets.token_hex(3)}"
        url = self.shared.router_url + "/mcp"
        if era == STATELESS:
            url += f"/s/{name}"
        log = self.shared.calls
        label = "handshake" if era == "legacy" else "stateless"
        started = log.now()
        opened = False
        try:
            async with self._client(url, era, name, abandon) as client:
                opened = True
                log.add(started, "open", label, True)
                s = SoakSession(self.shared, client, label, name, self.rng)
                names = list(self.mix)
                weights = [self.mix[n] for n in names]
                try:
                    for _ in range(self.rng.randint(1, 3)):
                        await SCENARIOS[self.rng.choices(names, weights)[0]](s)
                        await s.pause()
                finally:  # after a failed call too: the client ends what it opened
                    if era == STATELESS and not abandon:
                        await self._delete(url, label)
        except (Exception, BaseExceptionGroup) as exc:
            if not isinstance(leaf(exc), CallFailed):  # a failed call is in the log already
                log.add(
                    started if not opened else log.now(),
                    "open" if not opened else "close",
                    label,
                    False,
                    describe(exc),
                )

    @contextlib.asynccontextmanager
    async def _client(self, url: str, era: str, name: str, abandon: bool) -> AsyncIterator[Client]:
        async with (
            httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=CALL_TIMEOUT)) as http,
            Client(
                streamable_http_client(url, http_client=http, terminate_on_close=not abandon),
                mode=era,  # type: ignore[arg-type]
                client_info=mcp_types.Implementation(name=name, version="1"),
            ) as client,
        ):
            yield client

    async def _delete(self, url: str, label: str) -> None:
        log = self.shared.calls
        started = log.now()
        try:
            async with httpx2.AsyncClient(timeout=30.0) as http:
                r = await http.delete(url, headers={"MCP-Protocol-Version": STATELESS})
            ok = r.status_code in (200, 204)
            log.add(started, "end", label, ok, "" if ok else f"DELETE {r.status_code}: {r.text[:200]}")
        except Exception as exc:
            log.add(started, "end", label, False, describe(exc))
