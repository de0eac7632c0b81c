"""The spool's commit and its fsync, apart: what happens at the commit (a write to the OS, kill -9
safe) and what waits for the fsync (sync="full" callers), with the fsync held by the test."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from common.errors import StorageError
from instance.storage.spool import Spool
from instance.storage.writebehind import KIND_LINK_EVENT, KIND_TOOL_CALL

LINK = KIND_LINK_EVENT


class HeldFsync:
    """Replaces Spool._fsync_wal_sync: each fsync waits until `release` (or raises `error`)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.real = spool._fsync_wal_sync
        self.gate = threading.Event()
        self.started = threading.Event()
        self.error: OSError | None = None
        self.calls = 0
        spool._fsync_wal_sync = self  # type: ignore[method-assign]

    def __call__(self) -> None:
        self.calls += 1
        self.started.set()
        self.gate.wait(10)
        if self.error is not None:
            raise self.error
        self.real()


def _committed_rows(spool: Spool) -> int:
    other = sqlite3.connect(spool.path)  # another connection: what a restart after kill -9 finds
    try:
        return int(other.execute("SELECT count(*) FROM spool").fetchone()[0])
    finally:
        other.close()


async def test_a_full_append_is_committed_then_announced_and_answered_after_its_fsync(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:
        held = HeldFsync(spool)
        committed = asyncio.Event()
        append = asyncio.create_task(
            spool.append(LINK, {"uuid": "1", "body": "x"}, urgent=True, on_commit=committed.set)
        )
        await asyncio.to_thread(held.started.wait, 5)
        for _ in range(100):  # the loop hears of the commit while the fsync runs
            if spool.rows == 1:
                break
            await asyncio.sleep(0.01)
        # Committed and counted (kill -9 safe), its fsync running: not yet announced nor answered.
        assert _committed_rows(spool) == 1 and spool.rows == 1 and spool.hot_ready
        await asyncio.sleep(0.05)
        assert not committed.is_set() and not append.done()
        held.gate.set()
        await asyncio.wait_for(append, 5)
        assert committed.is_set() and held.calls == 1
    finally:
        held.gate.set()
        await spool.close()


async def test_a_normal_append_is_answered_at_the_commit_and_fsyncd_after(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:
        held = HeldFsync(spool)
        calls: list[str] = []
        await asyncio.wait_for(
            spool.append(
                LINK,
                {"uuid": "1", "body": "x"},
                urgent=True,
                sync="normal",
                on_commit=lambda: calls.append("c"),
            ),
            5,
        )
        assert calls == ["c"] and _committed_rows(spool) == 1
        await asyncio.to_thread(held.started.wait, 5)  # the fsync follows at once, on its own thread
        assert spool.stats()["unsynced_window"]["count"] == 0
        held.gate.set()
        for _ in range(100):
            if spool.stats()["unsynced_window"]["count"] == 1:
                break
            await asyncio.sleep(0.01)
        assert spool.stats()["unsynced_window"]["count"] == 1  # the power-loss window, measured
    finally:
        held.gate.set()
        await spool.close()


async def test_a_failed_fsync_tells_full_callers_and_keeps_the_row(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:
        held = HeldFsync(spool)
        held.error = OSError(5, "Input/output error")
        held.gate.set()
        with pytest.raises(StorageError, match="could not be fsync'd"):
            await spool.append(KIND_TOOL_CALL, {"id": "t", "body": "x"})
        # Committed all the same (it will be flushed): the caller was told exactly that.
        assert spool.rows == 1 and _committed_rows(spool) == 1
        held.error = None
        await spool.append(KIND_TOOL_CALL, {"id": "t2", "body": "y"})
        assert spool.rows == 2
    finally:
        held.gate.set()
        await spool.close()


async def test_a_normal_commit_does_not_wait_behind_a_full_batchs_fsync_callers(tmp_path: Path) -> None:
    """A sync="normal" row that shares a batch with a sync="full" one is answered at the commit."""
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(LINK,))
    await spool.open()
    try:
        held = HeldFsync(spool)
        full = asyncio.create_task(spool.append(KIND_TOOL_CALL, {"id": "t", "body": "x"}))
        normal = asyncio.create_task(
            spool.append(LINK, {"uuid": "1", "body": "y"}, urgent=True, sync="normal")
        )
        await asyncio.wait_for(normal, 5)
        assert not full.done()
        held.gate.set()
        await asyncio.wait_for(full, 5)
    finally:
        held.gate.set()
        await spool.close()
