"""A group task's event beside its task write, in one process: what the spool append adds.

    python tests/bench/bench_task_event.py [--calls 1000] [--no-fsync]

A group `task_create` writes the task to Postgres and, at the same time, appends its group
event to the instance's spool; it answers once both are done (instance/tools/tasks.py). This
times, in one process and without the fleet's HTTP layers, what the append adds to a write of
the task's kind (one INSERT with its commit, on a scratch database made from
EXAI_TEST_DATABASE_URL and dropped afterwards), with the real `Spool` (sync="normal", as
link events use it by default). Ways, each round in alternating order, 2 ms apart:

- `write`: the Postgres write alone;
- `task`: the append as a task of its own, started before the write (the code before
  2026-11-27: `asyncio.ensure_future(spool.append(...))`);
- `submit`: the append handed to the spool's thread before the write, no task
  (`Spool.submit`, the code after);
- `soon`: the same hand-off one loop callback later, once the write's query is sent;
- `append`: the append alone, no write.

Prints each way's p50 and the median of its per-round difference from `write`, in ms; and,
for `submit`, how long the write itself took beside the append and when the append's commit
was done (both from the call's start).
`--no-fsync` leaves out the spool's own fsync after each commit (which shares the disk with
Postgres's commit), to see its part; `--dir` puts the spool's file elsewhere (e.g. /dev/shm,
a file system Postgres's commits do not flush).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from instance.storage.spool import Spool  # noqa: E402
from instance.storage.writebehind import KIND_LINK_EVENT  # noqa: E402


def payload(i: int) -> dict[str, Any]:
    return {
        "uuid": str(i),
        "group": "g",
        "kind": "task",
        "sender": "s",
        "task_event": "e",
        "created_at": time.time(),
    }


async def run(dsn: str, calls: int, fsync: bool, where: str | None) -> dict[str, list[float]]:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE t (id serial PRIMARY KEY, name text)")
    with tempfile.TemporaryDirectory(prefix="bench-task-event-", dir=where) as tmp:
        spool = Spool(Path(tmp), max_bytes=1 << 30, hot_kinds=(KIND_LINK_EVENT,))
        await spool.open()
        if not fsync:
            spool._fsync_wal_sync = lambda: None  # type: ignore[method-assign]

        async def write() -> None:
            async with pool.acquire() as conn:
                await conn.fetchval("INSERT INTO t (name) VALUES ('x') RETURNING id")

        def submit(i: int) -> asyncio.Future[None]:
            fut = spool.submit(KIND_LINK_EVENT, payload(i), urgent=True, sync="normal")
            assert fut is not None
            return fut

        async def task(i: int) -> None:
            appended = asyncio.ensure_future(
                spool.append(KIND_LINK_EVENT, payload(i), urgent=True, sync="normal")
            )
            await write()
            await appended

        beside: list[tuple[float, float]] = []  # `submit`: (its write's ms, its commit's ms)

        async def submitted(i: int) -> None:
            t0 = time.perf_counter()
            committed = submit(i)
            done: list[float] = []
            committed.add_done_callback(lambda _: done.append(time.perf_counter()))
            await write()
            wrote = time.perf_counter()
            await committed
            beside.append(((wrote - t0) * 1000, (done[0] - t0) * 1000))

        async def soon(i: int) -> None:
            box: list[asyncio.Future[None]] = []
            asyncio.get_running_loop().call_soon(lambda: box.append(submit(i)))
            await write()
            await box[0]

        async def alone(i: int) -> None:
            await write()

        async def append(i: int) -> None:
            await spool.append(KIND_LINK_EVENT, payload(i), urgent=True, sync="normal")

        ways: dict[str, Callable[[int], Awaitable[None]]] = {
            "write": alone,
            "task": task,
            "submit": submitted,
            "soon": soon,
            "append": append,
        }
        ms: dict[str, list[float]] = {k: [] for k in ways}
        try:
            for i in range(calls):
                for key, fn in list(ways.items())[:: 1 if i % 2 else -1]:
                    await asyncio.sleep(0.002)
                    t0 = time.perf_counter()
                    await fn(i)
                    ms[key].append((time.perf_counter() - t0) * 1000)
                if i % 200 == 199:  # keep the spool small, as the flusher would
                    await spool.ack(await spool.read_batch(100_000))
        finally:
            await spool.close()
            await pool.close()
    ms["write beside"] = [w for w, _ in beside]
    ms["commit beside"] = [c for _, c in beside]
    return ms


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000, help="rounds of the five ways")
    ap.add_argument("--no-fsync", action="store_true", help="no spool fsync after its commits")
    ap.add_argument("--dir", help="where the spool's file goes (default: the temporary folder)")
    args = ap.parse_args()
    admin_dsn = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_task_event_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        ms = await run(admin_dsn.rsplit("/", 1)[0] + "/" + name, args.calls, not args.no_fsync, args.dir)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    writes, commits = ms.pop("write beside"), ms.pop("commit beside")
    print(f"{'way':8} {'p50 ms':>8} {'- write, per-round median':>26}")
    for key, values in ms.items():
        diff = statistics.median(a - b for a, b in zip(values, ms["write"], strict=True))
        print(f"{key:8} {statistics.median(values):8.3f} {diff:+26.3f}")
    first = sum(c <= w for w, c in zip(writes, commits, strict=True))
    print(
        f"submit: the write took {statistics.median(writes):.3f} ms (p50) beside the append, whose"
        f" commit was done after {statistics.median(commits):.3f} ms,"
        f" first in {first} of {len(writes)} rounds"
    )
    print(f"load average at the end: {[round(x, 2) for x in os.getloadavg()]}")


if __name__ == "__main__":
    asyncio.run(main())
