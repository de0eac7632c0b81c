"""Work that a request causes but its answer does not need: done once the answer is written.

A session's first call binds the instance (instance/runtime.py), which wakes the registry
heartbeat (a Redis write of the instance's entry) and records the session in the spool; every
call records its telemetry there too. None of that is part of the answer, yet done at once it
runs in the middle of the request on the instance's one event loop (the SDK yields to the loop
several times between reading a call and writing its answer) and the client waits for it.

The instance's outermost middleware opens an `AfterAnswer` for each `POST /mcp` and runs what
was put off as soon as the answer's last byte is written, or when the request ends any other
way (an error, the client gone). A long call (a chat) does not hold the work back for its
whole duration: it runs LATEST seconds after it was put off at the latest. Outside a request
(a reset, a drain, the lifespan) `after_answer` runs the work at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextvars import ContextVar

log = logging.getLogger(__name__)

LATEST = 0.05  # seconds: put-off work of a call still running by then is done anyway


class AfterAnswer:
    """What one request put off until its answer is written (see the module's doc)."""

    __slots__ = ("_timer", "done", "work")

    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []
        self.done = False
        self._timer: asyncio.TimerHandle | None = None

    def add(self, fn: Callable[[], None]) -> None:
        if self.done:
            _run_one(fn)
            return
        if fn not in self.work:  # the same hook twice (a binding, then its fence) runs once
            self.work.append(fn)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LATEST, self.run)

    def run(self) -> None:
        """Do the work put off so far, and from now on any that comes, at once."""
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        work, self.work = self.work, []
        for fn in work:
            _run_one(fn)


def _run_one(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # one failing hook must not keep the others (or the answer) from going
        log.exception("work put off until after an answer failed")


current_answer: ContextVar[AfterAnswer | None] = ContextVar("exai_after_answer", default=None)
"""The request being served (set by the instance's outermost middleware for `POST /mcp`; the
SDK runs the tool in tasks started inside that request, which inherit it)."""


def after_answer(fn: Callable[[], None]) -> bool:
    """Run `fn` once the current request's answer is written (at once outside a request, or when
    it is written already); True if it was put off. `fn` must not block: it starts background
    work (a task, an event), it does not do it."""
    return after_answer_of(current_answer.get(), fn)


def after_answer_of(pending: AfterAnswer | None, fn: Callable[[], None]) -> bool:
    """`after_answer` for the request whose `current_answer` was taken earlier (by a callback
    that runs outside the request's context, e.g. on a Redis reply)."""
    if pending is None or pending.done:
        _run_one(fn)
        return False
    pending.add(fn)
    return True
