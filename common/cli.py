"""`exai`: start, inspect, scale and stop the fleet under supervisord.

    exai up            start supervisord (and the embedded Postgres/Redis when no URLs are set),
                       migrate, start the router and EXAI_INSTANCES instances, wait for /healthz
    exai status        a table of processes, their state and ports
    exai scale N       start/stop instances so that N run; running ones are never restarted
    exai down          stop everything (data stays in the state folder)
    exai db migrate    apply schema.sql

The CLI blocks (it is not on an event loop). User errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.embedded import EmbeddedPostgres, EmbeddedRedis
from common.entry import run_entry
from common.errors import ConfigError, FleetControlError, InvalidArgument, StorageUnavailable
from common.keys import Keys
from common.migrate import migrate
from common.protocol import DEFAULT_INSTANCE_HOST, MCP_PATH, local_name
from common.settings import Settings, load_settings
from common.supervisor import (
    ProcessInfo,
    SupervisorControl,
    fleet_environment,
    pid_alive,
    plan_scale,
    render_config,
    router_names,
    write_config,
)

PROG = "exai"
#: The database `exai up` creates in the embedded Postgres.
EMBEDDED_DB = "exai"

Printer = Callable[[str], None]


# --- the fleet's services and secrets --------------------------------------------------------
@dataclass(frozen=True)
class Services:
    """Where the fleet's Postgres and Redis are, and which of them the fleet runs itself."""

    database_url: str
    redis_url: str
    postgres: EmbeddedPostgres | None
    redis: EmbeddedRedis | None


def services_for(settings: Settings) -> Services:
    """Configured URLs win; a missing one means the embedded server (data in the state folder)."""
    pg = redis = None
    if settings.database_url is None:
        pg = EmbeddedPostgres(settings.state_dir / "postgres", settings.embedded_pg_port)
    if settings.redis_url is None:
        redis = EmbeddedRedis(settings.state_dir / "redis", settings.embedded_redis_port)
    return Services(
        database_url=settings.database_url or (pg.dsn(EMBEDDED_DB) if pg else ""),
        redis_url=settings.redis_url or (redis.url() if redis else ""),
        postgres=pg,
        redis=redis,
    )


def _secret(path: Path, configured: str | None) -> str:
    """A configured token, else the one generated into `path` (0600) on first use."""
    if configured:
        return configured
    if path.exists():
        token = path.read_text(encoding="ascii").strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(token + "\n", encoding="ascii")
    return token


def internal_token(settings: Settings) -> str:
    return _secret(settings.state_dir / "internal_token", settings.internal_token)


def admin_token(settings: Settings) -> str:
    return _secret(settings.state_dir / "admin_token", settings.admin_token)


def prepare_state(settings: Settings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.state_dir.chmod(0o700)
    (settings.state_dir / "logs").mkdir(exist_ok=True)


# --- pre-flight checks -----------------------------------------------------------------------
def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same options as the servers: a port in TIME_WAIT after `exai down` is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_ports(settings: Settings, services: Services) -> None:
    """Fail with one line naming the variable if a port the fleet needs is taken."""
    wanted: list[tuple[str, int, str]] = [(settings.router_host, settings.router_port, "EXAI_ROUTER_PORT")]
    if services.postgres is not None:
        wanted.append(("127.0.0.1", services.postgres.port, "EXAI_EMBEDDED_PG_PORT"))
    if services.redis is not None:
        wanted.append(("127.0.0.1", services.redis.port, "EXAI_EMBEDDED_REDIS_PORT"))
    for num in range(1, settings.max_instances + 1):
        wanted.append((settings.instance_host, settings.instance_port_for(num), "EXAI_INSTANCE_BASE_PORT"))
    for host, port, var in wanted:
        if port > 65535:
            raise ConfigError(f"{var}: port {port} is above 65535.", hint="Choose a lower port.")
        if not _port_free(host, port):
            raise ConfigError(
                f"{var}: port {port} on {host} is already in use.",
                hint=f"Stop what listens there, or set {var} to a free port.",
            )


def _where(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or ''}".rstrip(":")


def check_redis(url: str) -> None:
    """Fail with one line if the configured Redis does not answer PING."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except (redis_sync.RedisError, OSError) as exc:
        raise ConfigError(
            f"REDIS_URL: cannot reach Redis at {_where(url)} ({exc}).",
            hint="Start Redis there, fix REDIS_URL, or unset it to use the embedded Redis.",
        ) from None
    finally:
        client.close()


async def _ensure_database(server_dsn: str, dbname: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname):
            await conn.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        await conn.close()


def run_migration(database_url: str) -> int:
    try:
        return asyncio.run(migrate(database_url))
    except StorageUnavailable as exc:
        reason = exc.message.rsplit(": ", 1)[-1]
        raise StorageUnavailable(
            f"DATABASE_URL: cannot connect to Postgres at {_where(database_url)} ({reason}).",
            hint="Start Postgres there, fix DATABASE_URL, or unset it to use the embedded Postgres.",
        ) from exc


# --- supervisord -----------------------------------------------------------------------------
def control(settings: Settings) -> SupervisorControl:
    return SupervisorControl(settings.supervisor_socket)


def render(settings: Settings, services: Services, *, bin_dir: Path | None = None) -> Path:
    """Render deploy/supervisord.conf.tmpl into the state folder for these services."""
    env = fleet_environment(
        settings,
        DATABASE_URL=services.database_url,
        REDIS_URL=services.redis_url,
        EXAI_INTERNAL_TOKEN=internal_token(settings),
        EXAI_ADMIN_TOKEN=admin_token(settings),
    )
    pg, redis = services.postgres, services.redis
    text = render_config(
        settings,
        env,
        postgres_command=pg.command() if pg else None,
        postgres_user=pg.run_as if pg else None,
        redis_command=redis.command() if redis else None,
        bin_dir=bin_dir,
    )
    return write_config(settings, text)


def start_supervisord(settings: Settings, conf: Path, *, timeout: float = 30.0) -> SupervisorControl:
    supervisord = Path(sys.executable).parent / "supervisord"
    argv = [str(supervisord if supervisord.exists() else "supervisord"), "-c", str(conf)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FleetControlError(f"supervisord did not start: {last[0]}.", hint=f"Check {conf}.")
    ctl = control(settings)
    deadline = time.monotonic() + timeout
    while not ctl.is_running():
        if time.monotonic() > deadline:
            log = settings.state_dir / "logs" / "supervisord.log"
            raise FleetControlError(f"supervisord did not answer within {timeout:.0f}s.", hint=f"See {log}.")
        time.sleep(0.1)
    return ctl


def wait_healthz(settings: Settings, ctl: SupervisorControl, *, timeout: float = 60.0) -> None:
    url = f"http://{settings.router_host}:{settings.router_port}/healthz"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        ctl.wait_running(router_names(settings), timeout=max(1.0, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            raise FleetControlError(
                f"the router did not answer {url} within {timeout:.0f}s.",
                hint=f"See {settings.state_dir / 'logs' / 'router.log'}.",
            )
        time.sleep(0.2)


def registered_instances(redis_url: str, prefix: str, host: str = DEFAULT_INSTANCE_HOST) -> set[str]:
    """Process names of this host's instances (advertised at `host`) whose registry entry is
    alive and ready; other hosts' instances in the same registry are left out."""
    import redis as redis_sync

    keys = Keys(prefix)
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3)
    try:
        ready = set()
        for member in client.smembers(keys.instances()):  # type: ignore[union-attr]
            name = local_name(str(member), host)
            if name is not None and client.hget(keys.instance(str(member)), "state") == "ready":
                ready.add(name)
        return ready
    except (redis_sync.RedisError, OSError) as exc:
        raise FleetControlError(f"cannot read the instance registry at {_where(redis_url)}: {exc}.") from None
    finally:
        client.close()


def wait_registered(
    redis_url: str,
    prefix: str,
    names: Sequence[str],
    ctl: SupervisorControl,
    *,
    timeout: float = 60.0,
    host: str = DEFAULT_INSTANCE_HOST,
) -> None:
    """Wait until the started instances are in the registry, so the router can hand them out."""
    deadline = time.monotonic() + timeout
    while missing := set(names) - registered_instances(redis_url, prefix, host):
        ctl.wait_running(missing, timeout=max(1.0, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            raise FleetControlError(
                f"instances not registered in Redis within {timeout:.0f}s: {', '.join(sorted(missing))}.",
                hint=f"See their logs in {ctl.socket_path.parent / 'logs'}.",
            )
        time.sleep(0.1)


def _forget_scale_state(r: Any, keys: Keys) -> None:
    """A fresh `exai up`: no ceiling from an old `exai scale`, nothing left draining."""
    r.delete(keys.instance_cap(), keys.draining())


def busy_instances(redis_url: str, prefix: str, host: str = DEFAULT_INSTANCE_HOST) -> set[str]:
    """Process names of this host's instances bound to a session (best effort: empty when Redis
    is unreachable)."""
    import redis as redis_sync

    keys = Keys(prefix)
    try:
        client = redis_sync.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3)
        try:
            busy = set()
            for member in client.smembers(keys.instances()):  # type: ignore[union-attr]
                name = local_name(str(member), host)
                if name is not None and client.hget(keys.instance(str(member)), "session"):
                    busy.add(name)
            return busy
        finally:
            client.close()
    except (redis_sync.RedisError, OSError):
        return set()


@dataclass(frozen=True)
class Launched:
    control: SupervisorControl
    services: Services
    conf: Path
    instances: tuple[str, ...]


def launch(
    settings: Settings,
    *,
    instances: int | None = None,
    bin_dir: Path | None = None,
    say: Printer = lambda _msg: None,
    timeout: float = 90.0,
) -> Launched:
    """Bring the fleet up: checks, config, supervisord, services, schema, router, instances.

    Assumes supervisord is not running for this state folder. On failure it shuts down what
    it started, so nothing is left behind.
    """
    count = settings.instances if instances is None else instances
    if count > settings.max_instances:
        raise ConfigError(f"cannot start {count} instances: EXAI_MAX_INSTANCES is {settings.max_instances}")
    services = services_for(settings)
    prepare_state(settings)
    check_ports(settings, services)
    if services.redis is None:
        check_redis(services.redis_url)
    if services.postgres is None:
        say("applying the schema")
        run_migration(services.database_url)
    else:
        services.postgres.ensure_initialized()
    if services.redis is not None:
        services.redis.ensure_initialized()
    conf = render(settings, services, bin_dir=bin_dir)
    ctl = start_supervisord(settings, conf)
    try:
        if services.postgres is not None:
            say(f"starting the embedded Postgres on port {services.postgres.port}")
            ctl.start("postgres")
        if services.redis is not None:
            say(f"starting the embedded Redis on port {services.redis.port}")
            ctl.start("redis")
        if services.postgres is not None:
            pg = services.postgres
            pg.wait_ready(timeout, alive=lambda: ctl.process("postgres").active)
            asyncio.run(_ensure_database(pg.dsn("postgres"), EMBEDDED_DB))
            say("applying the schema")
            run_migration(services.database_url)
        if services.redis is not None:
            rd = services.redis
            rd.wait_ready(timeout, alive=lambda: ctl.process("redis").active)
        say("starting the router")
        for router in router_names(settings):
            ctl.start(router)
        names = ctl.start_instances(range(1, count + 1))
        say(f"starting {count} instance(s)")
        services_up = [n for n, svc in (("postgres", services.postgres), ("redis", services.redis)) if svc]
        ctl.wait_running([*services_up, *router_names(settings), *names], timeout=timeout)
        wait_healthz(settings, ctl, timeout=timeout)
        wait_registered(
            services.redis_url,
            settings.redis_prefix,
            names,
            ctl,
            timeout=timeout,
            host=settings.instance_advertise,
        )
        _control_keys(services.redis_url, settings.redis_prefix, _forget_scale_state)
    except BaseException:
        ctl.shutdown()
        raise
    return Launched(control=ctl, services=services, conf=conf, instances=tuple(names))


@dataclass
class ScaleReport:
    """What `exai scale` did: processes started and stopped, sessions parked, calls cut."""

    started: list[str]
    stopped: list[str]
    parked: list[str]
    cut: list[dict[str, str]]
    problems: list[str]


def _control_keys(redis_url: str, prefix: str, fn: Callable[[Any, Keys], None]) -> str | None:
    """Run `fn(redis, keys)` on the fleet's Redis; the error text if Redis is unreachable."""
    import redis as redis_sync

    try:
        client = redis_sync.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3)
        try:
            fn(client, Keys(prefix))
        finally:
            client.close()
    except (redis_sync.RedisError, OSError) as exc:
        return str(exc)
    return None


def scale(
    settings: Settings, ctl: SupervisorControl, target: int, *, wait: float | None = None
) -> ScaleReport:
    """Start or stop instances so that `target` run.

    Before an instance stops, the router parks the sessions it serves (waiting up to `wait`
    seconds, default EXAI_DRAIN_TIMEOUT, for their calls in flight, then cutting them with an
    error that says so); they continue on the remaining instances. `target` also becomes the
    ceiling for spares the router starts on demand, so a returning session cannot undo it.
    """
    if target < 0:
        raise ConfigError("the instance count must be 0 or more")
    if target > settings.max_instances:
        raise ConfigError(
            f"cannot scale to {target}: EXAI_MAX_INSTANCES is {settings.max_instances}.",
            hint="Raise EXAI_MAX_INSTANCES and run `exai down` then `exai up` to provision more.",
        )
    from router.admin_client import AdminUnavailable, evict_instance

    redis_url = services_for(settings).redis_url
    prefix = settings.redis_prefix
    wait = settings.drain_timeout if wait is None else wait
    infos = ctl.processes()
    busy: set[str] = set()
    if target < sum(1 for p in infos if p.active and p.instance_num is not None):
        busy = busy_instances(redis_url, prefix, settings.instance_advertise)
    plan = plan_scale(infos, target, busy)
    report = ScaleReport(list(plan.start), list(plan.stop), [], [], [])

    def cap_and_undrain(r: Any, keys: Keys) -> None:
        r.set(keys.instance_cap(), str(target))
        if plan.start:
            r.srem(keys.draining(), *plan.start)  # a stopped instance comes back able to serve

    if (err := _control_keys(redis_url, prefix, cap_and_undrain)) is not None:
        report.problems.append(f"could not record the instance ceiling in Redis ({err})")
    for name in plan.start:
        ctl.start(name, wait=False)
    if plan.stop:
        token = admin_token(settings)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(plan.stop)) as pool:
            futures = {name: pool.submit(evict_instance, settings, token, name, wait) for name in plan.stop}
        for name, fut in futures.items():
            try:
                result = fut.result()
            except AdminUnavailable as exc:
                report.problems.append(f"{name}: sessions not parked, router unreachable ({exc.message})")
                continue
            report.parked += result.get("parked", [])
            report.cut += result.get("cut", [])
        for name in plan.stop:
            ctl.stop(name, wait=False)
        ctl.wait_stopped(plan.stop)
        _control_keys(redis_url, prefix, lambda r, keys: r.srem(keys.draining(), *plan.stop))
    if plan.start:
        ctl.wait_running(plan.start)
        wait_registered(redis_url, prefix, plan.start, ctl, host=settings.instance_advertise)
    return report


# --- output ----------------------------------------------------------------------------------
def _port_of(settings: Settings, proc: ProcessInfo) -> str:
    if proc.instance_num is not None:
        return str(settings.instance_port_for(proc.instance_num))
    if proc.group == "router":
        return str(settings.router_port)
    if proc.name == "postgres":
        return str(settings.embedded_pg_port)
    if proc.name == "redis":
        return str(settings.embedded_redis_port)
    return "-"


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def status_table(settings: Settings, procs: Sequence[ProcessInfo]) -> str:
    order = {"postgres": 0, "redis": 1, "router": 2}
    rows = [("NAME", "STATE", "PID", "PORT", "UPTIME")]
    for p in sorted(procs, key=lambda p: (order.get(p.group, 3), p.instance_num or 0, p.name)):
        rows.append((p.name, p.state, str(p.pid or "-"), _port_of(settings, p), _uptime(p.uptime)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _summary(settings: Settings, procs: Sequence[ProcessInfo]) -> str:
    running = sum(1 for p in procs if p.instance_num is not None and p.state == "RUNNING")
    return f"{running} of {settings.max_instances} instances running"


# --- commands --------------------------------------------------------------------------------
def _progress(message: str) -> None:
    """Progress lines of `exai up`; a closed stdout (`exai up | head`) must not abort the launch."""
    with contextlib.suppress(BrokenPipeError):
        print(f"exai: {message}", flush=True)


def provider_keys_line(settings: Settings) -> str:
    """Which provider keys `exai up` found, so a missing one is seen before the first chat fails."""
    found = [
        name
        for name, key in (("GLM_API_KEY", settings.glm_api_key), ("KIMI_API_KEY", settings.kimi_api_key))
        if key
    ]
    missing = [n for n in ("GLM_API_KEY", "KIMI_API_KEY") if n not in found]
    if not found:
        return (
            "none found: set GLM_API_KEY and/or KIMI_API_KEY (environment or .env), "
            "then `exai down && exai up`"
        )
    line = "found " + ", ".join(found)
    if missing:
        line += f" ({', '.join(missing)} not set: its models are unavailable)"
    return line


def supervisorctl_command() -> str:
    """supervisorctl by its full path in this venv, so the line works without the venv active."""
    exe = Path(sys.executable).with_name("supervisorctl")
    return str(exe) if exe.exists() else "supervisorctl"


def cmd_up(args: argparse.Namespace) -> int:
    settings = load_settings()
    ctl = control(settings)
    if ctl.is_running():
        print(f"EXAI fleet is already running ({settings.supervisor_conf}).")
        print(status_table(settings, ctl.processes()))
        return 0
    launched = launch(settings, instances=args.instances, say=_progress)
    procs = launched.control.processes()
    url = f"http://{settings.router_host}:{settings.router_port}{MCP_PATH}"
    token = admin_token(settings)
    print()
    print(f"EXAI fleet is up: router on {url}, {_summary(settings, procs)}.")
    if launched.services.postgres or launched.services.redis:
        print(f"Embedded services keep their data in {settings.state_dir}.")
    print()
    print("Connect a client:")
    print(f"  Claude Code:     claude mcp add --transport http exai {url}")
    print(f"  any MCP client:  Streamable HTTP at {url}")
    if settings.auth_tokens:
        print("                   with the header 'Authorization: Bearer <one of EXAI_AUTH_TOKENS>'")
    print()
    shown = "(EXAI_ADMIN_TOKEN)" if settings.admin_token else token
    print(f"Admin token:       {shown}")
    admin = f"http://{settings.router_host}:{settings.router_port}/admin/instances"
    print(f"  curl -H 'Authorization: Bearer {token}' {admin}")
    print(f"Provider keys:     {provider_keys_line(settings)}")
    print(f"supervisorctl:     {supervisorctl_command()} -c {launched.conf} status")
    print("Stop it with `exai down`; scale with `exai scale N`.")
    if args.foreground:
        return _stay_in_foreground(launched.control)
    return 0


def _stay_in_foreground(ctl: SupervisorControl) -> int:
    """For containers: live as long as supervisord; SIGTERM/SIGINT shut the fleet down."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pid = ctl.pid()
    sys.stdout.flush()
    while not stop.wait(1.0):
        if not pid_alive(pid):
            print("exai: supervisord exited", file=sys.stderr)
            return 1
    ctl.shutdown()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    settings = load_settings()
    ctl = control(settings)
    if not ctl.is_running():
        print("EXAI fleet is not running.")
        return 0
    print("exai: stopping instances, router and services ...", flush=True)
    ctl.shutdown()
    print("EXAI fleet stopped. Data stays in " + str(settings.state_dir))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings()
    ctl = control(settings)
    if not ctl.is_running():
        print(f"EXAI fleet is not running (no supervisord at {settings.supervisor_socket}).")
        return 3
    procs = ctl.processes()
    print(status_table(settings, procs))
    print(f"\n{_summary(settings, procs)}; config {settings.supervisor_conf}")
    _print_sessions_per_instance(settings)
    return 0


def _print_sessions_per_instance(settings: Settings) -> None:
    """The router's view: which session holds which instance (skipped if the router is down)."""
    from router.admin_client import AdminUnavailable, admin_get, sessions_by_instance

    try:
        bound = sessions_by_instance(settings, admin_token(settings))
    except AdminUnavailable as exc:
        print(f"sessions: unavailable ({exc.message})")
        return
    parked = ""
    with contextlib.suppress(AdminUnavailable, KeyError, TypeError):
        counts = admin_get(settings, admin_token(settings), "/admin/sessions")["counts"]
        parked = f", {counts['parked']} parked"
    lines = "".join(f"\n  {i}  {s}" for i, s in sorted(bound.items()))
    print(f"sessions: {len(bound)} bound{parked}{lines}")


def cmd_sessions(args: argparse.Namespace) -> int:
    from router.admin_client import fetch_sessions, sessions_table

    settings = load_settings()
    sessions = fetch_sessions(settings, admin_token(settings))
    print(json.dumps(sessions, indent=2) if args.json else sessions_table(sessions))
    return 0


def cmd_links(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from router.admin_client import admin_get, links_table

    settings = load_settings()
    token = admin_token(settings)
    if args.action == "list":
        groups = admin_get(settings, token, "/admin/links")["groups"]
        print(json.dumps(groups, indent=2) if args.json else links_table(groups))
        return 0
    if not args.group or (args.action in ("add", "remove") and not args.session):
        raise InvalidArgument(
            f"`exai links {args.action}` needs GROUP" + (" SESSION" if args.action != "delete" else "")
        )
    group = quote(args.group, safe="")
    if args.action == "add":
        out = admin_get(
            settings, token, f"/admin/links/{group}/members", method="POST", body={"session": args.session}
        )
    elif args.action == "remove":
        out = admin_get(
            settings, token, f"/admin/links/{group}/members/{quote(args.session, safe='')}", method="DELETE"
        )
    else:
        out = admin_get(settings, token, f"/admin/links/{group}", method="DELETE")
    print(json.dumps(out, indent=2))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from router.admin_client import set_draining

    settings = load_settings()
    set_draining(settings, admin_token(settings), args.instance, args.command == "drain")
    if args.command == "drain":
        print(
            f"{args.instance} is draining: no new session goes there "
            f"(`exai undrain {args.instance}` undoes it)."
        )
    else:
        print(f"{args.instance} takes new sessions again.")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    settings = load_settings()
    ctl = control(settings)
    if not ctl.is_running():
        raise FleetControlError("the fleet is not running.", hint="Start it with `exai up`.")
    report = scale(settings, ctl, args.count, wait=args.wait)
    if report.started:
        print(f"started {', '.join(report.started)}")
    if report.stopped:
        print(f"stopped {', '.join(report.stopped)}")
        print(f"parked {len(report.parked)} session(s); they continue on the remaining instances")
    for cut in report.cut:
        waited = settings.drain_timeout if args.wait is None else args.wait
        print(f"cut {cut['call']} of session {cut['session']} (still running after {waited:g}s)")
    for problem in report.problems:
        print(f"warning: {problem}")
    if not report.started and not report.stopped:
        print(f"{args.count} instance(s) already running")
    print(f"the router starts no spare beyond {args.count} running instance(s) until the next scale or up")
    print(_summary(settings, ctl.processes()))
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    settings = load_settings()
    services = services_for(settings)
    pg = services.postgres
    if pg is None or control(settings).is_running():
        version = run_migration(services.database_url)
    else:
        # Embedded and the fleet is down: run the server just long enough to migrate.
        prepare_state(settings)
        with pg.running():
            asyncio.run(_ensure_database(pg.dsn("postgres"), EMBEDDED_DB))
            version = run_migration(services.database_url)
    print(f"schema version {version} applied to {_where(services.database_url)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run the EXAI MCP fleet under supervisord.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the fleet (embedded Postgres/Redis when no URLs are set)")
    up.add_argument("--instances", type=int, default=None, help="instances to start (default EXAI_INSTANCES)")
    up.add_argument(
        "--foreground", action="store_true", help="stay attached; SIGTERM stops the fleet (containers)"
    )
    up.set_defaults(func=cmd_up)

    sub.add_parser("down", help="stop the fleet; data stays in the state folder").set_defaults(func=cmd_down)
    sub.add_parser("status", help="processes, their state and ports").set_defaults(func=cmd_status)
    ss = sub.add_parser("sessions", help="open sessions (from the router's admin API)")
    ss.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ss.set_defaults(func=cmd_sessions)

    lk = sub.add_parser(
        "links", help="link groups: list, or add/remove a session, delete a group (admin API)"
    )
    lk.add_argument("action", nargs="?", default="list", choices=("list", "add", "remove", "delete"))
    lk.add_argument("group", nargs="?", metavar="GROUP")
    lk.add_argument("session", nargs="?", metavar="SESSION")
    lk.add_argument("--json", action="store_true", help="print JSON instead of a table (list)")
    lk.set_defaults(func=cmd_links)

    for name, what in (("drain", "stop giving an instance new sessions"), ("undrain", "undo `exai drain`")):
        dr = sub.add_parser(name, help=what)
        dr.add_argument("instance", metavar="INSTANCE_ID", help="e.g. instance_03 (see `exai status`)")
        dr.set_defaults(func=cmd_drain)

    sc = sub.add_parser("scale", help="run N instances without restarting running ones")
    sc.add_argument("count", type=int, metavar="N")
    sc.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds calls on stopping instances may take before they are cut (default EXAI_DRAIN_TIMEOUT)",
    )
    sc.set_defaults(func=cmd_scale)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("migrate", help="apply schema.sql (idempotent)").set_defaults(func=cmd_db_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_entry(lambda: int(args.func(args)), prog=PROG)
