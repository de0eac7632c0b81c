"""The flusher's statement for link events (common/links.store_spooled), alone: time per call.

    python tests/bench/bench_link_store.py [--calls 1000] [--batch 1]

Stores `--calls` batches of `--batch` message events (one group, two members) through
`store_spooled` on one connection, as the flusher does for live events (a batch of one is the
usual case), and prints the median and p90 time per call and the client process's CPU per
call. To compare two builds, run this file from each tree alternately with
`PYTHONPATH=THAT_TREE` (each imports its own tree's code). Uses EXAI_TEST_DATABASE_URL
(default: the local server) in a fresh database, dropped afterwards. Saves JSON under
tests/bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from common import links as db
from common.migrate import migrate

ADMIN_DSN = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def run(calls: int, batch: int) -> dict[str, float]:
    name = f"bench_ls_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    try:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await db.join(conn, "bench", "s-a", principal="p", client="a")
            await db.join(conn, "bench", "s-b", principal="p", client="b")
            times: list[float] = []
            cpu0 = time.process_time()
            for _ in range(calls):
                payloads = [
                    {"uuid": str(uuid.uuid4()), "group": "bench", "kind": "message", "sender": "s-a",
                     "body": "hello", "created_at": time.time()}
                    for _ in range(batch)
                ]  # fmt: skip
                t0 = time.perf_counter()
                await db.store_spooled(conn, payloads)
                times.append(time.perf_counter() - t0)
            cpu = time.process_time() - cpu0
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    times.sort()
    return {
        "p50_ms": statistics.median(times) * 1000,
        "p90_ms": times[int(len(times) * 0.9)] * 1000,
        "cpu_per_call_ms": cpu / calls * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(run(args.calls, args.batch))
    print(json.dumps(result))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"link_store_{stamp}.json").write_text(json.dumps({"args": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
