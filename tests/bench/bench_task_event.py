"""A group task's event on its task write, in one process: what storing the event adds.

    python tests/bench/bench_task_event.py [--calls 1000] [--no-fsync] [--dir /dev/shm]

A group `task_create` stores the task and records its link-group event (instance/tools/tasks.py).
This times, in one process and without the fleet's HTTP layers, what the event adds to the
write, with the real `TaskStore` (instance/storage/tasks.py) on a scratch database made from
EXAI_TEST_DATABASE_URL (the schema applied; a link group of three members; dropped afterwards)
and the real `Spool` (sync="normal", as link events use it by default). Ways, each round in
alternating order, 2 ms apart:

- `session`: a session-scoped create (no event), the reference;
- `outbox`: a group create whose audit row names the group and the sender (the code since
  2026-11-28 afternoon), then the event handed to the spool (`Spool.submit`, not awaited: the
  instance does it once the call's answer is written);
- `direct`: a group create whose statement also stores the event with the group's next id (the
  code of 2026-11-28 morning, rebuilt here from its SQL for the comparison);
- `spooled`: the event handed to the spool's thread before the write and awaited after it (the
  code before that);
- `append`: the spool append alone, no write.

Prints each way's p50 and the median of its per-round difference from `session`, in ms, and
the CPU each way cost per call: this process's (the loop's thread, the spool's threads) and the
Postgres backend's (from /proc; the pool has one connection, so one backend serves every way).
`--no-fsync` leaves out the spool's own fsync after each commit; `--dir` puts the spool's file
elsewhere (e.g. /dev/shm).
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
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import links as link_store  # noqa: E402
from common.migrate import migrate  # noqa: E402
from common.settings import load_settings  # noqa: E402
from instance.storage.pool import Database  # noqa: E402
from instance.storage.spool import Spool  # noqa: E402
from instance.storage.tasks import TaskStore  # noqa: E402
from instance.storage.writebehind import KIND_LINK_EVENT  # noqa: E402

GROUP = "bench"
SCOPE = "link:" + GROUP

# The morning's group create: the task, its audit row and the link event in one statement.
DIRECT_SQL = """WITH ins AS (
    INSERT INTO tasks (id, session_id, name) VALUES ($1, $2, $3) RETURNING id, name, state, version
), ev AS (
    INSERT INTO task_events (id, task_id, session_id, event, to_state, version)
    SELECT $4, id, $2, 'created', state, 1 FROM ins
), link_seq AS (
    UPDATE link_groups SET seq = seq + 1
    WHERE name = $5::text AND EXISTS (SELECT 1 FROM ins)
        AND EXISTS (SELECT 1 FROM link_members m WHERE m.group_name = $5::text AND m.session_id = $7::text)
    RETURNING seq
), link_ev AS (
    INSERT INTO link_events (group_name, id, kind, sender, body, data, created_at, uuid)
    SELECT $5::text, link_seq.seq, 'task', $7::text, '',
        jsonb_build_object('task_id', w.id::text, 'name', w.name, 'state', w.state, 'version', w.version),
        now(), $6::uuid
    FROM ins w, link_seq
    RETURNING id, created_at
)
SELECT ins.*, link_ev.id AS link_event_id,
    ARRAY(SELECT session_id FROM link_members WHERE group_name = $5::text) AS link_members
FROM ins LEFT JOIN link_ev ON true"""


def backend_cpu(pid: int) -> float:
    """The Postgres backend's CPU time so far, seconds (the scheduler's, in ns: /proc schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


async def run(dsn: str, calls: int, fsync: bool, where: str | None) -> dict[str, Any]:
    await migrate(dsn)
    setup = await asyncpg.connect(dsn)
    try:
        for sid in ("s-a", "s-b", "s-c"):
            await link_store.join(setup, GROUP, sid, principal=None, client=sid)
    finally:
        await setup.close()
    settings = load_settings(
        database_url=dsn, db_pool_min=1, db_pool_max=1, glm_api_key=None, kimi_api_key=None
    )
    db = Database(settings)
    tasks = TaskStore(db)
    pid = await db.run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
    with tempfile.TemporaryDirectory(prefix="bench-task-event-", dir=where) as tmp:
        spool = Spool(Path(tmp), max_bytes=1 << 30, hot_kinds=(KIND_LINK_EVENT,))
        await spool.open()
        if not fsync:
            spool._fsync_wal_sync = lambda: None  # type: ignore[method-assign]

        async def session(i: int) -> None:
            await tasks.create(session_id="s-a", name=f"s{i}")

        async def outbox(i: int) -> None:
            event = link_store.TaskEventWrite(group=GROUP, uuid=str(uuid.uuid4()), sender="s-a")
            task = await tasks.create(session_id=SCOPE, name=f"o{i}", event_id=event.uuid, group_event=event)
            assert event.written
            committed = spool.submit(
                KIND_LINK_EVENT, link_store.task_event_payload(event, task), urgent=True, sync="normal"
            )
            assert committed is not None

        async def direct(i: int) -> None:
            event_id, event_uuid = str(uuid.uuid4()), str(uuid.uuid4())
            await db.run(
                lambda conn: conn.fetchrow(
                    DIRECT_SQL, str(uuid.uuid4()), SCOPE, f"d{i}", event_id, GROUP, event_uuid, "s-a"
                ),
                what="the direct way",
            )

        async def spooled(i: int) -> None:
            event_id = str(uuid.uuid4())
            payload = {
                "uuid": str(uuid.uuid4()),
                "group": GROUP,
                "kind": "task",
                "sender": "s-a",
                "task_event": event_id,
                "created_at": time.time(),
            }
            committed = spool.submit(KIND_LINK_EVENT, payload, urgent=True, sync="normal")
            assert committed is not None
            await tasks.create(session_id=SCOPE, name=f"p{i}", event_id=event_id)
            await committed

        async def append(i: int) -> None:
            payload = {"uuid": str(uuid.uuid4()), "group": GROUP, "kind": "task", "created_at": time.time()}
            await spool.append(KIND_LINK_EVENT, payload, urgent=True, sync="normal")

        ways: dict[str, Callable[[int], Awaitable[None]]] = {
            "session": session,
            "outbox": outbox,
            "direct": direct,
            "spooled": spooled,
            "append": append,
        }
        ms: dict[str, list[float]] = {k: [] for k in ways}
        cpu: dict[str, float] = dict.fromkeys(ways, 0.0)
        pg_cpu: dict[str, float] = dict.fromkeys(ways, 0.0)
        try:
            for i in range(-20, calls):  # 20 rounds of warm-up (statements prepared, caches)
                for key, fn in list(ways.items())[:: 1 if i % 2 else -1]:
                    await asyncio.sleep(0.002)
                    c0, p0 = time.process_time(), backend_cpu(pid)
                    t0 = time.perf_counter()
                    await fn(i)
                    t1 = time.perf_counter()
                    if i >= 0:
                        ms[key].append((t1 - t0) * 1000)
                        cpu[key] += time.process_time() - c0
                        pg_cpu[key] += backend_cpu(pid) - p0
                if i % 200 == 199:  # keep the spool small, as the flusher would
                    await spool.ack(await spool.read_batch(100_000))
        finally:
            await spool.close()
            await db.close()
    return {
        "ms": ms,
        "cpu_ms": {k: v / calls * 1000 for k, v in cpu.items()},
        "pg_cpu_ms": {k: v / calls * 1000 for k, v in pg_cpu.items()},
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000, help="rounds of the ways")
    ap.add_argument("--no-fsync", action="store_true", help="no spool fsync after its commits")
    ap.add_argument("--dir", help="where the spool's file goes (default: the temporary folder)")
    args = ap.parse_args()
    admin_dsn = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_task_event_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        out = await run(admin_dsn.rsplit("/", 1)[0] + "/" + name, args.calls, not args.no_fsync, args.dir)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    ms = out["ms"]
    print(f"{'way':8} {'p50 ms':>8} {'- session, per-round median':>28} {'cpu ms/call':>12} {'pg cpu':>8}")
    for key, values in ms.items():
        diff = statistics.median(a - b for a, b in zip(values, ms["session"], strict=True))
        print(
            f"{key:8} {statistics.median(values):8.3f} {diff:+28.3f}"
            f" {out['cpu_ms'][key]:12.3f} {out['pg_cpu_ms'][key]:8.3f}"
        )
    print(f"load average at the end: {[round(x, 2) for x in os.getloadavg()]}")


if __name__ == "__main__":
    asyncio.run(main())
