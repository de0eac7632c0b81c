"""The fleet end to end under real supervisord: `exai up`, scale, down, up again; the fixture."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from common.fleet.supervisor import SupervisorControl, pid_alive
from tests.fleet import Fleet
from tests.ports import free_port, free_port_block
from tests.test_cli import exai


async def call_version(mcp_url: str, tool: str = "version") -> dict[str, Any]:
    """An MCP SDK client calls the `version` tool (or `tool`) through the router."""
    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(30.0)) as http,
        Client(streamable_http_client(mcp_url, http_client=http)) as client,
    ):
        result = await client.call_tool(tool, {})
        assert not result.is_error, result
        assert result.structured_content is not None
        return dict(result.structured_content)


def admin_get(fleet_url: str, token: str, path: str) -> Any:
    req = urllib.request.Request(fleet_url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def pids(ctl: SupervisorControl) -> dict[str, int]:
    return {p.name: p.pid for p in ctl.instances() if p.state == "RUNNING"}


def test_exai_up_scale_down_up_with_embedded_services(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_") and "_URL" not in k}
    env.update(
        EXAI_STATE_DIR=str(state),
        EXAI_ROUTER_PORT=str(free_port()),
        EXAI_INSTANCE_BASE_PORT=str(free_port_block(3)),
        EXAI_EMBEDDED_PG_PORT=str(free_port()),
        EXAI_EMBEDDED_REDIS_PORT=str(free_port()),
        EXAI_INSTANCES="2",
        EXAI_MAX_INSTANCES="3",
    )
    router = f"http://127.0.0.1:{env['EXAI_ROUTER_PORT']}"
    pg_dsn = f"postgresql://postgres@127.0.0.1:{env['EXAI_EMBEDDED_PG_PORT']}/exai"
    ctl = SupervisorControl(state / "supervisor.sock")
    try:
        up = exai("up", env=env)
        assert up.returncode == 0, up.stderr
        assert f"{router}/mcp" in up.stdout
        assert "supervisorctl -c" in up.stdout
        admin_token = (state / "admin_token").read_text().strip()
        assert admin_token in up.stdout

        # supervisorctl works on the rendered config
        sctl = subprocess_run(
            [Path(sys.executable).parent / "supervisorctl", "-c", state / "supervisord.conf", "status"]
        )
        assert "router" in sctl and "instances:instance_01" in sctl

        assert set(pids(ctl)) == {"instance_01", "instance_02"}
        assert asyncio.run(call_version(f"{router}/mcp"))

        status = exai("status", env=env)
        assert status.returncode == 0
        assert "postgres" in status.stdout and "redis" in status.stdout

        # again: idempotent, says so
        again = exai("up", env=env)
        assert again.returncode == 0 and "already running" in again.stdout

        before = pids(ctl)
        assert exai("scale", "3", env=env).returncode == 0
        after = pids(ctl)
        assert set(after) == {"instance_01", "instance_02", "instance_03"}
        assert {k: after[k] for k in before} == before  # nothing restarted

        # Idle instances stop first, highest-numbered first (common/fleet/supervisor.plan_scale);
        # the version call's session may still be bound to either of the first two.
        listed = admin_get(router, admin_token, "/admin/instances")["instances"]
        bound = [i["id"] for i in listed if i["session"]]
        assert len(bound) <= 1, bound
        kept = bound[0] if bound else "instance_01"
        assert exai("scale", "1", env=env).returncode == 0
        assert pids(ctl) == {kept: before[kept]}

        too_many = exai("scale", "4", env=env)
        assert too_many.returncode == 2 and "EXAI_MAX_INSTANCES" in too_many.stderr
        assert len(too_many.stderr.strip().splitlines()) == 1

        asyncio.run(_pg(pg_dsn, "INSERT INTO sessions (id) VALUES ('kept-across-restart')"))
        supervisord_pid = ctl.pid()
        down = exai("down", env=env)
        assert down.returncode == 0, down.stderr
        assert not ctl.is_running()
        assert not pid_alive(supervisord_pid)

        up2 = exai("up", env=env)
        assert up2.returncode == 0, up2.stderr
        assert asyncio.run(_pg(pg_dsn, "SELECT count(*) FROM sessions WHERE id = 'kept-across-restart'")) == 1
        assert len(pids(ctl)) == 2
    finally:
        exai("down", env=env)


def test_fleet_fixture_controls_a_real_fleet(fleet_factory: Callable[..., Fleet]) -> None:
    # An admin token with characters supervisord's config treats specially still arrives intact.
    fleet = fleet_factory(instances=2, max_instances=3, admin_token="t%ok,en=1", instance_nice=3)
    assert fleet.wait_registered(2) == {"instance_01", "instance_02"}
    # EXAI_INSTANCE_NICE: every thread of an instance runs that much nicer; the router does not.
    for name in ("instance_01", "router"):
        pid = fleet.process(name).pid
        nices = {_nice(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")}
        assert nices == ({3} if name != "router" else {_nice(os.getpid())}), (name, nices)
    listed = admin_get(fleet.router_url, "t%ok,en=1", "/admin/instances")
    assert {i["id"] for i in listed["instances"]} == {"instance_01", "instance_02"}
    assert asyncio.run(call_version(fleet.mcp_url))
    # Startup's objects go to the collector's permanent generation once the tokenizers are in
    # (common/gcpauses.py): the instance's `status` and the router's /metrics say so.
    deadline = time.monotonic() + 30
    while not (gc_state := asyncio.run(call_version(fleet.mcp_url, "status"))["gc"])["frozen_objects"]:
        assert time.monotonic() < deadline, gc_state
        time.sleep(0.5)
    assert [g["collections"] >= 0 for g in gc_state["generations"]] == [True, True, True]
    with urllib.request.urlopen(fleet.router_url + "/metrics", timeout=10) as resp:
        frozen = [ln for ln in resp.read().decode().splitlines() if ln.startswith("exai_gc_frozen_objects ")]
    assert frozen and int(frozen[0].split()[1]) > 0, frozen

    old = fleet.kill_instance(1, signal.SIGKILL)
    assert fleet.wait_restarted("instance_01", old) != old

    running = pids(fleet.supervisor)
    fleet.scale(3)
    assert fleet.wait_registered(3) == {"instance_01", "instance_02", "instance_03"}
    assert {k: pids(fleet.supervisor)[k] for k in running} == running


def _nice(pid: int, tid: int | str | None = None) -> int:
    """A process's (or one of its threads') niceness, from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


async def _pg(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def subprocess_run(argv: list[Any]) -> str:
    import subprocess

    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False).stdout
