"""Early announcement of link events: who is told before and after the store, and how often.

A stand-in runtime records what the instance queues for each member (after the store) and what
the early announcement sends (one atomic Redis step, here a recording fake that can fail or
hold), so every interleaving of "announced" and "stored" is played out deterministically.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import links as db
from common.keys import Keys
from common.settings import load_settings
from instance import links as links_mod
from instance.links import Links

GROUP = "crew"


class FakeEvents:
    """EventLog.append_marked, recorded; `fail` raises like Redis down, `gate` holds it."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def append_marked(
        self, marker: str, member: str, score: float, now: float, items: list[tuple[str, Any]]
    ) -> list[str]:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("redis is down")
        self.sent.append(sorted(sid for sid, _ in items))
        return ["1-0"] * len(items)


class FakeRuntime:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.settings = load_settings(
            state_dir=tmp_path / "state", glm_api_key=None, kimi_api_key=None, **settings
        )
        self.redis = None  # counters, streams and marks' cleanup are best effort: skipped here
        self.notifier = SimpleNamespace(events=FakeEvents())
        self.told: list[str] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def notify(self, sid: str | None, method: str, params: dict[str, Any] | None = None) -> None:
        assert method == "notifications/resources/updated" and params == {"uri": db.inbox_uri(GROUP)}
        self.told.append(str(sid))

    def background(self, work: Any, *, what: str) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)

    async def settle(self) -> None:
        while pending := [t for t in self.tasks if not t.done()]:
            await asyncio.gather(*pending)


def _event(uid: str, sender: str = "a", recipient: str | None = None) -> db.LinkEvent:
    return db.LinkEvent(
        group=GROUP, id=1, kind="message", sender=sender, recipient=recipient, subject=None,
        thread=None, body="hi", data={}, created_at=datetime.now(UTC), uuid=uid,
    )  # fmt: skip


@pytest.fixture
def runtime(tmp_path: Path) -> FakeRuntime:
    return FakeRuntime(tmp_path)


def _links(runtime: FakeRuntime, members: set[str]) -> Links:
    links = Links(runtime)  # type: ignore[arg-type]
    links.keys = Keys("t")
    links.remember_members(GROUP, members)
    return links


async def test_members_told_early_are_not_told_again_and_a_new_member_is_told_after(
    runtime: FakeRuntime,
) -> None:
    links = _links(runtime, {"a", "b", "c"})
    links._announce_early(GROUP, "e1", "a", None, 0.0)
    await runtime.settle()
    assert runtime.notifier.events.sent == [["b", "c"]] and runtime.told == []
    links.flushed([(_event("e1"), ["a", "b", "c", "d"])])  # d joined meanwhile
    await runtime.settle()
    assert runtime.told == ["d"] and links.stats()["early"] == 1
    assert links._early == {}


async def test_a_store_before_the_announcement_finishes_is_completed_by_it(runtime: FakeRuntime) -> None:
    links = _links(runtime, {"a", "b"})
    runtime.notifier.events.gate = gate = asyncio.Event()
    links._announce_early(GROUP, "e2", "a", None, 0.0)
    await asyncio.sleep(0)
    links.flushed([(_event("e2"), ["a", "b", "c"])])
    assert runtime.told == []  # not yet: the announcement may still reach them
    gate.set()
    await runtime.settle()
    assert runtime.notifier.events.sent == [["b"]] and runtime.told == ["c"]
    assert links._early == {}


async def test_a_failed_announcement_leaves_everyone_to_the_store(runtime: FakeRuntime) -> None:
    links = _links(runtime, {"a", "b", "c"})
    runtime.notifier.events.fail = True
    links._announce_early(GROUP, "e3", "a", None, 0.0)
    await runtime.settle()
    links.flushed([(_event("e3"), ["a", "b", "c"])])
    assert sorted(runtime.told) == ["b", "c"] and links.stats()["early"] == 0


async def test_a_direct_message_is_announced_to_its_recipient_only(runtime: FakeRuntime) -> None:
    links = _links(runtime, {"a", "b", "c"})
    links._announce_early(GROUP, "e4", "a", "c", 0.0)
    await runtime.settle()
    links.flushed([(_event("e4", recipient="c"), ["a", "b", "c"])])
    assert runtime.notifier.events.sent == [["c"]] and runtime.told == []


async def test_a_store_later_than_readers_wait_tells_everyone_again(
    runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    links = _links(runtime, {"a", "b"})
    links._announce_early(GROUP, "e5", "a", None, 0.0)
    await runtime.settle()
    monkeypatch.setattr(links_mod, "INFLIGHT_WAIT", 0.0)  # Postgres was slower than a read waits
    await asyncio.sleep(0.01)
    links.flushed([(_event("e5"), ["a", "b"])])
    assert runtime.told == ["b"]  # b's early read may have found nothing: it is woken again


async def test_turned_off_every_member_is_told_after_the_store(tmp_path: Path) -> None:
    runtime = FakeRuntime(tmp_path, link_early_notify=False)
    links = _links(runtime, {"a", "b"})
    links._announce_early(GROUP, "e6", "a", None, 0.0)
    await runtime.settle()
    links.flushed([(_event("e6"), ["a", "b"])])
    assert runtime.notifier.events.sent == [] and runtime.told == ["b"]


class FakeLine:
    """DirectLine.send, recorded: the command is 'written' at the call; its reply is settled by
    the test (None: the line is down, take redis-py's path)."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.commands: list[tuple[Any, ...]] = []
        self.replies: list[asyncio.Future[Any]] = []

    def send(self, *args: Any) -> asyncio.Future[Any] | None:
        if not self.up:
            return None
        self.commands.append(args)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies.append(fut)
        return fut


class FakeEventsWithCommand(FakeEvents):
    def append_marked_command(
        self, marker: str, member: str, score: float, now: float, items: list[tuple[str, Any]]
    ) -> tuple[Any, ...]:
        return ("EVALSHA", "sha", marker, member, *sorted(sid for sid, _ in items))


def _with_line(runtime: FakeRuntime, line: FakeLine) -> FakeEventsWithCommand:
    events = FakeEventsWithCommand()
    runtime.notifier = SimpleNamespace(events=events, line=line)
    return events


async def test_the_announcement_is_written_on_the_direct_line_at_once(runtime: FakeRuntime) -> None:
    line = FakeLine()
    events = _with_line(runtime, line)
    links = _links(runtime, {"a", "b", "c"})
    links._announce_early(GROUP, "e7", "a", None, 0.0)
    # Written in the call itself: no task, no await between the commit and the socket.
    assert len(line.commands) == 1 and line.commands[0][-2:] == ("b", "c") and runtime.tasks == set()
    line.replies[0].set_result(["1-0", "1-0"])
    await asyncio.sleep(0)
    assert links.stats()["early"] == links.stats()["early_direct"] == 1 and events.sent == []
    links.flushed([(_event("e7"), ["a", "b", "c", "d"])])
    assert runtime.told == ["d"] and links._early == {}


async def test_a_line_reply_error_falls_back_to_redis_py(runtime: FakeRuntime) -> None:
    from redis.exceptions import ResponseError

    line = FakeLine()
    events = _with_line(runtime, line)
    links = _links(runtime, {"a", "b"})
    links._announce_early(GROUP, "e8", "a", None, 0.0)
    line.replies[0].set_exception(ResponseError("NOSCRIPT No matching script"))
    await asyncio.sleep(0)
    await runtime.settle()
    assert events.sent == [["b"]] and links.stats()["early"] == 1  # loaded and sent by redis-py
    links.flushed([(_event("e8"), ["a", "b"])])
    assert runtime.told == []


async def test_a_store_before_the_line_replies_is_completed_by_the_reply(runtime: FakeRuntime) -> None:
    line = FakeLine()
    _with_line(runtime, line)
    links = _links(runtime, {"a", "b"})
    links._announce_early(GROUP, "e9", "a", None, 0.0)
    links.flushed([(_event("e9"), ["a", "b", "c"])])
    assert runtime.told == []
    line.replies[0].set_result(["1-0"])
    await asyncio.sleep(0)
    assert runtime.told == ["c"] and links._early == {}


async def test_with_the_line_down_redis_py_announces(runtime: FakeRuntime) -> None:
    events = _with_line(runtime, FakeLine(up=False))
    links = _links(runtime, {"a", "b"})
    links._announce_early(GROUP, "e10", "a", None, 0.0)
    await runtime.settle()
    assert events.sent == [["b"]] and links.stats()["early"] == 1


async def test_an_event_the_spool_refused_after_its_announcement_leaves_no_mark(
    runtime: FakeRuntime,
) -> None:
    """Announced as its row went to the spool, then the write failed (disk error): readers must
    not wait for an event that will never be stored, and nobody is told about it again."""
    line = FakeLine()
    _with_line(runtime, line)
    links = _links(runtime, {"a", "b"})
    cleared: list[dict[str, list[str]]] = []
    links._clear_inflight = cleared.append  # type: ignore[method-assign]
    links._announce_early(GROUP, "e11", "a", None, 0.0)
    links._retract("e11")  # the spool refused it before Redis answered
    assert cleared == [] and "e11" in links._early
    line.replies[0].set_result(["1-0"])
    await asyncio.sleep(0)
    assert cleared == [{GROUP: ["e11"]}] and links._early == {}

    links._announce_early(GROUP, "e12", "a", None, 0.0)
    line.replies[1].set_result(["1-0"])
    await asyncio.sleep(0)
    links._retract("e12")  # refused after Redis answered: cleared at once
    assert cleared[-1] == {GROUP: ["e12"]} and links._early == {}
    assert runtime.told == []
