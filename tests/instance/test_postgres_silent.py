"""A Postgres that stops answering (packets dropped, not refused): one timeout, then fail fast.

A refused connection fails at once; a black hole costs each operation its whole timeout. The
instance takes the first timeout as "Postgres is silent": later operations fail at once, chats
go on without what only Postgres has, and a background probe brings Postgres back into use as
soon as it answers (instance/storage/pool.py).
"""

from __future__ import annotations

import asyncio
import time

from tests.fakes.provider import FakeProvider
from tests.fakes.tcp_proxy import TcpProxy
from tests.instance.conftest import InstanceProc, SpawnInstance, connect, metrics_of, new_session

ACQUIRE, COMMAND = 2.0, 4.0  # the instance's Postgres timeouts here (seconds)


def _text(result: object) -> str:
    return " ".join(getattr(c, "text", "") for c in getattr(result, "content", []))


async def _gauge(inst: InstanceProc, name: str) -> float:
    metrics = await asyncio.to_thread(metrics_of, inst)
    assert name in metrics, f"{name} missing from the instance's metrics"
    return metrics[name]


async def test_a_silent_postgres_costs_one_timeout_then_calls_fail_fast_and_recover(
    fake: FakeProvider, pg_proxy: tuple[TcpProxy, str], spawn_instance: SpawnInstance
) -> None:
    proxy, via_proxy = pg_proxy
    inst = spawn_instance(
        DATABASE_URL=via_proxy, EXAI_DB_ACQUIRE_TIMEOUT=str(ACQUIRE), EXAI_DB_COMMAND_TIMEOUT=str(COMMAND)
    )
    async with connect(inst, "legacy", session=new_session()) as client:
        first = await client.call_tool("chat", {"prompt": "while Postgres answers"})
        assert not first.is_error, first.content
        cid = first.structured_content["continuation_id"]  # type: ignore[index]
    assert await _gauge(inst, "exai_instance_postgres_silent") == 0

    proxy.hang()
    try:
        # The first operation that needs Postgres waits out one timeout (asyncpg's cancel of the
        # query included), not a retry's as well, and says so.
        async with connect(inst, "legacy", session=new_session()) as client:
            started = time.monotonic()
            hung = await client.call_tool("note_read", {"key": "anything"})
            first_wait = time.monotonic() - started
            assert hung.is_error and "[storage_unavailable]" in _text(hung), hung.content
            assert first_wait < COMMAND + ACQUIRE + 1.0, f"the first read took {first_wait:.1f} s"
        assert await _gauge(inst, "exai_instance_postgres_silent") == 1

        # From now on nothing waits for it: a new session's chat continuing the thread, and a
        # tool that needs Postgres answers at once, saying what happened and what to do.
        async with connect(inst, "legacy", session=new_session()) as client:
            started = time.monotonic()
            chat = await client.call_tool("chat", {"prompt": "Postgres is silent", "continuation_id": cid})
            assert not chat.is_error, chat.content
            read = await client.call_tool("note_read", {"key": "anything"})
            waited = time.monotonic() - started
            assert waited < ACQUIRE, f"waited {waited:.1f} s for a Postgres known to be silent"
            text = _text(read)
            assert read.is_error and "[storage_unavailable]" in text, text
            assert "not answered" in text and "not attempted" in text and "Retry" in text, text
        assert await _gauge(inst, "exai_instance_postgres_failed_fast_total") >= 1
    finally:
        proxy.unhang()

    # The probe reaches Postgres again by itself: the next calls use it.
    deadline = time.monotonic() + 30
    while await _gauge(inst, "exai_instance_postgres_silent") == 1:
        assert time.monotonic() < deadline, "the probe never reached Postgres again"
        await asyncio.sleep(0.2)
    async with connect(inst, "legacy", session=new_session()) as client:
        wrote = await client.call_tool("note_write", {"key": "back", "body": "Postgres answers again"})
        assert not wrote.is_error, wrote.content
        read = await client.call_tool("note_read", {"key": "back"})
        assert not read.is_error and "Postgres answers again" in _text(read), read.content
