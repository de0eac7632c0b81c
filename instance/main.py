"""`exai-instance`: one EXAI instance process, serving one session on its loopback port."""

from __future__ import annotations

import asyncio
import os

import uvicorn

from common.entry import run_entry
from common.eventloop import loop_factory
from common.logs import setup_logging
from common.settings import load_settings
from instance.app import build_app
from instance.http_protocol import HeadHoldingProtocol
from instance.lifecycle import InstanceServer, bind_socket
from instance.runtime import resolve_identity

# uvicorn's own graceful shutdown runs after our drain, so only stragglers are left by then.
UVICORN_GRACE_SECONDS = 3


def _serve() -> int:
    settings = load_settings()
    if settings.instance_nice:
        # Before any thread starts (Linux keeps a niceness per thread; new threads inherit it).
        os.nice(settings.instance_nice)
    identity = resolve_identity(settings)
    setup_logging(settings.log_level, name=identity.id)
    app, runtime = build_app(settings, identity)
    sock = bind_socket(identity.host, identity.port)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        # Only the router calls an instance, and nothing here reads the client's address: no
        # X-Forwarded-* rewriting per request.
        proxy_headers=False,
        # A response's head leaves with its body's first bytes: one segment per JSON answer.
        http=HeadHoldingProtocol,
        lifespan="on",
        timeout_graceful_shutdown=UVICORN_GRACE_SECONDS,
        timeout_keep_alive=75,
    )
    server = InstanceServer(config, runtime)
    # uvloop (where installed): the SDK, the HTTP clients and the storage drivers all run on
    # the loop's transports and callbacks, which it does in C.
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(server.serve(sockets=[sock]))
    return 0 if server.started else 1


def main() -> int:
    return run_entry(_serve, prog="exai-instance")


if __name__ == "__main__":
    raise SystemExit(main())
