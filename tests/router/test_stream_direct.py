"""A carried event written to a sleeping stream by the hub itself (router/streams.py).

When a publish carries an event that follows on from what a stream wrote last, and the stream's
pump is asleep with nothing to do, the hub writes the frame at once from its pub/sub reader,
without waking the pump. Anything else (a gap, a bare wake-up) still wakes the pump, which reads
the log. Either way the client gets every event once, in order. A real aiohttp server and
client; the session's log is a list.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from common.keys import Keys
from common.notifications import Event
from router.metrics import Metrics
from router.streams import Hub, Watch, sse_frame

SID = "s1"


class ListLog:
    """EventLog.after over a list of events (the session's log)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reads = 0

    async def after(self, sid: str, cursor: str, *, count: int = 200) -> list[Event]:
        self.reads += 1
        key = tuple(int(x) for x in cursor.split("-"))
        return [e for e in self.events if tuple(int(x) for x in e.id.split("-")) > key][:count]


def _note(n: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": f"x://{n}"}}


async def _frames(resp: aiohttp.ClientResponse, n: int) -> list[str]:
    """The ids of the next `n` event frames on the stream."""
    ids: list[str] = []
    async with asyncio.timeout(10):
        while len(ids) < n:
            line = (await resp.content.readline()).decode().strip()
            if line.startswith("id: "):
                ids.append(line[4:])
    return ids


async def _asleep(w: Watch) -> None:
    """Until the stream's pump sleeps with nothing to do (it offers the hub its direct write)."""
    async with asyncio.timeout(10):
        for _ in range(2000):
            if w.direct is not None:
                return
            await asyncio.sleep(0.005)
    raise AssertionError("the pump never went to sleep")


async def test_a_following_event_is_written_at_once_and_a_gap_is_read_from_the_log() -> None:
    log = ListLog()
    hub = Hub(
        redis=None,  # type: ignore[arg-type]  # not subscribed: this test wakes the hub by hand
        keys=Keys("t"),
        events=log,  # type: ignore[arg-type]
        table=None,  # type: ignore[arg-type]
        metrics=Metrics(),
        keepalive=30.0,
        per_session=4,
        retry_ms=0,
        session_ttl=60.0,
    )
    watches: list[Watch] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        async with hub.watch(SID, "get") as w:
            watches.append(w)
            resp = await hub._start(request)
            await resp.write(b": open\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await hub._pump(
                    resp,
                    w,
                    "1-0",
                    lambda ev: sse_frame(ev.message, ev.id),
                    catching_up=False,
                    transport=request.transport,
                )
            return resp

    app = web.Application()
    app.router.add_get("/s", stream)
    async with TestServer(app) as server, aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/s")) as resp:
            await resp.content.readline()  # the handler has its watch by now
            w = watches[0]
            await _asleep(w)
            reads = log.reads

            # Follows on from "1-0": written by the hub, the pump not woken, the log not read.
            log.events.append(Event("2-0", _note(2)))
            hub._wake(SID, ended=False, event=("1-0", log.events[-1]))
            assert not w.wake.is_set() and w.cursor == "2-0"
            assert await _frames(resp, 1) == ["2-0"]
            assert log.reads == reads

            # A gap (3-0 was never carried): the pump wakes and reads the log after 2-0.
            log.events += [Event("3-0", _note(3)), Event("4-0", _note(4))]
            hub._wake(SID, ended=False, event=("3-0", log.events[-1]))
            assert w.wake.is_set()
            assert await _frames(resp, 2) == ["3-0", "4-0"]
            await _asleep(w)
            assert log.reads > reads

            # Asleep again, it follows on from what the pump wrote (4-0).
            log.events.append(Event("5-0", _note(5)))
            hub._wake(SID, ended=False, event=("4-0", log.events[-1]))
            assert not w.wake.is_set()
            log.events.append(Event("6-0", _note(6)))
            hub._wake(SID, ended=False, event=("5-0", log.events[-1]))
            assert await _frames(resp, 2) == ["5-0", "6-0"]

            w.ended = True  # the session ends: the pump finishes, nothing is written twice
            w.wake.set()
            rest = await asyncio.wait_for(resp.content.read(), 10)
            assert b"id: " not in rest
