"""The embedded servers start from the pip packages, accept connections, and keep their data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import redis as redis_sync

from common.fleet.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.ports import free_port


async def _pg(dsn: str, *statements: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        result = None
        for sql in statements:
            result = await conn.fetchval(sql)
        return result
    finally:
        await conn.close()


def test_postgres_keeps_data_across_restart(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pgdata", port=free_port(), socket_dir=tmp_path)
    with pg.running():
        asyncio.run(_pg(pg.dsn(), "CREATE TABLE kept (v text)", "INSERT INTO kept VALUES ('still here')"))
    assert not pg.is_ready()
    with pg.running():
        assert asyncio.run(_pg(pg.dsn(), "SELECT v FROM kept")) == "still here"


def test_postgres_command_runs_in_the_foreground_on_its_port(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pgdata", port=free_port())
    argv = pg.command()
    assert Path(argv[0]).name == "postgres"
    assert argv[argv.index("-D") + 1] == str(tmp_path.resolve() / "pgdata")
    assert argv[argv.index("-p") + 1] == str(pg.port)


def test_redis_keeps_data_across_restart(tmp_path: Path) -> None:
    rd = EmbeddedRedis(tmp_path / "redis", port=free_port())
    with rd.running():
        client = redis_sync.Redis.from_url(rd.url())
        client.set("kept", "still here")
        client.close()
    assert not rd.is_ready()
    with rd.running():
        client = redis_sync.Redis.from_url(rd.url(), decode_responses=True)
        assert client.get("kept") == "still here"
        client.close()
