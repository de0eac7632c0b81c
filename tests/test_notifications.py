"""The notification log's writers against a real Redis: batches, carried events, in-flight marks."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis

from common.keys import Keys
from common.notifications import EventLog, carried, newer, notification

UPDATED = "notifications/resources/updated"


def _note(n: int) -> dict[str, Any]:
    return notification(UPDATED, {"uri": f"exai://test/{n}"})


async def _published(pubsub: Any, n: int) -> list[str]:
    out: list[str] = []
    async with asyncio.timeout(10):
        while len(out) < n:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                out.append(str(msg["data"]))
    return out


async def test_a_batch_is_logged_in_order_and_each_publish_carries_its_event(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    log = EventLog(redis_client, keys, maxlen=100, ttl=60)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.session_channel("s-a"), keys.session_channel("s-b"))
    try:
        first = await log.append("s-a", _note(0))
        ids = await log.append_many([("s-a", _note(1)), ("s-b", _note(2)), ("s-a", _note(3))])
        seen = [carried(data) for data in await _published(pubsub, 4)]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert None not in seen
    chain = [c for c in seen if c is not None]
    # Each publish names the entry before it in that session's log: s-a 0 -> 1 -> 3, s-b 2 first.
    assert [(prev, ev.id) for prev, ev in chain] == [
        ("0-0", first), (first, ids[0]), ("0-0", ids[1]), (ids[0], ids[2]),
    ]  # fmt: skip
    assert [ev.message for _, ev in chain] == [_note(n) for n in range(4)]
    assert [e.id for e in await log.after("s-a", "0-0")] == [first, ids[0], ids[2]]
    assert [e.message for e in await log.after("s-b", "0-0")] == [_note(2)]
    assert newer(ids[2], ids[0])


async def test_a_marked_batch_sets_the_mark_in_the_same_step(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    log = EventLog(redis_client, keys, maxlen=100, ttl=60)
    marker = keys.link_inflight("grp")
    now = time.time() * 1000
    await redis_client.zadd(marker, {"stale": now - 1000})
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.session_channel("s-m"))
    try:
        await log.append_marked(marker, "ev-1", now + 5000, now, [("s-m", _note(7))])
        (data,) = await _published(pubsub, 1)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert (c := carried(data)) is not None and c[1].message == _note(7)
    # The mark is there by the time anyone hears of the event; marks past their time are gone.
    assert await redis_client.zrange(marker, 0, -1) == ["ev-1"]


def test_only_well_formed_publishes_count_as_carried_events() -> None:
    message = json.dumps(_note(1))
    assert carried(f"0-0 1-1 {message}") is not None
    for data in ("end", "1-1", f"x 1-1 {message}", "0-0 1-1 not-json", "0-0 1-1 [1]", f"0-0 y {message}"):
        assert carried(data) is None, data
