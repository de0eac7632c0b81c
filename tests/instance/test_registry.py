"""The registry heartbeat against real Redis: stopping right after a state change must not hang.

Python 3.11's asyncio.wait_for swallows a cancellation that arrives in the same loop turn as
the awaited event; the heartbeat once waited that way, so a SIGTERM during startup (state
change, then stop) left the instance hanging until supervisord killed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis

from common.keys import Keys
from common.protocol import FENCE_HEADER, SESSION_HEADER
from common.settings import Settings
from instance.registry import Registry
from instance.runtime import Identity, Runtime


async def test_stop_right_after_a_poke_returns_and_deregisters(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, keys: Keys
) -> None:
    settings = make_settings(internal_token="t", heartbeat_interval=30.0, heartbeat_ttl=90.0)
    for n in range(8):  # the race is a matter of loop turns: try each gap between poke and stop
        runtime = Runtime(settings, Identity(id=f"reg-test-{n}", host="127.0.0.1", port=1), version="t")
        registry = Registry(runtime, redis_client)
        runtime.on_change = registry.poke
        await registry.start()
        assert await redis_client.exists(keys.instance(runtime.identity.id))
        await asyncio.sleep(0)  # let the heartbeat task start waiting on its wake-up event
        runtime.set_state("stopping")  # pokes the heartbeat ...
        for _ in range(n % 4):
            await asyncio.sleep(0)
        stopping = asyncio.create_task(registry.stop())  # ... and stop() cancels it soon after
        done, _ = await asyncio.wait({stopping}, timeout=5)
        assert stopping in done, f"Registry.stop() hung (gap of {n % 4} loop turns)"
        assert not await redis_client.exists(keys.instance(runtime.identity.id))
        assert runtime.identity.id not in await redis_client.smembers(keys.instances())


async def test_a_reset_is_in_the_registry_before_it_returns(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, keys: Keys
) -> None:
    """The router frees the lease once the reset has answered: by then the entry must say the
    instance is free, or the next opening takes the allocator's slow path (a lease to reconcile)."""
    settings = make_settings(internal_token="t", heartbeat_interval=30.0, heartbeat_ttl=90.0)
    runtime = Runtime(settings, Identity(id="reg-test-reset", host="127.0.0.1", port=1), version="t")
    registry = Registry(runtime, redis_client)
    runtime.register_now = registry.beat_now  # what the app wires; no heartbeat poke here
    key = keys.instance(runtime.identity.id)
    await registry.start()
    try:
        assert runtime.observe({SESSION_HEADER: "s1", FENCE_HEADER: "7"})
        await registry.beat()
        assert await redis_client.hget(key, "session") == "s1"  # type: ignore[misc]
        await runtime.reset()
        assert await redis_client.hmget(key, ["session", "fence"]) == ["", ""]  # type: ignore[misc]
    finally:
        await registry.stop()
    assert not await registry.beat_now()  # stopped: nothing written, the entry stays gone
    assert not await redis_client.exists(key)
