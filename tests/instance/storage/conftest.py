"""Fixtures for the storage tests: a TCP fault proxy and Storage instances on this run's services.

The proxy sits between the storage layer and the real Postgres (or Redis) so a test can make
the server unreachable (`cut`), bring it back (`restore`) or slow it down (`delay`) without
touching the server itself — which other test runs share.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis

from common.redis import create_redis
from common.settings import Settings
from instance.storage import Storage


class FaultProxy:
    """A loopback TCP forwarder whose link the test can cut, restore or slow down."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay = 0.0  # seconds added before each client->server chunk
        self._down = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        auth = netloc[0] + "@" if len(netloc) == 2 else ""
        return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{self.port}"))

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore`."""
        self._down = True
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._down = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst, slow in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pipe(src, dst, slow))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
        try:
            while data := await src.read(65536):
                if slow and self.delay:
                    await asyncio.sleep(self.delay)
                if self._down:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def start_proxy(url: str) -> FaultProxy:
    parts = urlsplit(url)
    return await FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()


@pytest.fixture
async def pg_proxy(pg_dsn: str) -> AsyncIterator[FaultProxy]:
    proxy = await start_proxy(pg_dsn)
    yield proxy
    await proxy.close()


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    proxy = await start_proxy(redis_url)
    yield proxy
    await proxy.close()


# Quick flushing and small waits keep the suite fast; the behaviour is the same as in production.
FAST = {"flush_interval_ms": 20, "fsync_window_ms": 1.0, "db_acquire_timeout": 2.0, "db_command_timeout": 5.0}


@pytest.fixture
def storage_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(**{**FAST, **overrides})

    return make


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def storage(storage_settings: Callable[..., Settings], redis: Redis) -> AsyncIterator[Storage]:
    async with Storage.open(storage_settings(), instance_id="t-main", redis=redis) as st:
        yield st
