"""`exai-router`: serve the router on EXAI_ROUTER_HOST:EXAI_ROUTER_PORT until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from common import gcpauses, loopwatch
from common.entry import run_entry
from common.eventloop import loop_factory
from common.logs import setup_logging
from common.settings import Settings, load_settings
from router.app import create_app
from router.security import check_bind
from router.server import RouterRunner

log = logging.getLogger("router")


async def serve(settings: Settings) -> None:
    check_bind(settings)
    app = create_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream connection, which cancels the call on the instance.
    # keepalive_timeout also bounds a connection that never finishes its request headers: aiohttp
    # closes a connection that has no complete request this long after it opened or last answered.
    runner = RouterRunner(
        app,
        fast_path=settings.router_fast_path,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=5.0,
        keepalive_timeout=settings.header_timeout,
    )
    await runner.setup()
    try:
        # Several router processes share the port (EXAI_ROUTER_PROCESSES) with SO_REUSEPORT.
        site = web.TCPSite(
            runner,
            settings.router_host,
            settings.router_port,
            backlog=1024,
            reuse_address=True,
            reuse_port=settings.router_processes > 1 or None,
        )
        await site.start()
        # What startup made lives as long as the process: the collector need not scan it again
        # on every full collection (a cost the proxied calls' allocations otherwise trigger).
        gcpauses.freeze()
        gcpauses.install()
        log.info("router listening on http://%s:%s/mcp", settings.router_host, settings.router_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Watched from here on: startup's one-time work (imports, config) is not a stall.
        with loopwatch.watching(settings.loop_stall_ms, name="router", audit=settings.loop_audit):
            await stop.wait()
        log.info("router stopping")
    finally:
        await runner.cleanup()


def _main() -> int:
    settings = load_settings()
    setup_logging(settings.log_level, name="router")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(settings))
    return 0


def main() -> int:
    return run_entry(_main, prog="exai-router")


if __name__ == "__main__":
    raise SystemExit(main())
