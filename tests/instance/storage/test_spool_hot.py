"""Live link events in the spool: kept in memory for the flusher, in order, and the sync modes.

No Postgres here: the flusher writes through a recording writer, so what it is handed (which
rows, in which order, from memory or from the file) is what is checked.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from instance.storage import writebehind
from instance.storage.spool import Spool, SpoolEntry
from instance.storage.writebehind import KIND_LINK_EVENT, KIND_TOOL_CALL, Flusher

T = TypeVar("T")
LINK = KIND_LINK_EVENT


def _spool(tmp_path: Path, hot_max: int = 1000) -> Spool:
    return Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,), hot_max=hot_max)


def _bodies(entries: Sequence[SpoolEntry]) -> list[str]:
    return [str(e.payload["body"]) for e in entries]


async def test_committed_link_rows_are_handed_out_from_memory_in_order(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    await spool.open()
    try:
        await spool.append(KIND_TOOL_CALL, {"id": "t1", "body": "call"})
        for i in range(3):
            await spool.append(LINK, {"uuid": str(i), "body": f"m{i}"}, urgent=True)
        assert spool.hot_ready and spool.hot_rows == 3
        hot = spool.hot_batch(10)
        assert _bodies(hot) == ["m0", "m1", "m2"]  # only the link rows, oldest first
        on_disk = {e.seq: e for e in await spool.read_batch(10)}
        for e in hot:  # the same rows as the file holds, seq for seq
            assert on_disk[e.seq].payload == e.payload and on_disk[e.seq].kind == LINK
        assert _bodies(spool.hot_batch(2)) == ["m0", "m1"]  # taken, not removed, until acked
        await spool.ack(hot[:2])
        assert _bodies(spool.hot_batch(10)) == ["m2"] and spool.hot_rows == 1
        await spool.ack(hot[2:])
        assert not spool.hot_ready and spool.hot_batch(10) == [] and spool.rows == 1
    finally:
        await spool.close()


async def test_an_overflow_falls_back_to_the_file_until_every_link_row_is_flushed(tmp_path: Path) -> None:
    spool = _spool(tmp_path, hot_max=2)
    await spool.open()
    try:
        for i in range(3):
            await spool.append(LINK, {"uuid": str(i), "body": f"m{i}"}, urgent=True)
        # Three rows for a copy of two: memory is given up rather than handing out a partial,
        # out-of-order view; the file has them all.
        assert not spool.hot_ready and spool.hot_batch(10) == []
        first = await spool.read_batch(2)
        await spool.ack(first)
        await spool.append(LINK, {"uuid": "3", "body": "m3"}, urgent=True)
        assert spool.hot_batch(10) == []  # m2 is still only in the file: m3 must not pass it
        rest = await spool.read_batch(10)
        assert _bodies(rest) == ["m2", "m3"]
        await spool.ack(rest)
        await spool.append(LINK, {"uuid": "4", "body": "m4"}, urgent=True)
        assert _bodies(spool.hot_batch(10)) == ["m4"]  # complete again: memory is used again
    finally:
        await spool.close()


async def test_link_rows_left_by_a_previous_run_are_read_from_the_file_first(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    await spool.open()
    await spool.append(LINK, {"uuid": "0", "body": "old"}, urgent=True)
    await spool.close()
    spool = _spool(tmp_path)
    await spool.open()
    try:
        assert spool.hot_rows == 1
        await spool.append(LINK, {"uuid": "1", "body": "new"}, urgent=True)
        assert spool.hot_batch(10) == []
        batch = await spool.read_batch(10)
        assert _bodies(batch) == ["old", "new"]
        await spool.ack(batch)
        assert spool.hot_rows == 0 and spool.rows == 0
    finally:
        await spool.close()


async def test_normal_sync_answers_with_the_row_committed(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    await spool.open()
    try:
        await spool.append(LINK, {"uuid": "n", "body": "fast"}, urgent=True, sync="normal")
        # Committed (another connection sees it: it survives this process being killed).
        other = sqlite3.connect(spool.path)
        try:
            assert other.execute("SELECT count(*) FROM spool").fetchone()[0] == 1
        finally:
            other.close()
        await spool.append(LINK, {"uuid": "f", "body": "full"}, urgent=True)
        stats = spool.stats()
        assert stats["unsynced_commits"] == 1 and stats["appends_total"] == 2
        assert _bodies(spool.hot_batch(10)) == ["fast", "full"]
    finally:
        await spool.close()


class _Recorder:
    """A Database stand-in whose writer records each batch it is handed."""

    def __init__(self) -> None:
        self.batches: list[list[SpoolEntry]] = []
        self.written = asyncio.Event()

    async def run(self, fn: Callable[[Any], Awaitable[T]], **_: Any) -> T:
        return await fn(None)

    async def writer(self, conn: Any, batch: Sequence[SpoolEntry]) -> list[Any]:
        self.batches.append(list(batch))
        self.written.set()
        return []


async def test_the_flusher_takes_a_link_event_at_once_and_keeps_link_order(tmp_path: Path) -> None:
    spool = _spool(tmp_path, hot_max=2)
    await spool.open()
    rec = _Recorder()
    # A flush interval of an hour: only a link event's own wake-up can explain a prompt flush.
    flusher = Flusher(spool, rec, batch_size=100, interval_s=3600, writer=rec.writer)  # type: ignore[arg-type]
    try:
        await spool.append(KIND_TOOL_CALL, {"id": "t1", "body": "call"})
        for i in range(3):  # more than the memory holds: the file path, in order
            await spool.append(LINK, {"uuid": str(i), "body": f"m{i}"}, urgent=True)
        flusher.start()
        async with asyncio.timeout(30):
            while spool.rows:  # noqa: ASYNC110 - waiting for the background flusher
                await asyncio.sleep(0.01)
        assert [b for batch in rec.batches for b in _bodies(batch)] == ["call", "m0", "m1", "m2"]
        rec.batches.clear()
        rec.written.clear()
        await spool.append(KIND_TOOL_CALL, {"id": "t2", "body": "later"})  # waits for its batch
        await spool.append(LINK, {"uuid": "3", "body": "m3"}, urgent=True)
        async with asyncio.timeout(30):
            await rec.written.wait()
        assert _bodies(rec.batches[0]) == ["m3"]  # from memory, ahead of the older tool call
        assert spool.hot_taken_total >= 1
    finally:
        await flusher.stop()
        await spool.close()


@pytest.mark.parametrize("sync", ["full", "normal"])
async def test_both_sync_modes_keep_every_row_through_a_reopen(tmp_path: Path, sync: Any) -> None:
    spool = _spool(tmp_path)
    await spool.open()
    await asyncio.gather(
        *(spool.append(LINK, {"uuid": str(i), "body": f"m{i}"}, urgent=True, sync=sync) for i in range(20))
    )
    await spool.close()
    spool = _spool(tmp_path)
    await spool.open()
    try:
        assert _bodies(await spool.read_batch(100)) == [f"m{i}" for i in range(20)]
    finally:
        await spool.close()


async def test_a_held_flusher_stores_a_link_event_only_once_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender's answer goes out before the store of its event (Flusher.hold): the flusher
    takes the committed row only after the release, or after HOLD_MAX without one; a flush()
    (shutdown, link_leave) does not wait for holds."""
    # HOLD_MAX (50 ms) longer here, so a loaded machine's slow steps cannot end the hold early.
    monkeypatch.setattr(writebehind, "HOLD_MAX", 2.0)
    spool = _spool(tmp_path)
    await spool.open()
    rec = _Recorder()
    flusher = Flusher(spool, rec, batch_size=100, interval_s=3600, writer=rec.writer)  # type: ignore[arg-type]
    flusher.start()
    try:
        release = flusher.hold()
        await spool.append(LINK, {"uuid": "1", "body": "held"}, urgent=True)
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert rec.batches == [] and spool.rows == 1  # committed, not stored yet
        release()
        release()  # a second release changes nothing
        async with asyncio.timeout(30):
            await rec.written.wait()
        assert _bodies(rec.batches[0]) == ["held"]

        rec.written.clear()
        flusher.hold()  # never released: the flusher goes on after HOLD_MAX
        await spool.append(LINK, {"uuid": "2", "body": "forgotten"}, urgent=True)
        async with asyncio.timeout(30):
            await rec.written.wait()
        assert _bodies(rec.batches[-1]) == ["forgotten"]

        rec.written.clear()
        flusher.hold()
        await spool.append(LINK, {"uuid": "3", "body": "leaving"}, urgent=True)
        assert await flusher.flush(5.0)
        assert _bodies(rec.batches[-1]) == ["leaving"]
    finally:
        await flusher.stop()
        await spool.close()


async def test_urgent_and_grouped_appends_keep_their_order(tmp_path: Path) -> None:
    """An urgent append goes to the spool's thread at once, taking the rows queued before it
    along: the file's order is the order of the appends, whatever mix of both."""
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,), fsync_window_ms=20.0)
    await spool.open()
    try:
        appends = []
        for i in range(30):
            if i % 3 == 0:
                appends.append(
                    spool.append(LINK, {"uuid": str(i), "body": f"r{i}"}, urgent=True, sync="normal")
                )
            else:
                appends.append(spool.append(KIND_TOOL_CALL, {"id": str(i), "body": f"r{i}"}))
        await asyncio.gather(*appends)
        assert _bodies(await spool.read_batch(100)) == [f"r{i}" for i in range(30)]
        assert spool.rows == 30 and spool.appends_total == 30
        assert _bodies(spool.hot_batch(100)) == [f"r{i}" for i in range(0, 30, 3)]
    finally:
        await spool.close()
