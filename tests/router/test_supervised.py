"""The router in a fleet run by real supervisord (the `exai up` path): spares, kill -9, restart.

Five instances autostarted, a sixth provisioned as a spare. Sessions stay open throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any

import aiohttp
import pytest

from common.fleet.supervisor import pid_alive
from tests.fakes.provider import Behaviour, FakeProvider
from tests.router.conftest import mcp_client, status_of

pytestmark = pytest.mark.timeout(180)


async def _admin(fleet: Any, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.get(fleet.router_url + path, headers=fleet.admin_headers()) as r,
    ):
        assert r.status == 200
        return await r.json()


async def test_spare_kill9_and_router_restart_under_supervisord(
    fleet_factory: Callable[..., Any], provider: FakeProvider
) -> None:
    fleet = await asyncio.to_thread(
        fleet_factory,
        instances=5,
        max_instances=6,
        allocation_deadline=30.0,
        autostart_spares=True,
        heartbeat_interval=0.5,
        heartbeat_ttl=2.0,
        session_park_after=600.0,  # this test is about spares, kill -9 and restarts, not parking
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        log_level="INFO",
    )
    modes = ["legacy", "2026-07-28", "legacy", "2026-07-28", "legacy", "legacy"]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(mcp_client(fleet.mcp_url, mode, name=f"sup-{i}"))
            for i, mode in enumerate(modes[:5])
        ]
        first = [await status_of(c) for c in clients]
        assert len({s["instance_id"] for s in first}) == 5

        # A sixth session while five work (slow chats): the router starts the provisioned spare.
        gate = threading.Event()
        provider.reset(Behaviour(gate=gate))
        chats = [asyncio.create_task(c.call_tool("chat", {"prompt": "busy"})) for c in clients]
        while provider.active() < 5:  # noqa: ASYNC110 - the provider runs in its own thread
            await asyncio.sleep(0.05)
        sixth = await stack.enter_async_context(mcp_client(fleet.mcp_url, "legacy", name="sup-5"))
        s6 = await status_of(sixth)
        gate.set()
        assert all(not r.is_error for r in await asyncio.gather(*chats))
        provider.reset()
        assert s6["instance_id"] == fleet.instance_id(6)
        clients.append(sixth)
        first.append(s6)
        metrics = await _metrics(fleet)
        assert "exai_router_spares_started_total 1" in metrics

        # kill -9 the instance under a live handshake session: supervisord restarts it and the
        # client's next call succeeds with the same session id.
        victim = first[0]
        pid = await asyncio.to_thread(fleet.kill_instance, int(victim["instance_id"].rsplit("_", 1)[1]))
        for _ in range(500):  # until the kernel has closed the dead process's sockets
            if not pid_alive(pid):
                break
            await asyncio.sleep(0.02)
        # The client's next call comes once the fleet has seen the crash (the registry no longer
        # shows the dead pid). A call racing the kill itself may have been written into the
        # dying connection, which no proxy can tell from a call the instance was running, so
        # it gets the instance_lost error instead (tests/router/test_failures.py).
        for _ in range(500):
            listed = (await _admin(fleet, "/admin/instances"))["instances"]
            if all(str(i["pid"]) != str(pid) for i in listed):  # registry pids are strings
                break
            await asyncio.sleep(0.02)
        again = await status_of(clients[0])
        assert again["session"] == victim["session"] and again["pid"] != victim["pid"]
        first[0] = again

        # Router restart under supervisord: every session continues where it was.
        await asyncio.to_thread(fleet.restart_router)
        after = [await status_of(c) for c in clients]
        assert [s["session"] for s in after] == [s["session"] for s in first]
        assert all(s["bound_session"] == s["session"] for s in after)
        # At most one session changed instance: the kill -9 victim's rebind may have parked
        # the longest-idle session to take its instance instead of waiting for the restart.
        assert sum(a["instance_id"] != b["instance_id"] for a, b in zip(after, first, strict=True)) <= 1
        body = await _admin(fleet, "/admin/sessions")
        assert {s["id"] for s in body["sessions"]} == {s["session"] for s in after}

        # The CLI shows the same through the admin API.
        table = await _exai(fleet, "sessions")
        assert all(s["session"] in table for s in after) and "INSTANCE" in table
        status = await _exai(fleet, "status")
        # Every session is listed, bound or parked (the kill -9 victim's rebind may have parked one).
        counts = re.search(r"sessions: (\d+) bound(?:, (\d+) parked)?", status)
        assert counts is not None, status
        assert int(counts[1]) + int(counts[2] or 0) == 6, status
        # `exai status` lists the bound ones by instance. Which ones are bound is not fixed: the
        # loop above resumes any session the victim's rebind parked, and a resume on a full
        # fleet parks the longest-idle session (that can be after[0], the first one called).
        bound = [s["id"] for s in (await _admin(fleet, "/admin/sessions"))["sessions"] if s["instance"]]
        assert len(bound) == int(counts[1]), (bound, status)
        assert all(sid in status for sid in bound), status


async def _metrics(fleet: Any) -> str:
    async with aiohttp.ClientSession() as http, http.get(fleet.router_url + "/metrics") as r:
        return await r.text()


async def _exai(fleet: Any, *args: str) -> str:
    st = fleet.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_")}
    env.update(
        EXAI_STATE_DIR=str(st.state_dir),
        EXAI_ROUTER_PORT=str(st.router_port),
        EXAI_INSTANCE_BASE_PORT=str(st.instance_base_port),
        EXAI_MAX_INSTANCES=str(st.max_instances),
        EXAI_INSTANCES=str(st.instances),
        EXAI_REDIS_PREFIX=st.redis_prefix,
        REDIS_URL=st.redis_url or "",
        DATABASE_URL=st.database_url or "",
    )
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "exai"), *args, env=env, stdout=PIPE, stderr=PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()
