"""Stopping an instance without losing work: SIGTERM drains, then uvicorn shuts down.

On the first SIGTERM (or SIGINT) the instance turns "stopping" (the registry says so at once,
new tool calls get a ShuttingDown error), waits up to EXAI_DRAIN_TIMEOUT for in-flight calls,
closes its MCP sessions so open streams end, and only then lets uvicorn stop; the lifespan
then flushes the spool and deregisters. A repeated SIGTERM is the same request (stoppers
re-send it, see common/fleet/supervisor.py); a second SIGINT (Ctrl-C twice) stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from common import gcpauses, loopwatch
from instance.runtime import Runtime

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TICK_SECONDS = 1.0  # uvicorn's housekeeping tick (its own main loop ticks every 0.1 s)


class InstanceServer(uvicorn.Server):
    """uvicorn's server with a drain step in front of its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        self._exit_asked: asyncio.Event | None = None  # before uvicorn sets should_exit
        super().__init__(config)
        self.runtime = runtime
        self._drain_task: asyncio.Task[None] | None = None
        self._watch: loopwatch.LoopWatch | None = None

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._exit_asked is not None:
            self._exit_asked.set()

    async def main_loop(self) -> None:
        """uvicorn's main loop without its ten wake-ups a second: it ticks once a second (the
        Date header it stamps on answers has one-second precision) and at once when asked
        to stop. An idle instance otherwise woke ten times a second for nothing, each waking
        a CPU that a laptop or a shared VM would rather leave asleep."""
        self._exit_asked = asyncio.Event()
        if self._should_exit:
            self._exit_asked.set()
        while not await self.on_tick(0):  # 0: the Date header is refreshed on every tick
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_SECONDS):
                    await self._exit_asked.wait()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            # What startup made (the modules, the SDK's and the tools' pydantic models and
            # schemas: ~110,000 objects the collector tracks) lives as long as the process: a
            # full collection need not scan it again (one took 105-111 ms on the event loop on
            # the loaded test machine, and about nothing once frozen). The calls' own young
            # objects are collected as before. The tokenizers, loaded on a thread meanwhile,
            # are frozen once they are in (instance/app.py, `_preload_and_freeze`).
            gcpauses.freeze()
        # Watched once started: the lifespan's one-time work (imports, opening storage) is not a stall.
        if self.started and self._watch is None:
            settings = self.runtime.settings
            self._watch = loopwatch.start(
                settings.loop_stall_ms, name=self.runtime.identity.id, audit=settings.loop_audit
            )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._watch is not None:
            self._watch.stop()
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._drain_task is None:
            log.info("%s received: draining", signal.Signals(sig).name)
            self._drain_task = asyncio.create_task(self.drain(), name="drain")
        elif sig == signal.SIGTERM:
            log.info("SIGTERM again: still draining")
        else:
            log.warning("second %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True

    async def drain(self) -> None:
        rt = self.runtime
        rt.set_state("stopping")
        timeout = rt.settings.drain_timeout
        if not await rt.wait_idle(timeout):
            log.warning("%d call(s) still running after %.0fs; they will be cancelled", rt.inflight, timeout)
        else:
            log.info("no calls in flight")
        if rt.close_mcp_sessions is not None:
            with contextlib.suppress(Exception):
                await rt.close_mcp_sessions()
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so "port in use" is one clear line, not a traceback.

    The protocol must be given explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose
    proto is IPPROTO_TCP, and without it every small response waits ~40 ms for a delayed ACK.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    # Listen now, before the lifespan registers the instance as ready: a router connecting in
    # between waits in the backlog until uvicorn accepts, instead of being refused.
    sock.listen(socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock
