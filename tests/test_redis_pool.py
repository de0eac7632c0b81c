"""The fleet's Redis client under a burst: more commands at once than pool connections wait for a
connection instead of failing as if Redis were down (common/redis.py)."""

from __future__ import annotations

import asyncio
import secrets

from common.redis import REDIS_DOWN_ERRORS, create_redis
from tests.ports import free_port


async def test_a_burst_beyond_the_pool_waits_instead_of_failing(redis_url: str, redis_prefix: str) -> None:
    client = create_redis(redis_url, max_connections=2)
    key = f"{redis_prefix}pool-burst:{secrets.token_hex(4)}"
    try:
        # Each BLPOP holds its connection for 50 ms: 20 of them need 10 rounds of 2 connections.
        got = await asyncio.gather(*(client.blpop([f"{key}:{i}"], timeout=0.05) for i in range(20)))
        assert got == [None] * 20
        # and the pool never grew past its limit
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 2
    finally:
        await client.aclose()


async def test_a_dead_redis_still_surfaces_as_redis_down() -> None:
    client = create_redis(f"redis://127.0.0.1:{free_port()}/0", max_connections=2)
    try:
        results = await asyncio.gather(*(client.ping() for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, REDIS_DOWN_ERRORS) for r in results), results
    finally:
        await client.aclose()


async def test_a_new_connection_reads_no_package_metadata_on_the_loop(redis_url: str) -> None:
    """redis-py looks its own version up (importlib.metadata: a scan of every sys.path folder)
    for each connection it opens unless it is given one: create_redis gives it, read once."""
    from unittest import mock

    client = create_redis(redis_url, max_connections=4)
    try:
        with mock.patch(
            "importlib.metadata.version", side_effect=AssertionError("metadata read on the loop")
        ):
            await asyncio.gather(*(client.ping() for _ in range(4)))  # opens several connections
    finally:
        await client.aclose()
