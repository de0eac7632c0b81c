"""Where the fleet's Postgres and Redis are, the secrets it generates, and its schema.

Configured URLs win; a missing one means the embedded server (common/fleet/embedded.py),
its data in the state folder. Blocking code: the control plane runs no event loop.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path

from common.errors import StorageUnavailable
from common.fleet.embedded import EmbeddedPostgres, EmbeddedRedis
from common.migrate import migrate
from common.settings import Settings

#: The database `exai up` creates in the embedded Postgres.
EMBEDDED_DB = "exai"


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


def where(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or ''}".rstrip(":")


async def ensure_database(server_dsn: str, dbname: str) -> None:
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
            f"DATABASE_URL: cannot connect to Postgres at {where(database_url)} ({reason}).",
            hint="Start Postgres there, fix DATABASE_URL, or unset it to use the embedded Postgres.",
        ) from exc
