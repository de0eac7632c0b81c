"""Logging setup shared by the router and instances: one line per event, to stderr.

Under supervisord stderr is a pipe, and a write to a pipe blocks once it is full (64 KiB on
Linux) until supervisord reads it: a burst of warnings (Redis down, a client flood) or a
supervisord busy rotating its files would stall the event loop that logged them. So the loop
only puts each record on a queue, and one thread (`logging.handlers.QueueListener`) formats
and writes it. Formatting happens on that thread too: an exception's traceback reads its
source lines from disk (linecache), which must not happen on the loop either. The message's
arguments are merged in before the record is queued, so a mutable argument changed afterwards
cannot change what was logged.

At exit the listener writes what is still queued. A process killed with SIGKILL loses at
most the records of the last few milliseconds.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys

_listener: logging.handlers.QueueListener | None = None


class _Enqueue(logging.handlers.QueueHandler):
    """Queues a record with its message made final, its formatting left to the listener."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = logging.makeLogRecord(record.__dict__)  # the caller keeps its own record
        record.msg = record.getMessage()
        record.args = None
        return record


def setup_logging(level: str = "INFO", *, name: str = "exai") -> None:
    global _listener
    if _listener is not None:  # set up again (tests): one writer thread at a time
        _listener.stop()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "httpx2", "uvicorn.access", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _flush_at_exit() -> None:
    if _listener is not None:
        _listener.stop()  # writes every record still queued, then ends the thread


atexit.register(_flush_at_exit)
