"""Redis goes away under an open notification stream, then comes back.

The router and the instance-side publisher run in this process against a Redis server of their
own (tests/redis_server.py, on a free port), because the test stops and restarts it; the shared
Redis of the test run is never touched. The stream stays open on keep-alive comments while
Redis is down, the publisher holds what is published meanwhile, and once Redis is back every
event reaches the stream, in order, once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from common.keys import Keys
from common.notifications import EventLog
from common.settings import Settings
from instance.notify import Notifier
from router.app import create_app
from router.sessions import Session, SessionTable
from tests.ports import free_port
from tests.redis_server import OwnRedis
from tests.router.sse import Reader

pytestmark = pytest.mark.timeout(120)

UPDATED = "notifications/resources/updated"


@contextlib.asynccontextmanager
async def router(settings: Settings) -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", settings.router_port).start()
        yield f"http://127.0.0.1:{settings.router_port}"
    finally:
        await runner.cleanup()


def _numbers(reader: Reader) -> list[int]:
    return [int(f.data["params"]["uri"].rsplit("/", 1)[1]) for f in reader.messages if f.data]


async def test_stream_stays_open_while_redis_is_down_and_catches_up(
    own_redis: OwnRedis, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        redis_url=own_redis.url,
        router_port=free_port(),
        internal_token="internal",
        stream_keepalive=0.3,
    )
    keys = Keys(settings.redis_prefix)
    redis = aioredis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    sess = Session(id="sess-redis-down", era="handshake", principal="local", upstream_sid="x")
    await SessionTable(redis, keys).save(sess)
    publisher = Notifier(EventLog(redis, keys, maxlen=100, ttl=600), buffer=100)
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sess.id, "MCP-Protocol-Version": "2025-11-25"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        router(settings) as url,
        publisher.running(),
        aiohttp.ClientSession(timeout=timeout) as http,
    ):
        reader = Reader(await http.get(url + "/mcp", headers=headers)).start()
        assert reader.resp.status == 200, await reader.resp.text()
        await reader.wait_keepalive()  # the hub is subscribed: the stream is live
        for n in (1, 2):
            publisher.publish(sess.id, UPDATED, {"uri": f"exai://test/{n}"})
        await reader.wait_for(2)

        await asyncio.to_thread(own_redis.stop)
        for n in (3, 4):
            publisher.publish(sess.id, UPDATED, {"uri": f"exai://test/{n}"})
        await reader.wait_keepalive()
        await reader.wait_keepalive()
        assert not reader.done and _numbers(reader) == [1, 2]
        assert publisher.pending == 2 and publisher.dropped == 0

        await asyncio.to_thread(own_redis.start)
        await reader.wait_for(4, timeout=60)
        publisher.publish(sess.id, UPDATED, {"uri": f"exai://test/{5}"})
        await reader.wait_for(5)
        assert _numbers(reader) == [1, 2, 3, 4, 5]
        assert publisher.pending == 0 and publisher.dropped == 0 and publisher.published == 5
        async with http.get(url + "/metrics") as r:
            metrics = await r.text()
        assert "exai_router_notify_pubsub_up 1" in metrics
        assert "exai_router_notify_pubsub_reconnects_total 1" in metrics
        await reader.stop()
    await redis.aclose()


async def test_publisher_drops_oldest_beyond_its_buffer_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here: Redis is down for this publisher
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
    publisher = Notifier(EventLog(redis, Keys("t"), maxlen=10, ttl=60), buffer=2)
    async with publisher.running(flush_timeout=0.1):
        for n in range(3):
            publisher.publish("sess", UPDATED, {"uri": f"exai://test/{n}"})
        assert publisher.stats() == {"published": 0, "pending": 2, "dropped": 1}
    assert "notification buffer full" in caplog.text
    await redis.aclose()
