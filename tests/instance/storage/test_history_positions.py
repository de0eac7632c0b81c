"""A chat exchange's position is not waited for on the answer's path (issue 15).

`append_exchange` writes the append script on the direct Redis line, commits the turns to the
spool with their position still a placeholder and returns; the position comes with Redis's reply
(instance/storage/history.py, docs/ARCHITECTURE.md "Thread order"). These tests hold the
windows that opens: the reply after the commit (and after the call returned), Redis lost between
the script's send and its reply, and a writer killed with turns spooled without their position.
A fault proxy in front of Redis holds the script back (`delay`) or drops it (`cut`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from common.keys import Keys
from common.redis import create_redis
from common.settings import Settings
from instance.storage import Storage
from instance.storage.history import CACHE_SYNC_S
from tests.instance.storage.conftest import FaultProxy

CHILD = Path(__file__).with_name("positions_proc.py")


def exchange(q: str, a: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


async def _line_up(st: Storage) -> None:
    line = st.cache.line
    assert line is not None
    for _ in range(500):
        if line.up:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the direct Redis line never came up")


async def _stored(dsn: str, cid: str) -> list[tuple[str, int | None]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT content, pos FROM messages WHERE conversation_id = $1"
            " ORDER BY pos NULLS FIRST, created_at, seq",
            cid,
        )
        return [(r["content"], r["pos"]) for r in rows]
    finally:
        await conn.close()


async def _cached(redis: Redis, keys: Keys, cid: str) -> list[tuple[str, int]]:
    return [(d["content"], d["pos"]) for d in map(json.loads, await redis.lrange(keys.thread(cid), 0, -1))]


async def test_a_position_that_comes_after_the_commit_is_the_one_stored_read_and_held(
    storage_settings: Callable[..., Settings],
    redis_proxy: FaultProxy,
    redis_url: str,
    redis: Redis,
    pg_dsn: str,
) -> None:
    """The call returns before Redis answered; this process's next read waits for the position
    and sees its turns in place, the held cache copy is extended when the reply comes, and the
    flusher stores every turn with its position (waiting for one still on its way)."""
    settings = storage_settings(redis_url=redis_proxy.url(redis_url))
    redis_a = create_redis(settings.redis_url)
    try:
        async with (
            Storage.open(settings, instance_id="t-late-a", redis=redis_a) as a,
            Storage.open(storage_settings(), instance_id="t-late-b", redis=redis) as b,
        ):
            await _line_up(a)
            cid, _ = await a.history.start_thread(
                exchange("q1", "a1"), session_id="s", tool_name="chat", model=None
            )
            assert [(m.content, m.pos) for m in await a.history.load(cid)] == [("q1", 1), ("a1", 1)]

            redis_proxy.delay = 0.5  # the append script reaches Redis 0.5 s after it was written
            asked, answered = await a.history.append_exchange(cid, exchange("q2", "a2"))
            assert (asked.pos, answered.pos) == (None, None)  # answered without waiting for Redis
            assert a.history.positions_after_commit_total >= 1
            second = await a.history.append_exchange(cid, exchange("q3", "a3"))  # still none back
            assert [m.pos for m in second] == [None, None]
            flushing = asyncio.create_task(a.flush(10))  # the flusher waits for the positions
            loaded = await a.history.load(cid)  # waits for them too
            want = [("q1", 1), ("a1", 1), ("q2", 2), ("a2", 2), ("q3", 3), ("a3", 3)]
            assert [(m.content, m.pos) for m in loaded] == want
            assert (asked.pos, answered.pos) == (2, 2)  # set on the turns the call returned
            # The held copy was extended by the replies (nobody pushed in between).
            assert [m.content for m in a.history._held.copies[cid].messages] == [c for c, _ in want]
            assert await flushing
            assert await _stored(pg_dsn, cid) == want
            assert await _cached(redis, Keys(settings.redis_prefix), cid) == want
            redis_proxy.delay = 0.0
            assert [(m.content, m.pos) for m in await b.history.load(cid)] == want
    finally:
        await redis_a.aclose()


async def test_redis_lost_between_the_send_and_the_reply_takes_the_local_position_and_marks(
    storage_settings: Callable[..., Settings],
    redis_proxy: FaultProxy,
    redis_url: str,
    redis: Redis,
    pg_dsn: str,
) -> None:
    """The append script never reaches Redis (the link drops while it is held back) after the
    call returned: the exchange takes the position after the highest one seen, the thread's
    cache is marked dirty and a cache mark is spooled, so another instance's cache, which
    misses the exchange, is dropped and its reads come from Postgres, in order."""
    settings = storage_settings(redis_url=redis_proxy.url(redis_url))
    redis_a = create_redis(settings.redis_url)
    try:
        async with (
            Storage.open(settings, instance_id="t-lost-a", redis=redis_a) as a,
            Storage.open(storage_settings(), instance_id="t-lost-b", redis=redis) as b,
        ):
            await _line_up(a)
            cid, _ = await a.history.start_thread(
                exchange("q1", "a1"), session_id="s", tool_name="chat", model=None
            )
            assert [m.content for m in await b.history.load(cid)] == ["q1", "a1"]  # B's cache hit

            redis_proxy.delay = 0.5
            asked, _ = await a.history.append_exchange(cid, exchange("q2", "a2"))
            assert asked.pos is None  # answered while the script was held back
            redis_proxy.cut()  # ...and dropped: Redis never runs it
            loaded = await a.history.load(cid)
            assert [(m.content, m.pos) for m in loaded] == [("q1", 1), ("a1", 1), ("q2", 2), ("a2", 2)]
            assert cid in a.history._dirty
            assert await a.flush(10)  # the turns and the mark spooled after them
            conn = await asyncpg.connect(pg_dsn)
            try:
                marks = await conn.fetchval(
                    "SELECT count(*) FROM thread_cache_marks WHERE conversation_id = $1", cid
                )
            finally:
                await conn.close()
            assert marks >= 1
            want = [("q1", 1), ("a1", 1), ("q2", 2), ("a2", 2)]
            assert await _stored(pg_dsn, cid) == want
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10 * CACHE_SYNC_S
            while (seen := [(m.content, m.pos) for m in await b.history.load(cid)]) != want:
                assert seen == want[:2], seen  # a prefix until the mark is applied
                assert loop.time() < deadline, "B never applied the cache mark"
                await asyncio.sleep(CACHE_SYNC_S / 5)
            redis_proxy.restore()
    finally:
        await redis_a.aclose()


async def test_a_writer_killed_with_turns_spooled_before_their_position_gets_them_at_restart(
    storage_settings: Callable[..., Settings],
    redis_proxy: FaultProxy,
    pg_proxy: FaultProxy,
    redis_url: str,
    pg_dsn: str,
    redis: Redis,
    tmp_path: Path,
) -> None:
    """kill -9 with three exchanges in the spool and none stored (Postgres cut): two whose
    script Redis ran (their positions were only in the dead process's memory) and one whose
    script never reached Redis. At restart each exchange's script is sent again: the first two
    get the positions they had and are not pushed onto the cache twice, the third gets the
    next position and is pushed once; Postgres stores them in their order."""
    settings = storage_settings()
    keys = Keys(settings.redis_prefix)
    state = tmp_path / "state-killed"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        pg_proxy.url(pg_dsn),
        redis_proxy.url(redis_url),
        settings.redis_prefix,
        str(state),
        "t-killed-pos",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None

    async def ask(line: str) -> dict[str, Any]:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(line.encode() + b"\n")
        await child.stdin.drain()
        async with asyncio.timeout(20):
            return dict(json.loads(await child.stdout.readline()))

    try:
        async with asyncio.timeout(30):
            assert json.loads(await child.stdout.readline()) == {"ready": True}
        pg_proxy.cut()  # nothing gets stored: the turns stay in the spool
        first = await ask("start q1 a1")
        cid = first["cid"]
        await ask("append q2 a2")
        await asyncio.sleep(0.2)  # both scripts ran; their positions are in the child's memory only
        redis_proxy.delay = 1.0
        third = await ask("append q3 a3")
        assert third["pos"] == [None, None]  # returned before Redis saw its script
        child.send_signal(signal.SIGKILL)
        redis_proxy.cut()  # the held-back script is dropped
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    cached = await _cached(redis, keys, cid)
    assert cached == [("q1", 1), ("a1", 1), ("q2", 2), ("a2", 2)]
    assert await _stored(pg_dsn, cid) == []

    redis_proxy.delay = 0.0
    redis_proxy.restore()
    pg_proxy.restore()
    restarted = storage_settings(state_dir=state)
    async with Storage.open(restarted, instance_id="t-killed-pos", redis=redis) as st:
        assert await st.flush(20)
        assert st.history.positions_recovered_total == 3
        want = [("q1", 1), ("a1", 1), ("q2", 2), ("a2", 2), ("q3", 3), ("a3", 3)]
        assert await _stored(pg_dsn, cid) == want
        assert await _cached(redis, keys, cid) == want  # no exchange pushed twice
        assert [(m.content, m.pos) for m in await st.history.load(cid)] == want
    await redis.delete(keys.thread(cid), keys.thread_meta(cid), keys.thread_pos(cid), keys.thread_xids(cid))


async def test_a_script_no_connection_takes_after_the_commit_began_goes_through_redis_py(
    storage_settings: Callable[..., Settings], redis: Redis, pg_dsn: str
) -> None:
    """The turns go to the spool's thread before the append script is written: if no
    connection takes the script after all (the line closed in between), the exchange takes
    its position the slow way, through redis-py, the cache extended and the thread not dirty,
    for a continued thread and for a new one (whose cache is then left to be read again)."""
    settings = storage_settings()
    async with Storage.open(settings, instance_id="t-unsent", redis=redis) as a:
        await _line_up(a)
        positions = a.history._positions
        real = positions.send_append
        unsent: list[str] = []

        def refuse(cid: str, blobs: list[str], create: list[str] | None) -> None:
            unsent.append(cid)  # as a line that closed between `can_send` and the write

        cid, _ = await a.history.start_thread(
            exchange("q1", "a1"), session_id="s", tool_name="chat", model=None
        )
        positions.send_append = refuse  # type: ignore[method-assign]
        try:
            assert positions.can_send()
            asked, _ = await a.history.append_exchange(cid, exchange("q2", "a2"))
            fresh, _ = await a.history.start_thread(
                exchange("n1", "n2"), session_id="s", tool_name="chat", model=None
            )
        finally:
            positions.send_append = real  # type: ignore[method-assign]
        assert unsent == [cid, fresh]
        want = [("q1", 1), ("a1", 1), ("q2", 2), ("a2", 2)]
        assert [(m.content, m.pos) for m in await a.history.load(cid)] == want
        assert asked.pos == 2
        assert cid not in a.history._dirty  # Redis gave the position: no local fallback
        assert await _cached(redis, Keys(settings.redis_prefix), cid) == want
        assert [(m.content, m.pos) for m in await a.history.load(fresh)] == [("n1", 1), ("n2", 1)]
        assert await a.flush(10)
        assert await _stored(pg_dsn, cid) == want
        assert await _stored(pg_dsn, fresh) == [("n1", 1), ("n2", 1)]
