"""schema.sql applies cleanly, twice, without superuser-only statements."""

from __future__ import annotations

import re

import asyncpg

from common.migrate import migrate, schema_sql

EXPECTED_TABLES = {
    "exai_schema_version",
    "sessions",
    "conversations",
    "messages",
    "tool_calls",
    "tasks",
    "task_events",
    "notes",
    "session_links",
    "link_groups",
    "link_members",
    "link_events",
    "link_reservations",
}


async def test_migrate_is_idempotent(pg_dsn: str) -> None:
    first = await migrate(pg_dsn)
    second = await migrate(pg_dsn)
    assert first == second >= 1
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    assert EXPECTED_TABLES <= {r["tablename"] for r in rows}


def test_schema_has_no_superuser_only_statements() -> None:
    sql = schema_sql().upper()
    for forbidden in ("CREATE EXTENSION", "ALTER SYSTEM", "CREATE ROLE", "SECURITY DEFINER", "COPY "):
        assert forbidden not in sql
    assert not re.search(r"\bDROP\s+(TABLE|SCHEMA|DATABASE)\b", sql)


async def test_task_state_is_constrained(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        try:
            await conn.execute("INSERT INTO tasks (id, name, state) VALUES (gen_random_uuid(), 'x', 'DONE')")
        except asyncpg.CheckViolationError:
            pass
        else:
            raise AssertionError("state DONE was accepted")
    finally:
        await conn.close()
