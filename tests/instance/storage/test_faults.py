"""Faults made by the test itself: kill -9 of a writing process, and Postgres unreachable for 20 s.

In both, every append that was acknowledged to its caller must end up in Postgres exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from common.settings import Settings
from instance.storage import Storage
from tests.instance.storage.conftest import FaultProxy

WRITER = Path(__file__).with_name("writer_proc.py")
OUTAGE_S = float(os.environ.get("EXAI_TEST_OUTAGE_S", "20"))


async def _counts(dsn: str, ids: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id::text, count(*) AS n FROM messages WHERE id = ANY($1::uuid[]) GROUP BY id", ids
        )
    finally:
        await conn.close()
    return {r["id"]: int(r["n"]) for r in rows}


@pytest.mark.parametrize("sync", ["full", "normal"])
async def test_kill_9_under_load_then_restart_keeps_every_acknowledged_write(
    storage_settings: Callable[..., Settings], pg_dsn: str, tmp_path: Path, sync: str
) -> None:
    """With either EXAI_CHAT_SPOOL_SYNC: what the OS was handed survives the process's kill -9."""
    state_dir = tmp_path / "killed"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        pg_dsn,
        str(state_dir),
        "t-kill",
        sync,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    acked: list[str] = []
    cid = ""
    started = time.monotonic()
    try:
        while len(acked) < 1500 or time.monotonic() - started < 1.0:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "the writer exited early"
            kind, _, value = line.decode().strip().partition(" ")
            if kind == "THREAD":
                cid = value
            elif kind == "ACK":
                acked.append(value)
    finally:
        proc.send_signal(signal.SIGKILL)
    # Lines written before the kill are acknowledged appends too; a torn last line is not.
    rest = await proc.stdout.read()
    for line in rest.decode().split("\n")[:-1]:
        if line.startswith("ACK "):
            acked.append(line[4:])
    assert await proc.wait() == -signal.SIGKILL

    settings = storage_settings(state_dir=state_dir, history_cache_turns=0)
    async with Storage.open(settings, instance_id="t-kill", redis=None) as st:
        recovered = st.backlog()["rows"]
        assert await st.flush(30)
        history = await st.history.load(cid)
    counts = await _counts(pg_dsn, acked)
    missing = [i for i in acked if i not in counts]
    assert not missing, f"{len(missing)} acknowledged writes lost"
    assert set(counts.values()) == {1}
    assert len({m.id for m in history}) == len(history) >= len(acked)
    print(f"kill -9: {len(acked)} acked, {recovered} rows replayed from the spool after restart")


async def test_postgres_unreachable_for_20s_under_load(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str, redis: Redis
) -> None:
    settings = storage_settings(database_url=pg_proxy.url(pg_dsn), flush_interval_ms=50)
    acked: list[str] = []
    errors: list[BaseException] = []
    stop = asyncio.Event()
    async with Storage.open(settings, instance_id="t-outage", redis=redis) as st:
        cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)

        async def writer(w: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    acked.append((await st.history.append(cid, "user", f"w{w} #{i}")).id)
                    await st.record_tool_call(
                        session_id="s", instance_id=None, tool_name="chat", status="ok", duration_ms=1.0
                    )
                except Exception as exc:
                    errors.append(exc)
                i += 1
                await asyncio.sleep(0.01)

        writers = [asyncio.create_task(writer(w)) for w in range(4)]
        await asyncio.sleep(1.0)
        pg_proxy.cut()
        cut_at = len(acked)
        await asyncio.sleep(OUTAGE_S / 2)
        mid = st.backlog()
        assert mid["rows"] > 0 and mid["failing"] and mid["last_error"]
        assert len(await st.history.load(cid, limit=10)) == 10  # readers still answered (cache + spool)
        await asyncio.sleep(OUTAGE_S / 2)
        during = len(acked) - cut_at
        pg_proxy.restore()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)
        assert await st.flush(60)
        after = st.backlog()
        assert after["rows"] == 0 and not after["failing"]
    assert not errors, errors[:3]
    assert during > 100  # callers kept getting answers while Postgres was away
    counts = await _counts(pg_dsn, acked)
    assert len(counts) == len(acked) and set(counts.values()) == {1}
    print(f"outage: {len(acked)} acked ({during} during {OUTAGE_S:.0f}s outage), backlog {mid['rows']} rows")
