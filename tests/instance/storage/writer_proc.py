"""A process that appends to a thread under load and prints each acknowledged message id.

The kill -9 test runs this, SIGKILLs it mid-stream, and checks that every id printed here
(every append that returned to its caller) is in Postgres exactly once after a restart.

    python writer_proc.py DSN STATE_DIR INSTANCE_ID [CHAT_SPOOL_SYNC]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from common.settings import load_settings
from instance.storage import Storage

WRITERS = 8


async def main(dsn: str, state_dir: str, instance_id: str, sync: str = "full") -> None:
    settings = load_settings(
        database_url=dsn,
        redis_url=None,
        state_dir=Path(state_dir),
        flush_interval_ms=200,  # keep rows pending so the kill lands with a backlog
        flush_batch_size=200,
        fsync_window_ms=1.0,
        chat_spool_sync=sync,
    )
    async with Storage.open(settings, instance_id=instance_id, redis=None) as st:
        cid = await st.history.new_thread(session_id="kill", tool_name="chat", model=None)
        print(f"THREAD {cid}", flush=True)

        async def writer(w: int) -> None:
            i = 0
            while True:
                msg = await st.history.append(cid, "user", f"writer {w} message {i}")
                sys.stdout.write(f"ACK {msg.id}\n")
                sys.stdout.flush()
                i += 1

        await asyncio.gather(*(writer(w) for w in range(WRITERS)))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
