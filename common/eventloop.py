"""The event loop the fleet's processes run on: uvloop's where it is installed, asyncio's otherwise.

uvloop's transports, timers and callbacks are C, which takes a large share off the CPU each
proxied call costs the router and each tool call costs an instance (both spend most of their
time in the loop's own machinery: socket reads and writes, callbacks, timers).
"""

from __future__ import annotations

import asyncio

# The socket module encodes every host name it connects to with the "idna" codec, whose module
# Python imports at the first use: on the event loop, inside a process's first outgoing
# connection (an instance's first provider call, found by EXAI_LOOP_AUDIT), reading its files
# from disk. Imported here, at process start, by the router and the instances alike.
import encodings.idna  # noqa: F401
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's `new_event_loop` where it is installed, else None (asyncio's default loop)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or an install without it
        return None
    return uvloop.new_event_loop
