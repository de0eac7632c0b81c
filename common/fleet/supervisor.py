"""supervisord for the fleet: the rendered config, and XML-RPC clients over its unix socket.

`exai up` renders deploy/supervisord.conf.tmpl into the state folder; `exai status|scale|down`
and the tests drive supervisord with `SupervisorControl` (blocking). The router starts spare
instances with `SupervisorClient`, the asyncio twin, which never blocks its event loop.
Both speak plain XML-RPC (xmlrpc.client encodes and decodes) over HTTP on the unix socket.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shlex
import socket
import string
import sys
import time
import xmlrpc.client
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import PROJECT_ROOT
from common.errors import ConfigError, FleetControlError, SupervisorFault, SupervisorUnavailable
from common.protocol import INSTANCE_PROGRAM, SUPERVISOR_GROUP, instance_process_name
from common.settings import Settings

TEMPLATE_PATH = PROJECT_ROOT / "deploy" / "supervisord.conf.tmpl"
RPC_PATH = "/RPC2"

#: Process states in which a process occupies its slot (running, or about to).
ACTIVE_STATES = frozenset({"STARTING", "RUNNING", "BACKOFF"})
#: States a process only leaves when someone starts it again.
DEAD_STATES = frozenset({"STOPPED", "EXITED", "FATAL", "UNKNOWN"})
# How often a stop re-sends SIGTERM to an instance that is still alive (see `_resignal`).
RESIGNAL_EVERY = 1.0

# supervisor.xmlrpc.Faults codes we treat as "already done".
_ALREADY_STARTED = 60
_NOT_RUNNING = 70


# --- process information ---------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessInfo:
    """One supervisord process, as getAllProcessInfo reports it."""

    name: str
    group: str
    state: str
    pid: int
    description: str
    start: float
    now: float
    exit_status: int
    spawn_error: str

    @classmethod
    def from_rpc(cls, d: Mapping[str, Any]) -> ProcessInfo:
        return cls(
            name=str(d["name"]),
            group=str(d["group"]),
            state=str(d["statename"]),
            pid=int(d.get("pid") or 0),
            description=str(d.get("description", "")),
            start=float(d.get("start") or 0),
            now=float(d.get("now") or 0),
            exit_status=int(d.get("exitstatus") or 0),
            spawn_error=str(d.get("spawnerr", "")),
        )

    @property
    def full_name(self) -> str:
        return f"{self.group}:{self.name}"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def uptime(self) -> float | None:
        return self.now - self.start if self.state == "RUNNING" and self.start else None

    @property
    def is_router(self) -> bool:
        """A router process ("router", or "router:router_N" when several share the port)."""
        return self.group == "router"

    @property
    def instance_num(self) -> int | None:
        """The instance number (1-based) for members of the instance group, else None."""
        if self.group != SUPERVISOR_GROUP:
            return None
        match = re.fullmatch(rf"{INSTANCE_PROGRAM}_(\d+)", self.name)
        return int(match.group(1)) if match else None


def full_name(name: str) -> str:
    """supervisord's "group:process" name for a bare name ("router", "instance_03")."""
    if ":" in name:
        return name
    if name.startswith(INSTANCE_PROGRAM + "_"):
        return f"{SUPERVISOR_GROUP}:{name}"
    return f"{name}:{name}"


def router_names(settings: Settings) -> list[str]:
    """supervisord's names of the router processes (EXAI_ROUTER_PROCESSES of them)."""
    if settings.router_processes == 1:
        return ["router"]
    return [f"router:router_{n}" for n in range(1, settings.router_processes + 1)]


def instances_of(infos: Iterable[ProcessInfo]) -> list[ProcessInfo]:
    """The instance-group members, ordered by instance number."""
    members = [p for p in infos if p.instance_num is not None]
    return sorted(members, key=lambda p: p.instance_num or 0)


@dataclass(frozen=True)
class ScalePlan:
    """What to start and stop (process names) to reach a target instance count."""

    start: tuple[str, ...]
    stop: tuple[str, ...]


def plan_scale(infos: Iterable[ProcessInfo], target: int, busy: Collection[str] = ()) -> ScalePlan:
    """Start the lowest-numbered stopped instances, or stop idle highest-numbered ones first.

    Running instances that stay are never touched. `busy` holds the names of instances bound
    to a session; they are stopped only when there are not enough idle ones.
    """
    members = instances_of(infos)
    active = [p for p in members if p.active]
    if target > len(members):
        raise FleetControlError(f"cannot run {target} instances: only {len(members)} are provisioned")
    if target >= len(active):
        idle = [p for p in members if not p.active]
        return ScalePlan(start=tuple(p.name for p in idle[: target - len(active)]), stop=())
    by_preference = sorted(active, key=lambda p: (p.name in busy, -(p.instance_num or 0)))
    return ScalePlan(start=(), stop=tuple(p.name for p in by_preference[: len(active) - target]))


# --- rendering -------------------------------------------------------------------------------
def _first_alias(name: str) -> str:
    from pydantic import AliasChoices

    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias) if alias else name.upper()


def _as_env(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        sep = ":" if value and isinstance(value[0], Path) else ","
        return sep.join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


#: Per-process settings that must not be shared by every program.
_PER_PROCESS = frozenset({"instance_id", "instance_port", "instance_num"})


def fleet_environment(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment every program gets: all settings as their env vars, plus `overrides`.

    Everything is explicit so that the programs do not depend on the shell or a `.env` file.
    """
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name in _PER_PROCESS or value is None:
            continue
        env[_first_alias(name)] = _as_env(value)
    env["EXAI_STATE_DIR"] = str(settings.state_dir.resolve())
    env.update(overrides)
    return env


def _escape(value: str, rounds: int = 1) -> str:
    """Escape a value for a supervisord config file (its own %-interpolation, `rounds` times)."""
    return value.replace("%", "%" * (2**rounds))


def _environment_line(env: Mapping[str, str]) -> str:
    """The [supervisord] environment= value. supervisord %-expands that line twice."""
    parts = []
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{key}: not a valid environment variable name")
        if any(c in value for c in '"\r\n') or value[:1] == "'" or value[-1:] == "'":
            raise ConfigError(
                f"{key}: contains a double quote, a newline or an edge single quote, "
                "which supervisord cannot pass to the fleet; choose another value"
            )
        parts.append(f'{key}="{_escape(value, rounds=2)}"')
    return ",".join(parts)


def _command(argv: list[str]) -> str:
    return _escape(shlex.join(argv))


def render_config(
    settings: Settings,
    environment: Mapping[str, str],
    *,
    postgres_command: list[str] | None = None,
    postgres_user: str | None = None,
    redis_command: list[str] | None = None,
    bin_dir: Path | None = None,
    template: str | None = None,
) -> str:
    """The supervisord config text. Embedded programs are included when their command is given."""
    text = template if template is not None else TEMPLATE_PATH.read_text(encoding="utf-8")
    for block, keep in (("postgres", postgres_command is not None), ("redis", redis_command is not None)):
        if not keep:
            text = re.sub(rf";; begin {block}\n.*?;; end {block}\n\n?", "", text, flags=re.DOTALL)
    bins = bin_dir if bin_dir is not None else Path(sys.executable).parent
    state_dir = settings.state_dir.resolve()
    if "%" in str(state_dir):
        raise ConfigError(f"EXAI_STATE_DIR: {state_dir} contains '%', which supervisord cannot use")
    values = {
        "conf_path": _escape(str(settings.supervisor_conf.resolve())),
        "socket": _escape(str(settings.supervisor_socket.resolve())),
        "state_dir": _escape(str(state_dir)),
        "environment": _environment_line(environment),
        "router_command": _command([str(bins / "exai-router")]),
        "router_processes": str(settings.router_processes),
        "router_process_name": (
            "%(program_name)s" if settings.router_processes == 1 else "router_%(process_num)d"
        ),
        "instance_command": _command([str(bins / "exai-instance")]),
        "instance_program": INSTANCE_PROGRAM,
        "group": SUPERVISOR_GROUP,
        "max_instances": str(settings.max_instances),
        "instance_stopwaitsecs": str(int(settings.drain_timeout) + 10),
        "postgres_command": _command(postgres_command or []),
        "postgres_user": f"user={postgres_user}" if postgres_user else "",
        "redis_command": _command(redis_command or []),
    }
    return string.Template(text).substitute(values)


def write_config(settings: Settings, text: str) -> Path:
    """Write the rendered config (mode 0600: it holds tokens and keys) and return its path."""
    path = settings.supervisor_conf
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --- XML-RPC codec ---------------------------------------------------------------------------
def _encode(method: str, params: tuple[Any, ...]) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode("utf-8")


def _decode(method: str, body: bytes) -> Any:
    try:
        (result,), _ = xmlrpc.client.loads(body, use_builtin_types=True)
    except xmlrpc.client.Fault as fault:
        message = f"supervisord refused {method}: {fault.faultString}"
        raise SupervisorFault(message, fault=fault.faultCode) from None
    return result


def _fault_code(exc: SupervisorFault) -> int | None:
    code = exc.details.get("fault")
    return int(code) if code is not None else None


# --- async client (router) -------------------------------------------------------------------
class SupervisorClient:
    """asyncio XML-RPC client for supervisord's unix socket; safe to use on the router's loop.

    Create it inside a running loop (e.g. in a lifespan) and `await close()` when done, or use
    `async with`.
    """

    def __init__(self, socket_path: Path, *, timeout: float = 60.0) -> None:
        import aiohttp

        self.socket_path = Path(socket_path)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=str(self.socket_path))
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def __aenter__(self) -> SupervisorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, *params: Any) -> Any:
        import aiohttp

        try:
            url = f"http://localhost{RPC_PATH}"
            body = _encode(method, params)
            async with self._client().post(url, data=body, headers={"Content-Type": "text/xml"}) as resp:
                if resp.status != 200:
                    raise SupervisorFault(f"supervisord answered HTTP {resp.status} to {method}")
                body = await resp.read()
        except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
            where = self.socket_path
            raise SupervisorUnavailable(f"supervisord is not reachable at {where} ({exc})") from None
        return _decode(method, body)

    async def is_running(self) -> bool:
        try:
            state = await self.call("supervisor.getState")
        except SupervisorUnavailable:
            return False
        return bool(state.get("statename") == "RUNNING")

    async def processes(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_rpc(d) for d in await self.call("supervisor.getAllProcessInfo")]

    async def instances(self) -> list[ProcessInfo]:
        return instances_of(await self.processes())

    async def start(self, name: str, *, wait: bool = False) -> bool:
        """Start a process; False if it was already running. `wait` waits for RUNNING."""
        try:
            return bool(await self.call("supervisor.startProcess", full_name(name), wait))
        except SupervisorFault as exc:
            if _fault_code(exc) == _ALREADY_STARTED:
                return False
            raise

    async def stop(self, name: str, *, wait: bool = True) -> bool:
        """Stop a process (SIGTERM, then SIGKILL after stopwaitsecs); False if it was not running."""
        try:
            return bool(await self.call("supervisor.stopProcess", full_name(name), wait))
        except SupervisorFault as exc:
            if _fault_code(exc) == _NOT_RUNNING:
                return False
            raise

    async def start_spare(self) -> str | None:
        """Start the lowest-numbered stopped instance; its process name, or None if none is left.

        Returns as soon as supervisord has spawned it; the caller waits for it to register.
        """
        for proc in await self.instances():
            if proc.active:
                continue
            if await self.start(proc.name, wait=False):
                return proc.name
        return None


# --- blocking client (CLI, tests) ------------------------------------------------------------
class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SupervisorControl:
    """Blocking XML-RPC client for supervisord's unix socket, for `exai` and the tests."""

    def __init__(self, socket_path: Path, *, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def call(self, method: str, *params: Any) -> Any:
        conn = _UnixHTTPConnection(str(self.socket_path), self.timeout)
        try:
            conn.request("POST", RPC_PATH, body=_encode(method, params), headers={"Content-Type": "text/xml"})
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            raise SupervisorUnavailable(
                f"supervisord is not reachable at {self.socket_path} ({exc.strerror or exc})"
            ) from None
        finally:
            conn.close()
        if resp.status != 200:
            raise SupervisorFault(f"supervisord answered HTTP {resp.status} to {method}")
        return _decode(method, body)

    def is_running(self) -> bool:
        try:
            state = self.call("supervisor.getState")
        except SupervisorUnavailable:
            return False
        return bool(state.get("statename") == "RUNNING")

    def pid(self) -> int:
        return int(self.call("supervisor.getPID"))

    def processes(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_rpc(d) for d in self.call("supervisor.getAllProcessInfo")]

    def process(self, name: str) -> ProcessInfo:
        return ProcessInfo.from_rpc(self.call("supervisor.getProcessInfo", full_name(name)))

    def instances(self) -> list[ProcessInfo]:
        return instances_of(self.processes())

    def start(self, name: str, *, wait: bool = False) -> bool:
        try:
            return bool(self.call("supervisor.startProcess", full_name(name), wait))
        except SupervisorFault as exc:
            if _fault_code(exc) == _ALREADY_STARTED:
                return False
            raise

    def stop(self, name: str, *, wait: bool = True) -> bool:
        try:
            stopping = bool(self.call("supervisor.stopProcess", full_name(name), False))
        except SupervisorFault as exc:
            if _fault_code(exc) == _NOT_RUNNING:
                return False
            raise
        if wait:
            self.wait_stopped([name])
        return stopping

    def _resignal(self, procs: Iterable[ProcessInfo]) -> None:
        """SIGTERM again every instance and router that supervisord is still stopping.

        supervisord forks, then the child closes its file descriptors and execs the program.
        A SIGTERM that lands in between (a stop moments after a start) is taken by the copy of
        supervisord's own handler in the child and vanishes with the exec: the instance starts
        normally and never hears it, and supervisord waits stopwaitsecs before its SIGKILL.
        An instance treats a repeated SIGTERM as the same request to drain, and a router as the
        same request to stop, so re-sending is harmless; supervisord runs on this machine (unix
        socket), so its pids are ours.
        """
        import os
        import signal

        for proc in procs:
            alive = proc.pid and pid_alive(proc.pid)
            ours = proc.instance_num is not None or proc.is_router
            if proc.state == "STOPPING" and ours and alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, signal.SIGTERM)

    def signal(self, name: str, sig: str | int) -> None:
        self.call("supervisor.signalProcess", full_name(name), str(sig))

    def tail(self, name: str, length: int = 2000) -> str:
        """The last `length` bytes of a process's log."""
        text, _offset, _overflow = self.call("supervisor.tailProcessStdoutLog", full_name(name), 0, length)
        return str(text)

    def wait_running(self, names: Iterable[str], *, timeout: float = 60.0) -> None:
        """Block until every named process is RUNNING; fail fast, with its log, if one gives up."""
        pending = {full_name(n) for n in names}
        deadline = time.monotonic() + timeout
        while pending:
            by_name = {p.full_name: p for p in self.processes()}
            for name in list(pending):
                proc = by_name.get(name)
                if proc is None:
                    raise FleetControlError(f"supervisord has no process named {name}")
                if proc.state == "RUNNING":
                    pending.discard(name)
                elif proc.state in ("FATAL", "EXITED", "STOPPED"):
                    last = self.tail(name).strip().splitlines()[-1:] or [proc.spawn_error or "no output"]
                    raise FleetControlError(f"{proc.name} did not start ({proc.state}): {last[0]}")
            if pending and time.monotonic() > deadline:
                raise FleetControlError(f"still starting after {timeout:.0f}s: {', '.join(sorted(pending))}")
            if pending:
                time.sleep(0.2)

    def wait_stopped(self, names: Iterable[str], *, timeout: float = 120.0) -> None:
        """Block until none of the named processes is running any more."""
        pending = {full_name(n) for n in names}
        deadline = time.monotonic() + timeout
        resignal = time.monotonic() + RESIGNAL_EVERY
        while pending:
            procs = self.processes()
            pending -= {p.full_name for p in procs if p.state in DEAD_STATES}
            if pending and time.monotonic() > deadline:
                raise FleetControlError(f"still stopping after {timeout:.0f}s: {', '.join(sorted(pending))}")
            if pending and time.monotonic() > resignal:
                self._resignal(p for p in procs if p.full_name in pending)
                resignal = time.monotonic() + RESIGNAL_EVERY
            if pending:
                time.sleep(0.1)

    def start_instances(self, nums: Iterable[int]) -> list[str]:
        names = [instance_process_name(n) for n in nums]
        for name in names:
            self.start(name, wait=False)
        return names

    def shutdown(self, *, timeout: float = 120.0) -> None:
        """Stop every program (in reverse priority) and supervisord itself; wait until it is gone."""
        try:
            pid = self.pid()
            self.call("supervisor.shutdown")
        except SupervisorUnavailable:
            return
        deadline = time.monotonic() + timeout
        resignal = time.monotonic() + RESIGNAL_EVERY
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise FleetControlError(f"supervisord (pid {pid}) did not exit within {timeout:.0f}s")
            if time.monotonic() > resignal:
                with contextlib.suppress(SupervisorUnavailable, SupervisorFault):
                    self._resignal(self.processes())
                resignal = time.monotonic() + RESIGNAL_EVERY
            time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (when supervisord is our own child) counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True
