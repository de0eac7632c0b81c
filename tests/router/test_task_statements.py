"""`task_create` and `task_update` are one SQL statement each, seen on the wire to Postgres.

The fleet (real supervisord) reaches this run's database through a TCP proxy of the test's
own (tests/fakes/tcp_proxy.py) that hands it every byte the instances send; the frontend
messages of the Postgres protocol are read from them (a Parse names a statement's text, a Bind
and an Execute run it, a Query runs text directly). An SDK client calls the tools through the
router; what the instance executed while each call was on its way is counted.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.fakes.tcp_proxy import TcpProxy
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, call, mcp_client

pytestmark = pytest.mark.timeout(120)

_UNTYPED = {80877103, 80877104}  # SSLRequest, GSSENCRequest: the startup message follows


class Wire:
    """Postgres frontend messages per connection: (time, connection, statement text) for every
    statement executed (an Execute, with the text its Bind's statement was parsed from, or a
    simple Query)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executed: list[tuple[float, int, str]] = []
        self._buf: dict[int, bytes] = {}
        self._started: set[int] = set()
        self._parsed: dict[tuple[int, str], str] = {}
        self._bound: dict[tuple[int, str], str] = {}

    def tap(self, conn: int, data: bytes) -> None:
        with self.lock:
            buf = self._buf.get(conn, b"") + data
            while True:
                if conn not in self._started:
                    if len(buf) < 8:
                        break
                    (length, code) = struct.unpack("!ii", buf[:8])
                    if len(buf) < length:
                        break
                    buf = buf[length:]
                    if code not in _UNTYPED:
                        self._started.add(conn)
                    continue
                if len(buf) < 5:
                    break
                kind = buf[:1]
                (length,) = struct.unpack("!i", buf[1:5])
                if len(buf) < 1 + length:
                    break
                self._message(conn, kind, buf[5 : 1 + length])
                buf = buf[1 + length :]
            self._buf[conn] = buf

    def _message(self, conn: int, kind: bytes, body: bytes) -> None:
        now = time.time()
        if kind == b"P":  # Parse: statement name, query text, ...
            name, query = body.split(b"\0")[:2]
            self._parsed[(conn, name.decode())] = query.decode(errors="replace")
        elif kind == b"B":  # Bind: portal name, statement name, ...
            portal, statement = body.split(b"\0")[:2]
            self._bound[(conn, portal.decode())] = self._parsed.get((conn, statement.decode()), "?")
        elif kind == b"E":  # Execute: portal name, row limit
            portal = body.split(b"\0")[0].decode()
            self.executed.append((now, conn, self._bound.get((conn, portal), "?")))
        elif kind == b"Q":  # a simple query (BEGIN, COMMIT, ...)
            self.executed.append((now, conn, body.rstrip(b"\0").decode(errors="replace")))

    def between(self, start: float, end: float) -> list[tuple[int, str]]:
        with self.lock:
            return [(conn, text) for when, conn, text in self.executed if start <= when <= end]


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def fleet(
    wire: Wire, pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    parts = urlsplit(pg_dsn)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432, tap=wire.tap).running() as proxy:
        netloc = parts.netloc.rsplit("@", 1)
        auth = netloc[0] + "@" if len(netloc) == 2 else ""
        fl = Fleet(
            tmp_path_factory.mktemp("fleet"),
            database_url=urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{proxy.port}")),
            redis_url=redis_url,
            redis_prefix=f"{redis_prefix}sql{secrets.token_hex(2)}",
            instances=1,
            max_instances=1,
            overrides=ROUTER_TEST_SETTINGS,
        )
        try:
            yield fl.start()
        finally:
            fl.stop()


def _about_tasks(sent: list[tuple[int, str]]) -> list[str]:
    """The statements that touch the task tables, and any transaction control on the path (not
    the outbox relay's look for unstored group task events, which runs on its own schedule)."""
    lowered = [text.lower() for _, text in sent if "link_group is not null" not in text.lower()]
    return [t for t in lowered if "task" in t or t.strip().rstrip(";") in ("begin", "commit", "rollback")]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_task_create_and_update_are_one_statement_each(fleet: Fleet, wire: Wire, mode: str) -> None:
    async with mcp_client(fleet.mcp_url, mode, name=f"sql-{mode}") as client:
        await call(client, "task_create", {"name": "warm-up"})  # first use: statements parsed

        start = time.time()
        task = (await call(client, "task_create", {"name": "counted", "description": "one statement"}))[
            "task"
        ]
        created = _about_tasks(wire.between(start, time.time()))
        assert len(created) == 1 and "insert into tasks" in created[0], created
        assert "task_events" in created[0], created  # the row and its `created` event together

        start = time.time()
        args = {"task_id": task["id"], "expected_version": task["version"], "state": "IN_PROGRESS"}
        updated = (await call(client, "task_update", args))["task"]
        changed = _about_tasks(wire.between(start, time.time()))
        assert updated["state"] == "IN_PROGRESS" and updated["version"] == task["version"] + 1
        assert len(changed) == 1 and "update tasks" in changed[0], changed
        assert "task_events" in changed[0], changed


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_group_task_and_its_link_event_are_one_statement(fleet: Fleet, wire: Wire, mode: str) -> None:
    """A group task's write is one statement too, and records its link-group event in it: the
    change's audit row names the group and the sender (the outbox), so the task, its audit row
    and the duty to tell the group commit together; the event itself is stored after the call
    answered (from the spool, by the flusher), with no second statement on the call's path."""
    group = f"one-{mode.replace('-', '')}"
    async with mcp_client(fleet.mcp_url, mode, name=f"sql-group-{mode}") as client:
        await call(client, "link_join", {"group": group})
        args = {"scope": "group", "group": group}
        await call(client, "task_create", {"name": "warm-up", **args})

        start = time.time()
        task = (await call(client, "task_create", {"name": "counted", **args}))["task"]
        created = _about_tasks(wire.between(start, time.time()))
        assert len(created) == 1 and "insert into tasks" in created[0], created
        assert "task_events" in created[0] and "link_group" in created[0], created

        start = time.time()
        update = {"task_id": task["id"], "expected_version": 1, "state": "IN_PROGRESS", "group": group}
        await call(client, "task_update", update)
        changed = _about_tasks(wire.between(start, time.time()))
        assert len(changed) == 1 and "update tasks" in changed[0], changed
        assert "link_group" in changed[0], changed

        async with asyncio.timeout(10):  # the events are stored a moment after the answers
            while (await call(client, "link_status", {"group": group}))["head"] < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        events = (await call(client, "link_status", {"group": group}))["head"]
        assert events == 4  # the join, the warm-up, the create and the update: ids 1-4, no gap
