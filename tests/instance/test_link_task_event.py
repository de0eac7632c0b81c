"""A group task's event on the sender's call: durable in the spool when the call answers, its
store (and the announcement after it) only once the answer is written.

A stand-in runtime with the instance's real spool and flusher (not started: the test looks at
what the flusher would be allowed to do), inside a request's `AfterAnswer`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common.settings import load_settings
from instance import after_answer
from instance.after_answer import AfterAnswer
from instance.links import Links
from instance.storage.spool import Spool
from instance.storage.writebehind import KIND_LINK_EVENT, Flusher


def _spooled(spool: Spool) -> list[dict[str, Any]]:
    other = sqlite3.connect(spool.path)  # another connection: what a restart after kill -9 finds
    try:
        return [
            json.loads(r[0])
            for r in other.execute("SELECT payload FROM spool WHERE kind = ?", (KIND_LINK_EVENT,))
        ]
    finally:
        other.close()


async def test_the_event_is_in_the_spool_when_the_call_answers_and_stored_only_after_the_answer(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(KIND_LINK_EVENT,))
    await spool.open()
    flusher = Flusher(spool, db=None, batch_size=100, interval_s=0.01)  # type: ignore[arg-type]
    settings = load_settings(state_dir=tmp_path / "state", glm_api_key=None, kimi_api_key=None)
    runtime = SimpleNamespace(settings=settings, storage=SimpleNamespace(spool=spool, flusher=flusher))
    runtime.require_storage = lambda: runtime.storage
    links = Links(runtime)  # type: ignore[arg-type]
    pending = AfterAnswer()
    token = after_answer.current_answer.set(pending)
    try:
        links.expect("ev-1")
        committed = links.spool_task_event("crew", "s-a", "ev-1")
        await asyncio.wait_for(committed, 5)  # what the call awaits before it answers
        links.settled("ev-1")
        rows = _spooled(spool)
        assert [(r["group"], r["kind"], r["task_event"]) for r in rows] == [("crew", "task", "ev-1")]
        assert links.stats()["spooled"] == 1
        assert not flusher._released.is_set()  # the store waits for the answer
    finally:
        after_answer.current_answer.reset(token)
    pending.run()  # the answer's last byte is written
    assert flusher._released.is_set()
    await spool.close()
