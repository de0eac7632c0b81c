"""The flusher's own CPU: chat calls' rows moved from the spool to Postgres, nothing else running.

    python tests/bench/bench_flush.py [--calls 600] [--batch 3] [--rounds 5] [--content-chars 1500]

Spools what `--calls` chat calls spool (each: its exchange, a question and an answer, through
`history.append_exchange`, and the call's `tool_calls` row through `record_tool_call`) with the
flusher stopped, then starts it and times the drain: the process's CPU (every thread: the event
loop's encoding and asyncpg, the spool's thread reading and deleting rows) and the loop thread's
alone, per chat call. `--batch` rows per batch: 3 is one call's rows, as the flusher takes them
at one session (a batch a call); a larger one is a backlog's. Repeated `--rounds` times in a
fresh spool; prints each round and the median.

To compare two builds, run this file from each tree alternately with `PYTHONPATH=THAT_TREE`
(each imports its own tree's code). Uses EXAI_TEST_DATABASE_URL (default: the local server) in
a fresh database, dropped afterwards. Saves JSON under tests/bench/results/.
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
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from common.eventloop import loop_factory
from common.migrate import migrate
from common.settings import load_settings
from instance.storage import Storage

RESULTS = Path(__file__).with_name("results")


def _exchange(i: int, chars: int) -> list[dict[str, Any]]:
    text = ("Please review this function and say whether the error handling is right. ü " * 40)[:chars]
    return [
        {"role": "user", "content": f"{i}: {text}", "session_id": "bench", "tool_name": "chat",
         "model": "glm-4.6", "files": ["src/a.py"], "metadata": {}},
        {"role": "assistant", "content": f"{i}: {text[::-1]}", "session_id": "bench", "tool_name": "chat",
         "model": "glm-4.6", "tokens_in": 900, "tokens_out": 300,
         "metadata": {"provider": "glm", "finish_reason": "stop", "usage": {"in": 900, "out": 300}}},
    ]  # fmt: skip


async def _round(dsn: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            database_url=dsn,
            state_dir=Path(tmp),
            history_cache_turns=0,
            flush_batch_size=args.batch,
        )
        async with Storage.open(settings, instance_id="bench-flush", redis=None) as st:
            await st.flusher.stop()
            cid = await st.history.new_thread(session_id="bench", tool_name="chat", model="glm-4.6")
            for i in range(args.calls):
                await st.history.append_exchange(cid, _exchange(i, args.content_chars))
                await st.record_tool_call(
                    session_id="bench", instance_id=None, tool_name="chat", status="ok", duration_ms=55.5
                )
            rows = st.spool.rows
            loop_thread = threading.get_ident()
            assert loop_thread == threading.main_thread().ident
            c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
            st.flusher.start()
            if not await st.flush(600):
                raise RuntimeError("the flusher did not drain the spool in 600 s")
            c1, t1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
            if st.backlog()["dead_rows"]:
                raise RuntimeError("rows were refused by Postgres")
    return {
        "rows": rows,
        "cpu_per_call_ms": (c1 - c0) * 1000 / args.calls,
        "loop_cpu_per_call_ms": (t1 - t0) * 1000 / args.calls,
        "wall_per_call_ms": (w1 - w0) * 1000 / args.calls,
    }


async def run(args: argparse.Namespace) -> list[dict[str, float]]:
    server = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    dbname = f"exai_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    dsn = server.rsplit("/", 1)[0] + "/" + dbname
    try:
        await migrate(dsn)
        return [await _round(dsn, args) for _ in range(args.rounds)]
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=600)
    ap.add_argument("--batch", type=int, default=3, help="rows per batch (flush_batch_size)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--content-chars", type=int, default=1500, help="characters per turn")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        rounds = runner.run(run(args))
    for r in rounds:
        print(
            f"  {r['rows']:.0f} rows: cpu/call {r['cpu_per_call_ms']:.3f} ms, loop thread"
            f" {r['loop_cpu_per_call_ms']:.3f} ms, wall {r['wall_per_call_ms']:.3f} ms"
        )
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "rows"}
    print(
        f"median of {len(rounds)} (batch {args.batch}, {args.content_chars} chars a turn): cpu/call"
        f" {summary['cpu_per_call_ms']:.3f} ms, loop thread {summary['loop_cpu_per_call_ms']:.3f} ms,"
        f" wall {summary['wall_per_call_ms']:.3f} ms"
    )
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"flush-{stamp}{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rounds, "median": summary}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
