"""The event loop the fleet's processes run on: uvloop's where it is installed, asyncio's otherwise.

uvloop's transports, timers and callbacks are C, which takes a large share off the CPU each
proxied call costs the router and each tool call costs an instance (both spend most of their
time in the loop's own machinery: socket reads and writes, callbacks, timers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's `new_event_loop` where it is installed, else None (asyncio's default loop)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or an install without it
        return None
    return uvloop.new_event_loop
