"""`exai`: start, inspect, scale and stop the fleet under supervisord.

    exai up            start supervisord (and the embedded Postgres/Redis when no URLs are set),
                       migrate, start the router and EXAI_INSTANCES instances, wait for /healthz
    exai status        a table of processes, their state and ports
    exai scale N       start/stop instances so that N run; running ones are never restarted
    exai down          stop everything (data stays in the state folder)
    exai db migrate    apply schema.sql

The CLI blocks (it is not on an event loop). User errors print one line and exit with code 2.
The commands are a thin shell over common/fleet: services, checks, launch, scale, registry,
admin_client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from common.entry import run_entry
from common.errors import FleetControlError, InvalidArgument
from common.fleet.admin_client import (
    AdminUnavailable,
    admin_get,
    fetch_sessions,
    links_table,
    sessions_by_instance,
    sessions_table,
    set_draining,
)
from common.fleet.launch import control, launch
from common.fleet.scale import scale
from common.fleet.services import (
    EMBEDDED_DB,
    admin_token,
    ensure_database,
    prepare_state,
    run_migration,
    services_for,
    where,
)
from common.fleet.supervisor import (
    ProcessInfo,
    SupervisorControl,
    pid_alive,
)
from common.protocol import MCP_PATH
from common.settings import Settings, load_settings

PROG = "exai"


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

    settings = load_settings()
    sessions = fetch_sessions(settings, admin_token(settings))
    print(json.dumps(sessions, indent=2) if args.json else sessions_table(sessions))
    return 0


def cmd_links(args: argparse.Namespace) -> int:
    from urllib.parse import quote

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
            asyncio.run(ensure_database(pg.dsn("postgres"), EMBEDDED_DB))
            version = run_migration(services.database_url)
    print(f"schema version {version} applied to {where(services.database_url)}")
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
