"""A whole fleet under real supervisord, on free ports in a temporary state folder, for tests.

    fleet = Fleet(tmp_path / "state", database_url=..., redis_url=..., redis_prefix="t1")
    with fleet:                      # start(): same path as `exai up`, then wait for registrations
        httpx.post(fleet.mcp_url, ...)
        fleet.kill_instance(1)       # SIGKILL; supervisord restarts it
    # stop(): `supervisorctl shutdown`, then the fleet's Redis keys are deleted

Tests normally get one from the `fleet` / `fleet_factory` / `module_fleet_factory` fixtures in
conftest.py. Control methods are blocking (call them through `asyncio.to_thread` from async
tests); the router-facing helpers (`admin`, `end_all_sessions`, `wait_instances`) are async.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import redis as redis_sync

from common.errors import FleetControlError, SupervisorFault
from common.fleet.launch import launch, wait_healthz
from common.fleet.registry import registered_instances
from common.fleet.scale import ScaleReport, scale
from common.fleet.services import admin_token, internal_token
from common.fleet.supervisor import (
    ProcessInfo,
    SupervisorClient,
    SupervisorControl,
    fleet_environment,
    pid_alive,
)
from common.keys import Keys
from common.protocol import MCP_PATH, PROBE_READY, instance_process_name, registry_id
from common.settings import Settings, load_settings
from tests import loopstalls
from tests.ports import free_port, free_port_block

BENCH_SETTINGS: dict[str, Any] = {"loop_stall_ms": 100.0, "loop_audit": False}
"""What a benchmark's fleet runs with instead of the tests' diagnostics: the loop watchdog at its
production default and no audit hook (which sees every audited event of the process)."""


def run_bench(main: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """`asyncio.run(main())` for a benchmark script, with SIGTERM taken as Ctrl-C.

    By default SIGTERM ends the interpreter at once, without the `finally` blocks that stop the
    benchmark's fleet, its nginx and its scratch database: supervisord and its instances were
    left running, and kept loading the machine of the next run. Here the main task is
    cancelled instead, so the same cleanup runs as after Ctrl-C. Exits 143 (128 + SIGTERM)."""

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await main() or 0
        except asyncio.CancelledError:
            print("stopped by SIGTERM: the fleet is stopped; this run saved no results", file=sys.stderr)
            return 143

    return asyncio.run(guarded())


class Fleet:
    """Router + instances under supervisord for one test; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        *,
        database_url: str,
        redis_url: str,
        redis_prefix: str,
        instances: int = 2,
        max_instances: int = 4,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "state_dir": state_dir,
            "database_url": database_url,
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "router_port": free_port(),
            "instance_base_port": free_port_block(max_instances),
            "instances": instances,
            "max_instances": max_instances,
            "glm_api_key": None,
            "kimi_api_key": None,
            "log_level": "DEBUG",
            # A low threshold: any blocking call on a loop shows up (tests/loopstalls.py reports them).
            "loop_stall_ms": loopstalls.TEST_STALL_MS,
            "loop_audit": True,  # and every file open, import, subprocess made on a loop
        }
        values.update(overrides or {})
        self.settings: Settings = load_settings(**values)
        self.keys = Keys(self.settings.redis_prefix)
        self.supervisor = SupervisorControl(self.settings.supervisor_socket)
        self._started = False
        self.stalls: list[loopstalls.LoggedStall] = []  # what its processes logged, read at stop()

    # --- addresses and secrets -------------------------------------------------------------
    @property
    def router_url(self) -> str:
        return f"http://{self.settings.router_host}:{self.settings.router_port}"

    @property
    def mcp_url(self) -> str:
        return self.router_url + MCP_PATH

    @property
    def admin_token(self) -> str:
        return admin_token(self.settings)

    @property
    def internal_token(self) -> str:
        return internal_token(self.settings)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def instance_port(self, num: int) -> int:
        return self.settings.instance_port_for(num)

    def instance_id(self, num: int) -> str:
        return instance_process_name(num)

    def environment(self) -> dict[str, str]:
        """The environment supervisord gives the fleet's programs, on top of this process's
        (minus its own EXAI_/GLM_/KIMI_ variables): for running an extra `exai-router` by hand."""
        own = {k: v for k, v in os.environ.items() if not k.startswith(("EXAI_", "GLM_", "KIMI_"))}
        return {**own, **fleet_environment(self.settings)}

    def supervisor_client(self) -> SupervisorClient:
        """A new asyncio client (create it on the test's loop; `await client.close()` after)."""
        return SupervisorClient(self.settings.supervisor_socket)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, *, timeout: float = 60.0) -> Fleet:
        """`exai up`'s path (checks, config, supervisord, router, instances, /healthz), then wait
        until the instances are registered in Redis."""
        launch(self.settings, timeout=timeout)
        self._started = True
        self.wait_registered(self.settings.instances, timeout=timeout)
        return self

    def stop(self) -> None:
        """`supervisorctl shutdown` and wait; then delete this fleet's Redis keys (and collect the
        event loop stalls its processes logged, `self.stalls`)."""
        try:
            self.supervisor.shutdown()
        finally:
            self._started = False
            logs = self.settings.state_dir / "logs"
            if logs.is_dir():
                test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
                self.stalls = loopstalls.read_stalls(logs, test)
                loopstalls.collected.extend(self.stalls)
            client = redis_sync.Redis.from_url(self.settings.redis_url or "", decode_responses=True)
            try:
                for key in client.scan_iter(match=self.keys.pattern(), count=500):
                    client.delete(key)
            except redis_sync.RedisError:
                pass
            finally:
                client.close()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    # --- inspection ------------------------------------------------------------------------
    def processes(self) -> list[ProcessInfo]:
        return self.supervisor.processes()

    def process(self, name: str) -> ProcessInfo:
        return self.supervisor.process(name)

    def running_instances(self) -> list[str]:
        return [p.name for p in self.supervisor.instances() if p.state == "RUNNING"]

    def registered(self) -> set[str]:
        """Ids of instances registered in Redis as ready."""
        return registered_instances(self.settings.redis_url or "", self.settings.redis_prefix)

    def wait_registered(self, count: int | None = None, *, timeout: float = 30.0) -> set[str]:
        """Wait until exactly the RUNNING instances (and `count` of them, if given) are registered."""
        deadline = time.monotonic() + timeout
        while True:
            running = set(self.running_instances())
            ready = self.registered()
            if running == ready and (count is None or len(ready) == count):
                return ready
            if time.monotonic() > deadline:
                raise TimeoutError(f"registered {sorted(ready)}, running {sorted(running)}, wanted {count}")
            time.sleep(0.1)

    def log(self, name: str, length: int = 20000) -> str:
        """The tail of a program's log ("router", "instance_01", ...)."""
        return self.supervisor.tail(name, length)

    # --- control ---------------------------------------------------------------------------
    def scale(self, count: int, *, wait: float | None = None) -> ScaleReport:
        """`exai scale` (blocking): what it started, stopped, parked and cut."""
        return scale(self.settings, self.supervisor, count, wait=wait)

    def start_instance(self, num: int, *, wait: bool = True) -> None:
        name = self.instance_id(num)
        self.supervisor.start(name, wait=False)
        if wait:
            self.supervisor.wait_running([name])

    def stop_instance(self, num: int) -> None:
        """Graceful stop (SIGTERM: the instance drains and deregisters)."""
        self.supervisor.stop(self.instance_id(num), wait=True)

    def restart_instance(self, num: int) -> None:
        self.stop_instance(num)
        self.start_instance(num)

    def kill_instance(self, num: int, sig: int = signal.SIGKILL, *, restart: bool = True) -> int:
        """Send `sig` to the instance (default SIGKILL: no draining, no deregistering).

        supervisord restarts it (autorestart). With `restart=False` the crash is final, like an
        instance that supervisord gave up on: wait until the process is gone, then make sure
        supervisord leaves it stopped (a replacement it already spawned is stopped again).
        Returns the pid that was signalled.
        """
        name = self.instance_id(num)
        pid = self._kill(name, sig)
        if not restart:
            self._wait_dead(pid)
            self._keep_stopped(name)
        return pid

    def _wait_dead(self, pid: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {pid} still alive after {timeout}s")
            time.sleep(0.01)

    def _keep_stopped(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            proc = self.supervisor.process(name)
            if not seen or seen[-1] != proc.state:
                seen.append(proc.state)
            if proc.state == "STOPPED":
                return
            if proc.active:  # autorestart already spawned a replacement (or has not reaped yet)
                try:
                    # An administrative stop (no more restarts); it re-sends SIGTERM to a
                    # replacement that was spawned just as the stop came (common/fleet/supervisor.py).
                    self.supervisor.stop(name, wait=True)
                except SupervisorFault as exc:  # it changed state meanwhile; look again
                    seen.append(f"stop failed: {exc}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not stay stopped: {' -> '.join(seen)}")
            time.sleep(0.02)

    def kill_router(self, sig: int = signal.SIGKILL) -> int:
        return self._kill("router", sig)

    def restart_router(self, *, timeout: float = 30.0) -> None:
        """Stop and start the router; return once it answers /healthz (supervisord's RUNNING
        comes after startsecs, which a loaded machine's imports can outlast)."""
        self.supervisor.stop("router", wait=True)
        self.supervisor.start("router", wait=False)
        self.supervisor.wait_running(["router"])
        self.wait_router_listening(timeout)

    def wait_router_listening(self, timeout: float = 30.0) -> None:
        """Block until the router answers /healthz."""
        wait_healthz(self.settings, self.supervisor, timeout=timeout)

    def _kill(self, name: str, sig: int) -> int:
        pid = self.supervisor.process(name).pid
        if not pid:
            raise RuntimeError(f"{name} is not running")
        self.supervisor.signal(name, int(sig))
        return pid

    def wait_restarted(self, name: str, old_pid: int, *, timeout: float = 30.0) -> int:
        """Wait until supervisord runs `name` again under a new pid; return it."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.supervisor.process(name)
            if proc.state == "RUNNING" and proc.pid and proc.pid != old_pid:
                return proc.pid
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not restarted (state {proc.state}, pid {proc.pid})")
            time.sleep(0.1)

    # --- the router's admin API (async: call from the test's event loop) -----------------------
    async def admin(
        self, method: str, path: str, *, token: str | None = "", router_url: str | None = None
    ) -> tuple[int, Any]:
        """(status, parsed JSON or text) of an admin-API (or /metrics, /healthz) request.

        `token` defaults to the fleet's admin token; None sends no Authorization header.
        `router_url` asks another router of the fleet (an `ExtraRouter`'s url).
        """
        token = self.admin_token if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, (router_url or self.router_url) + path, headers=headers) as r,
        ):
            ctype = r.headers.get("Content-Type", "")
            return r.status, (await r.json() if "json" in ctype else await r.text())

    async def end_all_sessions(self) -> None:
        """End every session through the admin API (instances are reset and freed)."""
        status, body = await self.admin("GET", "/admin/sessions")
        if status == 200:
            for s in body["sessions"]:
                await self.admin("DELETE", f"/admin/sessions/{s['id']}")

    async def wait_instance_ready(self, num: int, *, timeout: float = 40.0) -> None:
        """Until instance `num` itself answers its readiness probe (a restarted instance: the
        registry may still list the killed process's record as ready)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        url = f"http://127.0.0.1:{self.instance_port(num)}{PROBE_READY}"
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return
                if loop.time() > deadline:
                    raise TimeoutError(f"instance {num} not ready at {url} after {timeout:g}s")
                await asyncio.sleep(0.2)

    async def wait_instances(self, count: int, *, timeout: float = 40.0) -> list[dict[str, Any]]:
        """Until the router's admin API lists at least `count` ready instances."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status, body = await self.admin("GET", "/admin/instances")
            ready = [i for i in body.get("instances", []) if i["state"] == "ready"] if status == 200 else []
            if len(ready) >= count:
                return ready
            if loop.time() > deadline:
                raise TimeoutError(f"only {len(ready)} of {count} instances ready: {body}")
            await asyncio.sleep(0.2)


class ExtraRouter:
    """Another `exai-router` process on its own port, against the fleet's Redis, prefix and
    supervisord (as a router on another machine would run): a second router of the fleet.

    Not supervised, so a test can SIGKILL it and see it stay dead. Its log is `log_path`.
    """

    def __init__(self, fleet: Fleet, *, port: int | None = None) -> None:
        self.fleet = fleet
        self.port = port or free_port()
        self.log_path = fleet.settings.state_dir / "logs" / f"router-extra-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def router_url(self) -> str:
        return f"http://{self.fleet.settings.router_host}:{self.port}"

    @property
    def mcp_url(self) -> str:
        return self.router_url + MCP_PATH

    def start(self, *, timeout: float = 30.0) -> ExtraRouter:
        env = {
            **self.fleet.environment(),
            "EXAI_ROUTER_PORT": str(self.port),
            "EXAI_INTERNAL_TOKEN": self.fleet.internal_token,
            "EXAI_ADMIN_TOKEN": self.fleet.admin_token,
        }
        exe = str(Path(sys.executable).parent / "exai-router")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([exe], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the extra router exited: {self.log()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.router_url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"the extra router did not answer: {self.log()[-2000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    async def admin(self, method: str, path: str) -> tuple[int, Any]:
        return await self.fleet.admin(method, path, router_url=self.router_url)

    def __enter__(self) -> ExtraRouter:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class InstanceHost:
    """Another machine of a fleet: its own supervisord running only instances, on `address`.

    The instances listen on `address` (127.0.0.2, 127.0.0.3, ... stand in for other hosts'
    addresses), advertise it in the fleet's Redis registry, use the fleet's Postgres, Redis and
    internal token, and are routed to by the fleet's router like local ones. The router
    program is in the rendered config (same template) but never started here.

        with InstanceHost(fleet, tmp_path / "host2", "127.0.0.2", instances=2) as host:
            ...
            host.kill()   # the whole host at once: supervisord and its instances, SIGKILL
    """

    def __init__(self, fleet: Fleet, state_dir: Path, address: str, *, instances: int = 2) -> None:
        values: dict[str, Any] = {name: getattr(fleet.settings, name) for name in Settings.model_fields}
        values.update(
            state_dir=state_dir,
            instance_host=address,
            instance_advertise_host=address,
            instance_base_port=free_port_block(instances),
            instances=instances,
            max_instances=instances,
            internal_token=fleet.internal_token,
            admin_token=fleet.admin_token,
            router_port=free_port(),  # never listened on
        )
        self.fleet = fleet
        self.address = address
        self.settings: Settings = load_settings(**values)
        self.supervisor = SupervisorControl(self.settings.supervisor_socket)
        self.names: list[str] = []
        self._alive = False

    def instance_id(self, num: int) -> str:
        """The registry id of this host's instance `num` (instance_01@127.0.0.2)."""
        return registry_id(instance_process_name(num), self.address)

    def instance_port(self, num: int) -> int:
        return self.settings.instance_port_for(num)

    def start(self, *, timeout: float = 60.0) -> InstanceHost:
        from common.fleet.launch import render, start_supervisord, wait_registered
        from common.fleet.services import prepare_state, services_for

        prepare_state(self.settings)
        services = services_for(self.settings)
        conf = render(self.settings, services)
        ctl = start_supervisord(self.settings, conf)
        self._alive = True
        try:
            self.names = ctl.start_instances(range(1, self.settings.instances + 1))
            ctl.wait_running(self.names, timeout=timeout)
            wait_registered(
                services.redis_url,
                self.settings.redis_prefix,
                self.names,
                ctl,
                timeout=timeout,
                host=self.address,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self) -> list[int]:
        """The host disappears: SIGKILL to supervisord first (so it restarts nothing), then to
        every instance. Nothing drains or deregisters. Returns the pids killed."""
        pids = [self.supervisor.pid()] + [p.pid for p in self.supervisor.instances() if p.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(pid_alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pids {pids} still alive")
            time.sleep(0.02)
        self._alive = False
        return pids

    def stop(self) -> None:
        if self._alive:
            self._alive = False
            with contextlib.suppress(FleetControlError, OSError):
                self.supervisor.shutdown()

    def __enter__(self) -> InstanceHost:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
