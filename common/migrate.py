"""Apply schema.sql to a database. Idempotent; used by `exai db migrate`, `exai up` and tests."""

from __future__ import annotations

import asyncio

import asyncpg

from common import PROJECT_ROOT
from common.errors import ConfigError, StorageUnavailable

SCHEMA_PATH = PROJECT_ROOT / "schema.sql"

# Many processes may migrate at once (every test worker, `exai up` twice): serialize them.
_ADVISORY_LOCK_ID = 0x0E7A1


def schema_sql() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


async def migrate(dsn: str, *, timeout: float = 30.0) -> int:
    """Apply the schema and return the schema version now recorded in the database."""
    sql = await asyncio.to_thread(schema_sql)
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout, statement_cache_size=0)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise StorageUnavailable(
            f"cannot connect to Postgres to apply the schema: {exc}",
            hint="Check DATABASE_URL and that the server is running.",
        ) from None
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL: {exc}") from None
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_ID)
        try:
            await conn.execute("SET client_min_messages = warning")
            await conn.execute(sql)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_ID)
        version = await conn.fetchval("SELECT version FROM exai_schema_version WHERE id = 1")
        return int(version)
    finally:
        await conn.close()
