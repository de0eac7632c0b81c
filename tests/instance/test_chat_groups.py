"""instance/links.py chat_groups: a chat never waits for Postgres to learn its opted-in groups
once it knew them (an old copy is re-read in the background), nor for a Postgres known down."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from instance import links
from instance.links import Links


class FakeDb:
    def __init__(self) -> None:
        self.groups: list[str] = []
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.last_error: str | None = None
        self.connected = True

    async def run(self, fn: Any, *, idempotent: bool, what: str) -> list[str]:
        self.reads += 1
        seen = list(self.groups)  # what Postgres held when the read ran
        if self.gate is not None:
            await self.gate.wait()
        return seen


class FakeRuntime:
    def __init__(self) -> None:
        self.settings = SimpleNamespace(redis_prefix="exaitest")
        self.storage = SimpleNamespace(db=FakeDb())
        self.tasks: set[asyncio.Task[Any]] = set()

    def require_storage(self) -> Any:
        return self.storage

    def background(self, work: Any, *, what: str) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)


async def test_an_old_copy_is_served_and_a_reread_never_undoes_a_newer_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = FakeRuntime()
    db = rt.storage.db
    lk = Links(rt)  # type: ignore[arg-type]
    db.groups = ["g1"]
    assert await lk.chat_groups("s1") == ["g1"] and db.reads == 1
    monkeypatch.setattr(links, "CHAT_OPT_IN_TTL", 0.0)
    db.groups, db.gate = ["g1", "g2"], asyncio.Event()
    assert await lk.chat_groups("s1") == ["g1"]  # served at once; the re-read waits on Postgres
    await asyncio.sleep(0)
    assert await lk.chat_groups("s1") == ["g1"] and db.reads == 2  # one re-read at a time
    db.gate.set()
    await asyncio.gather(*rt.tasks)
    assert lk._chat_groups["s1"][1] == ["g1", "g2"]

    db.gate = asyncio.Event()
    assert await lk.chat_groups("s1") == ["g1", "g2"]  # starts a re-read of ["g1", "g2"]...
    lk.remember_chat_groups("s1", ["g3"])  # ...and a link_join through this instance is newer
    db.gate.set()
    await asyncio.gather(*rt.tasks)
    assert lk._chat_groups["s1"][1] == ["g3"]


async def test_a_miss_does_not_wait_for_a_postgres_known_down() -> None:
    rt = FakeRuntime()
    db = rt.storage.db
    db.last_error, db.connected = "connection refused", False
    lk = Links(rt)  # type: ignore[arg-type]
    assert await lk.chat_groups("s2") == [] and db.reads == 0
