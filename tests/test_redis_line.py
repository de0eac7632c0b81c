"""The direct Redis line: a command is written at the call, its reply comes back as a future,
and a line that is down or breaks sends the caller back to redis-py (never a silent loss).
The pub/sub line: messages reach the handler as redis-py would hand them out, on the database
the URL names, and a Redis that goes away is noticed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common.redis_line import DirectLine, PubSubLine, _encode, encode
from tests.redis_server import OwnRedis


async def _up(line: DirectLine) -> None:
    line.start()
    for _ in range(200):
        if line.up:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the line did not come up")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def test_commands_are_encoded_as_resp_arrays() -> None:
    assert encode(("SET", "k", 1.5, b"\x00")) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n1.5\r\n$1\r\n\x00\r\n"


@pytest.mark.parametrize(
    "value",
    [0, -1, 2**63 - 1, -(2**63), 0.1, 1e20, 1e-7, 1725000000.123456, float("inf"), "", "héllo", b"\xff" * 3],
)
def test_the_c_encoder_writes_what_the_python_one_does(value: object) -> None:
    assert encode(("SET", "k", value)) == _encode(("SET", "k", value))


def test_a_type_hiredis_does_not_pack_is_encoded_the_python_way_or_refused() -> None:
    assert encode(("SET", "k", True)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\nTrue\r\n"
    with pytest.raises(TypeError, match="cannot send NoneType"):
        encode(("SET", "k", None))


async def test_a_command_is_written_at_the_call_and_its_reply_returned(
    redis: Redis, redis_prefix: str
) -> None:
    line = DirectLine(redis)
    try:
        assert line.send("PING") is None  # not up yet: the caller takes redis-py's path
        await _up(line)
        key = f"{redis_prefix}:line"
        sent = line.send("RPUSH", key, "a")
        assert sent is not None
        # Written before any await: Redis has it as soon as it reads its socket.
        assert await asyncio.wait_for(sent, 5) == 1
        sha = await redis.script_load("return {ARGV[1], 7}")
        reply = line.send("EVALSHA", sha, 0, "x")
        assert reply is not None and await reply == ["x", 7]
        missing = line.send("EVALSHA", "0" * 40, 0)
        assert missing is not None
        with pytest.raises(ResponseError, match="NOSCRIPT"):
            await missing
        await redis.delete(key)
    finally:
        await line.close()


async def test_a_dead_redis_fails_what_waits_and_the_line_comes_back(tmp_path: Path) -> None:
    own = OwnRedis(tmp_path / "redis").start()
    client = Redis.from_url(own.url)
    line = DirectLine(client, timeout=1.0)
    try:
        await _up(line)
        own.kill()
        sent = line.send("PING")
        if sent is not None:  # written before the line noticed: it fails, it does not hang
            with pytest.raises((RedisConnectionError, ConnectionError)):
                await asyncio.wait_for(sent, 5)
        for _ in range(100):
            if not line.up:
                break
            await asyncio.sleep(0.01)
        assert line.send("PING") is None
        own.start()
        await asyncio.sleep(1.1)  # RETRY_AFTER
        await _up(line)
        reply = line.send("PING")
        assert reply is not None and await reply == "PONG"
    finally:
        await line.close()
        await client.aclose()
        own.stop()


async def _next(got: asyncio.Queue[dict[str, object]]) -> dict[str, object]:
    return await asyncio.wait_for(got.get(), 5)


async def test_the_pubsub_line_hands_out_messages_as_redis_py_does(redis_url: str, redis_prefix: str) -> None:
    # Another database than 0 (SELECT on connect): a publish is seen there whatever the db.
    base = redis_url.rsplit("/", 1)[0]
    client = Redis.from_url(base + "/3", decode_responses=True)
    got: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    line = PubSubLine(client, got.put_nowait)
    assert PubSubLine.usable(client)
    channel = f"{redis_prefix}:pubsub-line"
    try:
        await line.open()
        await line.subscribe(channel)
        assert await _next(got) == {"type": "subscribe", "channel": channel, "data": 1}
        assert await client.publish(channel, '0-1 0-2 {"a": "é"}') == 1
        assert await _next(got) == {"type": "message", "channel": channel, "data": '0-1 0-2 {"a": "é"}'}
        await line.unsubscribe(channel)
        assert await _next(got) == {"type": "unsubscribe", "channel": channel, "data": 0}
        assert await client.publish(channel, "later") == 0
        assert not await line.wait_lost(0.05)
    finally:
        await line.aclose()
        await client.aclose()


async def test_the_pubsub_line_notices_a_dead_redis(tmp_path: Path) -> None:
    own = OwnRedis(tmp_path / "redis").start()
    client = Redis.from_url(own.url, decode_responses=True)
    got: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    line = PubSubLine(client, got.put_nowait, timeout=1.0)
    try:
        await line.open()
        await line.subscribe("c")
        assert (await _next(got))["type"] == "subscribe"
        own.kill()
        assert await line.wait_lost(5)
        with pytest.raises(RedisConnectionError):  # refused at once, not queued for nobody
            await PubSubLine(client, got.put_nowait, timeout=1.0).open()
    finally:
        await line.aclose()
        await client.aclose()
        own.stop()


async def test_the_pubsub_line_pings_and_drops_a_silent_peer(redis_url: str) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # takes every byte, answers none (a peer gone without a reset)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    quiet = Redis(host="127.0.0.1", port=port)
    live = Redis.from_url(redis_url)
    line = PubSubLine(quiet, lambda _: None, timeout=0.3, health_interval=0.1)
    alive = PubSubLine(live, lambda _: None, timeout=0.3, health_interval=0.1)
    try:
        await line.open()
        await alive.open()
        await line.subscribe("c")
        await alive.subscribe("c")
        lost = False
        for _ in range(100):  # ~0.1 s to the PING, 0.3 s more without an answer
            lost = await line.wait_lost(0.02)
            if lost:
                break
        assert lost
        for _ in range(30):  # Redis answers its PINGs: the line stays up
            assert not await alive.wait_lost(0.02)
    finally:
        await line.aclose()
        await alive.aclose()
        await quiet.aclose()
        await live.aclose()
        server.close()
        await server.wait_closed()
