"""What an append's `on_commit` sees, and the power-loss window of sync="normal" rows, with the
spool's background fsync held by the test."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from common.errors import StorageError
from instance.storage.spool import Spool
from instance.storage.writebehind import KIND_LINK_EVENT

LINK = KIND_LINK_EVENT


class HeldFsync:
    """Replaces Spool._fsync_wal_sync (the fsync after sync="normal" commits): each waits until
    `gate` is set."""

    def __init__(self, spool: Spool) -> None:
        self.real = spool._fsync_wal_sync
        self.gate = threading.Event()
        self.started = threading.Event()
        spool._fsync_wal_sync = self  # type: ignore[method-assign]

    def __call__(self) -> None:
        self.started.set()
        self.gate.wait(10)
        self.real()


def _committed_rows(spool: Spool) -> int:
    other = sqlite3.connect(spool.path)  # another connection: what a restart after kill -9 finds
    try:
        return int(other.execute("SELECT count(*) FROM spool").fetchone()[0])
    finally:
        other.close()


async def test_on_commit_runs_once_the_row_is_committed_before_the_caller_resumes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:
        for n, sync in enumerate(("full", "normal"), start=1):
            seen: list[tuple[int, bool]] = []
            resumed = asyncio.Event()

            def committed(seen: list[tuple[int, bool]] = seen, resumed: asyncio.Event = resumed) -> None:
                seen.append((_committed_rows(spool), resumed.is_set()))

            await asyncio.wait_for(
                spool.append(
                    LINK,
                    {"uuid": sync, "body": "x"},
                    urgent=True,
                    sync=sync,  # type: ignore[arg-type]
                    on_commit=committed,
                ),
                5,
            )
            resumed.set()
            assert seen == [(n, False)]
        assert _bodies_from_memory(spool) == ["x", "x"]
    finally:
        await spool.close()


def _bodies_from_memory(spool: Spool) -> list[str]:
    return [str(e.payload["body"]) for e in spool.hot_batch(10)]


async def test_a_normal_append_is_answered_before_its_fsync_and_the_window_is_measured(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    held = HeldFsync(spool)
    try:
        await asyncio.wait_for(spool.append(LINK, {"uuid": "1", "body": "x"}, urgent=True, sync="normal"), 5)
        assert _committed_rows(spool) == 1  # kill -9 safe already
        await asyncio.to_thread(held.started.wait, 5)  # the fsync follows at once, off the caller's path
        assert spool.stats()["unsynced_window"]["count"] == 0
        held.gate.set()
        for _ in range(200):
            if spool.stats()["unsynced_window"]["count"] == 1:
                break
            await asyncio.sleep(0.01)
        assert spool.stats()["unsynced_window"]["count"] == 1  # answer -> fsync done, measured
    finally:
        held.gate.set()
        await spool.close()


async def test_the_fsync_is_asked_for_by_the_spool_thread_and_close_waits_for_the_last_one(
    tmp_path: Path,
) -> None:
    """The spool's thread wakes the fsync thread itself once it has committed (the loop does no
    work for it); commits made during one fsync share the next; close() returns only once the
    last commit is fsync'd."""
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    held = HeldFsync(spool)
    calls: list[int] = []
    real = held.real

    def counted() -> None:
        calls.append(1)
        real()

    held.real = counted
    await asyncio.wait_for(spool.append(LINK, {"uuid": "1", "body": "x"}, urgent=True, sync="normal"), 5)
    await asyncio.to_thread(held.started.wait, 5)  # the first fsync runs (held) ...
    for n in (2, 3):  # ... while two more commits are answered: one fsync covers both
        row = {"uuid": str(n), "body": "x"}
        await asyncio.wait_for(spool.append(LINK, row, urgent=True, sync="normal"), 5)
    assert spool.unsynced_commits == 3
    closing = asyncio.create_task(spool.close())
    await asyncio.sleep(0.1)
    assert not closing.done()  # the file is not closed before its last fsync
    held.gate.set()
    await asyncio.wait_for(closing, 10)
    assert len(calls) == 2  # the first commit's fsync, then one for the two made meanwhile
    assert spool.stats()["unsynced_window"]["count"] == 2


async def test_a_failing_on_commit_does_not_fail_the_write(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:

        def boom() -> None:
            raise RuntimeError("announcement bug")

        await spool.append(LINK, {"uuid": "1", "body": "x"}, urgent=True, on_commit=boom)
        assert spool.rows == 1
    finally:
        await spool.close()


async def test_before_commit_runs_once_admitted_before_the_row_is_committed(tmp_path: Path) -> None:
    """A link event is announced from `before_commit` (sync="normal"): the row is admitted but
    not committed yet, and the caller resumes only once it is committed, after `on_commit`."""
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:
        order: list[tuple[str, int]] = []
        await asyncio.wait_for(
            spool.append(
                LINK,
                {"uuid": "1", "body": "x"},
                urgent=True,
                sync="normal",
                before_commit=lambda: order.append(("before", _committed_rows(spool))),
                on_commit=lambda: order.append(("committed", _committed_rows(spool))),
            ),
            5,
        )
        assert order == [("before", 0), ("committed", 1)]

        def boom() -> None:
            raise RuntimeError("announcement bug")

        await spool.append(LINK, {"uuid": "2", "body": "y"}, urgent=True, sync="normal", before_commit=boom)
        assert _committed_rows(spool) == 2  # a failing callback does not fail the write
    finally:
        await spool.close()


async def test_before_commit_is_not_called_for_a_refused_row(tmp_path: Path) -> None:
    from common.errors import SpoolFull

    spool = Spool(tmp_path / "spool", max_bytes=64, full_policy="refuse", hot_kinds=(LINK,))
    await spool.open()
    called: list[int] = []
    try:
        try:
            await spool.append(
                LINK, {"uuid": "1", "body": "x" * 200}, urgent=True, sync="normal",
                before_commit=lambda: called.append(1),
            )  # fmt: skip
        except SpoolFull:
            pass
        else:
            raise AssertionError("a row larger than the spool was taken")
        assert called == [] and _committed_rows(spool) == 0
    finally:
        await spool.close()


async def test_append_many_commits_its_rows_together_and_eager_writers_still_share_commits(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24)
    await spool.open()
    try:
        rows = [("message", {"id": f"m{i}", "n": i}) for i in range(3)]
        await spool.append_many(rows, thread_id="t", eager=True, sync="normal")
        assert (spool.commits_total, spool.appends_total) == (1, 3)  # one transaction, in order
        assert [e.payload["n"] for e in await spool.pending_for_thread("t")] == [0, 1, 2]

        # Eager writers hand off at once only while the spool is idle; the rest join a group.
        await asyncio.gather(
            *(
                spool.append_many([("message", {"id": f"c{i}a"}), ("message", {"id": f"c{i}b"})], eager=True)
                for i in range(100)
            )
        )
        assert spool.appends_total == 3 + 200 and spool.commits_total - 1 < 100 / 4
        pairs = [e.payload["id"] for e in await spool.read_batch(1000)][3:]
        assert pairs == [f"c{i}{s}" for i in range(100) for s in "ab"]  # each pair kept together

        # A failed commit fails every row of the batch, and the caller hears it.
        def broken(rows: object, full: bool = True) -> list[int]:
            raise sqlite3.OperationalError("disk I/O error")

        spool._insert_sync = broken  # type: ignore[method-assign,assignment]
        try:
            await spool.append_many([("message", {"id": "x"}), ("message", {"id": "y"})], eager=True)
        except Exception as exc:
            assert "could not write to the local spool" in str(exc)
        else:
            raise AssertionError("a failed commit was not reported")
        assert spool.appends_total == 203
    finally:
        await spool.close()


async def test_submit_hands_a_row_to_the_spool_at_once_and_its_future_says_when_it_is_committed(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:
        for n, sync in enumerate(("full", "normal"), start=1):
            committed = spool.submit(LINK, {"uuid": sync, "body": sync}, urgent=True, sync=sync)  # type: ignore[arg-type]
            assert committed is not None
            await asyncio.wait_for(committed, 5)  # no task, no await before the hand-off
            assert _committed_rows(spool) == n  # on disk: a restart after kill -9 finds it
        assert _bodies_from_memory(spool) == ["full", "normal"]  # in order, for the flusher
    finally:
        await spool.close()


async def test_submit_takes_nothing_when_the_spool_is_full_and_refuses_once_it_is_closed(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=200, hot_kinds=(LINK,))
    await spool.open()
    try:
        first = spool.submit(LINK, {"uuid": "1", "body": "x" * 100}, urgent=True)
        assert first is not None
        await asyncio.wait_for(first, 5)
        # No room left: nothing queued, nothing reserved (the caller falls back to `append`,
        # which applies the full-spool policy).
        assert spool.submit(LINK, {"uuid": "2", "body": "y" * 100}, urgent=True) is None
        assert spool._reserved == 0 and _committed_rows(spool) == 1
    finally:
        await spool.close()
    try:
        spool.submit(LINK, {"uuid": "3", "body": "z"}, urgent=True)
    except StorageError as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("a closed spool took a row")
