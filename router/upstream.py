"""The router's HTTP client towards its instances: one bounded pool, stale connections dropped.

`calls` carries POST and DELETE requests and the router's own control requests (health,
reset, replayed initialize). At most CALLS_PER_INSTANCE connections per instance; an instance
serves one session, so this only bounds what one client can have in flight at once. No GET
stream goes to an instance: the router holds notification streams itself (router/streams.py).

The connector checks a pooled keep-alive connection before reusing it: when an instance
process dies (kill -9, OOM), the kernel closes its sockets at once, but the router's event
loop may not have read that EOF yet when the next request picks the idle connection. Writing
a request into such a connection fails in a way that looks exactly like "the instance died
while handling it" (ambiguous, so a tools/call could not be re-sent). A zero-timeout poll of
the socket sees the EOF that is already there; the connection is closed and the request goes
out on a fresh one (refused -> failover, or the restarted process -> session replay).
"""

from __future__ import annotations

import select
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.tracing import Trace

CALLS_PER_INSTANCE = 32
KEEPALIVE_TIMEOUT = 30.0


def peer_closed(proto: ResponseHandler) -> bool:
    """True if an idle pooled connection must not be reused: the peer closed it (EOF or reset
    waiting in the socket) or sent something unasked."""
    transport = proto.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    # An idle HTTP/1.1 connection has nothing to read; readable means EOF, RST or garbage.
    return bool(poller.poll(0))


class CheckedConnector(aiohttp.TCPConnector):
    """A TCPConnector that never hands out a pooled connection its peer has already closed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stale_dropped = 0

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> aiohttp.connector.Connection | None:
        while True:
            conn = await super()._get(key, traces)
            if conn is None or conn.protocol is None or not peer_closed(conn.protocol):
                return conn
            self.stale_dropped += 1
            conn.close()  # closes the transport and frees the slot; try the next pooled one


@dataclass
class Upstream:
    calls: aiohttp.ClientSession

    @classmethod
    def create(cls, max_instances: int) -> Upstream:
        connector = CheckedConnector(
            limit=CALLS_PER_INSTANCE * max_instances,
            limit_per_host=CALLS_PER_INSTANCE,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            ttl_dns_cache=None,
        )
        calls = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(None)
        )
        return cls(calls=calls)

    @property
    def stale_dropped(self) -> int:
        connector = self.calls.connector
        return connector.stale_dropped if isinstance(connector, CheckedConnector) else 0

    async def close(self) -> None:
        await self.calls.close()
