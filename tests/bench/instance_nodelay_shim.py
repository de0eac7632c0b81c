"""Run `exai-instance` with TCP_NODELAY on its accepted connections (bench workaround).

instance.lifecycle.bind_socket creates its listening socket without proto=IPPROTO_TCP, and
asyncio only disables Nagle on sockets whose proto is IPPROTO_TCP; uvicorn writes headers and
body separately, so every small response then waits ~40 ms for a delayed ACK. This shim binds
the same way with the protocol named, so the bench can show the router's own overhead until
the instance is fixed. `bench_router.py --nodelay-shim` uses it.
"""

from __future__ import annotations

import socket
import sys

import instance.main as instance_main


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    instance_main.bind_socket = bind_socket  # type: ignore[attr-defined]
    sys.exit(instance_main.main())
