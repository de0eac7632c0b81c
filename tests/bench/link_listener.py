"""B's SDK client for bench_links.py, in a process of its own.

    python tests/bench/link_listener.py MCP_URL GROUP NAME

Opens a real `mcp` SDK client (handshake era, as the bench's other clients) through the router,
joins GROUP, reads its inbox, then prints `ready <session id>`; from then on one line per
`notifications/resources/updated` for the group's inbox: the wall-clock moment (time.time())
its message handler ran. It reads nothing else of the stream and exits when stdin closes.

So B's parsing of a notification never waits for the bench process (where A's client is parsing
its own answer at about the same moment), and the bench's timing of B is taken here, in B.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import mcp_types

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import links as db  # noqa: E402
from tests.router.conftest import call, mcp_client  # noqa: E402


async def main(url: str, group: str, name: str) -> None:
    inbox = db.inbox_uri(group)
    out = sys.stdout

    async def on_message(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification) and str(message.params.uri) == inbox:
            out.write(f"{time.time()!r}\n")
            out.flush()

    async with mcp_client(url, "legacy", name=name, message_handler=on_message) as client:
        sid = (await call(client, "status"))["session"]
        await call(client, "link_join", {"group": group})
        while (await call(client, "link_inbox", {"group": group, "limit": 1000}))["more"]:
            pass
        out.write(f"ready {sid}\n")
        out.flush()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes stdin


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
