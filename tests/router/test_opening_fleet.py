"""A new session's Redis round trips, seen from Redis itself, on a fleet just started.

tests/router/test_opening.py counts the opening's commands in-process; here Redis's MONITOR
shows what a real router process (under supervisord, started by `exai up`'s path) sends while
a new 2026-07-28 session's first call is on its way: one script that checks the session key,
leases a free instance with its fencing token, claims the key and writes the record. Only the
router's own connections count (found from /proc: its sockets to Redis), and only commands
about allocation and this session, so the router's background rounds do not blur the count.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_sync

from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS

pytestmark = pytest.mark.timeout(120)

VERSION = "2026-07-28"


def _local_ports_to(pid: int, remote_port: int) -> set[int]:
    """Local ports of `pid`'s TCP connections to 127.0.0.1:`remote_port` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


class Monitor:
    """Redis's MONITOR in a thread: every command with its client's port and time."""

    def __init__(self, url: str) -> None:
        self.client = redis_sync.Redis.from_url(url, decode_responses=True)
        self.seen: list[tuple[float, int | None, str]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as mon:
            self.ready.set()
            for cmd in mon.listen():
                port = cmd.get("client_port")
                self.seen.append((time.time(), int(port) if port else None, str(cmd["command"])))
                if self.stop.is_set():
                    return

    def __enter__(self) -> Monitor:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.client.ping()  # one more command wakes the loop to see the stop
        self.thread.join(10)
        self.client.close()


@pytest.fixture
def fleet(fleet_factory: Callable[..., Fleet]) -> Fleet:
    fleet: Fleet = fleet_factory(instances=2, max_instances=2, **ROUTER_TEST_SETTINGS)
    return fleet


async def test_the_first_new_session_after_start_is_one_redis_round_trip(fleet: Fleet) -> None:
    # Instances register after the router has started (supervisord starts it first): the
    # router must still know them by the time a client comes, without a request to make it look.
    await asyncio.sleep(5 * ROUTER_TEST_SETTINGS["heartbeat_interval"])  # its registry rounds
    router_pid = (await asyncio.to_thread(fleet.process, "router")).pid
    redis_port = int(str(fleet.settings.redis_url).rsplit(":", 1)[1].split("/")[0])
    prefix = fleet.settings.redis_prefix
    name = "first-after-start"
    body = {
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {
            "name": "version", "arguments": {},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": VERSION,
                "io.modelcontextprotocol/clientInfo": {"name": name, "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }  # fmt: skip
    headers = {
        "Accept": "application/json, text/event-stream", "Content-Type": "application/json",
        "MCP-Protocol-Version": VERSION,
        "Mcp-Method": "tools/call", "Mcp-Name": "version",
    }  # fmt: skip
    with Monitor(str(fleet.settings.redis_url)) as monitor:
        async with aiohttp.ClientSession() as http:
            started = time.time()
            async with http.post(fleet.mcp_url, data=json.dumps(body), headers=headers) as r:
                text = await r.text()
            ended = time.time()
        assert r.status == 200, text
        assert "result" in json.loads(text), text
    ports = _local_ports_to(router_pid, redis_port)
    about = (f"{prefix}:instances", f"{prefix}:draining", f"{prefix}:lease", f"{prefix}:instance:", name)
    sent = [
        cmd
        for when, port, cmd in monitor.seen
        if started <= when <= ended and port in ports and any(word in cmd for word in about)
    ]
    assert len(sent) == 1 and sent[0].startswith("EVALSHA"), sent
