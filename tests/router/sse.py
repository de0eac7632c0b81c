"""A small SSE reader for tests that need what the SDK client hides (event ids, Last-Event-ID)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Frame:
    id: str | None
    data: dict[str, Any] | None
    comment: bool = False
    retry: int | None = None


async def frames(resp: aiohttp.ClientResponse) -> AsyncIterator[Frame]:
    """Parse an SSE body into frames (comments and retry-only frames included)."""
    ev_id: str | None = None
    data: list[str] = []
    comment = False
    retry: int | None = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line == "":
            if data or comment or retry is not None or ev_id is not None:
                body = json.loads("\n".join(data)) if data else None
                yield Frame(ev_id, body, comment and not data, retry)
            ev_id, data, comment, retry = None, [], False, None
            continue
        if line.startswith(":"):
            comment = True
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            ev_id = value
        elif name == "data":
            data.append(value)
        elif name == "retry":
            retry = int(value)


@dataclass
class Reader:
    """Reads one SSE response in the background, keeping every message frame."""

    resp: aiohttp.ClientResponse
    messages: list[Frame] = field(default_factory=list)
    keepalives: int = 0
    retry: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> Reader:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            async for f in frames(self.resp):
                if f.retry is not None:
                    self.retry = f.retry
                if f.comment:
                    self.keepalives += 1
                elif f.data is not None:
                    self.messages.append(f)
                self.changed.set()
        self.changed.set()

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Frame]:
        """Until `count` message frames arrived (or the stream ended); returns them all."""
        async with asyncio.timeout(timeout):
            while len(self.messages) < count and not self.done:
                self.changed.clear()
                await self.changed.wait()
        return self.messages

    async def wait_keepalive(self, timeout: float = 20.0) -> None:
        """Until a keep-alive comment arrived after the ones seen so far."""
        seen = self.keepalives
        async with asyncio.timeout(timeout):
            while self.keepalives == seen and not self.done:
                self.changed.clear()
                await self.changed.wait()
        assert self.keepalives > seen, "the stream ended without a keep-alive"

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.resp.close()
