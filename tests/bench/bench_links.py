"""Linked sessions: delivery latency A -> B, catch-up of missed events, the sender's cost.

    python tests/bench/bench_links.py [--messages 500] [--backlog 10000]

Uses the code the link tools run (common/links.py on Postgres, common/notifications.EventLog on
Redis) in this process, against EXAI_TEST_DATABASE_URL (a fresh database, dropped afterwards)
and EXAI_TEST_REDIS_URL (a fresh key prefix). Measured:

1. latency: A's event stored and published (the instance's sender task appends it to B's
   notification log, which publishes the wake-up) -> B's subscriber on its session channel has
   it: the pub/sub hop the router's stream hub rides on; and the whole path from the start of
   A's store (Postgres transaction included);
2. catch-up: B missed `--backlog` events; time for B to read and acknowledge all of them
   (link_inbox's queries, pages of 1000);
3. sender's cost: what a group event adds to A's tool call: the Postgres transaction that stores
   it (the notification itself is only queued on the call's path, measured separately).

Prints a table and saves JSON to tests/bench/results/links-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import links as db  # noqa: E402
from common.keys import Keys  # noqa: E402
from common.migrate import migrate  # noqa: E402
from common.notifications import EventLog, notification  # noqa: E402
from instance.notify import Notifier  # noqa: E402

UPDATED = "notifications/resources/updated"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def bench(dsn: str, redis_url: str, messages: int, backlog: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(f"bench-links-{secrets.token_hex(4)}")
    log = EventLog(redis, keys, maxlen=10_000, ttl=600)
    notifier = Notifier(log, buffer=10_000)
    a, b, group = "session-a", "session-b", "bench"
    results: dict[str, Any] = {"messages": messages, "backlog": backlog}
    try:
        await db.join(conn, group, a, principal="p", client="a")
        await db.join(conn, group, b, principal="p", client="b")
        pubsub = redis.pubsub()
        await pubsub.subscribe(keys.session_channel(b))
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        hop, whole, store, queue = [], [], [], []
        async with notifier.running():
            for i in range(messages):
                t0 = time.perf_counter()
                event = await db.append(conn, group, "message", sender=a, body=f"m{i}")
                t1 = time.perf_counter()
                notifier.publish(b, UPDATED, {"uri": db.inbox_uri(group)})
                t2 = time.perf_counter()
                while True:
                    got = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if got is not None:
                        break
                t3 = time.perf_counter()
                assert event.id > 0
                store.append((t1 - t0) * 1000)
                queue.append((t2 - t1) * 1000)
                hop.append((t3 - t2) * 1000)
                whole.append((t3 - t0) * 1000)
        await pubsub.aclose()
        results["latency_pubsub"] = summary(hop)
        results["latency_store_to_b"] = summary(whole)
        results["sender_store"] = summary(store)
        results["sender_queue_notification"] = summary(queue)
        await db.ack(conn, group, b, 10**9)

        # B misses `backlog` events (written in one statement: the set-up is not measured).
        head = await conn.fetchval("SELECT seq FROM link_groups WHERE name = $1", group)
        await conn.execute(
            "INSERT INTO link_events (group_name, id, kind, sender, body) "
            "SELECT $1, $2 + g, 'message', $3, 'backlog ' || g FROM generate_series(1, $4) g",
            group, head, a, backlog,
        )  # fmt: skip
        await conn.execute("UPDATE link_groups SET seq = seq + $2 WHERE name = $1", group, backlog)
        t0 = time.perf_counter()
        seen = 0
        last = 0
        while True:
            page = await db.unread(conn, group, b, limit=1000)
            if not page:
                break
            assert page[0].id > last
            last = page[-1].id
            seen += len(page)
            await db.ack(conn, group, b, last)
        seconds = time.perf_counter() - t0
        assert seen == backlog, (seen, backlog)
        results["catchup"] = {
            "events": seen,
            "seconds": round(seconds, 3),
            "events_per_second": round(seen / seconds),
        }
        _ = notification  # the notification shape is the one instances publish
    finally:
        await conn.close()
        async for key in redis.scan_iter(keys.pattern()):
            await redis.delete(key)
        await redis.aclose()
    return results


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--backlog", type=int, default=10_000)
    args = ap.parse_args()
    admin_dsn = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    name = f"bench_links_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
    try:
        await migrate(dsn)
        results = await bench(dsn, redis_url, args.messages, args.backlog)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"{'measure':34} {'p50 ms':>9} {'p99 ms':>9}")
    for key in ("latency_pubsub", "latency_store_to_b", "sender_store", "sender_queue_notification"):
        r = results[key]
        print(f"{key:34} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f}")
    c = results["catchup"]
    print(f"catch-up of {c['events']} events: {c['seconds']:.3f} s ({c['events_per_second']}/s)")
    out = ROOT / "tests" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"links-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    asyncio.run(main())
