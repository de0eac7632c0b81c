"""A group task's event on the sender's call: spooled only once the call's answer is written.

The task write's own statement records the event in the change's audit row (the outbox, see
tests/instance/test_link_task_outbox.py); the event itself goes to the instance's spool after
the answer, where the flusher stores it with the group's next id and announces it. A stand-in
runtime with the instance's real spool, inside a request's `AfterAnswer`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import links as db
from common.settings import load_settings
from instance import after_answer
from instance.after_answer import AfterAnswer
from instance.links import Links
from instance.storage.spool import Spool
from instance.storage.writebehind import KIND_LINK_EVENT


def _spooled(spool: Spool) -> list[dict[str, Any]]:
    other = sqlite3.connect(spool.path)  # another connection: what a restart after kill -9 finds
    try:
        return [
            json.loads(r[0])
            for r in other.execute("SELECT payload FROM spool WHERE kind = ?", (KIND_LINK_EVENT,))
        ]
    finally:
        other.close()


def _task(name: str = "port the parser", state: str = "IN_PROGRESS", version: int = 2) -> Any:
    return SimpleNamespace(id=str(uuid.uuid4()), name=name, state=state, version=version)


async def _links(tmp_path: Path) -> tuple[Links, Spool]:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(KIND_LINK_EVENT,))
    await spool.open()
    settings = load_settings(state_dir=tmp_path / "state", glm_api_key=None, kimi_api_key=None)
    runtime = SimpleNamespace(settings=settings, storage=SimpleNamespace(spool=spool), notifier=None)
    runtime.require_storage = lambda: runtime.storage
    return Links(runtime), spool  # type: ignore[arg-type]


async def test_the_event_is_spooled_after_the_answer_with_the_audit_rows_id(tmp_path: Path) -> None:
    links, spool = await _links(tmp_path)
    try:
        task = _task()
        written = db.TaskEventWrite(group="crew", uuid=str(uuid.uuid4()), sender="s-a", written=True)
        refused = db.TaskEventWrite(group="crew", uuid=str(uuid.uuid4()), sender="s-a")  # never committed
        pending = AfterAnswer()
        token = after_answer.current_answer.set(pending)
        try:
            links.task_event_written(written, task)
            links.task_event_written(refused, _task())
        finally:
            after_answer.current_answer.reset(token)
        await asyncio.sleep(0.01)  # (a call still running after AfterAnswer's LATEST spools it anyway)
        assert _spooled(spool) == []  # nothing beside the answer
        pending.run()  # the answer's last byte is written
        async with asyncio.timeout(5):
            while links.stats()["spooled"] < 1:  # noqa: ASYNC110 - the spool commits on its thread
                await asyncio.sleep(0.01)
        (row,) = _spooled(spool)
        assert row["uuid"] == written.uuid and (row["group"], row["kind"], row["sender"]) == (
            "crew",
            "task",
            "s-a",
        )
        assert row["data"] == {"task_id": task.id, "name": task.name, "state": "IN_PROGRESS", "version": 2}
        assert links.stats()["task_spooled"] == 1
    finally:
        await spool.close()


async def test_a_spool_that_cannot_take_it_leaves_it_to_the_relay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    links, spool = await _links(tmp_path)
    await spool.close()  # a closed spool refuses every write
    event = db.TaskEventWrite(group="crew", uuid=str(uuid.uuid4()), sender="s-a", written=True)
    links.task_event_written(event, _task())  # outside a request: at once
    assert links.stats()["task_spooled"] == 0
    assert "outbox relay will store it" in caplog.text
