"""Storage benchmark: the write-behind path against one synchronous INSERT per row, side by side.

    python tests/bench/bench_storage.py [--rows 5000] [--concurrency 16] [--latency-samples 200]

What it compares, in one run against the same Postgres (a fresh database, dropped afterwards):
1. Persisted rows per second (1a: local Postgres; 1b: Postgres `--wan-ms` further away):
   N history appends through the spool + flusher, timed until every
   row is in Postgres, versus N single-row INSERT transactions through the same pool (the old
   system's synchronous write per call). Printed as a ratio.
2. The latency a caller sees for one append with Postgres normal, versus Postgres slowed by
   200 ms per round trip (a TCP proxy in front of it). The ratio should stay close to 1: the
   caller waits for a local fsync, never for Postgres. The synchronous INSERT's latency under
   the same slowdown is shown for contrast.

Uses EXAI_TEST_DATABASE_URL / EXAI_TEST_REDIS_URL (defaults: the local servers). Results are
printed and saved as JSON under tests/bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from common.migrate import migrate
from common.redis import create_redis
from common.settings import Settings, load_settings
from instance.storage import Storage
from tests.instance.storage.conftest import FaultProxy

RESULTS = Path(__file__).with_name("results")
SLOW_S = 0.200

_INSERT = (
    "INSERT INTO messages (id, conversation_id, seq, role, content, session_id)"
    " VALUES ($1, $2, $3, 'user', $4, 'bench') ON CONFLICT (id) DO NOTHING"
)


def _with_db(dsn: str, db: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + db))


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def _gather_limited(n: int, concurrency: int, fn: Callable[[int], Awaitable[None]]) -> None:
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await fn(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _persisted_rows_per_s(
    settings: Settings, rows: int, concurrency: int, redis_url: str | None
) -> dict[str, Any]:
    redis = create_redis(redis_url) if redis_url else None
    try:
        async with Storage.open(settings, instance_id="bench-wb", redis=redis) as st:
            cid = await st.history.new_thread(session_id="bench", tool_name="bench", model=None)
            await st.flush(10)
            t0 = time.perf_counter()
            await _gather_limited(rows, concurrency, lambda i: st.history.append(cid, "user", f"message {i}"))
            acked = time.perf_counter() - t0
            assert await st.flush(120), "the spool did not drain"
            persisted = time.perf_counter() - t0
            backlog = st.backlog()
            pool_max = st.pool_stats()["max"]

            async def sync_insert(i: int) -> None:
                await st.db.run(lambda c: c.execute(_INSERT, uuid.uuid4(), cid, i, f"sync {i}"))

            t0 = time.perf_counter()
            await _gather_limited(rows, concurrency, sync_insert)
            sync_s = time.perf_counter() - t0
    finally:
        if redis is not None:
            await redis.aclose()
    wb_rate = rows / persisted
    sync_rate = rows / sync_s
    return {
        "rows": rows,
        "concurrency": concurrency,
        "pool_max": pool_max,
        "write_behind_rows_per_s": round(wb_rate, 1),
        "write_behind_acked_rows_per_s": round(rows / acked, 1),
        "sync_insert_rows_per_s": round(sync_rate, 1),
        "ratio_write_behind_vs_sync": round(wb_rate / sync_rate, 2),
        "fsyncs": backlog["commits_total"],
        "appends": backlog["appends_total"],
    }


async def _append_latency(
    normal: Settings, slowed: Settings, samples: int, redis_url: str | None
) -> tuple[dict[str, float], dict[str, float]]:
    """Interleave appends to a Storage on normal Postgres and one on slowed Postgres.

    Alternating sample by sample puts both under the same machine load, so the ratio compares
    Postgres speed and nothing else.
    """
    redis = create_redis(redis_url) if redis_url else None
    try:
        async with (
            Storage.open(normal, instance_id="bench-lat-normal", redis=redis, close_flush_timeout=60) as a,
            Storage.open(slowed, instance_id="bench-lat-slow", redis=redis, close_flush_timeout=60) as b,
        ):
            stores = (a, b)
            cids = [
                await st.history.new_thread(session_id="bench", tool_name="bench", model=None)
                for st in stores
            ]
            lat: tuple[list[float], list[float]] = ([], [])
            sync: tuple[list[float], list[float]] = ([], [])
            for i in range(samples):
                for k in (0, 1) if i % 2 == 0 else (1, 0):
                    t0 = time.perf_counter()
                    await stores[k].history.append(cids[k], "assistant", f"reply {i} " + "x" * 500)
                    lat[k].append((time.perf_counter() - t0) * 1000)
                    await asyncio.sleep(0.002)  # callers arrive spaced out, as tool calls do
            for i in range(20):
                for k in (0, 1):
                    t0 = time.perf_counter()
                    await stores[k].db.run(
                        lambda c, k=k, i=i: c.execute(_INSERT, uuid.uuid4(), cids[k], i, "sync")  # type: ignore[misc]
                    )
                    sync[k].append((time.perf_counter() - t0) * 1000)
    finally:
        if redis is not None:
            await redis.aclose()
    return tuple(  # type: ignore[return-value]
        {
            "append_p50_ms": round(statistics.median(lat[k]), 3),
            "append_p95_ms": round(_pct(lat[k], 0.95), 3),
            "append_mean_ms": round(statistics.fmean(lat[k]), 3),
            "sync_insert_p50_ms": round(statistics.median(sync[k]), 3),
        }
        for k in (0, 1)
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--wan-ms", type=float, default=5.0, help="added Postgres latency of scenario 1b")
    args = parser.parse_args()

    server = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")  # "" runs without Redis
    dbname = f"exai_bench_{secrets.token_hex(4)}"
    prefix = f"exaibench{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    dsn = _with_db(server, dbname)
    parts = urlsplit(dsn)
    proxy = await FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    try:
        await migrate(dsn)
        with tempfile.TemporaryDirectory() as tmp:

            def settings(**kw: Any) -> Settings:
                base: dict[str, Any] = {
                    "database_url": dsn,
                    "redis_url": redis_url or None,
                    "redis_prefix": prefix,
                }
                return load_settings(**{**base, "state_dir": Path(tmp), **kw})

            throughput = await _persisted_rows_per_s(settings(), args.rows, args.concurrency, redis_url)
            proxy.delay = args.wan_ms / 1000.0
            wan = await _persisted_rows_per_s(
                settings(database_url=proxy.url(dsn)), min(args.rows, 2000), args.concurrency, redis_url
            )
            proxy.delay = 0.0
            slow_proxy = await FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
            slow_proxy.delay = SLOW_S
            try:
                normal, slowed = await _append_latency(
                    settings(database_url=proxy.url(dsn)),
                    settings(database_url=slow_proxy.url(dsn)),
                    args.latency_samples,
                    redis_url,
                )
            finally:
                await slow_proxy.close()
    finally:
        await proxy.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        if redis_url:
            client = create_redis(redis_url)
            async for key in client.scan_iter(match=f"{prefix}:*"):
                await client.delete(key)
            await client.aclose()

    latency_ratio = slowed["append_p50_ms"] / normal["append_p50_ms"]
    result = {
        "when": datetime.now(UTC).isoformat(),
        "throughput": throughput,
        "throughput_pg_plus_wan_ms": {"added_ms": args.wan_ms, **wan},
        "append_latency_normal": normal,
        "append_latency_pg_slowed_200ms": slowed,
        "ratio_append_p50_slowed_vs_normal": round(latency_ratio, 2),
        "ratio_append_p95_slowed_vs_normal": round(slowed["append_p95_ms"] / normal["append_p95_ms"], 2),
    }
    t = throughput
    print("== persisted rows/s (same Postgres, same pool, same concurrency) ==")
    print(f"  write-behind (spool + flusher): {t['write_behind_rows_per_s']:>10.1f} rows/s")
    print(f"  one synchronous INSERT per row: {t['sync_insert_rows_per_s']:>10.1f} rows/s")
    print(f"  ratio write-behind / sync:      {t['ratio_write_behind_vs_sync']:>10.2f}x")
    print(f"  ({t['appends']} appends shared {t['fsyncs']} fsyncs)")
    print(f"== the same with Postgres {args.wan_ms:g} ms further away (a hosted database) ==")
    print(f"  write-behind (spool + flusher): {wan['write_behind_rows_per_s']:>10.1f} rows/s")
    print(f"  one synchronous INSERT per row: {wan['sync_insert_rows_per_s']:>10.1f} rows/s")
    print(f"  ratio write-behind / sync:      {wan['ratio_write_behind_vs_sync']:>10.2f}x")
    print("== latency a caller sees for one append ==")
    print(
        f"  Postgres normal:        p50 {normal['append_p50_ms']:.3f} ms"
        f"  p95 {normal['append_p95_ms']:.3f} ms"
    )
    print(
        f"  Postgres slowed 200 ms: p50 {slowed['append_p50_ms']:.3f} ms"
        f"  p95 {slowed['append_p95_ms']:.3f} ms"
    )
    print(f"  ratio slowed / normal (p50): {latency_ratio:.2f}  (should stay ~1)")
    print(
        f"  for contrast, one sync INSERT: p50 {normal['sync_insert_p50_ms']:.2f} ms normal, "
        f"{slowed['sync_insert_p50_ms']:.2f} ms slowed"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_storage-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    asyncio.run(main())
