"""The pool: PgBouncer transaction mode, reconnect after Postgres drops us, starting while it is down."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from common.errors import StorageUnavailable
from common.settings import Settings
from instance.storage import Storage
from tests.instance.storage.conftest import FaultProxy


async def _named_statements(st: Storage) -> int:
    return int(await st.db.run(lambda c: c.fetchval("SELECT count(*) FROM pg_prepared_statements")))


@pytest.mark.parametrize("pgbouncer", [True, False])
async def test_pgbouncer_mode_uses_no_named_prepared_statements(
    storage_settings: Callable[..., Settings], pgbouncer: bool
) -> None:
    """Transaction poolers break named prepared statements; this mode must create none."""
    settings = storage_settings(db_pgbouncer=pgbouncer, db_pool_min=1, db_pool_max=1)
    async with Storage.open(settings, instance_id=f"t-pgb-{pgbouncer}", redis=None) as st:
        task = await st.tasks.create(session_id="s", name="pooler")
        await st.tasks.update(task.id, expected_version=1, session_id="s", state="IN_PROGRESS")
        await st.tasks.list(session_id="s", tree=True)
        await st.notes.write(scope="session", scope_id="s", key="k", body="b")
        cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
        await st.history.append(cid, "user", "hello")
        assert await st.flush(10)
        assert [m.content for m in await st.history.load(cid)] == ["hello"]
        named = await _named_statements(st)
    if pgbouncer:
        assert named == 0
    else:
        assert named > 0  # the same workload does prepare statements in session mode


async def test_reconnects_after_postgres_drops_every_connection(
    storage_settings: Callable[..., Settings], pg_dsn: str
) -> None:
    settings = storage_settings(db_pool_min=2, db_pool_max=2)
    async with Storage.open(settings, instance_id="t-restart", redis=None) as st:
        task = await st.tasks.create(session_id="s", name="survives restart")
        admin = await asyncpg.connect(pg_dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'exai-instance'"
            )
        finally:
            await admin.close()
        assert killed >= 1
        assert (await st.tasks.get(task.id, session_id="s")).name == "survives restart"
        updated = await st.tasks.update(task.id, expected_version=1, session_id="s", state="IN_PROGRESS")
        assert updated.version == 2
        assert st.pool_stats()["connected"]


async def test_starts_while_postgres_is_down_and_connects_later(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str
) -> None:
    pg_proxy.cut()
    settings = storage_settings(database_url=pg_proxy.url(pg_dsn))
    async with Storage.open(settings, instance_id="t-late", redis=None) as st:
        assert st.pool_stats()["connected"] is False
        with pytest.raises(StorageUnavailable) as info:
            await st.tasks.create(session_id="s", name="too early")
        assert "Postgres" in info.value.message
        pg_proxy.restore()
        task = await st.tasks.create(session_id="s", name="in time")
        stats = st.pool_stats()
        assert stats["connected"] and stats["max"] == settings.db_pool_max
        # a cut of live connections (a Postgres restart, as the pool sees it) is retried once
        pg_proxy.cut()
        pg_proxy.restore()
        assert (await st.tasks.get(task.id, session_id="s")).id == task.id
