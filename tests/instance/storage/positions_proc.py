"""A chat writer driven line by line on stdin, for the test that kills it with turns spooled
before their position came back (tests/instance/storage/test_history_positions.py).

    python positions_proc.py DSN REDIS_URL REDIS_PREFIX STATE_DIR INSTANCE_ID

Commands: `start Q A` (a new thread with that exchange), `append Q A` (an exchange on it). Each
prints one JSON line once the call returned: the thread, the turns' ids, their positions as the
call returned them (null: the position had not come back from Redis yet).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from common.settings import load_settings
from instance.storage import Storage


async def main(dsn: str, redis_url: str, prefix: str, state_dir: str, instance_id: str) -> None:
    settings = load_settings(
        database_url=dsn,
        redis_url=redis_url,
        redis_prefix=prefix,
        state_dir=Path(state_dir),
        flush_interval_ms=20,
        fsync_window_ms=1.0,
        db_acquire_timeout=1.0,
    )
    async with Storage.open(settings, instance_id=instance_id) as st:
        line = st.cache.line
        for _ in range(500):  # appends take the direct line, as in a chat
            if line is None or line.up:
                break
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"ready": True}), flush=True)
        cid = ""
        while raw := await reader.readline():
            command, q, a = raw.decode().split()
            turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if command == "start":
                cid, messages = await st.history.start_thread(
                    turns, session_id="s", tool_name="chat", model=None
                )
            else:
                messages = await st.history.append_exchange(cid, turns)
            print(
                json.dumps({"cid": cid, "ids": [m.id for m in messages], "pos": [m.pos for m in messages]}),
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
