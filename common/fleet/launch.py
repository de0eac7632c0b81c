"""Bringing the fleet up under supervisord: config, services, schema, router, instances, and
the waits that make `exai up` return only once the router can hand instances out.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, FleetControlError
from common.fleet.checks import check_ports, check_redis
from common.fleet.registry import control_keys, forget_scale_state, registered_instances
from common.fleet.services import (
    EMBEDDED_DB,
    Services,
    admin_token,
    ensure_database,
    internal_token,
    prepare_state,
    run_migration,
    services_for,
)
from common.fleet.supervisor import (
    SupervisorControl,
    fleet_environment,
    render_config,
    router_names,
    write_config,
)
from common.protocol import DEFAULT_INSTANCE_HOST
from common.settings import Settings

Printer = Callable[[str], None]


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
            asyncio.run(ensure_database(pg.dsn("postgres"), EMBEDDED_DB))
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
        control_keys(services.redis_url, settings.redis_prefix, forget_scale_state)
    except BaseException:
        ctl.shutdown()
        raise
    return Launched(control=ctl, services=services, conf=conf, instances=tuple(names))
