"""Progress notifications for calls that take more than a few seconds.

Clients that sent a progress token see a heartbeat while the provider works (elapsed seconds
and characters received so far); for quick calls nothing is sent. A client that went away
must not fail the call, so send errors are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mcp.server.mcpserver import Context

FIRST_AFTER = 2.0
EVERY = 2.0


@dataclass
class Progress:
    """What the call has done so far, updated by the caller, reported by the heartbeat."""

    label: str
    chars: int = 0

    def on_delta(self, text: str) -> None:
        self.chars += len(text)


@contextlib.asynccontextmanager
async def progress_heartbeat(
    ctx: Context, label: str, *, first_after: float = FIRST_AFTER, every: float = EVERY
) -> AsyncIterator[Progress]:
    state = Progress(label)
    started = time.monotonic()

    async def beat() -> None:
        while True:
            elapsed = time.monotonic() - started
            message = f"{state.label}: {elapsed:.0f}s, {state.chars} characters received"
            with contextlib.suppress(Exception):
                await ctx.report_progress(round(elapsed, 1), None, message)
            await asyncio.sleep(every)

    # Most calls end before the first beat: a timer until then costs far less than a task
    # (no task to start, and none to cancel and wait for at the end).
    tasks: list[asyncio.Task[None]] = []

    def first() -> None:
        tasks.append(asyncio.create_task(beat(), name="progress"))

    timer = asyncio.get_running_loop().call_later(first_after, first)
    try:
        yield state
    finally:
        timer.cancel()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
