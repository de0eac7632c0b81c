"""A chat call's storage path alone, in one process: the reads, then the exchange appended.

    python tests/bench/bench_chat_storage.py [--iterations 500] [--per-thread 9] [--pause-ms 2]

What `chat` does around its provider call (instance/tools/chat.py), without the MCP server,
the router or a provider: the thread and the notes read at once (`history.load` and
`notes_block.load`, one Redis pipeline), then the question and the answer appended as one
exchange (`history.append_exchange`: the thread's position from Redis, then the spool commit
with the default EXAI_CHAT_SPOOL_SYNC). A thread takes `--per-thread` exchanges (a chat thread
holds 9 calls by default: 20 turns), then a new one is started with `start_thread`. Prints the
p50 / p90 of each stage and the process's CPU per iteration (the spool's threads included),
and saves them as JSON under tests/bench/results/.

To compare two builds, run this file from each tree alternately (each imports its own tree's
code), or with `PYTHONPATH=OTHER_TREE` for a tree without it. Uses EXAI_TEST_DATABASE_URL /
EXAI_TEST_REDIS_URL (defaults: the local servers) in a fresh database, dropped afterwards.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from common.eventloop import loop_factory
from common.migrate import migrate
from common.redis import create_redis
from common.settings import load_settings
from instance.context import notes_block
from instance.storage import Storage

RESULTS = Path(__file__).with_name("results")
USER = "Please review this function and say whether the error handling is right. " * 25
ANSWER = "The error handling misses the case where the connection drops mid-read. " * 15


def _exchange(i: int) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": f"{i}: {USER}", "session_id": "bench", "tool_name": "chat",
         "model": "glm-4.6", "files": [], "metadata": {}},
        {"role": "assistant", "content": f"{i}: {ANSWER}", "session_id": "bench", "tool_name": "chat",
         "model": "glm-4.6", "tokens_in": 900, "tokens_out": 300,
         "metadata": {"provider": "glm", "finish_reason": "stop"}},
    ]  # fmt: skip


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = os.environ.get("EXAI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("EXAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    dbname = f"exai_bench_{secrets.token_hex(4)}"
    prefix = f"exaibench{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    dsn = server.rsplit("/", 1)[0] + "/" + dbname
    reads: list[float] = []
    appends: list[float] = []
    cpu = 0.0
    try:
        await migrate(dsn)
        redis = create_redis(redis_url)
        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings(
                database_url=dsn, redis_url=redis_url, redis_prefix=prefix, state_dir=Path(tmp)
            )
            async with Storage.open(settings, instance_id="bench-chat-storage", redis=redis) as st:
                cid = ""
                n = 0
                for i in range(args.iterations + args.warmup):
                    await asyncio.sleep(args.pause_ms / 1000)  # calls arrive spaced out
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    if n == 0:
                        cid, _ = await st.history.start_thread(
                            _exchange(i), session_id="bench", tool_name="chat", model="glm-4.6"
                        )
                        n = 1
                        continue
                    await asyncio.gather(
                        st.history.load(cid),
                        notes_block.load(st.notes, thread_id=cid, session_id="bench"),
                    )
                    t1 = time.perf_counter()
                    await st.history.append_exchange(cid, _exchange(i))
                    t2 = time.perf_counter()
                    c1 = time.process_time()
                    n = 0 if n + 1 >= args.per_thread else n + 1
                    if i >= args.warmup:
                        reads.append((t1 - t0) * 1000)
                        appends.append((t2 - t1) * 1000)
                        cpu += c1 - c0
                line_total = getattr(st.cache, "line_commands_total", 0)
                batched_total = st.cache.batched_total
        await redis.aclose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        client = create_redis(redis_url)
        async for key in client.scan_iter(match=f"{prefix}:*"):
            await client.delete(key)
        await client.aclose()
    return {
        "reads_p50_ms": statistics.median(reads),
        "reads_p90_ms": _pct(reads, 0.9),
        "append_p50_ms": statistics.median(appends),
        "append_p90_ms": _pct(appends, 0.9),
        "samples": len(appends),
        "cpu_per_iteration_ms": cpu * 1000 / max(1, len(appends)),
        "redis_line_commands": line_total,
        "redis_batched_commands": batched_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--per-thread", type=int, default=9, help="exchanges per thread, then a new one")
    ap.add_argument("--pause-ms", type=float, default=2.0)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        r = runner.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"chat-storage-{stamp}{'-' + args.label if args.label else ''}.json"
    out.write_text(
        json.dumps({"when": stamp, "label": args.label, "load": os.getloadavg(), **r}, indent=2) + "\n"
    )
    print(
        f"{args.label or 'run'}: reads p50 {r['reads_p50_ms']:.3f} p90 {r['reads_p90_ms']:.3f} ms;"
        f" append_exchange p50 {r['append_p50_ms']:.3f} p90 {r['append_p90_ms']:.3f} ms;"
        f" CPU/iteration {r['cpu_per_iteration_ms']:.3f} ms ({r['samples']} samples;"
        f" Redis commands on the direct line {r['redis_line_commands']},"
        f" pipelined {r['redis_batched_commands']})"
    )


if __name__ == "__main__":
    main()
